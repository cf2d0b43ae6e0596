"""Office hours and agreements in the notifier, on the real Postgres and RabbitMQ,
with a fake clock: held alerts, digests, re-planning, reminders, replicas.

The clock is a mutable object given to ``create_app``; the tests move it and
drive ``run_once`` themselves while the background scheduler ticks on the same
clock, so "exactly once" is checked with both at work.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.notifier.app import SCHEDULER, SCHEDULER_TASK, create_app
from services.notifier.scheduler import Scheduler
from shared.amqp import Publisher
from shared.boundaries import Agreement
from shared.events import (
    AGREEMENT_UPDATED,
    AVAILABILITY_UPDATED,
    CHECKIN_SUBMITTED,
    REPLY_SENT,
    AgreementEventData,
    AvailabilityEventData,
    Event,
    MessageEventData,
    new_event,
)
from shared.internal_auth import Identity, sign_headers
from shared.schedule import Absence, QuietHours, WeeklySchedule
from tests.conftest import TEST_INTERNAL_KEY
from tests.support.stack import eventually

if TYPE_CHECKING:
    from tests.conftest import TestEnv

pytestmark = pytest.mark.integration

# Monday 2030-01-07. Office hours are weekdays 09:00-17:00 UTC unless a test says otherwise.
MONDAY = datetime(2030, 1, 7, tzinfo=UTC)
MONDAY_EVENING = MONDAY.replace(hour=20)
TUESDAY_OPENING = MONDAY + timedelta(days=1, hours=9)
WEEKDAYS = "Mon-Fri 09:00-17:00"


class FakeClock:
    """A clock that stands still until a test moves it."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Notifier:
    app: web.Application
    client: TestClient[web.Request, web.Application]

    @property
    def scheduler(self) -> Scheduler:
        return self.app[SCHEDULER]


async def _ready(client: TestClient[web.Request, web.Application]) -> bool:
    return (await client.get("/readyz")).status == 200


@asynccontextmanager
async def running_notifier(test_env: TestEnv, clock: FakeClock, *,
                           interval: float = 0.05) -> AsyncIterator[Notifier]:
    app = create_app(test_env.settings(), clock=clock, scheduler_interval=interval)
    async with TestClient(TestServer(app)) as client:
        await eventually(lambda: _ready(client))
        yield Notifier(app, client)
    assert app[SCHEDULER_TASK].done()


@dataclass
class Pair:
    """A therapist and a client in a relationship (ids only: the notifier knows no more)."""

    therapist: uuid.UUID
    client: uuid.UUID
    relationship: uuid.UUID

    @classmethod
    def new(cls, therapist: uuid.UUID | None = None) -> Pair:
        return cls(therapist or uuid.uuid4(), uuid.uuid4(), uuid.uuid4())


class Events:
    """Publishes events and waits until a notifier has handled them."""

    def __init__(self, publisher: Publisher, pool: asyncpg.Pool, clock: FakeClock) -> None:
        self.publisher = publisher
        self.pool = pool
        self.clock = clock

    async def send(self, event: Event, *, wait: bool = True) -> Event:
        await self.publisher.publish(event.type, event.model_dump_json().encode(),
                                     message_id=str(event.event_id),
                                     correlation_id=event.correlation_id)
        if wait:
            await eventually(lambda: self.handled(event.event_id))
        return event

    async def handled(self, event_id: uuid.UUID) -> bool:
        return bool(await self.pool.fetchval(
            "SELECT true FROM notifier.inbox WHERE event_id = $1", event_id))

    async def hours(self, therapist: uuid.UUID, version: int, spec: str | None, *,
                    absences: tuple[Absence, ...] = ()) -> Event:
        """``spec`` None: no hours set; "": no office time at all."""
        schedule = None
        if spec is not None:
            hours = WeeklySchedule.parse(spec, "UTC", absences) if spec else \
                WeeklySchedule(tz="UTC")
            schedule = hours.to_json(include_notes=False)
        data = AvailabilityEventData(therapist_id=therapist, version=version, schedule=schedule)
        return await self.send(new_event(AVAILABILITY_UPDATED, data, "test"))

    async def agreement(self, pair: Pair, version: int, agreement: Agreement) -> Event:
        terms = {**agreement.to_json(), "crisis_resources": None}
        data = AgreementEventData(relationship_id=pair.relationship, therapist_id=pair.therapist,
                                  client_id=pair.client, version=version, terms=terms)
        return await self.send(new_event(AGREEMENT_UPDATED, data, "test"))

    def message(self, event_type: str, pair: Pair, **fields: Any) -> Event:
        sender = pair.client if event_type == CHECKIN_SUBMITTED else pair.therapist
        data = MessageEventData.model_validate({
            "message_id": uuid.uuid4(), "relationship_id": pair.relationship,
            "therapist_id": pair.therapist, "client_id": pair.client, "sender_id": sender,
            "sent_at": self.clock.now, **fields})
        return new_event(event_type, data, "test")

    async def checkin(self, pair: Pair, **fields: Any) -> Event:
        return await self.send(self.message(CHECKIN_SUBMITTED, pair, **fields))

    async def reply(self, pair: Pair, **fields: Any) -> Event:
        return await self.send(self.message(REPLY_SENT, pair, **fields))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(MONDAY_EVENING)


