"""The scheduler's SQL: deliver due held alerts and due reminders, exactly once.

Several notifier replicas may run the scheduler on one database at once. A
recipient's due alerts are delivered under a transaction-level advisory lock on
that recipient (taken with try: a replica that cannot get it leaves the
recipient to the one that has it) and their rows are locked ``FOR UPDATE SKIP
LOCKED``, then marked delivered in the same transaction as the notifications
they became; reminders likewise. Nothing is ever delivered twice or split
between two digests.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from services.notifier.store import (
    RECIPIENT_LOCK_NAMESPACE,
    HeldAlert,
    NewNotification,
    PendingReminder,
    insert_notifications,
    recipient_lock_key,
    schedule_from_row,
)
from services.notifier.unavailable import reachable
from shared.schedule import WeeklySchedule

_HELD_COLUMNS = ("id, recipient_id, kind, relationship_id, message_id, actor_id, event_id,"
                 " urgent, beyond, created_at, released_at, release_at")

# What the due alerts of one recipient become: each notification with the held
# alerts it delivers.
Composer = Callable[[uuid.UUID, Sequence[HeldAlert], datetime],
                    list[tuple[NewNotification, list[uuid.UUID]]]]


@dataclass(frozen=True, slots=True)
class ReminderDecision:
    """Send now, or try again at ``retry_at`` (None: when the hours change)."""

    send: NewNotification | None
    retry_at: datetime | None = None


ReminderPolicy = Callable[[PendingReminder, WeeklySchedule | None, datetime], ReminderDecision]


class SchedulerStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def due_recipients(self, now: datetime, *, limit: int) -> list[uuid.UUID]:
        """Recipients with held alerts due at ``now`` (some may be delivered meanwhile)."""
        async with reachable(), self._pool.acquire() as conn:
            rows = await conn.fetch(
                "/* due_recipients */ SELECT DISTINCT recipient_id FROM notifier.held_alerts"
                " WHERE delivered_at IS NULL AND release_at <= $1 LIMIT $2", now, limit)
        return [row["recipient_id"] for row in rows]

    async def deliver(self, recipient_id: uuid.UUID, now: datetime,
                      compose: Composer) -> int | None:
        """Deliver ``recipient_id``'s due held alerts as ``compose`` says, in one
        transaction; returns how many notifications were created, or None when
        another transaction holds the recipient."""
        async with reachable(), self._pool.acquire() as conn, conn.transaction():
            locked = await conn.fetchval(
                "/* deliver */ SELECT pg_try_advisory_xact_lock($1, $2)",
                RECIPIENT_LOCK_NAMESPACE, recipient_lock_key(recipient_id))
            if not locked:
                return None
            rows = await conn.fetch(
                f"/* deliver */ SELECT {_HELD_COLUMNS} FROM notifier.held_alerts"
                " WHERE recipient_id = $1 AND delivered_at IS NULL AND release_at <= $2"
                " ORDER BY created_at, id FOR UPDATE SKIP LOCKED", recipient_id, now)
            planned = compose(recipient_id, [HeldAlert.from_record(r) for r in rows], now)
            ids = await insert_notifications(conn, [n for n, _ in planned])
            await conn.executemany(
                "/* deliver */ UPDATE notifier.held_alerts"
                " SET delivered_at = $2, notification_id = $3 WHERE id = $1",
                [(held, now, notification_id)
                 for notification_id, (_, held_ids) in zip(ids, planned, strict=True)
                 for held in held_ids],
            )
            return len(planned)

    async def remind(self, now: datetime, policy: ReminderPolicy, *, limit: int) -> int:
        """Settle up to ``limit`` reminders due at ``now`` as ``policy`` says; returns
        how many were sent."""
        async with reachable(), self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "/* remind */ SELECT r.*, a.schedule FROM notifier.reminders r"
                " LEFT JOIN notifier.availability a ON a.therapist_id = r.therapist_id"
                " WHERE r.remind_at <= $1 AND r.sent_at IS NULL AND r.cancelled_at IS NULL"
                " ORDER BY r.remind_at LIMIT $2 FOR UPDATE OF r SKIP LOCKED", now, limit)
            sent = 0
            for row in rows:
                decision = policy(PendingReminder.from_record(row),
                                  schedule_from_row(row["schedule"]), now)
                if decision.send is None:
                    await conn.execute(
                        "/* remind */ UPDATE notifier.reminders SET remind_at = $2"
                        " WHERE message_id = $1", row["message_id"], decision.retry_at)
                    continue
                # The recipient's notifications are stored one transaction at a
                # time (EventTransaction.notify); if a handler holds them now,
                # this reminder waits for the next tick. Try, never wait: the
                # handler may be about to cancel this very row, which we hold.
                if not await conn.fetchval(
                        "/* remind */ SELECT pg_try_advisory_xact_lock($1, $2)",
                        RECIPIENT_LOCK_NAMESPACE, recipient_lock_key(decision.send.user_id)):
                    continue
                await insert_notifications(conn, [decision.send])
                await conn.execute(
                    "/* remind */ UPDATE notifier.reminders SET sent_at = $2"
                    " WHERE message_id = $1", row["message_id"], now)
                sent += 1
            return sent
