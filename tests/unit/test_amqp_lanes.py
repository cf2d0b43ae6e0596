"""The consume loop's concurrent pump, over fake messages and a fake connection:
up to N messages at once, one lane key at a time and in delivery order, each
settled on its own, nothing left running when the pump ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import pytest

from shared import amqp_consume as amqp
from shared.amqp_consume import ConsumerState, PoisonMessage, _pump_until_closed

pytestmark = pytest.mark.timeout(10)

WAIT = 5.0


@dataclass(eq=False)
class FakeMessage:
    delivery_tag: int
    key: str
    fail_ack: bool = False
    settled: list[str] = field(default_factory=list)

    @property
    def message_id(self) -> str:
        return f"m{self.delivery_tag}"

    @property
    def processed(self) -> bool:
        return bool(self.settled)

    async def ack(self, multiple: bool = False) -> None:
        assert not multiple
        if self.fail_ack:
            raise ConnectionError("channel gone")
        self.settled.append("ack")

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        self.settled.append("nack")

    async def reject(self, requeue: bool = False) -> None:
        self.settled.append("reject")


class FakeIterator:
    """Yields what is put in; ``end()`` ends it as a cancelled consumer would."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[FakeMessage | None] = asyncio.Queue()

    def put(self, *messages: FakeMessage) -> None:
        for message in messages:
            self._queue.put_nowait(message)

    def end(self) -> None:
        self._queue.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[FakeMessage]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[FakeMessage]:
        while (message := await self._queue.get()) is not None:
            yield message


class FakeConnection:
    def __init__(self) -> None:
        self._closed = asyncio.Event()

    def close(self) -> None:
        self._closed.set()

    async def closed(self) -> bool:
        await self._closed.wait()
        return True


def by_key(message: Any) -> Hashable:
    return message.key


@dataclass
class Pump:
    connection: FakeConnection
    messages: FakeIterator
    state: ConsumerState
    task: asyncio.Task[None]

    async def finish(self) -> None:
        """Close the connection and wait for the pump to end."""
        self.connection.close()
        async with asyncio.timeout(WAIT):
            await asyncio.wait([self.task])


def start(handler: Callable[[Any], Awaitable[None]], *, concurrency: int = 4,
          lane_key: Callable[[Any], Hashable] | None = by_key) -> Pump:
    connection, messages, state = FakeConnection(), FakeIterator(), ConsumerState()
    task = asyncio.create_task(_pump_until_closed(
        connection, messages, handler, state,  # type: ignore[arg-type]
        concurrency=concurrency, lane_key=lane_key))
    return Pump(connection, messages, state, task)


async def until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def only_this_task_left() -> bool:
    return asyncio.all_tasks() == {asyncio.current_task()}


async def test_other_keys_go_ahead_while_one_is_blocked() -> None:
    gate = asyncio.Event()
    started: list[str] = []

    async def handler(message: FakeMessage) -> None:
        started.append(message.message_id)
        if message.key == "A":
            await gate.wait()

    a, b, c = FakeMessage(1, "A"), FakeMessage(2, "B"), FakeMessage(3, "C")
    pump = start(handler)
    pump.messages.put(a, b, c)
    await until(lambda: b.settled == ["ack"] and c.settled == ["ack"])
    assert a.settled == []
    assert pump.state.in_hand == 1
    gate.set()
    await until(lambda: a.settled == ["ack"])
    assert pump.state.handled == 3
    assert pump.state.in_hand == 0
    await pump.finish()
    assert only_this_task_left()


async def test_one_key_is_handled_one_at_a_time_in_delivery_order() -> None:
    active: dict[str, int] = {}
    overlap: dict[str, int] = {}
    order: dict[str, list[int]] = {}
    most_at_once = 0

    async def handler(message: FakeMessage) -> None:
        nonlocal most_at_once
        active[message.key] = active.get(message.key, 0) + 1
        overlap[message.key] = max(overlap.get(message.key, 0), active[message.key])
        most_at_once = max(most_at_once, sum(active.values()))
        order.setdefault(message.key, []).append(message.delivery_tag)
        # Later messages finish sooner: only the lanes keep them in order.
        await asyncio.sleep(0.002 * (40 - message.delivery_tag) / 4)
        active[message.key] -= 1

    messages = [FakeMessage(tag, "ABC"[tag % 3]) for tag in range(1, 31)]
    pump = start(handler, concurrency=3)
    pump.messages.put(*messages)
    await until(lambda: all(m.settled for m in messages))
    assert all(m.settled == ["ack"] for m in messages)
    assert overlap == {"A": 1, "B": 1, "C": 1}
    assert most_at_once <= 3
    for key, tags in order.items():
        assert tags == sorted(tags), key
        assert len(tags) == 10
    await pump.finish()
    assert only_this_task_left()


