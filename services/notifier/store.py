"""The consumer's event transaction: the inbox (dedupe), the recipient lock, and
the queries an event handler runs inside its event's one transaction
(:class:`EventTransaction`): the read model of availability and agreements;
alerts made, held or re-planned; reminders added, re-planned or cancelled.

Here too are the kinds of notification and of held alert, and what the
scheduler reads back of that work: held alerts, pending reminders, the
recipient lock's key (its queries live in :mod:`services.notifier.scheduler_store`).
:class:`NotifierStore`, the one store the app holds, is the feed's queries
(:mod:`services.notifier.feed_store`) plus :meth:`NotifierStore.handle_event`.
Results are frozen dataclasses; failures are domain errors, never HTTP.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.notifier.feed_store import FeedStore

# Made in their own module, and re-exported here where the rest of the notifier looks.
from services.notifier.notifications_store import NOTIFIER_OUTBOX as NOTIFIER_OUTBOX
from services.notifier.notifications_store import NewNotification as NewNotification
from services.notifier.notifications_store import NewReminder as NewReminder
from services.notifier.notifications_store import create_notifications
from services.notifier.notifications_store import insert_notifications as insert_notifications
from services.notifier.unavailable import reachable
from shared.boundaries import Agreement
from shared.db import transaction_opened_with, uuid_literal
from shared.schedule import WeeklySchedule

CHECKIN_RECEIVED = "checkin.received"
REPLY_RECEIVED = "reply.received"
DIGEST = "digest"
REMINDER_REPLY_DUE = "reminder.reply_due"

KINDS = (CHECKIN_RECEIVED, REPLY_RECEIVED, DIGEST, REMINDER_REPLY_DUE)

HELD_CHECKIN = "checkin"
HELD_REPLY = "reply"

# Advisory locks on a recipient take (namespace, key); the namespace keeps them
# apart from any other two-key advisory lock on the database.
RECIPIENT_LOCK_NAMESPACE = 0x1D7E_0002
# Event types that may be spliced into SQL text as they are (every real one).
_PLAIN_EVENT_TYPE = re.compile(r"[a-z][a-z0-9_.]{0,63}")

_HELD_COLUMNS = ("id, recipient_id, kind, relationship_id, message_id, actor_id, event_id,"
                 " urgent, beyond, created_at, released_at, release_at")


@dataclass(frozen=True, slots=True)
class NewHeldAlert:
    """An alert to give later: ``release_at`` None waits for the therapist's hours to change."""

    recipient_id: uuid.UUID
    kind: str                      # HELD_CHECKIN or HELD_REPLY
    relationship_id: uuid.UUID
    message_id: uuid.UUID
    actor_id: uuid.UUID
    event_id: uuid.UUID
    created_at: datetime
    release_at: datetime | None
    urgent: bool = False
    beyond: bool = False
    released_at: datetime | None = None  # replies: when the reply reaches the client


@dataclass(frozen=True, slots=True)
class HeldAlert:
    id: uuid.UUID
    recipient_id: uuid.UUID
    kind: str
    relationship_id: uuid.UUID
    message_id: uuid.UUID
    actor_id: uuid.UUID
    event_id: uuid.UUID
    urgent: bool
    beyond: bool
    created_at: datetime
    released_at: datetime | None
    release_at: datetime | None

    @classmethod
    def from_record(cls, record: Any) -> HeldAlert:
        return cls(**dict(record.items()))


@dataclass(frozen=True, slots=True)
class PendingReminder(NewReminder):
    """A stored reminder, neither sent nor cancelled."""

    @classmethod
    def from_record(cls, record: Any) -> PendingReminder:
        return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls)})


def recipient_lock_key(recipient_id: uuid.UUID) -> int:
    """The advisory-lock key of a recipient (a signed 32-bit int; collisions only serialise)."""
    return int.from_bytes(recipient_id.bytes[-4:], "big", signed=True)


def schedule_from_row(value: Any) -> WeeklySchedule | None:
    return None if value is None else WeeklySchedule.from_json(value)


