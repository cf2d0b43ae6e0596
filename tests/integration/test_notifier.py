"""The notifier against the real Postgres and RabbitMQ: events in, feed out."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import aio_pika
import asyncpg
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from services.notifier.app import (
    CONSUMER_STATE,
    CONSUMER_TASK,
    RELAY,
    SCHEDULER_TASK,
    create_app,
)
from services.notifier.consumer import QUEUE, EventConsumer
from services.notifier.store import (
    CHECKIN_RECEIVED,
    NOTIFIER_OUTBOX,
    NewNotification,
    NotifierStore,
)
from shared.amqp import EVENTS_EXCHANGE, Publisher, Unroutable, declare_consumer_queue
from shared.amqp_consume import ConsumerState
from shared.events import (
    CHECKIN_SUBMITTED,
    MESSAGING_EVENTS,
    NOTIFICATION_CREATED,
    RELATIONSHIP_CREATED,
    REPLY_SENT,
    Event,
    MessageEventData,
    new_event,
)
from shared.internal_auth import Identity, sign_headers
from tests.conftest import TEST_INTERNAL_KEY
from tests.support.stack import eventually

if TYPE_CHECKING:
    # Imported for annotations only: a module-level ``TestEnv`` would be collected
    # by pytest as a test class (a collection warning, an error under -W error).
    from tests.conftest import TestEnv

pytestmark = pytest.mark.integration

T = TypeVar("T")
WAIT_SECONDS = 10.0


@dataclass
class Notifier:
    client: TestClient[web.Request, web.Application]
    app: web.Application

    @property
    def state(self) -> ConsumerState:
        return self.app[CONSUMER_STATE]


async def _ready(client: TestClient[web.Request, web.Application]) -> bool:
    response = await client.get("/readyz")
    return response.status == 200


@pytest.fixture
async def notifier(test_env: TestEnv) -> AsyncIterator[Notifier]:
    app = create_app(test_env.settings())
    async with TestClient(TestServer(app)) as client:
        await eventually(lambda: _ready(client))
        yield Notifier(client, app)
    assert app[CONSUMER_TASK].done()


def message_event(event_type: str, *, therapist: uuid.UUID | None = None,
                  client: uuid.UUID | None = None) -> tuple[Event, MessageEventData]:
    therapist = therapist or uuid.uuid4()
    client = client or uuid.uuid4()
    data = MessageEventData(
        message_id=uuid.uuid4(), relationship_id=uuid.uuid4(), therapist_id=therapist,
        client_id=client, sender_id=client if event_type == CHECKIN_SUBMITTED else therapist,
        sent_at=datetime.now(UTC),
    )
    return new_event(event_type, data, correlation_id=f"test-{uuid.uuid4()}"), data


async def publish(publisher: Publisher, event: Event) -> None:
    await publisher.publish(event.type, event.model_dump_json().encode(),
                            message_id=str(event.event_id), correlation_id=event.correlation_id)


async def notifications_of(pool: asyncpg.Pool, event_id: uuid.UUID) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT * FROM notifier.notifications WHERE event_id = $1", event_id)


async def in_inbox(pool: asyncpg.Pool, event_id: uuid.UUID) -> bool:
    found = await pool.fetchval("SELECT true FROM notifier.inbox WHERE event_id = $1", event_id)
    return bool(found)


async def call(client: TestClient[web.Request, web.Application], method: str, path_qs: str,
               user_id: uuid.UUID, role: str = "therapist") -> ClientResponse:
    identity = Identity(user_id=user_id, role=role, request_id=f"req-{uuid.uuid4()}")
    headers = sign_headers(TEST_INTERNAL_KEY.encode(), method=method, path_qs=path_qs,
                           identity=identity, body=b"")
    return await client.request(method, path_qs, headers=headers)


async def json_of(response: ClientResponse, status: int) -> Any:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    return await response.json()


async def take_dead_letter(amqp_url: str, message_id: str) -> aio_pika.abc.AbstractMessage:
    """Consume ``notifier.events.dead`` until the message ``message_id`` turns up."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        channel = await connection.channel()
        dead = await channel.declare_queue(f"{QUEUE}.dead", passive=True)

        async def ours() -> aio_pika.abc.AbstractMessage | None:
            while (message := await dead.get(no_ack=False, fail=False)) is not None:
                await message.ack()  # the vhost is this run's own: nothing else is in it
                if message.message_id == message_id:
                    return message
            return None

        return await eventually(ours)
    finally:
        await connection.close()


# --- events in -------------------------------------------------------------------------


