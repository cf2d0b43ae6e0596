"""``reply.sent``: a therapist replied, so their client has something to see.

A reply written outside the therapist's office hours reaches the client when
the next window opens (unless sent with "deliver now"); the client's alert then
waits out their quiet hours. The reply also cancels the reminders of the
relationship's earlier check-ins.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from services.notifier.store import (
    HELD_REPLY,
    REPLY_RECEIVED,
    EventTransaction,
    NewHeldAlert,
    NewNotification,
)
from shared.boundaries import Agreement, client_alert_time, reply_release_time
from shared.events import Event, MalformedEvent, MessageEventData, decode_message_data
from shared.schedule import WeeklySchedule


@dataclass(frozen=True, slots=True)
class ReplyOutcome:
    """Exactly one of ``notification`` and ``held``."""

    notification: NewNotification | None
    held: NewHeldAlert | None
    answers_before: datetime   # reminders of check-ins received before this are cancelled


def decode(event: Event) -> MessageEventData:
    data = decode_message_data(event)
    if data.sender_id != data.therapist_id or data.therapist_id == data.client_id:
        raise MalformedEvent("a reply must be sent by the therapist to another user")
    return data


def plan(event: Event, data: MessageEventData, schedule: WeeklySchedule | None,
         agreement: Agreement, now: datetime) -> ReplyOutcome:
    """What a reply causes at ``now``, given the therapist's hours and the agreement."""
    released = reply_release_time(schedule, now, deliver_now=data.deliver_now)
    alert_at = client_alert_time(agreement, released)
    sent_at = data.sent_at if data.sent_at.tzinfo else data.sent_at.replace(tzinfo=UTC)
    if alert_at <= now:
        notification = NewNotification(
            user_id=data.client_id, kind=REPLY_RECEIVED, relationship_id=data.relationship_id,
            message_id=data.message_id, actor_id=data.therapist_id, event_id=event.event_id,
            created_at=event.occurred_at,
        )
        return ReplyOutcome(notification, None, sent_at)
    held = NewHeldAlert(
        recipient_id=data.client_id, kind=HELD_REPLY, relationship_id=data.relationship_id,
        message_id=data.message_id, actor_id=data.therapist_id, event_id=event.event_id,
        created_at=now, release_at=alert_at, released_at=released,
    )
    return ReplyOutcome(None, held, sent_at)


async def handle(tx: EventTransaction, event: Event, now: datetime) -> str:
    """Apply a reply inside its event's transaction; returns what happened."""
    data = decode(event)
    # Serialises with a concurrent hours or agreement change for this therapist.
    await tx.lock_user(data.therapist_id)
    schedule, agreement = await tx.schedule_and_agreement(data.therapist_id,
                                                          data.relationship_id)
    outcome = plan(event, data, schedule, agreement, now)
    await tx.cancel_reminders(data.relationship_id, outcome.answers_before, now)
    if outcome.notification is not None:
        await tx.notify([outcome.notification])
    if outcome.held is not None:
        await tx.hold([outcome.held])
    return "alerted" if outcome.notification is not None else "held"
