"""``reply.sent``: a therapist replied, so their client has something to see."""

from __future__ import annotations

from services.notifier.store import REPLY_RECEIVED, NewNotification
from shared.events import Event, MalformedEvent, decode_message_data


def plan(event: Event) -> list[NewNotification]:
    """The notifications a reply causes: one for the client."""
    data = decode_message_data(event)
    if data.sender_id != data.therapist_id or data.therapist_id == data.client_id:
        raise MalformedEvent("a reply must be sent by the therapist to another user")
    return [NewNotification(
        user_id=data.client_id, kind=REPLY_RECEIVED, relationship_id=data.relationship_id,
        message_id=data.message_id, actor_id=data.sender_id, event_id=event.event_id,
        created_at=event.occurred_at,
    )]