async def test_no_more_than_concurrency_handlers_at_once() -> None:
    gate = asyncio.Event()
    started: list[int] = []

    async def handler(message: FakeMessage) -> None:
        started.append(message.delivery_tag)
        await gate.wait()

    pump = start(handler, concurrency=2, lane_key=None)  # every message its own lane
    messages = [FakeMessage(tag, "same") for tag in range(1, 6)]
    pump.messages.put(*messages)
    await until(lambda: len(started) == 2)
    await asyncio.sleep(0.05)
    assert started == [1, 2]
    gate.set()
    await until(lambda: all(m.settled == ["ack"] for m in messages))
    await pump.finish()


async def test_a_failing_handler_is_nacked_later_without_holding_up_other_keys(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(amqp, "REQUEUE_DELAY_SECONDS", 0.3)
    finished: list[int] = []

    async def handler(message: FakeMessage) -> None:
        if message.delivery_tag == 1:
            raise RuntimeError("broken for now")
        if message.delivery_tag == 2:
            raise PoisonMessage("never")
        finished.append(message.delivery_tag)

    failing, poison = FakeMessage(1, "A"), FakeMessage(2, "B")
    other, after_failing = FakeMessage(3, "C"), FakeMessage(4, "A")
    pump = start(handler, concurrency=2)
    pump.messages.put(failing, poison, other, after_failing)
    await until(lambda: other.settled == ["ack"])
    assert poison.settled == ["reject"]
    assert failing.settled == []       # still in its pause before the nack
    assert after_failing.settled == []  # its lane waits for the message before it
    await until(lambda: after_failing.settled == ["ack"])
    assert failing.settled == ["nack"]
    assert finished == [3, 4]
    assert (pump.state.retried, pump.state.dead_lettered, pump.state.handled) == (1, 1, 2)
    await pump.finish()


async def test_a_closed_connection_cancels_every_message_in_flight() -> None:
    started = 0

    async def handler(message: FakeMessage) -> None:
        nonlocal started
        started += 1
        await asyncio.sleep(3600)

    messages = [FakeMessage(tag, "AB"[tag % 2]) for tag in range(1, 7)]
    pump = start(handler)
    pump.messages.put(*messages)
    await until(lambda: started == 2)
    await pump.finish()
    assert pump.task.result() is None
    # The two begun are handed back at once; the rest were never begun and are
    # redelivered by the broker when the channel closes.
    assert sorted(len(m.settled) for m in messages) == [0, 0, 0, 0, 1, 1]
    assert all(m.settled in ([], ["nack"]) for m in messages)
    assert pump.state.in_hand == 0
    assert only_this_task_left()


async def test_a_failed_ack_ends_the_pump_with_its_error() -> None:
    blocked = asyncio.Event()

    async def slow(message: FakeMessage) -> None:
        if message.key == "B":
            await blocked.wait()

    pump = start(slow)
    pump.messages.put(FakeMessage(1, "B"), FakeMessage(2, "A", fail_ack=True))
    async with asyncio.timeout(WAIT):
        await asyncio.wait([pump.task])
    with pytest.raises(ConnectionError):
        pump.task.result()
    assert pump.state.in_hand == 0
    assert only_this_task_left()


async def test_once_stopping_no_handler_begins_and_those_in_hand_finish() -> None:
    gate = asyncio.Event()
    started: list[int] = []

    async def handler(message: FakeMessage) -> None:
        started.append(message.delivery_tag)
        await gate.wait()

    first, second = FakeMessage(1, "A"), FakeMessage(2, "B")
    pump = start(handler)
    pump.messages.put(first, second)
    await until(lambda: pump.state.in_hand == 2)
    pump.state.stopping = True
    late = FakeMessage(3, "C")
    pump.messages.put(late)
    await asyncio.sleep(0.05)
    gate.set()
    await until(lambda: pump.state.in_hand == 0)
    assert first.settled == second.settled == ["ack"]
    assert started == [1, 2]
    await pump.finish()
    assert late.settled == []  # never begun: left for the broker to redeliver
    assert only_this_task_left()


async def test_concurrency_one_is_the_serial_loop() -> None:
    log: list[str] = []

    async def handler(message: FakeMessage) -> None:
        log.append(f"start {message.delivery_tag}")
        await asyncio.sleep(0.01)
        log.append(f"end {message.delivery_tag}")

    messages = [FakeMessage(tag, str(tag)) for tag in range(1, 4)]
    pump = start(handler, concurrency=1)
    pump.messages.put(*messages)
    await until(lambda: all(m.settled == ["ack"] for m in messages))
    assert log == ["start 1", "end 1", "start 2", "end 2", "start 3", "end 3"]
    await pump.finish()
    assert only_this_task_left()
