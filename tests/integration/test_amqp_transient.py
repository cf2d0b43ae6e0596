"""The transient consumer on the real broker: every hint is handled and acked, with
far fewer ``basic.ack`` frames than messages, and what waits is flushed on stop."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aio_pika
import aio_pika.abc
import pytest

from shared.amqp import Publisher
from shared.amqp_consume import ConsumerState, consume_transient_forever
from tests.conftest import TestEnv
from tests.support.stack import eventually

pytestmark = pytest.mark.integration

WAIT = 15.0


@dataclass
class Consumer:
    queue: str
    routing_key: str
    state: ConsumerState


@pytest.fixture
def acks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """Every ack sent by an aio-pika message: ``(delivery tag, multiple)``."""
    sent: list[tuple[int, bool]] = []
    original = aio_pika.IncomingMessage.ack

    async def ack(self: aio_pika.IncomingMessage, multiple: bool = False) -> None:
        await original(self, multiple=multiple)
        assert self.delivery_tag is not None
        sent.append((self.delivery_tag, multiple))

    monkeypatch.setattr(aio_pika.IncomingMessage, "ack", ack)
    return sent


@asynccontextmanager
async def transient_consumer(test_env: TestEnv, *,
                             ack_delay: float = 0.05) -> AsyncIterator[Consumer]:
    """A connected transient consumer on a queue of its own; stopped on exit."""
    suffix = uuid.uuid4().hex[:12]
    state = ConsumerState()
    queue, key = f"test.transient.{suffix}", f"test.transient.{suffix}"
    task = asyncio.create_task(consume_transient_forever(
        test_env.amqp_url, queue, [key], ignore, state, ack_delay=ack_delay))
    try:
        async def connected() -> bool:
            return state.connected
        await eventually(connected, timeout=WAIT)
        yield Consumer(queue, key, state)
    finally:
        task.cancel()
        async with asyncio.timeout(WAIT):
            await asyncio.gather(task, return_exceptions=True)


async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    pass


def queue_counts(vhost: str, queue: str) -> tuple[int, int] | None:
    """``(ready, unacked)`` of ``queue`` as the broker counts them, or None if gone."""
    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "-p", vhost,
         "name", "messages_ready", "messages_unacknowledged"],
        check=True, capture_output=True, text=True, timeout=60).stdout
    for line in out.splitlines():
        name, ready, unacked = line.split()
        if name == queue:
            return int(ready), int(unacked)
    return None


async def publish(publisher: Publisher, key: str, count: int) -> None:
    await asyncio.gather(*(publisher.publish(key, b"{}", message_id=str(uuid.uuid4()))
                           for _ in range(count)))


async def test_a_hundred_hints_are_all_acked_in_a_few_frames(
        publisher: Publisher, test_env: TestEnv, acks: list[tuple[int, bool]]) -> None:
    async with transient_consumer(test_env) as consumer:
        await publish(publisher, consumer.routing_key, 100)

        async def handled() -> bool:
            return consumer.state.handled == 100
        await eventually(handled, timeout=WAIT)

        async def settled() -> bool:
            counts = await asyncio.to_thread(queue_counts, test_env.vhost, consumer.queue)
            return counts == (0, 0)
        await eventually(settled, timeout=WAIT)
        assert consumer.state.reconnects == 0
    tags = [tag for tag, _ in acks]
    assert tags[-1] == 100
    assert tags == sorted(set(tags))
    assert all(multiple for _, multiple in acks)
    assert len(acks) <= 10, acks


async def test_what_waits_is_acked_when_the_consumer_stops(
        publisher: Publisher, test_env: TestEnv, acks: list[tuple[int, bool]]) -> None:
    async with transient_consumer(test_env, ack_delay=3600) as consumer:
        await publish(publisher, consumer.routing_key, 10)

        async def handled() -> bool:
            return consumer.state.handled == 10
        await eventually(handled, timeout=WAIT)
        # Held back: fewer than a batch, long before the delay.
        counts = await asyncio.to_thread(queue_counts, test_env.vhost, consumer.queue)
        assert counts == (0, 10)
        assert acks == []
    assert acks == [(10, True)]

    async def gone() -> bool:
        return await asyncio.to_thread(queue_counts, test_env.vhost, consumer.queue) is None
    await eventually(gone, timeout=WAIT)
