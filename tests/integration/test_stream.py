"""The gateway's live stream (``GET /v1/stream``) on real RabbitMQ and Postgres."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp.test_utils import TestServer

from services.gateway import stream as stream_module
from services.gateway.app import create_app as gateway_app
from services.gateway.stream import Push
from services.gateway.stream_hub import StreamHub
from services.gateway.typedefs import SETTINGS, STREAM_HUB
from services.notifier.routes import STORE as NOTIFIER_STORE
from services.notifier.store import DIGEST, NewNotification, insert_notifications
from shared.amqp import Publisher
from shared.events import NOTIFICATION_CREATED, NotificationEventData, new_event
from tests.conftest import TestEnv
from tests.integration.conftest import new_pair
from tests.support.stack import Person, Stack, eventually

pytestmark = pytest.mark.integration

WAIT = 15.0


@pytest.fixture
async def publisher(test_env: TestEnv) -> AsyncIterator[Publisher]:
    pub = Publisher(test_env.amqp_url)
    try:
        yield pub
    finally:
        await pub.close()


def hub_of(stack: Stack) -> StreamHub:
    return stack.apps["gateway"][STREAM_HUB]


async def subscribed(hub: StreamHub) -> None:
    """Until this gateway's queue is bound (events published before would be missed)."""
    async def connected() -> bool:
        return hub.state.connected
    await eventually(connected, timeout=WAIT)


async def open_stream(base: str, http: aiohttp.ClientSession, who: Person, *,
                      header: bool = False, after: str | None = None
                      ) -> aiohttp.ClientWebSocketResponse:
    """A socket authenticated as ``who`` (first message unless ``header``), past "ready"."""
    url = base + "/v1/stream" + (f"?after={after}" if after else "")
    ws = await http.ws_connect(url, headers=who.auth if header else None)
    if not header:
        await ws.send_json({"type": "auth", "access_token": who.access_token})
    ready = await next_frame(ws)
    assert ready["type"] == "ready", ready
    assert ready["user_id"] == str(who.user_id)
    return ws


async def next_frame(ws: aiohttp.ClientWebSocketResponse, *, skip_heartbeats: bool = True
                     ) -> dict[str, Any]:
    async with asyncio.timeout(WAIT):
        while True:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
            frame: dict[str, Any] = msg.json()
            if skip_heartbeats and frame["type"] == "heartbeat":
                continue
            return frame


async def frames_until(ws: aiohttp.ClientWebSocketResponse, done: Any) -> list[dict[str, Any]]:
    """Every frame up to and including the first for which ``done(frame)`` holds."""
    seen: list[dict[str, Any]] = []
    while True:
        frame = await next_frame(ws)
        seen.append(frame)
        if done(frame):
            return seen


async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
    async with asyncio.timeout(WAIT):
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.CLOSE:
                return msg.data, msg.extra or ""
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return ws.close_code, ""


def is_notification(notification_id: str) -> Any:
    return lambda f: f["type"] == "notification" and f["notification"]["id"] == notification_id


def is_message(message_id: str) -> Any:
    return lambda f: f["type"] == "message" and f["message_id"] == message_id


async def publish_notification(publisher: Publisher, user_id: uuid.UUID, *,
                               notification_id: uuid.UUID | None = None, kind: str = "digest",
                               created_at: datetime | None = None,
                               message_id: uuid.UUID | None = None,
                               relationship_id: uuid.UUID | None = None,
                               actor_id: uuid.UUID | None = None) -> str:
    data = NotificationEventData(
        notification_id=notification_id or uuid.uuid4(), user_id=user_id, kind=kind,
        relationship_id=relationship_id, message_id=message_id, actor_id=actor_id,
        details={"checkins": 1} if kind == "digest" else None,
        created_at=created_at or datetime.now(UTC))
    event = new_event(NOTIFICATION_CREATED, data, "test-stream")
    await publisher.publish(NOTIFICATION_CREATED, event.model_dump_json().encode(),
                            message_id=str(event.event_id))
    return str(data.notification_id)


async def feed_item(stack: Stack, who: Person, message_id: str) -> dict[str, Any]:
    """The notification about ``message_id`` in ``who``'s feed, once it is there."""
    async def find() -> dict[str, Any] | None:
        status, data = await stack.call("GET", "/v1/notifications", who)
        assert status == 200, data
        return next((n for n in data["items"] if n["message_id"] == message_id), None)
    return await eventually(find, timeout=WAIT)


