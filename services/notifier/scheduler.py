"""The scheduler: delivers held alerts and reply-by reminders when they are due.

:meth:`Scheduler.run_once` does one pass at an instant its caller gives (tests
drive it with a fake clock); :meth:`Scheduler.run` ticks with the injected
clock until cancelled. The decisions are pure functions here; the locking that
makes several replicas deliver everything exactly once is in the store.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import datetime

import structlog

from services.notifier.consumer import Clock, read_clock
from services.notifier.scheduler_store import ReminderDecision, SchedulerStore
from services.notifier.store import (
    DIGEST,
    HELD_CHECKIN,
    HELD_REPLY,
    REMINDER_REPLY_DUE,
    REPLY_RECEIVED,
    HeldAlert,
    NewNotification,
    PendingReminder,
)
from services.notifier.unavailable import StoreUnavailable
from shared.schedule import WeeklySchedule
from shared.schedule_time import is_open, next_alert_time

log = structlog.get_logger(__name__)

DEFAULT_INTERVAL_SECONDS = 1.0
_RECIPIENTS_PER_PASS = 200
_REMINDERS_PER_PASS = 200


def digest_details(checkins: Sequence[HeldAlert]) -> dict[str, int]:
    """The counts a digest shows: never content, names or ids."""
    return {
        "checkins": len({a.message_id for a in checkins}),
        "clients": len({a.actor_id for a in checkins}),
        "beyond_agreement": len({a.message_id for a in checkins if a.beyond}),
        "urgent": len({a.message_id for a in checkins if a.urgent}),
    }


def compose(recipient_id: uuid.UUID, alerts: Sequence[HeldAlert],
            now: datetime) -> list[tuple[NewNotification, list[uuid.UUID]]]:
    """What one recipient's due alerts become: one digest for all check-ins, and one
    ``reply.received`` per reply (each reply is its own thing to read)."""
    planned: list[tuple[NewNotification, list[uuid.UUID]]] = []
    checkins = [a for a in alerts if a.kind == HELD_CHECKIN]
    if checkins:
        planned.append((NewNotification(
            user_id=recipient_id, kind=DIGEST, relationship_id=None, message_id=None,
            actor_id=None, event_id=None, created_at=now, details=digest_details(checkins),
        ), [a.id for a in checkins]))
    for reply in (a for a in alerts if a.kind == HELD_REPLY):
        planned.append((NewNotification(
            user_id=recipient_id, kind=REPLY_RECEIVED, relationship_id=reply.relationship_id,
            message_id=reply.message_id, actor_id=reply.actor_id, event_id=reply.event_id,
            created_at=now,
        ), [reply.id]))
    return planned


def reminder_decision(reminder: PendingReminder, schedule: WeeklySchedule | None,
                      now: datetime) -> ReminderDecision:
    """Remind the therapist now if they are in office hours, else at the next opening."""
    if schedule is not None and not is_open(schedule, now):
        return ReminderDecision(None, next_alert_time(schedule, now))
    return ReminderDecision(NewNotification(
        user_id=reminder.therapist_id, kind=REMINDER_REPLY_DUE,
        relationship_id=reminder.relationship_id, message_id=reminder.message_id,
        actor_id=reminder.client_id, event_id=None, created_at=now,
        details={"reply_by": reminder.reply_by.isoformat()},
    ))


class Scheduler:
    def __init__(self, store: SchedulerStore, clock: Clock, *,
                 interval: float = DEFAULT_INTERVAL_SECONDS) -> None:
        self._store = store
        self._clock = clock
        self._interval = interval
        self.passes = 0

    async def run_once(self, now: datetime) -> int:
        """Deliver what is due at ``now``; returns how many notifications were created."""
        created = 0
        for recipient in await self._store.due_recipients(now, limit=_RECIPIENTS_PER_PASS):
            created += await self._store.deliver(recipient, now, compose) or 0
        created += await self._store.remind(now, reminder_decision, limit=_REMINDERS_PER_PASS)
        return created

    async def run(self) -> None:
        """Tick every ``interval`` seconds until cancelled."""
        while True:
            try:
                created = await self.run_once(read_clock(self._clock))
                if created:
                    log.info("scheduler delivered held alerts", notifications=created)
            except StoreUnavailable as exc:
                log.warning("scheduler: database unavailable; next tick retries",
                            error=str(exc))
            except Exception:  # a bad row must not stop every later delivery
                log.exception("scheduler pass failed; next tick retries")
            self.passes += 1
            await asyncio.sleep(self._interval)