def agreement_from_row(terms: Any) -> Agreement:
    return Agreement() if terms is None else Agreement.from_json(terms)


class EventTransaction:
    """The queries an event handler may run, all inside its event's one transaction."""

    def __init__(self, conn: asyncpg.Connection, *,
                 locked: uuid.UUID | None = None, notify_relay: bool = True) -> None:
        self._conn = conn
        self._notify_relay = notify_relay
        # Whether a notification.created went into the outbox (its relay has work).
        self.announced = False
        # Users whose lock this transaction holds already (taken with BEGIN).
        self._locked: set[uuid.UUID] = set() if locked is None else {locked}

    # --- the read model ---------------------------------------------------------------

    async def agreement_of(self, relationship_id: uuid.UUID) -> Agreement:
        """The relationship's agreement; the defaults until one is known."""
        return agreement_from_row(await self._conn.fetchval(
            "/* agreement_of */ SELECT terms FROM notifier.agreements"
            " WHERE relationship_id = $1", relationship_id))

    async def schedule_and_agreement(self, therapist_id: uuid.UUID, relationship_id: uuid.UUID
                                     ) -> tuple[WeeklySchedule | None, Agreement]:
        """The therapist's office hours (None until known, or when they set none) and
        the relationship's agreement (the defaults until known), in one round trip."""
        row = await self._conn.fetchrow(
            "/* schedule_and_agreement */ SELECT"
            " (SELECT schedule FROM notifier.availability WHERE therapist_id = $1) AS schedule,"
            " (SELECT terms FROM notifier.agreements WHERE relationship_id = $2) AS terms",
            therapist_id, relationship_id)
        return schedule_from_row(row["schedule"]), agreement_from_row(row["terms"])

    async def save_availability(self, therapist_id: uuid.UUID, version: int,
                                schedule: dict[str, Any] | None) -> bool:
        """Store the therapist's availability if ``version`` is newer; True if it was."""
        applied = await self._conn.fetchval(
            "/* save_availability */ INSERT INTO notifier.availability AS a"
            " (therapist_id, version, schedule) VALUES ($1, $2, $3)"
            " ON CONFLICT (therapist_id) DO UPDATE"
            " SET version = EXCLUDED.version, schedule = EXCLUDED.schedule, updated_at = now()"
            " WHERE a.version < EXCLUDED.version RETURNING true",
            therapist_id, version, schedule)
        return bool(applied)

    async def save_agreement(self, relationship_id: uuid.UUID, therapist_id: uuid.UUID,
                             client_id: uuid.UUID, version: int, terms: dict[str, Any]) -> bool:
        """Store the relationship's agreement if ``version`` is newer; True if it was."""
        applied = await self._conn.fetchval(
            "/* save_agreement */ INSERT INTO notifier.agreements AS a"
            " (relationship_id, therapist_id, client_id, version, terms)"
            " VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (relationship_id) DO UPDATE"
            " SET therapist_id = EXCLUDED.therapist_id, client_id = EXCLUDED.client_id,"
            "     version = EXCLUDED.version, terms = EXCLUDED.terms, updated_at = now()"
            " WHERE a.version < EXCLUDED.version RETURNING true",
            relationship_id, therapist_id, client_id, version, terms)
        return bool(applied)

    # --- alerts -----------------------------------------------------------------------

    async def notify(self, notifications: Sequence[NewNotification], *,
                     reminder: NewReminder | None = None) -> None:
        """Create ``notifications`` and, in the same statement, ``reminder``.

        Each recipient's lock is held first (the handler's therapist already
        holds theirs; a reply's client is locked here), so one user's
        notifications are stored one transaction at a time: their stored order,
        which a stream's resume follows, is then the order they committed in.
        Two therapists' lanes notifying the same client would otherwise store
        seq 10 and 11 and commit 11 first, and a resume after 11 would miss 10.
        """
        if not notifications:
            if reminder is not None:
                await self.add_reminder(reminder)
            return
        for user_id in sorted({n.user_id for n in notifications} - self._locked,
                              key=recipient_lock_key):
            await self.lock_user(user_id)
        created = await create_notifications(
            self._conn, notifications, notify_relay=self._notify_relay,
            reminders=() if reminder is None else (reminder,))
        self.announced = self.announced or created.announced

    async def hold(self, alerts: Sequence[NewHeldAlert]) -> None:
        await self._conn.executemany(
            "/* hold */ INSERT INTO notifier.held_alerts"
            " (id, recipient_id, kind, relationship_id, message_id, actor_id, event_id,"
            "  urgent, beyond, created_at, released_at, release_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
            " ON CONFLICT (event_id, recipient_id) DO NOTHING",
            [(uuid.uuid4(), a.recipient_id, a.kind, a.relationship_id, a.message_id, a.actor_id,
              a.event_id, a.urgent, a.beyond, a.created_at, a.released_at, a.release_at)
             for a in alerts],
        )

    async def lock_user(self, user_id: uuid.UUID) -> None:
        """Wait for, then hold until commit, the user's advisory lock.

        Handlers take their therapist's: one therapist's events are then applied
        one at a time even across replicas (a re-plan never misses a check-in
        held concurrently), and no scheduler builds that therapist's digest from
        rows half re-planned (it only try-locks, and skips them this tick).
        """
        if user_id in self._locked:
            return
        await self._conn.execute(
            "/* lock_user */ SELECT pg_advisory_xact_lock($1, $2)",
            RECIPIENT_LOCK_NAMESPACE, recipient_lock_key(user_id))
        self._locked.add(user_id)

    async def held_checkins_for(self, therapist_id: uuid.UUID) -> list[HeldAlert]:
        rows = await self._conn.fetch(
            f"/* held_checkins_for */ SELECT {_HELD_COLUMNS} FROM notifier.held_alerts"
            " WHERE recipient_id = $1 AND kind = 'checkin' AND delivered_at IS NULL"
            " FOR UPDATE", therapist_id)
        return [HeldAlert.from_record(r) for r in rows]

    async def held_replies_from(self, therapist_id: uuid.UUID) -> list[HeldAlert]:
        rows = await self._conn.fetch(
            f"/* held_replies_from */ SELECT {_HELD_COLUMNS} FROM notifier.held_alerts"
            " WHERE actor_id = $1 AND kind = 'reply' AND delivered_at IS NULL"
            " FOR UPDATE", therapist_id)
        return [HeldAlert.from_record(r) for r in rows]

    async def held_replies_in(self, relationship_id: uuid.UUID) -> list[HeldAlert]:
        rows = await self._conn.fetch(
            f"/* held_replies_in */ SELECT {_HELD_COLUMNS} FROM notifier.held_alerts"
            " WHERE relationship_id = $1 AND kind = 'reply' AND delivered_at IS NULL"
            " FOR UPDATE", relationship_id)
        return [HeldAlert.from_record(r) for r in rows]

    async def reschedule(self, changes: Sequence[tuple[uuid.UUID, datetime | None,
                                                       datetime | None]]) -> None:
        """Set ``(id, released_at, release_at)`` of undelivered held alerts."""
        await self._conn.executemany(
            "/* reschedule */ UPDATE notifier.held_alerts"
            " SET released_at = $2, release_at = $3"
            " WHERE id = $1 AND delivered_at IS NULL",
            changes,
        )

    # --- reminders --------------------------------------------------------------------

    async def add_reminder(self, reminder: NewReminder) -> None:
        await self._conn.execute(
            "/* add_reminder */ INSERT INTO notifier.reminders"
            " (message_id, therapist_id, relationship_id, client_id, received_at, reply_by,"
            "  remind_at) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            " ON CONFLICT (message_id) DO NOTHING",
            reminder.message_id, reminder.therapist_id, reminder.relationship_id,
            reminder.client_id, reminder.received_at, reminder.reply_by, reminder.remind_at)

    async def cancel_reminders(self, relationship_id: uuid.UUID, received_before: datetime,
                               at: datetime) -> int:
        """Cancel the pending reminders of check-ins received before ``received_before``."""
        status = await self._conn.execute(
            "/* cancel_reminders */ UPDATE notifier.reminders SET cancelled_at = $3"
            " WHERE relationship_id = $1 AND received_at < $2"
            " AND sent_at IS NULL AND cancelled_at IS NULL",
            relationship_id, received_before, at)
        return int(status.rsplit(" ", 1)[-1])

    async def pending_reminders_of(self, therapist_id: uuid.UUID) -> list[PendingReminder]:
        rows = await self._conn.fetch(
            "/* pending_reminders_of */ SELECT * FROM notifier.reminders"
            " WHERE therapist_id = $1 AND sent_at IS NULL AND cancelled_at IS NULL"
            " FOR UPDATE", therapist_id)
        return [PendingReminder.from_record(r) for r in rows]

    async def reschedule_reminders(self, changes: Sequence[tuple[uuid.UUID, datetime | None]]
                                   ) -> None:
        await self._conn.executemany(
            "/* reschedule_reminders */ UPDATE notifier.reminders SET remind_at = $2"
            " WHERE message_id = $1 AND sent_at IS NULL AND cancelled_at IS NULL",
            changes,
        )