async def announce(stack: Stack, publisher: Publisher, who: Person,
                   message_id: str) -> dict[str, Any]:
    """Publish ``notification.created`` for the feed's notification about ``message_id``.

    A stand-in for the notifier's own event until it publishes one through its
    outbox; once it does, the stream gets both copies and must push one only.
    """
    item = await feed_item(stack, who, message_id)
    await publish_notification(
        publisher, who.user_id, notification_id=uuid.UUID(item["id"]), kind=item["kind"],
        created_at=datetime.fromisoformat(item["created_at"]),
        message_id=uuid.UUID(item["message_id"]),
        relationship_id=uuid.UUID(item["relationship_id"]),
        actor_id=uuid.UUID(item["actor_id"]))
    return item


async def send(stack: Stack, sender: Person, rel: uuid.UUID, text: str = "hello") -> str:
    status, data = await stack.post(sender, rel, await stack.envelope(sender, rel, text))
    assert status == 201, data
    return str(data["id"])


async def test_checkin_and_reply_reach_both_members(stack: Stack, publisher: Publisher) -> None:
    therapist, client, rel = await new_pair(stack)
    await subscribed(hub_of(stack))
    t_ws = await open_stream(stack.base, stack.http, therapist, header=True)
    c_ws = await open_stream(stack.base, stack.http, client)

    checkin_id = await send(stack, client, rel, "a check-in")
    seen = await frames_until(t_ws, is_message(checkin_id))
    assert seen[-1] == {"type": "message", "relationship_id": str(rel),
                        "message_id": checkin_id, "kind": "checkin",
                        "sent_at": seen[-1]["sent_at"]}
    # The sender sees their own message arrive too.
    assert (await frames_until(c_ws, is_message(checkin_id)))[-1]["kind"] == "checkin"

    item = await announce(stack, publisher, therapist, checkin_id)
    pushed = (await frames_until(t_ws, is_notification(item["id"])))[-1]["notification"]
    assert pushed == {k: item[k] for k in ("id", "kind", "relationship_id", "message_id",
                                           "actor_id", "details", "created_at")}
    assert pushed["kind"] == "checkin.received"
    assert pushed["actor_id"] == str(client.user_id)

    reply_id = await send(stack, therapist, rel, "a reply")
    assert (await frames_until(c_ws, is_message(reply_id)))[-1]["kind"] == "reply"
    assert (await frames_until(t_ws, is_message(reply_id)))[-1]["kind"] == "reply"
    reply_item = await announce(stack, publisher, client, reply_id)
    seen = await frames_until(c_ws, is_notification(reply_item["id"]))
    assert seen[-1]["notification"]["kind"] == "reply.received"
    # Nothing of the therapist's own notification went to the client.
    assert not any(f["type"] == "notification" and f["notification"]["id"] == item["id"]
                   for f in seen)
    await t_ws.close()
    await c_ws.close()


async def test_reconnect_resumes_missed_notifications_in_order_once(
        stack: Stack, publisher: Publisher) -> None:
    therapist, client, rel = await new_pair(stack)
    await subscribed(hub_of(stack))
    ws = await open_stream(stack.base, stack.http, therapist)
    first = await send(stack, client, rel, "one")
    last_seen = (await frames_until(ws, is_notification(
        (await announce(stack, publisher, therapist, first))["id"])))[-1]["notification"]["id"]
    await ws.close()

    missed = [await send(stack, client, rel, "two"), await send(stack, client, rel, "three")]
    items = [await feed_item(stack, therapist, m) for m in missed]

    ws = await open_stream(stack.base, stack.http, therapist, after=last_seen)
    # Live copies racing in after the reconnect must not be pushed a second time.
    for m in missed:
        await announce(stack, publisher, therapist, m)
    sentinel = await publish_notification(publisher, therapist.user_id)
    seen = await frames_until(ws, is_notification(sentinel))
    notifications = [f["notification"]["id"] for f in seen if f["type"] == "notification"]
    assert notifications == [items[0]["id"], items[1]["id"], sentinel]
    resumed = next(f for f in seen if f["type"] == "resumed")
    assert resumed == {"type": "resumed", "after": last_seen, "count": 2, "complete": True}
    assert seen.index(resumed) == 2   # the backlog first, then live events

    # The same by message, on an open socket: already-sent ones are not repeated.
    await ws.send_json({"type": "resume", "after": last_seen})
    seen = await frames_until(ws, lambda f: f["type"] == "resumed")
    assert [f["type"] for f in seen] == ["resumed"]
    await ws.close()


