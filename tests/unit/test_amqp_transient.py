"""The transient consumer's pump (hints, acked in batches), over fake messages and
a fake connection: one ``basic.ack`` with ``multiple`` per batch or per delay, in
delivery order, flushed when the pump stops; a failing handler drops its message."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog

from shared.amqp_acks import Batching
from shared.amqp_consume import ConsumerState, PoisonMessage, _pump_until_closed
from tests.unit.test_amqp_lanes import FakeConnection, FakeIterator, until

pytestmark = pytest.mark.timeout(10)

WAIT = 5.0


@dataclass
class Channel:
    """What the fake messages sent: ``(delivery tag, multiple)`` per ack."""

    acks: list[tuple[int, bool]] = field(default_factory=list)
    ack_seconds: float = 0.0
    dead: bool = False


@dataclass(eq=False)
class Hint:
    delivery_tag: int
    channel: Channel

    @property
    def message_id(self) -> str:
        return f"m{self.delivery_tag}"

    async def ack(self, multiple: bool = False) -> None:
        if self.channel.dead:
            raise ConnectionError("channel gone")
        self.channel.acks.append((self.delivery_tag, multiple))
        await asyncio.sleep(self.channel.ack_seconds)

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        raise AssertionError("a hint is never nacked")

    async def reject(self, requeue: bool = False) -> None:
        raise AssertionError("a hint is never rejected")


@dataclass
class Pump:
    connection: FakeConnection
    messages: FakeIterator
    state: ConsumerState
    channel: Channel
    task: asyncio.Task[None]

    def put(self, first: int, last: int) -> None:
        self.messages.put(*(Hint(tag, self.channel)  # type: ignore[arg-type]
                            for tag in range(first, last + 1)))

    async def ended(self) -> None:
        async with asyncio.timeout(WAIT):
            await asyncio.wait([self.task])


async def ignore(message: Any) -> None:
    pass


def start(handler: Callable[[Any], Awaitable[None]] = ignore, *, limit: int = 64,
          delay: float = 0.05, channel: Channel | None = None) -> Pump:
    connection, messages, state = FakeConnection(), FakeIterator(), ConsumerState()
    channel = channel or Channel()
    task = asyncio.create_task(_pump_until_closed(
        connection, messages, handler, state,  # type: ignore[arg-type]
        batching=Batching(limit, delay)))
    return Pump(connection, messages, state, channel, task)


async def test_a_hundred_messages_take_two_acks() -> None:
    pump = start(delay=0.5)
    pump.put(1, 100)
    await until(lambda: pump.state.handled == 100)
    assert pump.channel.acks == [(64, True)]  # the rest waits for the delay
    await until(lambda: len(pump.channel.acks) == 2)
    assert pump.channel.acks == [(64, True), (100, True)]
    assert pump.state.in_hand == 0
    pump.task.cancel()
    await pump.ended()
    assert pump.channel.acks == [(64, True), (100, True)]  # nothing left to flush


async def test_a_lone_message_is_acked_after_the_delay() -> None:
    loop = asyncio.get_running_loop()
    pump = start(delay=0.1)
    pump.put(1, 1)
    await until(lambda: pump.state.handled == 1)
    handled_at = loop.time()
    assert pump.channel.acks == []
    await until(lambda: bool(pump.channel.acks))
    assert loop.time() - handled_at >= 0.08
    assert pump.channel.acks == [(1, True)]
    # A later one starts its own delay.
    pump.put(2, 3)
    await until(lambda: len(pump.channel.acks) == 2)
    assert pump.channel.acks[-1] == (3, True)
    pump.task.cancel()
    await pump.ended()


async def test_acks_go_out_in_delivery_order_when_slow() -> None:
    # Slow acks: the delay's flush is still sending when the next batch is full.
    pump = start(limit=3, delay=0.001, channel=Channel(ack_seconds=0.02))
    for first in range(1, 43, 3):
        pump.put(first, first + 2)
        await asyncio.sleep(0.005)
    await until(lambda: pump.channel.acks[-1:] == [(42, True)])
    tags = [tag for tag, _ in pump.channel.acks]
    assert tags == sorted(set(tags))
    assert all(multiple for _, multiple in pump.channel.acks)
    assert len(tags) < 42
    pump.task.cancel()
    await pump.ended()


@pytest.mark.parametrize("how", ["cancelled", "connection closed", "iterator ended"])
async def test_what_waits_is_flushed_when_the_pump_stops(how: str) -> None:
    pump = start(delay=3600)
    pump.put(1, 5)
    await until(lambda: pump.state.handled == 5)
    assert pump.channel.acks == []
    if how == "cancelled":
        pump.task.cancel()
    elif how == "connection closed":
        pump.connection.close()
    else:
        pump.messages.end()
    await pump.ended()
    assert pump.channel.acks == [(5, True)]


async def test_a_flush_on_a_dead_channel_on_stop_is_not_an_error() -> None:
    pump = start(delay=3600)
    pump.put(1, 5)
    await until(lambda: pump.state.handled == 5)
    pump.channel.dead = True
    pump.connection.close()
    await pump.ended()
    assert pump.task.result() is None
    assert pump.channel.acks == []


@pytest.mark.parametrize("full_batch", [True, False])
async def test_a_failed_ack_ends_the_pump_with_its_error(full_batch: bool) -> None:
    channel = Channel(dead=True)
    pump = start(limit=2 if full_batch else 64, delay=0.01, channel=channel)
    pump.put(1, 2)
    await pump.ended()
    with pytest.raises(ConnectionError):
        pump.task.result()


async def test_a_handler_that_raises_drops_its_message() -> None:
    handled: list[int] = []

    async def handler(message: Hint) -> None:
        if message.delivery_tag == 2:
            raise RuntimeError("a bug")
        if message.delivery_tag == 3:
            raise PoisonMessage("never")
        handled.append(message.delivery_tag)

    pump = start(handler, delay=0.01)
    with structlog.testing.capture_logs() as logs:
        pump.put(1, 4)
        await until(lambda: pump.channel.acks[-1:] == [(4, True)])
    assert handled == [1, 4]
    assert pump.state.handled == 4
    assert (pump.state.retried, pump.state.dead_lettered, pump.state.in_hand) == (0, 0, 0)
    failures = [e for e in logs if e["log_level"] == "error"]
    assert [e["message_id"] for e in failures] == ["m2", "m3"]
    assert not pump.task.done()
    pump.task.cancel()
    await pump.ended()


async def test_a_cancelled_handler_leaves_its_message_unacked() -> None:
    started = asyncio.Event()

    async def handler(message: Hint) -> None:
        if message.delivery_tag == 3:
            started.set()
            await asyncio.sleep(3600)

    pump = start(handler, delay=3600)
    pump.put(1, 3)
    async with asyncio.timeout(WAIT):
        await started.wait()
    pump.task.cancel()
    await pump.ended()
    assert pump.channel.acks == [(2, True)]
    assert pump.state.handled == 2
    assert pump.state.in_hand == 0
