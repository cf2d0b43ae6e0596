"""Making notifications in one statement, against the real Postgres: the rows, their
notification.created announcements, their deliveries and the wake-ups, each once."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest

from services.notifier.deliveries_store import DELIVERIES_CHANNEL
from services.notifier.notifications_store import create_notifications
from services.notifier.scheduler import reminder_decision
from services.notifier.scheduler_store import SchedulerStore
from services.notifier.store import (
    CHECKIN_RECEIVED,
    DIGEST,
    NOTIFIER_OUTBOX,
    RECIPIENT_LOCK_NAMESPACE,
    REMINDER_REPLY_DUE,
    REPLY_RECEIVED,
    EventTransaction,
    NewNotification,
    NewReminder,
    NotifierStore,
    insert_notifications,
    recipient_lock_key,
)
from shared.db import create_pool, migrate_all
from shared.events import NOTIFICATION_CREATED
from tests.conftest import PG_BASE, create_database, drop_database

if TYPE_CHECKING:
    from tests.conftest import TestEnv

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


class CountingConnection:
    """A connection that counts the statements sent through it."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.statements = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.conn, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.statements += 1
            return await method(*args, **kwargs)

        return counted


@pytest.fixture(params=["service pool", "plain pool"])
async def pool(request: pytest.FixtureRequest, test_env: TestEnv,
               db_pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Pool]:
    """With the services' jsonb codec and without it: the SQL works either way."""
    if request.param == "plain pool":
        yield db_pool
        return
    pool = await create_pool(test_env.database_url)
    try:
        yield pool
    finally:
        await pool.close()


async def add_channel(pool: asyncpg.Pool, user: uuid.UUID, kinds: list[str], *,
                      verified: bool = True) -> uuid.UUID:
    channel_id = uuid.uuid4()
    await pool.execute(
        "INSERT INTO notifier.channels (id, user_id, type, address, host, kinds, verified_at)"
        " VALUES ($1, $2, 'email', $3, 'smtp.example.org:25', $4,"
        "  CASE WHEN $5 THEN now() END)",
        channel_id, user, f"{channel_id.hex}@example.org", kinds, verified)
    return channel_id


def checkin_alert(user: uuid.UUID, event_id: uuid.UUID) -> NewNotification:
    return NewNotification(
        user_id=user, kind=CHECKIN_RECEIVED, relationship_id=uuid.uuid4(),
        message_id=uuid.uuid4(), actor_id=uuid.uuid4(), event_id=event_id,
        created_at=datetime.now(UTC))


async def outbox_of(pool: asyncpg.Pool, ids: list[uuid.UUID]) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        f"SELECT routing_key, payload::text AS payload FROM {NOTIFIER_OUTBOX.qualified}"
        " WHERE payload->'data'->>'notification_id' = ANY ($1::text[]) ORDER BY id",
        [str(i) for i in ids])
    assert {row["routing_key"] for row in rows} <= {NOTIFICATION_CREATED}
    return [json.loads(row["payload"]) for row in rows]


async def test_one_statement_creates_rows_announcements_and_deliveries_once(
    pool: asyncpg.Pool, test_env: TestEnv,
) -> None:
    user, event_id = uuid.uuid4(), uuid.uuid4()
    channel = await add_channel(pool, user, [CHECKIN_RECEIVED, DIGEST])
    await add_channel(pool, user, [CHECKIN_RECEIVED], verified=False)
    await add_channel(pool, user, ["reply.received"])
    alert = checkin_alert(user, event_id)
    digest = NewNotification(user_id=user, kind=DIGEST, relationship_id=None, message_id=None,
                             actor_id=None, event_id=None, created_at=datetime.now(UTC),
                             details={"checkins": 2, "since": "2026-12-01T09:00:00+00:00"})

    woken: list[str] = []
    listener = await asyncpg.connect(test_env.database_url, timeout=10)
    try:
        for name in (NOTIFIER_OUTBOX.channel, DELIVERIES_CHANNEL):
            await listener.add_listener(name, lambda _c, _p, channel, _m: woken.append(channel))
        async with pool.acquire() as raw, raw.transaction():
            await raw.execute("INSERT INTO notifier.inbox (event_id, event_type)"
                              " VALUES ($1, 'checkin.submitted')", event_id)
            conn = CountingConnection(raw)
            ids = await insert_notifications(conn, [alert, alert, digest])  # type: ignore[arg-type]
            assert conn.statements == 1
        async with asyncio.timeout(5):
            while len(set(woken)) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    finally:
        await listener.close()

    assert ids[0] == ids[1] != ids[2]
    rows = await pool.fetch("SELECT id, kind, details::text AS details"
                            " FROM notifier.notifications WHERE user_id = $1", user)
    assert {row["id"] for row in rows} == set(ids)
    [stored_digest] = [row for row in rows if row["kind"] == DIGEST]
    assert json.loads(stored_digest["details"]) == digest.details
    announced = await outbox_of(pool, ids)
    assert [a["data"]["notification_id"] for a in announced] == [str(ids[0]), str(ids[2])]
    assert announced[0]["correlation_id"] == str(event_id)
    assert announced[1]["data"]["details"] == digest.details
    deliveries = await pool.fetch(
        "SELECT notification_id, channel_id FROM notifier.deliveries WHERE user_id = $1", user)
    assert sorted((d["notification_id"], d["channel_id"]) for d in deliveries) == sorted(
        [(ids[0], channel), (ids[2], channel)])