async def test_resume_sends_a_notification_stored_late_with_an_earlier_time(
        stack: Stack) -> None:
    """Feed order is event time; a notification whose event reached the notifier
    late is stored after one the reader already has, with an earlier time. Reading
    the feed down to the last one seen would skip it; resume must not."""
    therapist, _, _ = await new_pair(stack)
    store = stack.apps["notifier"][NOTIFIER_STORE]
    now = datetime.now(UTC)

    async def stored(created_at: datetime) -> str:
        notification = NewNotification(
            user_id=therapist.user_id, kind=DIGEST, relationship_id=None, message_id=None,
            actor_id=None, event_id=None, created_at=created_at, details={"checkins": 1})
        async with store.pool.acquire() as conn, conn.transaction():
            [created] = await insert_notifications(conn, [notification])
        return str(created)

    last_seen = await stored(now)
    late = await stored(now - timedelta(seconds=30))
    ws = await open_stream(stack.base, stack.http, therapist, after=last_seen)
    seen = await frames_until(ws, lambda f: f["type"] == "resumed")
    assert [f["notification"]["id"] for f in seen if f["type"] == "notification"] == [late]
    assert seen[-1] == {"type": "resumed", "after": last_seen, "count": 1, "complete": True}
    await ws.close()


async def test_unknown_resume_id_asks_for_a_reload_and_heartbeats_flow(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_module, "HEARTBEAT_SECONDS", 0.2)
    therapist, _, _ = await new_pair(stack)
    ws = await open_stream(stack.base, stack.http, therapist)
    assert (await next_frame(ws, skip_heartbeats=False))["type"] == "heartbeat"
    unknown = str(uuid.uuid4())
    await ws.send_json({"type": "resume", "after": unknown})
    assert await next_frame(ws) == {"type": "resumed", "after": unknown, "count": 0,
                                    "complete": False}
    await ws.send_json({"type": "nonsense"})
    assert (await next_frame(ws))["type"] == "error"
    await ws.close()
    bad = await stack.http.ws_connect(stack.base + "/v1/stream?after=nope",
                                      headers=therapist.auth)
    assert (await closed_with(bad))[0] == 4400


async def test_bad_or_missing_token_closes_with_4401(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_module, "AUTH_TIMEOUT_SECONDS", 0.5)
    url = stack.base + "/v1/stream"
    cases: list[tuple[dict[str, str] | None, dict[str, Any] | None]] = [
        (None, None),                                                # silence
        ({"Authorization": "Bearer ila_forged"}, None),              # bad header
        (None, {"type": "auth", "access_token": "ila_forged"}),      # bad first message
        (None, {"type": "resume", "after": str(uuid.uuid4())}),      # not an auth message
    ]
    for headers, first in cases:
        ws = await stack.http.ws_connect(url, headers=headers)
        if first is not None:
            await ws.send_json(first)
        code, reason = await closed_with(ws)
        assert code == 4401, (headers, first, code)
        assert "unauthorized" in reason
    # A plain HTTP request is not upgraded.
    status, _ = await stack.call("GET", "/v1/stream")
    assert status in (400, 426)


async def test_another_users_events_are_never_delivered(
        stack: Stack, publisher: Publisher) -> None:
    therapist, client, _ = await new_pair(stack)
    other_therapist, other_client, other_rel = await new_pair(stack)
    await subscribed(hub_of(stack))
    ws = await open_stream(stack.base, stack.http, therapist)
    await publish_notification(publisher, other_therapist.user_id)
    await publish_notification(publisher, client.user_id)
    other_message = await send(stack, other_client, other_rel, "not yours")
    await feed_item(stack, other_therapist, other_message)
    mine = await publish_notification(publisher, therapist.user_id)
    seen = await frames_until(ws, is_notification(mine))
    assert [f["type"] for f in seen] == ["notification"], seen
    await ws.close()


async def test_logout_closes_the_stream_with_4401(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_module, "REVALIDATE_SECONDS", 0.2)
    therapist, client, _ = await new_pair(stack)
    ws = await open_stream(stack.base, stack.http, therapist)
    # A fresh token of the same user keeps the socket; another user's is refused.
    status, session = await stack.call("POST", "/v1/auth/refresh",
                                       json={"refresh_token": therapist.refresh_token})
    assert status == 200, session
    await ws.send_json({"type": "auth", "access_token": session["access_token"]})
    assert await next_frame(ws) == {"type": "reauthenticated"}
    therapist.access_token = session["access_token"]
    status, _ = await stack.call("POST", "/v1/auth/logout", therapist)
    assert status == 204
    code, reason = await closed_with(ws)
    assert code == 4401
    assert "expired or revoked" in reason

    ws = await open_stream(stack.base, stack.http, client)
    other, _, _ = await new_pair(stack)
    await ws.send_json({"type": "auth", "access_token": other.access_token})
    assert (await closed_with(ws))[0] == 4401