async def test_checkin_notifies_the_therapist_once(
    notifier: Notifier, publisher: Publisher, db_pool: asyncpg.Pool,
) -> None:
    event, data = message_event(CHECKIN_SUBMITTED)
    await publish(publisher, event)

    rows = await eventually(lambda: notifications_of(db_pool, event.event_id))
    assert len(rows) == 1
    row = rows[0]
    assert row["user_id"] == data.therapist_id
    assert row["kind"] == CHECKIN_RECEIVED
    assert row["actor_id"] == data.client_id
    assert row["relationship_id"] == data.relationship_id
    assert row["message_id"] == data.message_id
    assert row["created_at"] == event.occurred_at
    assert row["read_at"] is None
    # Ids and times only: the row has no room for content.
    assert set(row.keys()) == {"id", "user_id", "kind", "relationship_id", "message_id",
                               "actor_id", "event_id", "created_at", "read_at", "details",
                               "seq"}
    assert row["details"] is None


async def test_an_alert_wakes_its_own_relay_without_notify_or_polling(
    notifier: Notifier, publisher: Publisher, db_pool: asyncpg.Pool, test_env: TestEnv,
) -> None:
    """The consumer's notification statement sends its relay no NOTIFY: the store
    wakes this process's relay after the commit. With polling out of the
    picture, the notification.created still goes out at once."""
    # The scheduler's digests and reminders still NOTIFY (of other tests' data,
    # in this shared database): stopped, so that what is heard is this event's.
    notifier.app[SCHEDULER_TASK].cancel()
    await asyncio.wait([notifier.app[SCHEDULER_TASK]], timeout=5)
    relay = notifier.app[RELAY]
    relay._poll_seconds = 300  # from its next wait on
    await asyncio.sleep(1)      # the current (short) wait ends; the relay idles
    heard: list[str] = []
    listener = await asyncpg.connect(test_env.database_url, timeout=10)
    try:
        await listener.add_listener(NOTIFIER_OUTBOX.channel,
                                    lambda _c, _p, channel, _m: heard.append(channel))
        event, _ = message_event(CHECKIN_SUBMITTED)
        await publish(publisher, event)
        [row] = await eventually(lambda: notifications_of(db_pool, event.event_id))

        async def announced() -> bool:
            return bool(await db_pool.fetchval(
                f"SELECT published_at IS NOT NULL FROM {NOTIFIER_OUTBOX.qualified}"
                " WHERE payload->'data'->>'notification_id' = $1", str(row["id"])))

        assert await eventually(announced, timeout=5)
    finally:
        await listener.close()
    assert heard == []


async def test_the_same_event_twice_has_one_effect(
    notifier: Notifier, publisher: Publisher, db_pool: asyncpg.Pool,
) -> None:
    event, _ = message_event(CHECKIN_SUBMITTED)
    handled_before = notifier.state.handled
    await publish(publisher, event)
    await publish(publisher, event)

    async def both_acked() -> bool:
        return notifier.state.handled >= handled_before + 2

    await eventually(both_acked)
    assert len(await notifications_of(db_pool, event.event_id)) == 1


async def test_reply_notifies_the_client(
    notifier: Notifier, publisher: Publisher, db_pool: asyncpg.Pool,
) -> None:
    event, data = message_event(REPLY_SENT)
    await publish(publisher, event)

    rows = await eventually(lambda: notifications_of(db_pool, event.event_id))
    assert [(r["user_id"], r["kind"], r["actor_id"]) for r in rows] == [
        (data.client_id, "reply.received", data.therapist_id)]


async def test_malformed_message_is_dead_lettered_and_does_not_block(
    notifier: Notifier, publisher: Publisher, db_pool: asyncpg.Pool, test_env: TestEnv,
) -> None:
    bad_id = str(uuid.uuid4())
    await publisher.publish(CHECKIN_SUBMITTED, b'{"event_id": "not json', message_id=bad_id)
    good, _ = message_event(CHECKIN_SUBMITTED)
    await publish(publisher, good)

    assert len(await eventually(lambda: notifications_of(db_pool, good.event_id))) == 1
    dead = await take_dead_letter(test_env.amqp_url, bad_id)
    assert dead.body == b'{"event_id": "not json'


async def test_event_with_malformed_data_is_dead_lettered(
    notifier: Notifier, publisher: Publisher, db_pool: asyncpg.Pool, test_env: TestEnv,
) -> None:
    event, _ = message_event(CHECKIN_SUBMITTED)
    broken = event.model_copy(update={"data": {**event.data, "therapist_id": "nobody"}})
    await publish(publisher, broken)

    await take_dead_letter(test_env.amqp_url, str(event.event_id))
    assert not await in_inbox(db_pool, event.event_id)
    assert await notifications_of(db_pool, event.event_id) == []