async def test_a_repeat_returns_the_first_id_and_creates_nothing(pool: asyncpg.Pool) -> None:
    user, event_id = uuid.uuid4(), uuid.uuid4()
    await add_channel(pool, user, [CHECKIN_RECEIVED])
    await pool.execute("INSERT INTO notifier.inbox (event_id, event_type)"
                       " VALUES ($1, 'checkin.submitted')", event_id)
    async with pool.acquire() as conn, conn.transaction():
        [first] = await insert_notifications(conn, [checkin_alert(user, event_id)])
    async with pool.acquire() as conn, conn.transaction():
        again = await insert_notifications(conn, [checkin_alert(user, event_id)])
        assert await insert_notifications(conn, []) == []
    assert again == [first]
    assert len(await outbox_of(pool, [first])) == 1
    assert await pool.fetchval(
        "SELECT count(*) FROM notifier.deliveries WHERE notification_id = $1", first) == 1
    assert await pool.fetchval(
        "SELECT count(*) FROM notifier.notifications WHERE event_id = $1", event_id) == 1


class CapturingConnection:
    """Records the statement ``insert_notifications`` sends instead of running it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        self.calls.append((sql, args))
        return [{"id": uuid.uuid4(), "announced": True}]


def sql_literal(value: Any) -> str:
    """A text literal PostgreSQL casts to the prepared statement's parameter type."""
    def text(item: Any) -> str:
        return item.isoformat() if isinstance(item, datetime) else str(item)

    if isinstance(value, list):
        value = "{" + ",".join(
            "NULL" if item is None
            else '"' + text(item).replace("\\", "\\\\").replace('"', '\\"') + '"'
            for item in value) + "}"
    return "'" + text(value).replace("'", "''") + "'"


def scanned_tables(plan: dict[str, Any]) -> list[tuple[str, str]]:
    found = [(plan["Node Type"], plan["Relation Name"])] if "Relation Name" in plan else []
    for child in plan.get("Plans", []):
        found += scanned_tables(child)
    return found


async def test_a_repeat_is_looked_up_by_key_never_by_scanning_every_notification(
    test_env: TestEnv,
) -> None:
    """Each alert's statement must cost the same at a million notifications as at ten.

    It once joined the table to find repeats. asyncpg prepares the statement and
    Postgres caches a generic plan for it after five runs; made while the table
    was new (never analysed: it looks like ten pages), that plan scanned every
    notification on every call for as long as the connection lived or until
    autovacuum analysed the table, which a new deployment (and the benchmark)
    runs into. Planned in a database of its own, as new as a deployment's.
    """
    capture = CapturingConnection()
    await insert_notifications(  # type: ignore[arg-type]
        capture, [checkin_alert(uuid.uuid4(), uuid.uuid4())])
    [(sql, args)] = capture.calls
    database = f"{test_env.database}_plan"
    await create_database(database)
    try:
        await migrate_all(f"{PG_BASE}/{database}")
        conn = await asyncpg.connect(f"{PG_BASE}/{database}", timeout=10)
        try:
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            await conn.execute(f"PREPARE insert_notifications_plan AS {sql}")
            plan = json.loads(await conn.fetchval(
                "EXPLAIN (FORMAT JSON) EXECUTE insert_notifications_plan"
                f" ({', '.join(map(sql_literal, args))})"))
        finally:
            await conn.close()
    finally:
        await drop_database(database)
    scans = scanned_tables(plan[0]["Plan"])
    assert ("Index Scan", "notifications") in scans
    assert ("Seq Scan", "notifications") not in scans