async def test_per_user_limit_and_slow_client(stack: Stack) -> None:
    therapist, _, _ = await new_pair(stack)
    hub = hub_of(stack)
    limit, size = hub.max_per_user, hub.queue_size
    hub.max_per_user, hub.queue_size = 2, 3
    try:
        first = await open_stream(stack.base, stack.http, therapist)
        second = await open_stream(stack.base, stack.http, therapist)
        third = await stack.http.ws_connect(stack.base + "/v1/stream", headers=therapist.auth)
        code, reason = await closed_with(third)
        assert code == 4429
        assert "too many streams" in reason
        # More than the send queue holds, faster than it drains: that socket is dropped.
        for n in range(10):
            hub.push(therapist.user_id, Push({"type": "notification", "n": n}, str(n)))
        for ws in (first, second):
            async with asyncio.timeout(WAIT):
                while (msg := await ws.receive()).type == aiohttp.WSMsgType.TEXT:
                    pass
            assert msg.type == aiohttp.WSMsgType.CLOSE
            assert msg.data == 1013
            assert "too slow" in msg.extra
        await eventually(_no_connections(hub), timeout=WAIT)
    finally:
        hub.max_per_user, hub.queue_size = limit, size


async def test_instance_limit_counts_every_socket(stack: Stack) -> None:
    therapist, client, _ = await new_pair(stack)
    hub = hub_of(stack)
    limit, hub.max_connections = hub.max_connections, 1
    try:
        # Not authenticated yet, but it holds a place.
        waiting = await stack.http.ws_connect(stack.base + "/v1/stream")
        refused = await stack.http.ws_connect(stack.base + "/v1/stream", headers=client.auth)
        code, reason = await closed_with(refused)
        assert code == 1013
        assert "busy" in reason
        await waiting.send_json({"type": "auth", "access_token": therapist.access_token})
        assert (await next_frame(waiting))["type"] == "ready"
        await waiting.close()
    finally:
        hub.max_connections = limit


def _no_connections(hub: StreamHub) -> Any:
    async def check() -> bool:
        return not hub.connections()
    return check


@asynccontextmanager
async def replica(stack: Stack) -> AsyncIterator[TestServer]:
    """Another gateway process in front of the same services."""
    server = TestServer(gateway_app(stack.apps["gateway"][SETTINGS]))
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


async def test_each_replica_delivers_to_its_own_sockets(
        stack: Stack, publisher: Publisher) -> None:
    therapist, client, rel = await new_pair(stack)
    async with replica(stack) as other:
        other_hub = other.app[STREAM_HUB]
        assert other_hub.queue_name != hub_of(stack).queue_name
        await subscribed(hub_of(stack))
        await subscribed(other_hub)
        other_base = str(other.make_url("")).rstrip("/")
        t_ws = await open_stream(stack.base, stack.http, therapist)
        c_ws = await open_stream(other_base, stack.http, client)
        t_ws2 = await open_stream(other_base, stack.http, therapist)
        assert [c.user_id for c in hub_of(stack).connections()] == [therapist.user_id]

        message_id = await send(stack, client, rel, "to both replicas")
        for ws in (t_ws, c_ws, t_ws2):
            await frames_until(ws, is_message(message_id))
        for_client = await publish_notification(publisher, client.user_id)
        for_therapist = await publish_notification(publisher, therapist.user_id)
        seen = await frames_until(c_ws, is_notification(for_client))
        assert not any(is_notification(for_therapist)(f) for f in seen)
        for ws in (t_ws, t_ws2):
            seen = await frames_until(ws, is_notification(for_therapist))
            assert not any(is_notification(for_client)(f) for f in seen)
        await t_ws.close()
    # The replica shut down: its sockets were told it is going away.
    for ws in (c_ws, t_ws2):
        assert (await closed_with(ws))[0] == 1001


