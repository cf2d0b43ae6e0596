"""The concurrent consumer's ack window, over fake messages: acks with ``multiple``
only up to the highest delivery below which everything is settled, nacks and
rejects never covered, a message finished behind a slow one acked on its own
after a while, and what is due flushed on request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from shared.amqp_acks import AckWindow
from shared.amqp_consume import ConsumerState, _handle_one

pytestmark = pytest.mark.timeout(10)


@dataclass
class Wire:
    """Frames the fake messages sent: ``(kind, delivery tag, multiple)``."""

    frames: list[tuple[str, int, bool]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def send(self, frame: tuple[str, int, bool]) -> None:
        self.frames.append(frame)
        self.changed.set()

    async def until(self, count: int) -> None:
        """Wait (at most 5 s) until ``count`` frames went out."""
        async with asyncio.timeout(5):
            while len(self.frames) < count:
                self.changed.clear()
                await self.changed.wait()


@dataclass(eq=False)
class Message:
    delivery_tag: int
    wire: Wire

    @property
    def message_id(self) -> str:
        return f"m{self.delivery_tag}"

    async def ack(self, multiple: bool = False) -> None:
        self.wire.send(("ack", self.delivery_tag, multiple))

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        self.wire.send(("nack", self.delivery_tag, multiple))


def deliver(window: AckWindow, wire: Wire, count: int) -> list[Message]:
    messages = [Message(tag, wire) for tag in range(1, count + 1)]
    for message in messages:
        window.delivered(message)  # type: ignore[arg-type]
    return messages


async def test_in_order_acks_go_out_as_one() -> None:
    wire, window = Wire(), AckWindow(delay=1, limit=16)
    messages = deliver(window, wire, 5)
    for message in messages:
        window.ack(message)  # type: ignore[arg-type]
    assert window.due == 5
    await window.flush()
    assert wire.frames == [("ack", 5, True)]
    assert window.due == 0


async def test_an_unsettled_message_bounds_the_multiple_ack() -> None:
    wire, window = Wire(), AckWindow(delay=1, limit=16, straggler_seconds=60)
    m = deliver(window, wire, 4)
    for message in (m[0], m[2], m[3]):
        window.ack(message)  # type: ignore[arg-type]
    await window.flush()
    # Tag 2 is still being handled: an ack covering it would be a lie.
    assert wire.frames == [("ack", 1, True)]
    window.ack(m[1])  # type: ignore[arg-type]
    await window.flush()
    assert wire.frames == [("ack", 1, True), ("ack", 4, True)]


async def test_a_nacked_message_is_never_covered_and_does_not_block() -> None:
    wire, window = Wire(), AckWindow(delay=1, limit=16)
    m = deliver(window, wire, 3)
    window.ack(m[0])  # type: ignore[arg-type]
    await m[1].nack()
    window.settled(m[1])  # type: ignore[arg-type]
    window.ack(m[2])  # type: ignore[arg-type]
    await window.flush()
    # The broker no longer counts tag 2 as outstanding: ack 3 with multiple takes 1 and 3.
    assert wire.frames == [("nack", 2, False), ("ack", 3, True)]


async def test_a_message_finished_behind_a_slow_one_is_acked_on_its_own() -> None:
    wire, window = Wire(), AckWindow(delay=0.01, limit=16, straggler_seconds=0.05)
    m = deliver(window, wire, 3)
    window.ack(m[1])  # type: ignore[arg-type]
    window.ack(m[2])  # type: ignore[arg-type]
    runner = asyncio.create_task(window.run())
    try:
        await wire.until(2)
        assert sorted(wire.frames) == [("ack", 2, False), ("ack", 3, False)]
        # The slow one finishes: it alone is left, and goes with multiple.
        window.ack(m[0])  # type: ignore[arg-type]
        await wire.until(3)
        assert wire.frames[2] == ("ack", 1, True)
        assert window.due == 0
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_run_waits_the_delay_but_not_past_the_limit() -> None:
    wire, window = Wire(), AckWindow(delay=30, limit=4)
    m = deliver(window, wire, 6)
    runner = asyncio.create_task(window.run())
    try:
        for message in m[:3]:
            window.ack(message)  # type: ignore[arg-type]
        await asyncio.sleep(0.1)
        assert wire.frames == []  # 3 due, under the limit: waiting for the delay
        window.ack(m[3])  # type: ignore[arg-type]
        await wire.until(1)
        assert wire.frames == [("ack", 4, True)]
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_flush_everything_acks_each_due_message_behind_an_unsettled_one() -> None:
    wire, window = Wire(), AckWindow(delay=1, limit=16, straggler_seconds=60)
    m = deliver(window, wire, 3)
    window.ack(m[0])  # type: ignore[arg-type]
    window.ack(m[2])  # type: ignore[arg-type]
    await window.flush(everything=True)
    # Tag 2 was never handled (a stop cancelled it): redelivered, never acked.
    assert wire.frames == [("ack", 1, True), ("ack", 3, False)]
    assert window.due == 0


async def test_a_failed_message_stopped_before_its_nack_is_never_covered() -> None:
    """A handler fails, and a stop comes during the pause before the nack: no ack
    with ``multiple`` may then cover it (that would ack an event never applied);
    a later message's ack goes out on its own and the broker redelivers the
    failed one when the connection closes."""
    wire, window, state = Wire(), AckWindow(delay=1, limit=16, straggler_seconds=60), \
        ConsumerState()
    failed, handled = deliver(window, wire, 2)

    failing_now = asyncio.Event()

    async def failing(_: object) -> None:
        failing_now.set()
        raise RuntimeError("database gone")

    async def fine(_: object) -> None:
        return None

    first = asyncio.create_task(_handle_one(failed, failing, state,  # type: ignore[arg-type]
                                            acks=window))
    await asyncio.wait_for(failing_now.wait(), 5)
    await asyncio.sleep(0.05)  # the pause before the nack lasts a second
    assert state.retried == 1
    first.cancel()  # in the pause before the nack
    assert isinstance((await asyncio.gather(first, return_exceptions=True))[0],
                      asyncio.CancelledError)
    await _handle_one(handled, fine, state, acks=window)  # type: ignore[arg-type]
    await window.flush(everything=True)
    assert wire.frames == [("ack", 2, False)]