EventWork = Callable[[EventTransaction], Awaitable[None]]


class NotifierStore(FeedStore):
    """The consumer's event transaction and the feed's queries, over one asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool, *,
                 wake_relay: Callable[[], None] | None = None) -> None:
        """With ``wake_relay``, an event whose transaction announced notifications
        calls it after the commit, instead of sending its relay a NOTIFY
        through Postgres (one fewer per alert; used when this process runs it)."""
        super().__init__(pool)
        self._wake_relay = wake_relay

    async def handle_event(self, event_id: uuid.UUID, event_type: str, work: EventWork, *,
                           lock_user: uuid.UUID | None = None) -> bool:
        """Record ``event_id`` in the inbox and run ``work``, in one transaction.

        Returns False, and runs nothing, if the event was recorded before. An
        exception from ``work`` rolls back the inbox entry too. With
        ``lock_user``, that user's lock (:meth:`EventTransaction.lock_user`) is
        taken first, and the lock, ``BEGIN`` and the inbox entry cost one round
        trip together (the lock before the entry: a redelivered copy handled
        elsewhere at the same moment waits for the lock, then finds the entry).
        """
        lock = "" if lock_user is None else (
            "SELECT pg_advisory_xact_lock("
            f"{RECIPIENT_LOCK_NAMESPACE:d}, {recipient_lock_key(lock_user):d}); ")
        # The inbox entry travels with BEGIN as a simple query when the type can
        # be spliced in (every real one; the id is a UUID's text): its status
        # says whether a row went in. Any other type is inserted with parameters.
        plain = _PLAIN_EVENT_TYPE.fullmatch(event_type) is not None
        inbox = ("/* handle_event */ INSERT INTO notifier.inbox (event_id, event_type)"
                 f" VALUES ({uuid_literal(event_id)}, '{event_type}')"
                 " ON CONFLICT (event_id) DO NOTHING") if plain else "SELECT 1"
        async with reachable(), self._pool.acquire() as conn, \
                transaction_opened_with(conn, lock + inbox) as status:
            inserted = status == "INSERT 0 1" if plain else await conn.fetchval(
                "/* handle_event */ INSERT INTO notifier.inbox (event_id, event_type)"
                " VALUES ($1, $2) ON CONFLICT (event_id) DO NOTHING RETURNING true",
                event_id, event_type)
            if not inserted:
                return False
            tx = EventTransaction(conn, locked=lock_user,
                                  notify_relay=self._wake_relay is None)
            await work(tx)
        if tx.announced and self._wake_relay is not None:
            self._wake_relay()
        return True

    async def record_event(self, event_id: uuid.UUID, event_type: str,
                           notifications: Sequence[NewNotification]) -> bool:
        """Record ``event_id`` in the inbox and create ``notifications``, in one transaction.

        Returns False, and creates nothing, if the event was recorded before.
        """
        async def work(tx: EventTransaction) -> None:
            await tx.notify(notifications)

        return await self.handle_event(event_id, event_type, work)