async def test_held_reply_is_not_pushed_to_the_client_early(
        stack: Stack, publisher: Publisher) -> None:
    therapist, client, rel = await new_pair(stack)
    day = (datetime.now(UTC) + timedelta(days=2)).strftime("%a")
    status, data = await stack.call("PUT", "/v1/availability", therapist,
                                    json={"spec": f"{day} 09:00-10:00", "tz": "UTC"})
    assert status == 200, data
    await subscribed(hub_of(stack))
    t_ws = await open_stream(stack.base, stack.http, therapist)
    c_ws = await open_stream(stack.base, stack.http, client)
    checkin_id = await send(stack, client, rel, "outside hours")
    await frames_until(t_ws, is_message(checkin_id))
    status, reply = await stack.post(therapist, rel,
                                     await stack.envelope(therapist, rel, "held until then"))
    assert status == 201, reply
    assert reply["held"] is True
    reply_id = reply["id"]
    # The therapist (the sender) sees it at once; the client's copy would have been
    # queued in the same instant, so a later sentinel proves it was not.
    await frames_until(t_ws, is_message(reply_id))
    sentinel = await publish_notification(publisher, client.user_id)
    seen = await frames_until(c_ws, is_notification(sentinel))
    assert not any(f["type"] == "message" and f["message_id"] == reply_id for f in seen), seen
    await t_ws.close()
    await c_ws.close()


def _queues(vhost: str) -> set[str]:
    out = subprocess.run(["rabbitmqctl", "list_queues", "-q", "-p", vhost, "name"], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return {line.strip() for line in out.splitlines()[1:] if line.strip()}


async def test_stream_consumer_comes_back_after_losing_the_broker(
        stack: Stack, test_env: TestEnv) -> None:
    therapist, _, _ = await new_pair(stack)
    hub = hub_of(stack)
    await subscribed(hub)
    ws = await open_stream(stack.base, stack.http, therapist)
    reconnects = hub.state.reconnects
    # Only this run's vhost: every connection in it drops, as in a broker restart.
    await asyncio.to_thread(subprocess.run, [
        "rabbitmqctl", "close_all_connections", "--vhost", test_env.vhost, "test: broker gone"],
        check=True, capture_output=True, timeout=60)

    async def back() -> bool:
        return hub.state.reconnects > reconnects and hub.state.connected
    await eventually(back, timeout=WAIT)
    assert hub.queue_name in await asyncio.to_thread(_queues, test_env.vhost)
    # The socket stayed open and gets what is published after the reconnect.
    publisher = Publisher(test_env.amqp_url)
    try:
        mine = await publish_notification(publisher, therapist.user_id)
    finally:
        await publisher.close()
    await frames_until(ws, is_notification(mine))
    await ws.close()


def _queue_depth(vhost: str, queue: str) -> int:
    """Ready plus unacked messages of ``queue``."""
    out = subprocess.run(["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "-p", vhost,
                          "name", "messages_ready", "messages_unacknowledged"], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    for line in out.splitlines():
        name, ready, unacked = line.split()
        if name == queue:
            return int(ready) + int(unacked)
    raise AssertionError(f"no queue {queue}")


async def test_events_are_not_read_while_nobody_is_connected(
        stack: Stack, publisher: Publisher, test_env: TestEnv) -> None:
    therapist, _, _ = await new_pair(stack)
    hub = hub_of(stack)
    await subscribed(hub)

    async def consumed() -> bool:
        # Confirmed, so in the queue; handled and acked once it is empty.
        return await asyncio.to_thread(_queue_depth, test_env.vhost, hub.queue_name) == 0

    def malformed(logs: list[dict[str, Any]]) -> int:
        return sum(e["event"] == "stream ignored a malformed event" for e in logs)

    with structlog.testing.capture_logs() as logs:
        handled = hub.state.handled
        await publisher.publish(NOTIFICATION_CREATED, b"not an event",
                                message_id=str(uuid.uuid4()))
        await eventually(consumed, timeout=WAIT)
        assert hub.state.handled > handled
        assert malformed(logs) == 0
        ws = await open_stream(stack.base, stack.http, therapist)
        await publisher.publish(NOTIFICATION_CREATED, b"not an event",
                                message_id=str(uuid.uuid4()))
        mine = await publish_notification(publisher, therapist.user_id)
        await frames_until(ws, is_notification(mine))
        assert malformed(logs) == 1
    await ws.close()


async def test_replica_queue_is_deleted_when_it_stops(stack: Stack, test_env: TestEnv) -> None:
    async with replica(stack) as other:
        name = other.app[STREAM_HUB].queue_name
        await subscribed(other.app[STREAM_HUB])
        assert name in await asyncio.to_thread(_queues, test_env.vhost)

    async def gone() -> bool:
        return name not in await asyncio.to_thread(_queues, test_env.vhost)
    await eventually(gone, timeout=WAIT)