@pytest.fixture
def events(publisher: Publisher, db_pool: asyncpg.Pool, clock: FakeClock) -> Events:
    return Events(publisher, db_pool, clock)


async def notifications_for(pool: asyncpg.Pool, user: uuid.UUID,
                            kind: str | None = None) -> list[asyncpg.Record]:
    rows = await pool.fetch(
        "SELECT * FROM notifier.notifications WHERE user_id = $1 ORDER BY created_at, id", user)
    return [r for r in rows if kind is None or r["kind"] == kind]


async def held_for(pool: asyncpg.Pool, user: uuid.UUID) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM notifier.held_alerts WHERE recipient_id = $1", user)


async def tick(notifier: Notifier, clock: FakeClock, at: datetime) -> None:
    """Move the clock to ``at``, run a scheduler pass there, and let any background
    pass that was already under way finish (it may hold a recipient's lock, which
    makes ours skip that recipient)."""
    clock.now = at
    await notifier.scheduler.run_once(at)
    start = notifier.scheduler.passes

    async def two_more_passes() -> bool:
        return notifier.scheduler.passes >= start + 2

    await eventually(two_more_passes)


def digest_counts(row: asyncpg.Record) -> dict[str, int]:
    assert row["kind"] == "digest"
    assert (row["relationship_id"], row["message_id"], row["actor_id"], row["event_id"]) == (
        None, None, None, None)
    return details_of(row)


def details_of(row: asyncpg.Record) -> Any:
    # The tests' pool has no jsonb codec: details arrive as JSON text.
    return None if row["details"] is None else json.loads(row["details"])


# --- held check-ins and digests ----------------------------------------------------------


async def test_checkin_outside_hours_waits_for_one_digest_at_the_opening(
    test_env: TestEnv, events: Events, clock: FakeClock, db_pool: asyncpg.Pool,
) -> None:
    pair = Pair.new()
    async with running_notifier(test_env, clock) as notifier:
        await events.hours(pair.therapist, 1, WEEKDAYS)
        await events.checkin(pair)
        await tick(notifier, clock, MONDAY_EVENING + timedelta(hours=1))
        await tick(notifier, clock, TUESDAY_OPENING - timedelta(microseconds=1))
        assert await notifications_for(db_pool, pair.therapist) == []

        await tick(notifier, clock, TUESDAY_OPENING)
        await tick(notifier, clock, TUESDAY_OPENING + timedelta(minutes=1))
        [digest] = await notifications_for(db_pool, pair.therapist)
        assert digest_counts(digest) == {"checkins": 1, "clients": 1, "beyond_agreement": 0,
                                         "urgent": 0}
        assert digest["created_at"] == TUESDAY_OPENING
        [held] = await held_for(db_pool, pair.therapist)
        assert held["notification_id"] == digest["id"]
        assert held["delivered_at"] == TUESDAY_OPENING


async def test_checkins_from_two_clients_make_one_digest_across_a_restart(
    test_env: TestEnv, events: Events, clock: FakeClock, db_pool: asyncpg.Pool,
) -> None:
    first = Pair.new()
    second = Pair.new(first.therapist)
    async with running_notifier(test_env, clock):
        await events.hours(first.therapist, 1, WEEKDAYS)
        await events.checkin(first)
        await events.checkin(first, beyond_agreement=True)
    # A new notifier on the same database: the held alerts are durable.
    async with running_notifier(test_env, clock) as notifier:
        await events.checkin(second)
        await tick(notifier, clock, MONDAY_EVENING + timedelta(hours=2))
        assert await notifications_for(db_pool, first.therapist) == []
    async with running_notifier(test_env, clock) as notifier:
        await tick(notifier, clock, TUESDAY_OPENING)
        await tick(notifier, clock, TUESDAY_OPENING + timedelta(seconds=1))
        [digest] = await notifications_for(db_pool, first.therapist)
        assert digest_counts(digest) == {"checkins": 3, "clients": 2, "beyond_agreement": 1,
                                         "urgent": 0}

        # The feed shows it, with counts and no single message or person.
        identity = Identity(user_id=first.therapist, role="therapist", request_id="r")
        headers = sign_headers(TEST_INTERNAL_KEY.encode(), method="GET",
                               path_qs="/v1/notifications", identity=identity, body=b"")
        response = await notifier.client.get("/v1/notifications", headers=headers)
        assert response.status == 200
        [item] = (await response.json())["items"]
        assert item["kind"] == "digest"
        assert (item["relationship_id"], item["message_id"], item["actor_id"]) == (
            None, None, None)
        assert item["details"] == {"checkins": 3, "clients": 2, "beyond_agreement": 1,
                                   "urgent": 0}


