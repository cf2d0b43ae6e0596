"""Which events the notifier's consumer keeps in order with which: one therapist's
events share a lane; anything else is a lane of its own."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

import services.notifier.consumer as consumer_module
import shared.events
from services.notifier.consumer import BINDINGS, EventConsumer, lane_key
from services.notifier.notifications_store import NOTIFIER_OUTBOX
from shared.amqp_consume import ConsumerState
from shared.events import (
    AGREEMENT_UPDATED,
    AVAILABILITY_UPDATED,
    CHECKIN_SUBMITTED,
    MESSAGING_EVENTS,
    NOTIFICATION_CREATED,
    RELATIONSHIP_CREATED,
    REPLY_SENT,
    AgreementEventData,
    AvailabilityEventData,
    Event,
    MessageEventData,
    RelationshipEventData,
    decode_event,
    new_event,
)

THERAPIST = uuid.uuid4()


def delivered(body: bytes, tag: int = 7) -> Any:
    return SimpleNamespace(body=body, delivery_tag=tag, message_id="m")


def as_message(event: Event) -> Any:
    return delivered(event.model_dump_json().encode())


def message_event(event_type: str, therapist: uuid.UUID = THERAPIST) -> Event:
    client = uuid.uuid4()
    data = MessageEventData(
        message_id=uuid.uuid4(), relationship_id=uuid.uuid4(), therapist_id=therapist,
        client_id=client, sender_id=client if event_type == CHECKIN_SUBMITTED else therapist,
        sent_at=datetime.now(UTC))
    return new_event(event_type, data, "c")


def test_one_therapists_events_share_a_lane() -> None:
    events = [
        message_event(CHECKIN_SUBMITTED), message_event(REPLY_SENT),
        new_event(AVAILABILITY_UPDATED, AvailabilityEventData(
            therapist_id=THERAPIST, version=2, schedule=None), "c"),
        new_event(AGREEMENT_UPDATED, AgreementEventData(
            relationship_id=uuid.uuid4(), therapist_id=THERAPIST, client_id=uuid.uuid4(),
            version=1, terms={}), "c"),
    ]
    keys = {lane_key(as_message(event)) for event in events}
    assert keys == {("therapist", THERAPIST)}
    # The same therapist however the id is spelled.
    upper = events[0].model_copy(update={"data": {
        **events[0].data, "therapist_id": str(THERAPIST).upper()}})
    assert lane_key(as_message(upper)) == ("therapist", THERAPIST)


def test_another_therapists_events_take_another_lane() -> None:
    other = uuid.uuid4()
    assert lane_key(as_message(message_event(CHECKIN_SUBMITTED, other))) == ("therapist", other)


def test_other_events_are_keyed_by_their_own_id() -> None:
    for event in (
        new_event(RELATIONSHIP_CREATED, RelationshipEventData(
            relationship_id=uuid.uuid4(), therapist_id=THERAPIST, client_id=uuid.uuid4()), "c"),
        message_event(CHECKIN_SUBMITTED).model_copy(update={"type": NOTIFICATION_CREATED}),
    ):
        assert lane_key(as_message(event)) == ("event", event.event_id)


def test_unreadable_messages_get_a_lane_of_their_own() -> None:
    assert lane_key(delivered(b'{"event_id": "not json', tag=41)) == ("delivery", 41)
    broken = message_event(CHECKIN_SUBMITTED)
    for value in ("nobody", None, 12):
        event = broken.model_copy(update={"data": {**broken.data, "therapist_id": value}})
        assert lane_key(as_message(event)) == ("event", event.event_id)
    missing = broken.model_copy(update={"data": {}})
    assert lane_key(as_message(missing)) == ("event", missing.event_id)


def test_every_event_type_is_routed_somewhere_on_purpose() -> None:
    """A new event type must be put in MESSAGING_EVENTS (the notifier's durable
    queue binds it; publishing it must reach that queue) or be a live hint like
    notification.created; otherwise its outbox rows would wait, unroutable."""
    declared = {value for name, value in vars(shared.events).items()
                if name.isupper() and isinstance(value, str)
                and re.fullmatch(r"[a-z]+\.[a-z_]+", value)}
    assert declared == set(MESSAGING_EVENTS) | {NOTIFICATION_CREATED}
    assert set(BINDINGS) == set(MESSAGING_EVENTS)
    assert NOTIFICATION_CREATED not in BINDINGS
    assert NOTIFIER_OUTBOX.hints == {NOTIFICATION_CREATED}


class RecordingStore:
    """Stands in for NotifierStore: records which events would be applied."""

    def __init__(self) -> None:
        self.events: list[uuid.UUID] = []

    async def handle_event(self, event_id: uuid.UUID, event_type: str, work: Any, *,
                           lock_user: uuid.UUID | None = None) -> bool:
        self.events.append(event_id)
        return True


async def test_the_lane_key_and_the_handler_share_one_decoding(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []

    def counting(body: bytes) -> Event:
        calls.append(body)
        return decode_event(body)

    monkeypatch.setattr(consumer_module, "decode_event", counting)
    store = RecordingStore()
    consumer = EventConsumer(store, ConsumerState())  # type: ignore[arg-type]
    event = message_event(CHECKIN_SUBMITTED)
    message = as_message(event)
    assert lane_key(message) == ("therapist", THERAPIST)
    await consumer.handle(message)
    assert store.events == [event.event_id]
    assert len(calls) == 1
