"""The notifier's pure steps: who is notified of what, and when they are alerted."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.notifier import checkin_submitted, reply_sent
from services.notifier.consumer import HANDLERS, normalise_event, read_clock
from services.notifier.feed_store import FeedPosition
from services.notifier.routes import decode_cursor, encode_cursor
from services.notifier.store import CHECKIN_RECEIVED, REPLY_RECEIVED
from shared.boundaries import Agreement
from shared.events import (
    AGREEMENT_UPDATED,
    AVAILABILITY_UPDATED,
    CHECKIN_SUBMITTED,
    REPLY_SENT,
    Event,
    MalformedEvent,
    MessageEventData,
    new_event,
)

NOW = datetime(2025, 3, 30, 12, 0, tzinfo=UTC)


def _message_event(event_type: str, *, sender: str = "client") -> tuple[Event, MessageEventData]:
    therapist, client = uuid.uuid4(), uuid.uuid4()
    data = MessageEventData(
        message_id=uuid.uuid4(), relationship_id=uuid.uuid4(), therapist_id=therapist,
        client_id=client, sender_id=client if sender == "client" else therapist, sent_at=NOW,
    )
    return new_event(event_type, data, correlation_id="corr-1"), data


def test_checkin_notifies_the_therapist_with_the_client_as_actor() -> None:
    event, data = _message_event(CHECKIN_SUBMITTED, sender="client")
    outcome = checkin_submitted.plan(event, checkin_submitted.decode(event), None, Agreement(), NOW)
    notification = outcome.notification
    assert notification is not None
    assert outcome.held is None
    assert notification.user_id == data.therapist_id
    assert notification.actor_id == data.client_id
    assert notification.kind == CHECKIN_RECEIVED
    assert notification.relationship_id == data.relationship_id
    assert notification.message_id == data.message_id
    assert notification.event_id == event.event_id
    assert notification.created_at == event.occurred_at


def test_reply_notifies_the_client_with_the_therapist_as_actor() -> None:
    event, data = _message_event(REPLY_SENT, sender="therapist")
    outcome = reply_sent.plan(event, reply_sent.decode(event), None, Agreement(), NOW)
    notification = outcome.notification
    assert notification is not None
    assert outcome.held is None
    assert notification.user_id == data.client_id
    assert notification.actor_id == data.therapist_id
    assert notification.kind == REPLY_RECEIVED
    assert notification.message_id == data.message_id


@pytest.mark.parametrize(("decode", "event_type", "wrong_sender"), [
    (checkin_submitted.decode, CHECKIN_SUBMITTED, "therapist"),
    (reply_sent.decode, REPLY_SENT, "client"),
])
def test_a_message_from_the_wrong_side_is_malformed(
    decode: Callable[[Event], MessageEventData], event_type: str, wrong_sender: str,
) -> None:
    event, _ = _message_event(event_type, sender=wrong_sender)
    with pytest.raises(MalformedEvent):
        decode(event)


def test_message_data_that_does_not_fit_the_schema_is_malformed() -> None:
    event, _ = _message_event(CHECKIN_SUBMITTED)
    broken = event.model_copy(update={"data": {"message_id": "not-a-uuid"}})
    with pytest.raises(MalformedEvent):
        checkin_submitted.decode(broken)


def test_one_handler_per_event_kind_consumed() -> None:
    assert set(HANDLERS) == {CHECKIN_SUBMITTED, REPLY_SENT, AVAILABILITY_UPDATED,
                             AGREEMENT_UPDATED}


def test_a_naive_clock_reading_is_taken_as_utc() -> None:
    assert read_clock(lambda: datetime(2025, 3, 30, 12, 0)) == NOW
    paris = timezone(timedelta(hours=2))
    assert read_clock(lambda: datetime(2025, 3, 30, 14, 0, tzinfo=paris)).tzinfo is UTC


def test_normalise_takes_a_naive_time_as_utc() -> None:
    event, _ = _message_event(CHECKIN_SUBMITTED)
    naive = event.model_copy(update={"occurred_at": datetime(2025, 3, 30, 9, 0)})
    assert normalise_event(naive, now=NOW).occurred_at == datetime(2025, 3, 30, 9, 0, tzinfo=UTC)


def test_normalise_converts_offsets_to_utc_and_keeps_the_instant() -> None:
    event, _ = _message_event(CHECKIN_SUBMITTED)
    paris = timezone(timedelta(hours=2))
    shifted = event.model_copy(update={"occurred_at": datetime(2025, 3, 30, 11, 0, tzinfo=paris)})
    occurred = normalise_event(shifted, now=NOW).occurred_at
    assert occurred.utcoffset() == timedelta(0)
    assert occurred == datetime(2025, 3, 30, 9, 0, tzinfo=UTC)


def test_normalise_clamps_a_future_time_to_now() -> None:
    event, _ = _message_event(CHECKIN_SUBMITTED)
    future = event.model_copy(update={"occurred_at": NOW + timedelta(hours=3)})
    assert normalise_event(future, now=NOW).occurred_at == NOW


def test_cursor_round_trips_and_is_url_safe() -> None:
    position = FeedPosition(created_at=NOW.replace(microsecond=123456), id=uuid.uuid4())
    cursor = encode_cursor(position)
    assert set(cursor) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert decode_cursor(cursor) == position


@pytest.mark.parametrize("cursor", [
    "%%%", "bm90IGpzb24", encode_cursor(FeedPosition(NOW, uuid.uuid4()))[:-3], "e30",
    # Valid JSON, but a naive time and a bad id.
    "eyJ0IjoiMjAyNS0wMS0wMVQwMDowMDowMCIsImlkIjoieCJ9",
])
def test_a_foreign_cursor_is_refused(cursor: str) -> None:
    with pytest.raises(ValueError, match="not a feed cursor"):
        decode_cursor(cursor)