async def test_two_notifiers_at_once_deliver_each_digest_exactly_once(
    test_env: TestEnv, events: Events, clock: FakeClock, db_pool: asyncpg.Pool,
) -> None:
    therapists = [uuid.uuid4() for _ in range(6)]
    async with running_notifier(test_env, clock, interval=0.01) as one, \
            running_notifier(test_env, clock, interval=0.01) as two:
        for index, therapist in enumerate(therapists):
            await events.hours(therapist, 1, WEEKDAYS)
            pairs = [Pair.new(therapist) for _ in range(2)]
            for n in range(index % 3 + 1):
                await events.checkin(pairs[n % 2], beyond_agreement=n == 2)
        clock.now = TUESDAY_OPENING
        for _ in range(10):
            await asyncio.gather(*(n.scheduler.run_once(TUESDAY_OPENING)
                                   for n in (one, two, one, two)))
        # Both background schedulers keep ticking on the same clock meanwhile.
        passes = (one.scheduler.passes, two.scheduler.passes)
        await eventually(lambda: asyncio.sleep(0, one.scheduler.passes > passes[0] + 2
                                               and two.scheduler.passes > passes[1] + 2))

    for index, therapist in enumerate(therapists):
        digests = await notifications_for(db_pool, therapist)
        count = index % 3 + 1
        assert len(digests) == 1, therapist
        assert digest_counts(digests[0]) == {
            "checkins": count, "clients": min(count, 2), "beyond_agreement": int(count == 3),
            "urgent": 0}
        held = await held_for(db_pool, therapist)
        assert len(held) == count
        assert {h["notification_id"] for h in held} == {digests[0]["id"]}


async def test_an_hours_change_releases_held_alerts_at_the_next_tick(
    test_env: TestEnv, events: Events, clock: FakeClock, db_pool: asyncpg.Pool,
) -> None:
    pair = Pair.new()
    async with running_notifier(test_env, clock) as notifier:
        await events.hours(pair.therapist, 1, WEEKDAYS)
        await events.checkin(pair)
        await tick(notifier, clock, MONDAY_EVENING + timedelta(minutes=5))
        assert await notifications_for(db_pool, pair.therapist) == []

        await events.hours(pair.therapist, 2, "Mon 18:00-23:00; " + WEEKDAYS)
        # A late copy of an older version changes nothing.
        await events.hours(pair.therapist, 1, WEEKDAYS)
        assert await db_pool.fetchval(
            "SELECT version FROM notifier.availability WHERE therapist_id = $1",
            pair.therapist) == 2
        await tick(notifier, clock, MONDAY_EVENING + timedelta(minutes=6))
        [digest] = await notifications_for(db_pool, pair.therapist)
        assert digest_counts(digest)["checkins"] == 1
        # Now open: the next check-in alerts at once.
        await events.checkin(pair)
        assert sorted(n["kind"] for n in await notifications_for(db_pool, pair.therapist)) == [
            "checkin.received", "digest"]


async def test_the_end_of_an_absence_releases_held_alerts(
    test_env: TestEnv, events: Events, clock: FakeClock, db_pool: asyncpg.Pool,
) -> None:
    pair = Pair.new()
    monday_morning = MONDAY.replace(hour=10)
    clock.now = monday_morning
    away = Absence(id="a1", first_day=date(2030, 1, 7), last_day=date(2030, 1, 8))
    async with running_notifier(test_env, clock) as notifier:
        await events.hours(pair.therapist, 1, WEEKDAYS, absences=(away,))
        await events.checkin(pair)
        assert (await held_for(db_pool, pair.therapist))[0]["release_at"] == \
            MONDAY + timedelta(days=2, hours=9)
        await tick(notifier, clock, monday_morning + timedelta(minutes=1))
        assert await notifications_for(db_pool, pair.therapist) == []

        await events.hours(pair.therapist, 2, WEEKDAYS)   # back early
        await tick(notifier, clock, monday_morning + timedelta(minutes=2))
        [digest] = await notifications_for(db_pool, pair.therapist)
        assert digest_counts(digest)["checkins"] == 1


