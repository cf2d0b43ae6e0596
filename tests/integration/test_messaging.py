"""Relationships, keys, check-ins and replies through the real services."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from datetime import datetime

import aio_pika
import pytest

from client.crypto import DeviceKeys, open_envelope
from services.messaging.typedefs import POOL, RELAY
from shared.amqp import EVENTS_EXCHANGE
from shared.envelope import parse_envelope
from tests.conftest import TestEnv
from tests.integration.conftest import new_pair
from tests.support.stack import Stack, eventually

pytestmark = pytest.mark.integration


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


async def test_checkin_and_reply_round_trip(stack: Stack) -> None:
    therapist, client, rid = await new_pair(stack)
    status, stored = await stack.post(client, rid, await stack.envelope(client, rid, "hello"))
    assert status == 201
    assert stored["kind"] == "checkin"
    status, _ = await stack.post(therapist, rid, await stack.envelope(therapist, rid, "hi back"))
    assert status == 201
    status, page = await stack.call("GET", f"/v1/relationships/{rid}/messages", therapist)
    assert status == 200
    assert [m["kind"] for m in page["items"]] == ["checkin", "reply"]
    texts = []
    for item in page["items"]:
        env = parse_envelope(base64.b64decode(item["envelope"]))
        sender = client if item["kind"] == "checkin" else therapist
        for reader in (therapist, client):  # both people, and the sender's own history
            texts.append(open_envelope(env, user_id=reader.user_id, device_id=reader.device_id,
                                       keys=reader.keys,
                                       sender_signing_public_key=sender.keys.signing_public_key))
    assert texts == ["hello", "hello", "hi back", "hi back"]


async def test_server_refuses_what_it_cannot_vouch_for(stack: Stack) -> None:
    therapist, client, rid = await new_pair(stack)
    good = await stack.envelope(client, rid, "a check-in")
    # A tampered byte of the ciphertext breaks the signature.
    status, data = await stack.post(client, rid, flip(good, len(good) - 100))
    assert status == 422
    assert data["error"]["code"] == "bad_signature"
    # A tampered sender id no longer names the caller.
    status, data = await stack.post(client, rid, flip(good, 40))
    assert status == 422
    assert data["error"]["code"] == "invalid_envelope"
    # Garbage is not an envelope.
    status, data = await stack.post(client, rid, b"garbage" * 10)
    assert status == 422
    assert data["error"]["code"] == "invalid_envelope"
    status, data = await stack.call("POST", f"/v1/relationships/{rid}/messages", client,
                                    json={"envelope": "***"})
    assert status == 422
    assert data["error"]["field"] == "envelope"
    # A therapist cannot send a check-in, nor a client someone else's envelope.
    status, data = await stack.post(therapist, rid, good)
    assert status == 422
    assert data["error"]["code"] == "wrong_kind"
    # A client's new device that no one has wrapped for: stale keys.
    old_keys, old_device = client.keys, client.device_id
    client.keys, client.device_id = DeviceKeys.generate(), uuid.uuid4()
    await stack.publish_keys(client)
    client.keys, client.device_id = old_keys, old_device
    status, data = await stack.post(client, rid, good)
    assert status == 409
    assert data["error"]["code"] == "stale_keys"
    # Nothing was stored.
    status, page = await stack.call("GET", f"/v1/relationships/{rid}/messages", therapist)
    assert page["items"] == []


async def test_each_side_sees_only_its_own_relationships(stack: Stack) -> None:
    therapist, client, rid = await new_pair(stack)
    other_therapist, other_client, other_rid = await new_pair(stack)
    for who in (other_therapist, other_client):
        for path in (f"/v1/relationships/{rid}", f"/v1/relationships/{rid}/messages",
                     f"/v1/relationships/{rid}/devices"):
            status, _ = await stack.call("GET", path, who)
            assert status == 404, path
    status, _ = await stack.post(client, other_rid,
                                    await stack.envelope(other_client, other_rid, "x"))
    assert status == 404
    status, rels = await stack.call("GET", "/v1/relationships", therapist)
    assert [r["id"] for r in rels["items"]] == [str(rid)]
    status, _data = await stack.call("GET", "/v1/relationships/not-a-uuid", therapist)
    assert status == 404


async def test_idempotency_key_makes_retries_safe(stack: Stack) -> None:
    _, client, rid = await new_pair(stack)
    envelope = await stack.envelope(client, rid, "once")
    first = await stack.post(client, rid, envelope, idempotency_key="retry-1")
    again = await stack.post(client, rid, envelope, idempotency_key="retry-1")
    assert first[0] == 201
    assert again[0] == 200
    assert first[1]["id"] == again[1]["id"]
    # The same envelope without a key is recognised by its id.
    assert (await stack.post(client, rid, envelope))[0] == 200
    other = await stack.envelope(client, rid, "another")
    status, _data = await stack.post(client, rid, other, idempotency_key="retry-1")
    assert status == 409
    pool = stack.apps["messaging"][POOL]
    stored = await pool.fetchval("SELECT count(*) FROM messaging.messages WHERE relationship_id"
                                 " = $1", rid)
    events = await pool.fetchval(
        "SELECT count(*) FROM messaging.outbox WHERE routing_key = 'checkin.submitted'"
        " AND payload->'data'->>'relationship_id' = $1", str(rid))
    assert stored == 1
    assert events == 1


async def test_one_statement_stores_message_event_and_key_together(stack: Stack) -> None:
    """The same envelope sent four times at once is stored once, with one event
    and one key; the event carries the row's own visible_at, to the microsecond."""
    _, client, rid = await new_pair(stack)
    envelope = await stack.envelope(client, rid, "at once")
    results = await asyncio.wait_for(asyncio.gather(*[
        stack.post(client, rid, envelope, idempotency_key=f"k-{i % 2}") for i in range(4)]),
        timeout=30)
    statuses = sorted(status for status, _ in results)
    # One writer per relationship: the first stores it, the rest find it.
    assert statuses == [200, 200, 200, 201], statuses
    assert len({data["id"] for _, data in results}) == 1
    pool = stack.apps["messaging"][POOL]
    row = await pool.fetchrow("SELECT id, visible_at, delivery_seq FROM messaging.messages"
                              " WHERE relationship_id = $1", rid)
    events = await pool.fetch(
        "SELECT payload FROM messaging.outbox WHERE routing_key = 'checkin.submitted'"
        " AND payload->'data'->>'relationship_id' = $1", str(rid))
    keys = await pool.fetch("SELECT key, message_id FROM messaging.idempotency_keys"
                            " WHERE message_id = $1 ORDER BY key", row["id"])
    assert len(events) == 1
    assert datetime.fromisoformat(events[0]["payload"]["data"]["visible_at"]) \
        == row["visible_at"]
    assert row["delivery_seq"] is not None
    # The key of the request that stored it; the other key found it by its id.
    assert len(keys) == 1
    assert keys[0]["key"] in ("k-0", "k-1")


