"""The gateway's StreamHub as an AMQP handler, over fake sockets: events are read
only when this process has a stream open, and routed to that user's sockets."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import structlog

from services.gateway.stream import Push
from services.gateway.stream_hub import StreamHub
from shared.events import (
    NOTIFICATION_CREATED,
    REPLY_SENT,
    MessageEventData,
    NotificationEventData,
    decode_event,
    new_event,
)

pytestmark = pytest.mark.timeout(10)

MALFORMED = "stream ignored a malformed event"


@dataclass(eq=False)
class FakeConnection:
    user_id: uuid.UUID
    offered: list[Any] = field(default_factory=list)

    def offer(self, item: Any) -> None:
        self.offered.append(item)


def amqp_message(body: bytes) -> Any:
    return SimpleNamespace(body=body, message_id="m1")


def notification(user_id: uuid.UUID) -> tuple[bytes, str]:
    data = NotificationEventData(notification_id=uuid.uuid4(), user_id=user_id,
                                 kind="digest", created_at=datetime.now(UTC))
    event = new_event(NOTIFICATION_CREATED, data, "test")
    return event.model_dump_json().encode(), str(data.notification_id)


def reply_visible_in(seconds: float) -> bytes:
    therapist, client = uuid.uuid4(), uuid.uuid4()
    now = datetime.now(UTC)
    data = MessageEventData(message_id=uuid.uuid4(), relationship_id=uuid.uuid4(),
                            therapist_id=therapist, client_id=client, sender_id=therapist,
                            sent_at=now, visible_at=now + timedelta(seconds=seconds))
    return new_event(REPLY_SENT, data, "test").model_dump_json().encode()


async def test_with_nobody_connected_events_are_not_decoded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    hub = StreamHub()
    decoded: list[bytes] = []

    def spy(body: bytes) -> Any:
        decoded.append(body)
        return decode_event(body)

    monkeypatch.setattr("services.gateway.stream_hub.decode_event", spy)
    body, _ = notification(uuid.uuid4())
    with structlog.testing.capture_logs() as logs:
        for raw in (b"not json", body, reply_visible_in(30)):
            await hub.on_message(amqp_message(raw))
    assert decoded == []
    assert logs == []
    assert not hub._delayed


async def test_with_someone_connected_events_are_read_and_routed() -> None:
    hub = StreamHub()
    mine, other = FakeConnection(uuid.uuid4()), FakeConnection(uuid.uuid4())
    for conn in (mine, other):
        assert hub.add(conn)  # type: ignore[arg-type]
    body, notification_id = notification(mine.user_id)
    with structlog.testing.capture_logs() as logs:
        await hub.on_message(amqp_message(b"not json"))
        await hub.on_message(amqp_message(body))
        await hub.on_message(amqp_message(reply_visible_in(30)))
    assert [e["event"] for e in logs] == [MALFORMED]
    [pushed] = mine.offered
    assert isinstance(pushed, Push)
    assert pushed.key == notification_id
    assert pushed.payload["notification"]["id"] == notification_id
    assert other.offered == []
    # A message visible soon is still timed while anyone is connected here.
    assert len(hub._delayed) == 1
    for handle in hub._delayed:
        handle.cancel()
