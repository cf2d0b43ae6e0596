"""Event schemas. Events carry ids and times, never content."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

SCHEMA_VERSION = 1

CHECKIN_SUBMITTED = "checkin.submitted"
REPLY_SENT = "reply.sent"
RELATIONSHIP_CREATED = "relationship.created"
DEVICE_KEYS_CHANGED = "device.keys_changed"
AVAILABILITY_UPDATED = "availability.updated"
AGREEMENT_UPDATED = "agreement.updated"
NOTIFICATION_CREATED = "notification.created"

# What messaging announces: the record of what happened, which its outbox must
# deliver to at least one durable queue (the notifier's binds every one of them).
MESSAGING_EVENTS = (CHECKIN_SUBMITTED, REPLY_SENT, RELATIONSHIP_CREATED, DEVICE_KEYS_CHANGED,
                    AVAILABILITY_UPDATED, AGREEMENT_UPDATED)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MessageEventData(_Strict):
    message_id: uuid.UUID
    relationship_id: uuid.UUID
    therapist_id: uuid.UUID
    client_id: uuid.UUID
    sender_id: uuid.UUID
    sent_at: datetime
    urgent: bool = False
    # Check-ins: computed by messaging when it accepted the check-in.
    beyond_agreement: bool = False
    reply_by: datetime | None = None
    # Replies: the therapist asked to deliver now, even outside office hours.
    deliver_now: bool = False
    # When the recipient may see it (a reply held for office hours: later).
    visible_at: datetime | None = None


class RelationshipEventData(_Strict):
    relationship_id: uuid.UUID
    therapist_id: uuid.UUID
    client_id: uuid.UUID


class DeviceKeysEventData(_Strict):
    user_id: uuid.UUID
    device_id: uuid.UUID
    key_id: str
    version: int


class AvailabilityEventData(_Strict):
    therapist_id: uuid.UUID
    version: int
    # WeeklySchedule.to_json(include_notes=False); None: no office hours set.
    schedule: dict[str, Any] | None


class AgreementEventData(_Strict):
    relationship_id: uuid.UUID
    therapist_id: uuid.UUID
    client_id: uuid.UUID
    version: int
    # Agreement.to_json() without the crisis text, which the notifier never needs.
    terms: dict[str, Any]


class NotificationEventData(_Strict):
    """A notification the notifier just stored, for live streams and channels."""

    notification_id: uuid.UUID
    user_id: uuid.UUID
    kind: str
    relationship_id: uuid.UUID | None = None
    message_id: uuid.UUID | None = None
    actor_id: uuid.UUID | None = None
    details: dict[str, Any] | None = None
    created_at: datetime


class Event(_Strict):
    event_id: uuid.UUID
    type: str
    schema_version: Literal[1] = 1
    occurred_at: datetime
    correlation_id: str
    data: dict[str, Any]


class MalformedEvent(ValueError):
    """The bytes are not a valid event of a known schema."""


def new_event(event_type: str, data: _Strict, correlation_id: str) -> Event:
    return Event(
        event_id=uuid.uuid4(), type=event_type, occurred_at=datetime.now(UTC),
        correlation_id=correlation_id, data=data.model_dump(mode="json"),
    )


def decode_event(body: bytes) -> Event:
    """Parse an event; raises :class:`MalformedEvent` with a short reason."""
    try:
        return Event.model_validate(json.loads(body))
    except (ValueError, ValidationError) as exc:
        raise MalformedEvent(str(exc).splitlines()[0][:200]) from None


_D = TypeVar("_D", bound=_Strict)


def decode_data(event: Event, model: type[_D]) -> _D:
    """The event's data as ``model``; raises :class:`MalformedEvent`."""
    try:
        return model.model_validate(event.data)
    except ValidationError as exc:
        raise MalformedEvent(str(exc).splitlines()[0][:200]) from None


def decode_message_data(event: Event) -> MessageEventData:
    return decode_data(event, MessageEventData)