async def test_an_event_type_without_a_handler_is_acked_and_ignored(
    notifier: Notifier, publisher: Publisher, db_pool: asyncpg.Pool,
) -> None:
    event, _ = message_event(CHECKIN_SUBMITTED)
    # Bound (every messaging event is, so none is unroutable), but nothing to do.
    unknown = event.model_copy(update={"type": RELATIONSHIP_CREATED})
    handled = notifier.state.handled
    await publish(publisher, unknown)

    async def acked() -> bool:
        return notifier.state.handled > handled

    await eventually(acked)
    # Nothing to apply, so no transaction: neither an inbox entry nor an effect.
    assert not await in_inbox(db_pool, event.event_id)
    assert await notifications_of(db_pool, event.event_id) == []
    assert notifier.state.dead_lettered == 0


def bindings_of(vhost: str, queue: str) -> set[str]:
    """The routing keys binding ``queue`` to the events exchange, as the broker has them."""
    listed = subprocess.run(
        ["rabbitmqctl", "list_bindings", "-p", vhost, "-q", "--formatter", "json",
         "source_name", "destination_name", "routing_key"],
        check=True, capture_output=True, text=True, timeout=60).stdout
    return {b["routing_key"] for b in json.loads(listed)
            if b["source_name"] == EVENTS_EXCHANGE and b["destination_name"] == queue}


async def test_the_queue_takes_messaging_events_and_not_its_own_announcements(
    test_env: TestEnv, publisher: Publisher,
) -> None:
    # The queue as an earlier release left it: bound to every key.
    connection = await aio_pika.connect(test_env.amqp_url, timeout=10)
    try:
        await declare_consumer_queue(await connection.channel(), QUEUE, ["#"])
    finally:
        await connection.close()
    try:
        assert "#" in bindings_of(test_env.vhost, QUEUE)
        app = create_app(test_env.settings())
        async with TestClient(TestServer(app)) as client:
            await eventually(lambda: _ready(client))
            assert bindings_of(test_env.vhost, QUEUE) == set(MESSAGING_EVENTS)
            # So its own notification.created no longer comes back to it: with no
            # gateway streaming, nothing takes one.
            event, _ = message_event(CHECKIN_SUBMITTED)
            with pytest.raises(Unroutable):
                await publish(publisher,
                              event.model_copy(update={"type": NOTIFICATION_CREATED}))
    finally:
        # Whatever happened, later tests must not find the vhost's queue bound to #.
        connection = await aio_pika.connect(test_env.amqp_url, timeout=10)
        try:
            queue = await (await connection.channel()).get_queue(QUEUE)
            await queue.unbind(EVENTS_EXCHANGE, routing_key="#")
        finally:
            await connection.close()


async def test_store_refuses_a_second_notification_for_the_same_event(
    db_pool: asyncpg.Pool,
) -> None:
    store = NotifierStore(db_pool)
    event_id, user = uuid.uuid4(), uuid.uuid4()
    notification = NewNotification(
        user_id=user, kind=CHECKIN_RECEIVED, relationship_id=uuid.uuid4(),
        message_id=uuid.uuid4(), actor_id=uuid.uuid4(), event_id=event_id,
        created_at=datetime.now(UTC),
    )
    assert await store.record_event(event_id, CHECKIN_SUBMITTED, [notification, notification])
    assert not await store.record_event(event_id, CHECKIN_SUBMITTED, [notification])
    assert len(await notifications_of(db_pool, event_id)) == 1