async def test_messages_page_with_cursor(stack: Stack) -> None:
    therapist, client, rid = await new_pair(stack)
    for i in range(5):
        assert (await stack.post(client, rid, await stack.envelope(client, rid, str(i))))[0] == 201
    seen, cursor = [], ""
    for _ in range(5):
        status, page = await stack.call(
            "GET", f"/v1/relationships/{rid}/messages?limit=2&cursor={cursor}"
            if cursor else f"/v1/relationships/{rid}/messages?limit=2", therapist)
        assert status == 200
        seen += [m["id"] for m in page["items"]]
        if page["next_cursor"] is None:
            break
        cursor = page["next_cursor"]
    assert len(seen) == len(set(seen)) == 5
    status, data = await stack.call("GET", f"/v1/relationships/{rid}/messages?limit=0",
                                    therapist)
    assert status == 422
    assert data["error"]["field"] == "limit"


async def test_key_change_is_kept_in_history_and_announced(stack: Stack) -> None:
    _, client, rid = await new_pair(stack)
    client.keys = DeviceKeys.generate()
    await stack.publish_keys(client)
    status, history = await stack.call("GET", f"/v1/relationships/{rid}/devices/history", client)
    versions = [d["version"] for d in history["items"] if d["user_id"] == str(client.user_id)]
    assert versions == [1, 2]
    pool = stack.apps["messaging"][POOL]
    announced = await pool.fetchval(
        "SELECT count(*) FROM messaging.outbox WHERE routing_key = 'device.keys_changed'"
        " AND payload->'data'->>'user_id' = $1", str(client.user_id))
    assert announced == 2
    # A record not signed by its own key is refused.
    status, data = await stack.call("PUT", f"/v1/devices/{uuid.uuid4()}", client, json={
        "suite": 1, "hpke_public_key": base64.b64encode(client.keys.hpke_public_key).decode(),
        "signing_public_key": base64.b64encode(client.keys.signing_public_key).decode(),
        "signature": base64.b64encode(b"\\0" * 64).decode()})
    assert status == 422
    assert data["error"]["code"] == "bad_signature"


