"""``availability.updated``: a therapist changed their office hours or absences.

The notifier keeps its own copy (a newer version replaces an older one, never
the reverse) and re-plans what waits on those hours: held check-in alerts, held
replies not yet released, and pending reminders. An alert whose window is open
under the new hours becomes due now; the scheduler delivers it at its next tick.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from services.notifier.store import EventTransaction, HeldAlert, PendingReminder
from shared.boundaries import (
    Agreement,
    client_alert_time,
    reminder_time,
    reply_release_time,
)
from shared.events import AvailabilityEventData, Event, MalformedEvent, decode_data
from shared.schedule import ScheduleError, WeeklySchedule
from shared.schedule_time import next_alert_time


def decode(event: Event) -> tuple[AvailabilityEventData, WeeklySchedule | None]:
    data = decode_data(event, AvailabilityEventData)
    if data.schedule is None:
        return data, None
    try:
        return data, WeeklySchedule.from_json(data.schedule)
    except (ScheduleError, TypeError) as exc:
        raise MalformedEvent(f"availability schedule: {exc}") from None


def recheck_checkin(schedule: WeeklySchedule | None, now: datetime,
                    alert: HeldAlert) -> datetime | None:
    """When a held check-in alert is due under new hours (None: no office time ahead).

    Changed hours release every held check-in at their next open instant: now
    if the new hours are open now. (A check-in beyond the agreement goes into
    that digest too: the therapist has just looked at their hours.)
    """
    if schedule is None:
        return now
    return next_alert_time(schedule, now)


def recheck_reply(schedule: WeeklySchedule | None, agreement: Agreement, now: datetime,
                  alert: HeldAlert) -> tuple[datetime, datetime]:
    """``(released_at, release_at)`` of a held reply under new hours.

    A reply already released to the client waits only for their quiet hours,
    which the therapist's hours do not change.
    """
    released = alert.released_at
    if released is None or released > now:
        released = reply_release_time(schedule, now, deliver_now=False)
    return released, client_alert_time(agreement, released)


def recheck_reminder(schedule: WeeklySchedule | None,
                     reminder: PendingReminder) -> datetime | None:
    """When a pending reminder is due under new hours; the scheduler moves a due one
    that falls outside hours to the next opening."""
    return reminder_time(schedule, reminder.received_at, reminder.reply_by)


async def handle(tx: EventTransaction, event: Event, now: datetime) -> str:
    """Apply an availability change inside its event's transaction; returns what happened."""
    data, schedule = decode(event)
    therapist = data.therapist_id
    await tx.lock_user(therapist)
    if not await tx.save_availability(therapist, data.version, data.schedule):
        return "stale version ignored"
    changes: list[tuple[uuid.UUID, datetime | None, datetime | None]] = []
    for alert in await tx.held_checkins_for(therapist):
        release_at = recheck_checkin(schedule, now, alert)
        if release_at != alert.release_at:
            changes.append((alert.id, alert.released_at, release_at))
    agreements: dict[uuid.UUID, Agreement] = {}
    for alert in await tx.held_replies_from(therapist):
        if alert.relationship_id not in agreements:
            agreements[alert.relationship_id] = await tx.agreement_of(alert.relationship_id)
        released, release_at = recheck_reply(schedule, agreements[alert.relationship_id], now,
                                             alert)
        if (released, release_at) != (alert.released_at, alert.release_at):
            changes.append((alert.id, released, release_at))
    await tx.reschedule(changes)
    reminders = [(r.message_id, recheck_reminder(schedule, r))
                 for r in await tx.pending_reminders_of(therapist)]
    await tx.reschedule_reminders(reminders)
    return f"applied; {len(changes)} held alert(s) re-planned"
