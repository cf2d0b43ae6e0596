"""``checkin.submitted``: a client checked in, so their therapist has something to see.

Within office hours and the agreement the therapist is alerted at once;
otherwise the alert is held for the digest at the next window. A check-in with
a reply-by time also gets a reminder, for when that time draws near.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from services.notifier.store import (
    CHECKIN_RECEIVED,
    HELD_CHECKIN,
    EventTransaction,
    NewHeldAlert,
    NewNotification,
    NewReminder,
)
from shared.boundaries import Agreement, plan_checkin_alert, reminder_time
from shared.events import Event, MalformedEvent, MessageEventData, decode_message_data
from shared.schedule import WeeklySchedule


@dataclass(frozen=True, slots=True)
class CheckinOutcome:
    """Exactly one of ``notification`` and ``held``; a reminder when a reply is due."""

    notification: NewNotification | None
    held: NewHeldAlert | None
    reminder: NewReminder | None


def decode(event: Event) -> MessageEventData:
    data = decode_message_data(event)
    if data.sender_id != data.client_id or data.therapist_id == data.client_id:
        raise MalformedEvent("a check-in must be sent by the client to another user")
    return data


def _aware(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def plan(event: Event, data: MessageEventData, schedule: WeeklySchedule | None,
         agreement: Agreement, now: datetime) -> CheckinOutcome:
    """What a check-in causes at ``now``, given the therapist's hours and the agreement."""
    decision = plan_checkin_alert(schedule, agreement, now, urgent=data.urgent,
                                  beyond=data.beyond_agreement)
    notification = held = None
    if decision.immediate:
        notification = NewNotification(
            user_id=data.therapist_id, kind=CHECKIN_RECEIVED,
            relationship_id=data.relationship_id, message_id=data.message_id,
            actor_id=data.client_id, event_id=event.event_id, created_at=event.occurred_at,
        )
    else:
        held = NewHeldAlert(
            recipient_id=data.therapist_id, kind=HELD_CHECKIN,
            relationship_id=data.relationship_id, message_id=data.message_id,
            actor_id=data.client_id, event_id=event.event_id, created_at=now,
            release_at=decision.alert_at, urgent=data.urgent, beyond=data.beyond_agreement,
        )
    reminder = None
    if data.reply_by is not None:
        received, due = _aware(data.sent_at), _aware(data.reply_by)
        reminder = NewReminder(
            message_id=data.message_id, therapist_id=data.therapist_id,
            relationship_id=data.relationship_id, client_id=data.client_id,
            received_at=received, reply_by=due,
            remind_at=reminder_time(schedule, received, due),
        )
    return CheckinOutcome(notification, held, reminder)


async def handle(tx: EventTransaction, event: Event, now: datetime) -> str:
    """Apply a check-in inside its event's transaction; returns what happened."""
    data = decode(event)
    # Serialises with a concurrent hours or agreement change for this therapist.
    await tx.lock_user(data.therapist_id)
    schedule, agreement = await tx.schedule_and_agreement(data.therapist_id,
                                                          data.relationship_id)
    outcome = plan(event, data, schedule, agreement, now)
    if outcome.notification is not None:
        # The reminder travels in the notification's statement.
        await tx.notify([outcome.notification], reminder=outcome.reminder)
    else:
        if outcome.held is not None:
            await tx.hold([outcome.held])
        if outcome.reminder is not None:
            await tx.add_reminder(outcome.reminder)
    return "alerted" if outcome.notification is not None else "held"