async def test_a_reminder_travels_in_the_notification_statement(pool: asyncpg.Pool) -> None:
    user, event_id = uuid.uuid4(), uuid.uuid4()
    alert = checkin_alert(user, event_id)
    assert alert.message_id is not None
    assert alert.relationship_id is not None
    assert alert.actor_id is not None
    now = datetime.now(UTC)
    reminder = NewReminder(
        message_id=alert.message_id, therapist_id=user, relationship_id=alert.relationship_id,
        client_id=alert.actor_id, received_at=now, reply_by=now + timedelta(days=1),
        remind_at=now + timedelta(hours=20))
    await pool.execute("INSERT INTO notifier.inbox (event_id, event_type)"
                       " VALUES ($1, 'checkin.submitted')", event_id)
    async with pool.acquire() as raw, raw.transaction():
        conn = CountingConnection(raw)
        created = await create_notifications(  # type: ignore[arg-type]
            conn, [alert], reminders=[reminder])
        assert conn.statements == 1
        assert created.announced
    # A repeat keeps the reminder made first (and announces nothing new).
    later = dataclasses.replace(reminder, remind_at=now + timedelta(hours=1))
    async with pool.acquire() as conn, conn.transaction():
        again = await create_notifications(conn, [alert], reminders=[later])
    assert again.ids == created.ids
    assert not again.announced
    stored = await pool.fetch("SELECT therapist_id, client_id, reply_by, remind_at"
                              " FROM notifier.reminders WHERE message_id = $1", alert.message_id)
    assert [tuple(r) for r in stored] == [
        (user, alert.actor_id, reminder.reply_by, reminder.remind_at)]
    with pytest.raises(ValueError, match="travel with notifications"):
        async with pool.acquire() as conn:
            await create_notifications(conn, [], reminders=[reminder])


async def test_one_users_notifications_are_stored_in_the_order_they_commit(
        db_pool: asyncpg.Pool) -> None:
    """Two therapists' lanes notifying the same client: the second waits for the
    first to commit, so stored order (what a stream's resume follows) is commit
    order. Without the client's lock the second stored after the first and
    committed before it."""
    store = NotifierStore(db_pool)
    client, therapist_a, therapist_b = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    first_inside, release_first = asyncio.Event(), asyncio.Event()

    events = {therapist_a: uuid.uuid4(), therapist_b: uuid.uuid4()}

    def reply_from(therapist: uuid.UUID) -> NewNotification:
        return NewNotification(
            user_id=client, kind=REPLY_RECEIVED, relationship_id=uuid.uuid4(),
            message_id=uuid.uuid4(), actor_id=therapist, event_id=events[therapist],
            created_at=datetime.now(UTC))

    async def first(tx: EventTransaction) -> None:
        await tx.notify([reply_from(therapist_a)])
        first_inside.set()
        await release_first.wait()

    async def second(tx: EventTransaction) -> None:
        await tx.notify([reply_from(therapist_b)])

    one = asyncio.create_task(store.handle_event(events[therapist_a], "reply.sent", first,
                                                 lock_user=therapist_a))
    await asyncio.wait_for(first_inside.wait(), 10)
    two = asyncio.create_task(store.handle_event(events[therapist_b], "reply.sent", second,
                                                 lock_user=therapist_b))
    try:
        await asyncio.sleep(0.5)
        assert not two.done(), "the second lane stored for the client while the first was open"
    finally:
        release_first.set()
    assert await asyncio.wait_for(asyncio.gather(one, two), 10) == [True, True]


async def test_a_reminder_waits_while_a_handler_holds_its_therapist(
        db_pool: asyncpg.Pool) -> None:
    """The scheduler stores a reminder only under its recipient's lock, tried,
    never waited for (the handler holding it may cancel the very row)."""
    therapist, message = uuid.uuid4(), uuid.uuid4()
    # Due long ago, so no other test's reminder is due at this ``now``.
    due = datetime(2001, 1, 1, 9, tzinfo=UTC)
    await db_pool.execute(
        "INSERT INTO notifier.reminders (message_id, therapist_id, relationship_id, client_id,"
        " received_at, reply_by, remind_at) VALUES ($1, $2, $3, $4, $5, $6, $5)",
        message, therapist, uuid.uuid4(), uuid.uuid4(), due, due + timedelta(days=1))
    store = SchedulerStore(db_pool)
    async with db_pool.acquire() as handler, handler.transaction():
        await handler.execute("SELECT pg_advisory_xact_lock($1, $2)",
                              RECIPIENT_LOCK_NAMESPACE, recipient_lock_key(therapist))
        sent = await asyncio.wait_for(store.remind(due, reminder_decision, limit=10), 10)
        assert sent == 0
    assert await store.remind(due, reminder_decision, limit=10) == 1
    assert await db_pool.fetchval(
        "SELECT sent_at FROM notifier.reminders WHERE message_id = $1", message) == due
    kinds = await db_pool.fetch("SELECT kind FROM notifier.notifications WHERE user_id = $1",
                                therapist)
    assert [row["kind"] for row in kinds] == [REMINDER_REPLY_DUE]