async def test_relay_publishes_confirmed_events_and_marks_them_sent(
        stack: Stack, test_env: TestEnv) -> None:
    connection = await aio_pika.connect(test_env.amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"test-relay-{uuid.uuid4().hex}", exclusive=True)
        await queue.bind(EVENTS_EXCHANGE, routing_key="checkin.submitted")
        _, client, rid = await new_pair(stack)
        status, stored = await stack.post(client, rid, await stack.envelope(client, rid, "x"))
        assert status == 201

        async def received() -> dict[str, object] | None:
            message = await queue.get(fail=False, timeout=5)
            if message is None:
                return None
            await message.ack()
            body: dict[str, object] = json.loads(message.body)
            return body if body["data"]["message_id"] == stored["id"] else None  # type: ignore[index]

        event = await eventually(received)
        assert event["type"] == "checkin.submitted"
        assert event["schema_version"] == 1
        assert set(event["data"]) == {  # type: ignore[arg-type]
            "message_id", "relationship_id", "therapist_id", "client_id", "sender_id",
            "sent_at", "urgent", "beyond_agreement", "reply_by", "deliver_now", "visible_at"}
        pool = stack.apps["messaging"][POOL]

        async def marked() -> bool:
            return bool(await pool.fetchval(
                "SELECT published_at IS NOT NULL FROM messaging.outbox"
                " WHERE payload->'data'->>'message_id' = $1", stored["id"]))

        assert await eventually(marked)
        assert stack.apps["messaging"][RELAY].state.listening
    finally:
        await connection.close()


async def test_outbox_holds_events_while_the_broker_is_unreachable(test_env: TestEnv) -> None:
    """With the broker unreachable, check-ins are still accepted; events wait in the outbox."""
    from tests.support.stack import running_stack

    broken = TestEnv(test_env.database_url, "amqp://guest:guest@127.0.0.1:9/", test_env.vhost,
                     test_env.database)
    async with running_stack(broken, require_ready=False) as stack:
        _, client, rid = await new_pair(stack)
        status, stored = await stack.post(client, rid, await stack.envelope(client, rid, "x"))
        assert status == 201
        await asyncio.sleep(0.5)
        pool = stack.apps["messaging"][POOL]
        pending = await pool.fetchval(
            "SELECT published_at IS NULL FROM messaging.outbox"
            " WHERE payload->'data'->>'message_id' = $1", stored["id"])
        assert pending is True
    # Back with a reachable broker, the same outbox row goes out.
    async with running_stack(test_env) as stack:
        pool = stack.apps["messaging"][POOL]

        async def published() -> bool:
            return bool(await pool.fetchval(
                "SELECT published_at IS NOT NULL FROM messaging.outbox"
                " WHERE payload->'data'->>'message_id' = $1", stored["id"]))

        assert await eventually(published, timeout=15)


async def test_messaging_is_not_ready_without_its_broker(test_env: TestEnv) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from services.messaging.app import create_app

    settings = test_env.settings(INTERLUDE_AMQP_URL="amqp://guest:guest@127.0.0.1:9/")
    async with TestClient(TestServer(create_app(settings))) as client:
        response = await client.get("/readyz")
        assert response.status == 503
        assert "broker" in (await response.json())["problems"]
        assert (await client.get("/healthz")).status == 200


async def test_nothing_is_sent_to_someone_without_a_device(stack: Stack) -> None:
    from tests.integration.conftest import therapist_code, unique_email

    t_email = unique_email("t")
    therapist = await stack.enroll(await therapist_code(stack, t_email), t_email)
    status, invite = await stack.call("POST", "/v1/invites", therapist)
    assert status == 201
    client = await stack.enroll(invite["code"], unique_email("c"))
    await stack.publish_keys(client)  # the therapist never set up a device
    status, rels = await stack.call("GET", "/v1/relationships", client)
    rid = uuid.UUID(rels["items"][0]["id"])
    status, data = await stack.post(client, rid, await stack.envelope(client, rid, "x"))
    assert status == 409
    assert data["error"]["code"] == "peer_has_no_devices"


async def test_a_checkin_wakes_its_own_relay_without_notify_or_polling(stack: Stack) -> None:
    """The submit statement sends no NOTIFY: the route wakes this process's relay
    after the commit. With polling out of the picture, the event still goes out
    at once."""
    relay = stack.apps["messaging"][RELAY]
    relay._poll_seconds = 300  # from its next wait on
    await asyncio.sleep(1)      # the current (short) wait ends; the relay idles
    _, client, rid = await new_pair(stack)
    pool = stack.apps["messaging"][POOL]
    await asyncio.sleep(1)      # the pairing's own events are out
    published = relay.state.published
    status, stored = await stack.post(client, rid, await stack.envelope(client, rid, "x"))
    assert status == 201

    async def marked() -> bool:
        return bool(await pool.fetchval(
            "SELECT published_at IS NOT NULL FROM messaging.outbox"
            " WHERE payload->'data'->>'message_id' = $1", stored["id"]))

    assert await eventually(marked, timeout=5)
    assert relay.state.published > published
