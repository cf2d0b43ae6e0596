"""``checkin.submitted``: a client checked in, so their therapist has something to see."""

from __future__ import annotations

from services.notifier.store import CHECKIN_RECEIVED, NewNotification
from shared.events import Event, MalformedEvent, decode_message_data


def plan(event: Event) -> list[NewNotification]:
    """The notifications a check-in causes: one for the therapist."""
    data = decode_message_data(event)
    if data.sender_id != data.client_id or data.therapist_id == data.client_id:
        raise MalformedEvent("a check-in must be sent by the client to another user")
    return [NewNotification(
        user_id=data.therapist_id, kind=CHECKIN_RECEIVED, relationship_id=data.relationship_id,
        message_id=data.message_id, actor_id=data.sender_id, event_id=event.event_id,
        created_at=event.occurred_at,
    )]