async def test_with_no_office_time_ahead_a_checkin_waits_for_new_hours(
    test_env: TestEnv, events: Events, clock: FakeClock, db_pool: asyncpg.Pool,
) -> None:
    pair = Pair.new()
    async with running_notifier(test_env, clock) as notifier:
        await events.hours(pair.therapist, 1, "")
        await events.checkin(pair)
        assert (await held_for(db_pool, pair.therapist))[0]["release_at"] is None
        await tick(notifier, clock, MONDAY + timedelta(days=30))
        assert await notifications_for(db_pool, pair.therapist) == []

        await events.hours(pair.therapist, 2, None)   # hours unset: every alert immediate
        await tick(notifier, clock, clock.now)
        [digest] = await notifications_for(db_pool, pair.therapist)
        assert digest_counts(digest)["checkins"] == 1


async def test_urgent_checkins_follow_the_urgent_policy(
    test_env: TestEnv, events: Events, clock: FakeClock, db_pool: asyncpg.Pool,
) -> None:
    anytime = Pair.new()
    in_hours = Pair.new(anytime.therapist)
    async with running_notifier(test_env, clock) as notifier:
        await events.hours(anytime.therapist, 1, WEEKDAYS)
        await events.agreement(anytime, 1, Agreement(urgent_policy="urgent-anytime"))
        await events.checkin(anytime, urgent=True)
        [alert] = await notifications_for(db_pool, anytime.therapist)
        assert alert["kind"] == "checkin.received"
        assert alert["relationship_id"] == anytime.relationship

        # No agreement known for this one: the default, urgent-in-hours, holds it.
        await events.checkin(in_hours, urgent=True)
        await tick(notifier, clock, TUESDAY_OPENING)
        digests = await notifications_for(db_pool, anytime.therapist, "digest")
        assert [digest_counts(d) for d in digests] == [
            {"checkins": 1, "clients": 1, "beyond_agreement": 0, "urgent": 1}]


# --- replies -------------------------------------------------------------------------------


async def test_a_reply_outside_hours_waits_for_the_window_and_the_clients_quiet_hours(
    test_env: TestEnv, events: Events, clock: FakeClock, db_pool: asyncpg.Pool,
) -> None:
    plain = Pair.new()
    quiet = Pair.new(plain.therapist)
    async with running_notifier(test_env, clock) as notifier:
        await events.hours(plain.therapist, 1, WEEKDAYS)
        await events.agreement(quiet, 1, Agreement(
            client_quiet_hours=QuietHours.parse("07:00-10:00", "UTC")))
        plain_reply = await events.reply(plain)
        await events.reply(quiet)
        await tick(notifier, clock, TUESDAY_OPENING - timedelta(seconds=1))
        assert await notifications_for(db_pool, plain.client) == []

        await tick(notifier, clock, TUESDAY_OPENING)
        [alert] = await notifications_for(db_pool, plain.client)
        assert (alert["kind"], alert["actor_id"], alert["event_id"]) == (
            "reply.received", plain.therapist, plain_reply.event_id)
        assert alert["created_at"] == TUESDAY_OPENING
        assert await notifications_for(db_pool, quiet.client) == []

        await tick(notifier, clock, TUESDAY_OPENING.replace(hour=10))
        await tick(notifier, clock, TUESDAY_OPENING.replace(hour=11))
        assert len(await notifications_for(db_pool, quiet.client)) == 1
        assert len(await notifications_for(db_pool, plain.client)) == 1


async def test_new_quiet_hours_move_a_held_reply(
    test_env: TestEnv, events: Events, clock: FakeClock, db_pool: asyncpg.Pool,
) -> None:
    pair = Pair.new()
    async with running_notifier(test_env, clock) as notifier:
        await events.hours(pair.therapist, 1, WEEKDAYS)
        await events.reply(pair)
        await events.agreement(pair, 2, Agreement(
            client_quiet_hours=QuietHours.parse("08:00-12:00", "UTC")))
        await tick(notifier, clock, TUESDAY_OPENING)
        assert await notifications_for(db_pool, pair.client) == []
        await tick(notifier, clock, TUESDAY_OPENING.replace(hour=12))
        assert len(await notifications_for(db_pool, pair.client)) == 1


