"""End to end: delivery channels through the CLI, against the real notifier.

A webhook channel points at a small aiohttp receiver in this test, which checks
the Standard Webhooks signature with the secret the CLI showed once. An email
channel points at a local SMTP server (aiosmtpd): this module's notifier sends
through it (``INTERLUDE_SMTP_*``), so the code is read from the verification
email and the alert email is seen arriving.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiosmtpd.controller import Controller

from tests.conftest import TestEnv
from tests.e2e.helpers import Cli, Person, Stack, _free_port, enroll_pair, poll, run_stack
from tests.support.threaded import serve_in_thread

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SMTP_FROM = "Interlude <alerts@interlude.test>"
SECRET_LINE = re.compile(r"^\s+(whsec_\S+)$", re.MULTILINE)


# -- a local SMTP server, and the services that send through it ---------------------------

@dataclass
class Mailbox:
    port: int = 0
    messages: list[tuple[list[str], EmailMessage]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append((list(envelope.rcpt_tos), message))
        return "250 OK"

    def to(self, address: str) -> list[EmailMessage]:
        return [m for rcpts, m in list(self.messages) if address in rcpts]


@pytest.fixture(scope="module")
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox(port=_free_port())
    controller = Controller(box, hostname="127.0.0.1", port=box.port)
    controller.start()
    try:
        yield box
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def stack(test_env: TestEnv, tmp_path_factory: pytest.TempPathFactory,
          mailbox: Mailbox) -> Iterator[Stack]:
    """This module's services; the notifier mails through ``mailbox`` (plain SMTP)."""
    services = run_stack(test_env, tmp_path_factory.mktemp("services"))
    with pytest.MonkeyPatch.context() as env:
        # run_stack starts the processes with os.environ underneath the test settings.
        env.setenv("INTERLUDE_SMTP_HOST", "127.0.0.1")
        env.setenv("INTERLUDE_SMTP_PORT", str(mailbox.port))
        env.setenv("INTERLUDE_SMTP_SECURITY", "none")
        env.setenv("INTERLUDE_SMTP_FROM", SMTP_FROM)
        started = next(services)
    yield started
    next(services, None)  # stop them (and fail if they do not stop cleanly)


# -- a webhook receiver -------------------------------------------------------------------

@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    url: str = ""
    requests: list[Received] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """``/hook`` answers 204, ``/broken`` 500; both record what they got."""
    got = Receiver()

    async def record(request: web.Request) -> web.Response:
        got.requests.append(Received(request.path, dict(request.headers), await request.read()))
        return web.Response(status=204 if request.path == "/hook" else 500)

    app = web.Application()
    app.router.add_post("/hook", record)
    app.router.add_post("/broken", record)
    with serve_in_thread(app) as url:
        got.url = url
        yield got


def standard_webhooks_valid(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The receiver's side of Standard Webhooks, written from the specification."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(sig.partition(",")[2], expected)
               for sig in headers["webhook-signature"].split())


def _channels(cli: Cli, person: Person) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cli.json(person, "channels", "list")
    return items


# -- tests ------------------------------------------------------------------------------------

def test_webhook_channel_gets_signed_posts(stack: Stack, tmp_path: Path,
                                           receiver: Receiver) -> None:
    cli = Cli(stack)
    therapist, client = enroll_pair(cli, tmp_path)

    added = cli.run(therapist, "channels", "add", "webhook", f"{receiver.url}/hook",
                    "--kinds", "checkin.received").stdout
    assert "store it now; it will not be shown again" in added
    secrets = SECRET_LINE.findall(added)
    assert len(secrets) == 1, added
    secret = secrets[0]
    broken = cli.run(therapist, "channels", "add", "webhook", f"{receiver.url}/broken").stdout
    assert SECRET_LINE.findall(broken) != [secret]

    listed = cli.run(therapist, "channels", "list").stdout
    assert f"webhook  {receiver.url}/hook  [signed webhook]  kinds: checkin.received" in listed
    assert secret not in listed
    hook = next(c for c in _channels(cli, therapist) if c["url"] == f"{receiver.url}/hook")

    sent = cli.json(client, "send", "nobody else should read this")
    got = poll("a POST to /hook", lambda: [r for r in receiver.requests if r.path == "/hook"],
               lambda posts: len(posts) >= 1)
    assert len(got) == 1
    post = got[0]
    assert standard_webhooks_valid(secret, post.headers, post.body)
    payload = json.loads(post.body)
    assert payload["type"] == "notification.created"
    assert payload["data"]["kind"] == "checkin.received"
    assert b"nobody else" not in post.body
    assert sent["id"] not in post.body.decode()  # ids of the notification only, no message

    failed = poll("the failed delivery to /broken",
                  lambda: cli.run(therapist, "channels", "deliveries", "--failed").stdout,
                  lambda out: "/broken" in out)
    assert "last error: HTTP 500" in failed
    deliveries = cli.json(therapist, "channels", "deliveries", "--state", "sent")
    assert [d["channel_id"] for d in deliveries] == [hook["id"]]

    rotated = cli.run(therapist, "channels", "rotate-secret", hook["id"]).stdout
    new_secret = SECRET_LINE.findall(rotated)
    assert len(new_secret) == 1
    assert new_secret != [secret]

    cli.run(therapist, "channels", "remove", hook["id"])
    assert [c["url"] for c in _channels(cli, therapist)] == [f"{receiver.url}/broken"]
    gone = cli.run(therapist, "channels", "remove", hook["id"], ok=False)
    assert gone.returncode == 2
    assert "no channel" in gone.stderr


def test_email_channel_is_verified_with_the_mailed_code(stack: Stack, tmp_path: Path,
                                                        mailbox: Mailbox) -> None:
    cli = Cli(stack)
    therapist, client = enroll_pair(cli, tmp_path)
    address = f"alerts-{therapist.email}"

    out = cli.run(therapist, "channels", "add", "email", address).stdout
    assert f"a verification code was sent to {address}" in out
    mail = poll("the verification email", lambda: mailbox.to(address), lambda m: len(m) == 1)
    text = mail[0].get_content()
    code = re.search(r"\b(\d{6})\b", text)
    assert code is not None, text
    wrong = cli.run(therapist, "channels", "verify",
                    "000001" if code[1] == "000000" else "000000", ok=False)
    assert wrong.returncode == 1
    assert "wrong code" in wrong.stderr
    verified = cli.run(therapist, "channels", "verify", code[1]).stdout
    assert verified.startswith(f"{address} is verified")
    assert [c["verified"] for c in _channels(cli, therapist)] == [True]

    cli.run(client, "send", "a private worry")
    alerts = poll("the alert email", lambda: mailbox.to(address), lambda m: len(m) == 2)
    alert = alerts[1].get_content()
    assert "a private worry" not in alert
    assert client.name not in alert  # an alert names nobody
