"""End to end: the real services as processes, the real CLI as subprocesses.

A therapist and a client enroll, exchange one encrypted check-in and one reply,
and see each other's notifications. Then we look where the server could have
leaked the text: every table (pg_dump), every service log, every broker message.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest

from shared.amqp import EVENTS_EXCHANGE
from tests.conftest import TestEnv
from tests.e2e.helpers import CALL_TIMEOUT, Cli, Person, Stack, create_therapist, poll

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


async def _declare_spy(amqp_url: str, queue_name: str) -> None:
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(EVENTS_EXCHANGE, ensure=True)
        queue = await channel.declare_queue(queue_name, durable=False, auto_delete=False)
        await queue.bind(exchange, routing_key="#")


async def _drain_spy(amqp_url: str, queue_name: str) -> list[bytes]:
    bodies: list[bytes] = []
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name, ensure=True)
        while (message := await queue.get(no_ack=True, fail=False, timeout=5)) is not None:
            bodies.append(message.body)
    return bodies


async def _delete_spy(amqp_url: str, queue_name: str) -> None:
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue_name)


@pytest.fixture
def spy_queue(test_env: TestEnv, stack: Stack, request: pytest.FixtureRequest) -> Iterator[str]:
    """A queue that sees every event (bound to '#'), declared before anything is sent."""
    name = f"e2e-spy-{request.node.name}-{uuid.uuid4().hex[:8]}"
    asyncio.run(_declare_spy(test_env.amqp_url, name))
    try:
        yield name
    finally:
        asyncio.run(_delete_spy(test_env.amqp_url, name))


def test_checkin_and_reply_end_to_end(stack: Stack, spy_queue: str, test_env: TestEnv,
                                      tmp_path: Path) -> None:
    run_id = uuid.uuid4().hex[:10]
    canary = f"canary-{uuid.uuid4().hex} I could not sleep before the exam"
    reply_text = f"reply-{uuid.uuid4().hex} let us talk about it on Tuesday"
    therapist = Person(tmp_path / "therapist", f"dr-{run_id}@example.org", "Dr Ada Byron",
                       f"therapist-pw-{uuid.uuid4().hex}", f"therapist-pp-{uuid.uuid4().hex}")
    client = Person(tmp_path / "client", f"client-{run_id}@example.org", "Sam Client",
                    f"client-pw-{uuid.uuid4().hex}", f"client-pp-{uuid.uuid4().hex}")
    cli = Cli(stack)
    secrets = [canary, reply_text]

    code = create_therapist(stack, therapist.email, therapist.name)
    cli.run(therapist, "enroll", "--code", code, "--email", therapist.email,
            "--name", therapist.name)
    invite_code = cli.run(therapist, "invite").stdout.strip().splitlines()[-1]
    cli.run(client, "enroll", "--code", invite_code, "--email", client.email,
            "--name", client.name)

    sent = cli.run(client, "send", canary)
    assert canary not in sent.stdout + sent.stderr

    notes = poll("the therapist's check-in notification",
                  lambda: cli.json(therapist, "notifications"),
                  lambda items: any(n["kind"] == "checkin.received" for n in items))
    checkin_note = next(n for n in notes if n["kind"] == "checkin.received")
    assert checkin_note["actor_name"] == client.name

    inbox = cli.json(therapist, "inbox")
    assert [m.get("text") for m in inbox] == [canary], inbox
    assert inbox[0]["kind"] == "checkin"
    assert inbox[0]["from"] == client.email
    assert inbox[0]["from_name"] == client.name
    assert inbox[0]["urgent"] is False
    assert inbox[0]["id"] == checkin_note["message_id"]

    cli.run(therapist, "reply", "--to", client.email, reply_text)

    client_inbox = cli.json(client, "inbox")
    assert [(m["kind"], m.get("text")) for m in client_inbox] == [
        ("checkin", canary), ("reply", reply_text)], client_inbox
    assert client_inbox[1]["from"] == therapist.email
    poll("the client's reply notification", lambda: cli.json(client, "notifications"),
          lambda items: any(n["kind"] == "reply.received" for n in items))

    # Both sides see the same safety number.
    def number(person: Person) -> str:
        lines = cli.run(person, "fingerprint").stdout.splitlines()
        return next(line.strip() for line in lines if line.strip()[:5].isdigit())

    assert number(therapist) == number(client)

    # Wrong passphrase: one clear line, exit 2, no traceback.
    wrong = cli.run(Person(therapist.home, therapist.email, therapist.name, therapist.password,
                           "not-the-passphrase"), "whoami", ok=False)
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == (
        f"interlude-client: wrong passphrase for keystore {therapist.home / 'keystore.json'}")

    # The client signs in on a second device: the therapist is warned and refuses to
    # reply until they trust the new keys.
    laptop = Person(tmp_path / "client-laptop", client.email, client.name, client.password,
                    f"laptop-pp-{uuid.uuid4().hex}")
    cli.run(laptop, "login", "--email", client.email)
    refused = cli.run(therapist, "reply", "--to", client.email, "not sent", ok=False)
    assert refused.returncode == 3, refused.stderr
    assert f"WARNING: the keys of {client.email} have changed" in refused.stderr
    assert f"interlude-client trust {client.email}" in refused.stderr
    cli.run(therapist, "trust", client.email)
    second_reply = f"second-{uuid.uuid4().hex}"
    cli.run(therapist, "reply", "--to", client.email, second_reply)
    secrets.append(second_reply)
    laptop_inbox = cli.json(laptop, "inbox")
    assert [m.get("text") for m in laptop_inbox] == [None, None, second_reply], laptop_inbox
    assert all("error" in m for m in laptop_inbox[:2])
    # The first device notices a new device on its own account too.
    own = cli.run(client, "send", "not sent either", ok=False)
    assert own.returncode == 3, own.stderr
    cli.run(client, "trust", client.email)
    assert [m.get("text") for m in cli.json(client, "inbox")][-1] == second_reply

    # --- what the server knows ---------------------------------------------------
    dump_path = tmp_path / "db.sql"
    subprocess.run(["pg_dump", "--dbname", test_env.database_url, "--file", str(dump_path)],
                   check=True, timeout=CALL_TIMEOUT, capture_output=True)
    dump = dump_path.read_bytes()
    assert len(dump) > 1000
    for secret in secrets:
        assert secret.encode() not in dump, "plaintext found in the database"

    bodies = asyncio.run(_drain_spy(test_env.amqp_url, spy_queue))
    assert bodies, "the spy queue saw no events at all"
    for body in bodies:
        for secret in secrets:
            assert secret.encode() not in body, "plaintext found in a broker message"

    for log in stack.logs:
        text = log.read_bytes()
        for secret in [*secrets, therapist.password, therapist.passphrase, client.password,
                       client.passphrase]:
            assert secret.encode() not in text, f"a secret appears in {log.name}"