async def test_a_reply_sent_now_alerts_at_once(
    test_env: TestEnv, events: Events, clock: FakeClock, db_pool: asyncpg.Pool,
) -> None:
    pair = Pair.new()
    async with running_notifier(test_env, clock):
        await events.hours(pair.therapist, 1, WEEKDAYS)
        await events.reply(pair, deliver_now=True)
        [alert] = await notifications_for(db_pool, pair.client)
        assert alert["kind"] == "reply.received"
        assert await held_for(db_pool, pair.client) == []


# --- reminders -----------------------------------------------------------------------------


async def test_a_reminder_fires_once_in_hours_and_a_reply_cancels_it(
    test_env: TestEnv, events: Events, clock: FakeClock, db_pool: asyncpg.Pool,
) -> None:
    waiting = Pair.new()
    answered = Pair.new(waiting.therapist)
    monday_nine = MONDAY.replace(hour=9)
    clock.now = monday_nine
    reply_by = TUESDAY_OPENING.replace(hour=17)   # 16 office hours: reminder Tue 13:00
    remind_at = TUESDAY_OPENING.replace(hour=13)
    async with running_notifier(test_env, clock) as notifier:
        await events.hours(waiting.therapist, 1, WEEKDAYS)
        checkin = await events.checkin(waiting, reply_by=reply_by)
        await events.checkin(answered, reply_by=reply_by)
        clock.now = monday_nine + timedelta(hours=1)
        await events.reply(answered)

        await tick(notifier, clock, remind_at - timedelta(seconds=1))
        assert await notifications_for(db_pool, waiting.therapist, "reminder.reply_due") == []
        await tick(notifier, clock, remind_at)
        await tick(notifier, clock, remind_at + timedelta(hours=1))
        [reminder] = await notifications_for(db_pool, waiting.therapist, "reminder.reply_due")
        assert str(reminder["message_id"]) == checkin.data["message_id"]
        assert reminder["relationship_id"] == waiting.relationship
        assert details_of(reminder) == {"reply_by": reply_by.isoformat()}
        row = await db_pool.fetchrow(
            "SELECT sent_at, cancelled_at FROM notifier.reminders WHERE relationship_id = $1",
            answered.relationship)
        assert row["sent_at"] is None
        assert row["cancelled_at"] is not None


async def test_a_reminder_due_outside_hours_waits_for_the_opening(
    test_env: TestEnv, events: Events, clock: FakeClock, db_pool: asyncpg.Pool,
) -> None:
    pair = Pair.new()
    clock.now = MONDAY.replace(hour=16)
    async with running_notifier(test_env, clock) as notifier:
        await events.hours(pair.therapist, 1, WEEKDAYS)
        # Due at 17:00 today: the last quarter starts at 16:45, an hour the
        # therapist is in; but the pass comes only after closing.
        await events.checkin(pair, reply_by=MONDAY.replace(hour=17))
        await tick(notifier, clock, MONDAY_EVENING)
        assert await notifications_for(db_pool, pair.therapist, "reminder.reply_due") == []
        await tick(notifier, clock, TUESDAY_OPENING)
        assert len(await notifications_for(db_pool, pair.therapist, "reminder.reply_due")) == 1


# --- duplicates ----------------------------------------------------------------------------


async def test_duplicate_events_have_one_effect(
    test_env: TestEnv, events: Events, clock: FakeClock, db_pool: asyncpg.Pool,
) -> None:
    pair = Pair.new()
    async with running_notifier(test_env, clock) as notifier:
        hours = await events.hours(pair.therapist, 1, WEEKDAYS)
        checkin = events.message(CHECKIN_SUBMITTED, pair, reply_by=TUESDAY_OPENING)
        reply = events.message(REPLY_SENT, pair, deliver_now=True,
                               sent_at=MONDAY_EVENING - timedelta(hours=1))
        for event in (checkin, checkin, reply, reply, hours):
            await events.send(event, wait=False)
        for event in (checkin, reply):
            await eventually(lambda event=event: events.handled(event.event_id))
        await asyncio.sleep(0.3)   # the second copies too
        assert len(await held_for(db_pool, pair.therapist)) == 1
        assert len(await db_pool.fetch(
            "SELECT 1 FROM notifier.reminders WHERE relationship_id = $1",
            pair.relationship)) == 1
        assert len(await notifications_for(db_pool, pair.client)) == 1

        await tick(notifier, clock, TUESDAY_OPENING)
        await tick(notifier, clock, TUESDAY_OPENING + timedelta(minutes=1))
        [digest] = await notifications_for(db_pool, pair.therapist, "digest")
        assert digest_counts(digest)["checkins"] == 1