class _SlowStore(NotifierStore):
    """A store whose commit takes a while, so a stop arrives mid-message."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.entered = asyncio.Event()

    async def handle_event(self, event_id: uuid.UUID, event_type: str, work: Any, *,
                           lock_user: uuid.UUID | None = None) -> bool:
        self.entered.set()
        await asyncio.sleep(0.5)
        return await super().handle_event(event_id, event_type, work, lock_user=lock_user)


async def test_stop_lets_the_message_in_hand_commit(
    test_env: TestEnv, publisher: Publisher, db_pool: asyncpg.Pool,
) -> None:
    store = _SlowStore(db_pool)
    state = ConsumerState()
    consumer = EventConsumer(store, state)
    task = asyncio.create_task(consumer.run(test_env.amqp_url))
    try:
        await eventually(lambda: asyncio.sleep(0, state.connected))
        event, _ = message_event(CHECKIN_SUBMITTED)
        await publish(publisher, event)
        async with asyncio.timeout(WAIT_SECONDS):
            await store.entered.wait()
        await consumer.stop(task)
    finally:
        task.cancel()
        await asyncio.wait([task])
    assert state.handled == 1
    assert len(await notifications_of(db_pool, event.event_id)) == 1


# --- the feed API ------------------------------------------------------------------------


async def seed(pool: asyncpg.Pool, user: uuid.UUID, count: int, *,
               start: datetime | None = None, step: timedelta = timedelta(minutes=1)) -> None:
    store = NotifierStore(pool)
    start = start or datetime.now(UTC)
    for i in range(count):
        event_id = uuid.uuid4()
        await store.record_event(event_id, CHECKIN_SUBMITTED, [NewNotification(
            user_id=user, kind=CHECKIN_RECEIVED, relationship_id=uuid.uuid4(),
            message_id=uuid.uuid4(), actor_id=uuid.uuid4(), event_id=event_id,
            created_at=start - step * i,
        )])


async def test_unsigned_call_is_refused_with_json(notifier: Notifier) -> None:
    body = await json_of(await notifier.client.get("/v1/notifications"), 401)
    assert body["error"]["code"] == "unauthorized"

    identity = Identity(user_id=uuid.uuid4(), role="therapist", request_id="r")
    headers = sign_headers(b"another-key-of-at-least-32-characters!!", method="GET",
                           path_qs="/v1/notifications", identity=identity, body=b"")
    response = await notifier.client.get("/v1/notifications", headers=headers)
    assert (await json_of(response, 401))["error"]["code"] == "unauthorized"


async def test_feed_lists_only_the_callers_notifications_newest_first(
    notifier: Notifier, publisher: Publisher, db_pool: asyncpg.Pool,
) -> None:
    therapist = uuid.uuid4()
    first, _ = message_event(CHECKIN_SUBMITTED, therapist=therapist)
    second, data = message_event(CHECKIN_SUBMITTED, therapist=therapist)
    someone_elses, _ = message_event(CHECKIN_SUBMITTED)
    for event in (first, second, someone_elses):
        await publish(publisher, event)
    await eventually(lambda: notifications_of(db_pool, someone_elses.event_id))
    await eventually(lambda: notifications_of(db_pool, second.event_id))

    body = await json_of(await call(notifier.client, "GET", "/v1/notifications", therapist), 200)
    assert body["next_cursor"] is None
    assert len(body["items"]) == 2
    newest = body["items"][0]
    assert set(newest) == {"id", "kind", "relationship_id", "message_id", "actor_id",
                           "created_at", "read_at", "details"}
    assert newest["details"] is None
    assert newest["kind"] == "checkin.received"
    assert newest["message_id"] == str(data.message_id)
    assert newest["relationship_id"] == str(data.relationship_id)
    assert newest["actor_id"] == str(data.client_id)
    assert newest["read_at"] is None
    assert datetime.fromisoformat(newest["created_at"]) == second.occurred_at

    stranger = await call(notifier.client, "GET", "/v1/notifications", uuid.uuid4())
    assert (await json_of(stranger, 200)) == {"items": [], "next_cursor": None}


async def test_feed_pages_with_a_cursor(notifier: Notifier, db_pool: asyncpg.Pool) -> None:
    user = uuid.uuid4()
    start = datetime.now(UTC).replace(microsecond=123456)
    await seed(db_pool, user, 5, start=start)
    # Two more at the very same instant: the id breaks the tie, none is skipped.
    await seed(db_pool, user, 1, start=start - timedelta(minutes=2))
    await seed(db_pool, user, 1, start=start - timedelta(minutes=2))
    expected = [str(r["id"]) for r in await db_pool.fetch(
        "SELECT id FROM notifier.notifications WHERE user_id = $1"
        " ORDER BY created_at DESC, id DESC", user)]
    assert len(expected) == 7

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        path = "/v1/notifications?limit=3" + (f"&cursor={cursor}" if cursor else "")
        body = await json_of(await call(notifier.client, "GET", path, user), 200)
        seen += [item["id"] for item in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert pages < 10
    assert seen == expected
    assert pages == 3


async def test_bad_query_parameters_are_named(notifier: Notifier) -> None:
    user = uuid.uuid4()
    for path, field in [("/v1/notifications?cursor=not-a-cursor", "cursor"),
                        ("/v1/notifications?cursor=e30", "cursor"),
                        ("/v1/notifications?limit=0", "limit"),
                        ("/v1/notifications?limit=many", "limit"),
                        ("/v1/notifications?unread=maybe", "unread")]:
        body = await json_of(await call(notifier.client, "GET", path, user), 422)
        assert body["error"]["field"] == field, path


async def test_mark_read_unread_filter_and_read_all(
    notifier: Notifier, db_pool: asyncpg.Pool,
) -> None:
    user = uuid.uuid4()
    await seed(db_pool, user, 3)
    items = (await json_of(await call(notifier.client, "GET", "/v1/notifications", user),
                           200))["items"]
    target = items[1]["id"]

    body = await json_of(
        await call(notifier.client, "POST", f"/v1/notifications/{target}/read", user), 200)
    read_at = body["notification"]["read_at"]
    assert body["notification"]["id"] == target
    assert read_at is not None
    again = await json_of(
        await call(notifier.client, "POST", f"/v1/notifications/{target}/read", user), 200)
    assert again["notification"]["read_at"] == read_at

    unread = await json_of(
        await call(notifier.client, "GET", "/v1/notifications?unread=true", user), 200)
    assert [i["id"] for i in unread["items"]] == [items[0]["id"], items[2]["id"]]
    everything = await json_of(
        await call(notifier.client, "GET", "/v1/notifications?unread=false", user), 200)
    assert len(everything["items"]) == 3

    updated = await json_of(
        await call(notifier.client, "POST", "/v1/notifications/read-all", user), 200)
    assert updated == {"updated": 2}
    updated = await json_of(
        await call(notifier.client, "POST", "/v1/notifications/read-all", user), 200)
    assert updated == {"updated": 0}
    unread = await json_of(
        await call(notifier.client, "GET", "/v1/notifications?unread=true", user), 200)
    assert unread["items"] == []


async def test_someone_elses_or_unknown_notification_is_not_found(
    notifier: Notifier, db_pool: asyncpg.Pool,
) -> None:
    owner, other = uuid.uuid4(), uuid.uuid4()
    await seed(db_pool, owner, 1)
    [item] = (await json_of(await call(notifier.client, "GET", "/v1/notifications", owner),
                            200))["items"]

    for path in (f"/v1/notifications/{item['id']}/read",
                 f"/v1/notifications/{uuid.uuid4()}/read",
                 "/v1/notifications/not-a-uuid/read"):
        body = await json_of(await call(notifier.client, "POST", path, other), 404)
        assert body["error"]["code"] == "not_found"
    # The other user's read-all leaves the owner's notification unread.
    await json_of(await call(notifier.client, "POST", "/v1/notifications/read-all", other), 200)
    [still] = (await json_of(await call(notifier.client, "GET", "/v1/notifications", owner),
                             200))["items"]
    assert still["read_at"] is None


async def test_stored_after_follows_the_order_of_storing_and_only_the_callers(
    notifier: Notifier, db_pool: asyncpg.Pool,
) -> None:
    owner, other = uuid.uuid4(), uuid.uuid4()
    # Each one stored after the last has an earlier time: the feed lists them in
    # the reverse of the order they were stored in.
    await seed(db_pool, owner, 3)
    feed = (await json_of(await call(notifier.client, "GET", "/v1/notifications", owner),
                          200))["items"]
    first, second, third = (item["id"] for item in feed)

    async def after(notification_id: str, who: uuid.UUID, query: str = "",
                    status: int = 200) -> Any:
        return await json_of(await call(
            notifier.client, "GET", f"/v1/notifications/{notification_id}/stored-after{query}",
            who), status)

    assert await after(first, owner) == {"items": feed[1:], "more": False}
    assert await after(first, owner, "?limit=1") == {"items": feed[1:2], "more": True}
    assert await after(third, owner) == {"items": [], "more": False}
    assert [n["id"] for n in (await after(second, owner))["items"]] == [third]
    for notification_id, who in ((first, other), (str(uuid.uuid4()), owner),
                                 ("not-a-uuid", owner)):
        body = await after(notification_id, who, status=404)
        assert body["error"]["code"] == "not_found"
    body = await after(first, owner, "?limit=0", status=422)
    assert body["error"]["code"] == "invalid"


# --- health ------------------------------------------------------------------------------


async def test_health_and_readiness(notifier: Notifier) -> None:
    assert (await json_of(await notifier.client.get("/healthz"), 200)) == {"status": "alive"}
    assert (await json_of(await notifier.client.get("/readyz"), 200)) == {"status": "ready"}


async def test_not_ready_without_the_broker(test_env: TestEnv) -> None:
    settings = test_env.settings(INTERLUDE_AMQP_URL="amqp://guest:guest@127.0.0.1:1/")
    async with TestClient(TestServer(create_app(settings))) as client:
        body = await json_of(await client.get("/readyz"), 503)
        assert body["status"] == "not ready"
        assert "consumer" in body["problems"]
        assert "database" not in body["problems"]
        assert (await client.get("/healthz")).status == 200
