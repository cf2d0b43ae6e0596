"""The outbox relay's claim, lease, mark and release (shared/outbox.py), against the
real Postgres and RabbitMQ. Each test has its own outbox table (a copy of
messaging's) and its own routing key, so no service's relay or queue is involved."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
import pytest

import shared.outbox
from shared.amqp import EVENTS_EXCHANGE, Publisher, PublishFailed
from shared.db import create_pool
from shared.events import Event, decode_event
from shared.outbox import (
    CLAIM_LEASE_SECONDS,
    PUBLISH_DEADLINE_SECONDS,
    Outbox,
    OutboxRelay,
    add_events,
)
from tests.conftest import TestEnv

pytestmark = pytest.mark.integration

UNREACHABLE = "amqp://guest:guest@127.0.0.1:9/"


@dataclass
class Tap:
    """A routing key of this test's own and an exclusive queue bound to it."""

    key: str
    queue: aio_pika.abc.AbstractQueue


class StuckPublisher(Publisher):
    """Takes the batch and never gets a confirm: a relay hung, or killed, mid-publish."""

    def __init__(self) -> None:
        super().__init__(UNREACHABLE)
        self.calls = 0
        self.publishing = asyncio.Event()

    async def publish(self, routing_key: str, body: bytes, *, message_id: str,
                      correlation_id: str | None = None, timeout: float = 10.0,
                      mandatory: bool = True) -> None:
        self.calls += 1
        self.publishing.set()
        await asyncio.Event().wait()


@pytest.fixture
async def pool(test_env: TestEnv) -> AsyncIterator[asyncpg.Pool]:
    """A pool as the services make it (jsonb decoded)."""
    pool = await create_pool(test_env.database_url, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def outbox(pool: asyncpg.Pool) -> AsyncIterator[Outbox]:
    schema = f"relay_test_{uuid.uuid4().hex[:10]}"
    await pool.execute(f"CREATE SCHEMA {schema};"
                       f" CREATE TABLE {schema}.outbox (LIKE messaging.outbox INCLUDING ALL)")
    try:
        yield Outbox(schema=schema, channel=schema)
    finally:
        await pool.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
async def tap(test_env: TestEnv, publisher: Publisher) -> AsyncIterator[Tap]:
    await publisher.ensure()  # declares the events exchange
    connection = await aio_pika.connect(test_env.amqp_url)
    try:
        channel = await connection.channel()
        key = f"test.relay.{uuid.uuid4().hex}"
        queue = await channel.declare_queue(f"test-relay-{uuid.uuid4().hex}", exclusive=True)
        await queue.bind(EVENTS_EXCHANGE, routing_key=key)
        yield Tap(key, queue)
    finally:
        await connection.close()


def make_event(key: str, **data: Any) -> Event:
    return Event(event_id=uuid.uuid4(), type=key, occurred_at=datetime.now(UTC),
                 correlation_id=f"corr-{uuid.uuid4().hex[:8]}", data=data)


async def add(pool: asyncpg.Pool, outbox: Outbox, events: list[Event]) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await add_events(conn, outbox, events)


async def received(queue: aio_pika.abc.AbstractQueue, count: int,
                   timeout: float = 10.0) -> list[aio_pika.abc.AbstractIncomingMessage]:
    messages: list[aio_pika.abc.AbstractIncomingMessage] = []
    async with asyncio.timeout(timeout):
        while len(messages) < count:
            message = await queue.get(fail=False, timeout=5)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            await message.ack()
            messages.append(message)
    return messages


async def rows(pool: asyncpg.Pool, outbox: Outbox) -> list[asyncpg.Record]:
    return await pool.fetch(  # type: ignore[no-any-return]
        "SELECT event_id, published_at, attempts, last_error, next_attempt_at,"
        f" extract(epoch FROM next_attempt_at - now()) AS lease_left FROM {outbox.qualified}"
        " ORDER BY id")


def test_the_lease_outlasts_the_publish() -> None:
    confirm_timeout = inspect.signature(Publisher.publish).parameters["timeout"].default
    assert confirm_timeout <= PUBLISH_DEADLINE_SECONDS < CLAIM_LEASE_SECONDS


async def test_a_live_claim_is_not_taken_and_an_expired_one_is_published_again(
        test_env: TestEnv, pool: asyncpg.Pool, outbox: Outbox, tap: Tap,
        publisher: Publisher) -> None:
    events = [make_event(tap.key, n=n) for n in range(3)]
    await add(pool, outbox, events)
    stuck = StuckPublisher()
    holder = OutboxRelay(pool, stuck, test_env.database_url, 0.2, outbox)
    holding = asyncio.create_task(holder.drain_once())
    try:
        await asyncio.wait_for(stuck.publishing.wait(), 10)
        claimed = await rows(pool, outbox)
        assert all(row["published_at"] is None for row in claimed)
        assert all(CLAIM_LEASE_SECONDS - 5 < row["lease_left"] <= CLAIM_LEASE_SECONDS
                   for row in claimed)
        # While the lease runs, a second relay finds nothing to do.
        other = OutboxRelay(pool, publisher, test_env.database_url, 0.2, outbox)
        assert await other.drain_once() == 0
        assert await tap.queue.get(fail=False) is None
        # The holder dies without a word (SIGKILL: no finally runs; here it just
        # never returns). Once its lease has ended, any relay publishes the rows.
        await pool.execute(f"UPDATE {outbox.qualified}"
                           " SET next_attempt_at = now() - interval '1 second'")
        assert await other.drain_once() == 3
        messages = await received(tap.queue, 3)
        assert [decode_event(m.body).event_id for m in messages] == [e.event_id for e in events]
    finally:
        holding.cancel()
        await asyncio.gather(holding, return_exceptions=True)
    assert stuck.calls == 3
    # The holder's late stop gave nothing back: its lease had ended.
    marked = await rows(pool, outbox)
    assert all(row["published_at"] is not None and row["attempts"] == 1
               and row["next_attempt_at"] is None for row in marked)


async def test_a_stopped_relay_gives_its_claim_back(
        test_env: TestEnv, pool: asyncpg.Pool, outbox: Outbox, tap: Tap,
        publisher: Publisher) -> None:
    events = [make_event(tap.key, n=n) for n in range(2)]
    await add(pool, outbox, events)
    stuck = StuckPublisher()
    relay = OutboxRelay(pool, stuck, test_env.database_url, 0.2, outbox)
    task = asyncio.create_task(relay.run())
    try:
        await asyncio.wait_for(stuck.publishing.wait(), 10)
        assert all(row["lease_left"] > 0 for row in await rows(pool, outbox))
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
    released = await rows(pool, outbox)
    assert all(row["published_at"] is None and row["next_attempt_at"] is None
               and row["attempts"] == 0 for row in released)
    # A restarted relay publishes them at once, not after the lease.
    fresh = OutboxRelay(pool, publisher, test_env.database_url, 0.2, outbox)
    assert await fresh.drain_once() == 2
    assert len(await received(tap.queue, 2)) == 2


class SlowAnswerPool:
    """The real pool, but the claim's answer arrives late: the statement has
    committed, the relay has not read its rows yet."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.claimed = asyncio.Event()

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        found: list[asyncpg.Record] = await self._pool.fetch(query, *args)
        if "relay_claim" in query:
            self.claimed.set()
            await asyncio.sleep(0.5)
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


async def test_a_relay_stopped_while_its_claim_is_answered_gives_the_rows_back(
        test_env: TestEnv, pool: asyncpg.Pool, outbox: Outbox, tap: Tap,
        publisher: Publisher) -> None:
    await add(pool, outbox, [make_event(tap.key, n=n) for n in range(2)])
    slow = SlowAnswerPool(pool)
    relay = OutboxRelay(slow, publisher, test_env.database_url, 0.2,  # type: ignore[arg-type]
                        outbox)
    task = asyncio.create_task(relay.drain_once())
    await asyncio.wait_for(slow.claimed.wait(), 10)
    assert all(row["lease_left"] > 0 for row in await rows(pool, outbox))
    task.cancel()  # the claim committed; its answer is still on the way
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    released = await rows(pool, outbox)
    assert all(row["published_at"] is None and row["next_attempt_at"] is None
               for row in released)
    fresh = OutboxRelay(pool, publisher, test_env.database_url, 0.2, outbox)
    assert await fresh.drain_once() == 2


async def test_a_stopped_relay_gives_back_only_rows_it_still_holds(
        test_env: TestEnv, pool: asyncpg.Pool, outbox: Outbox, tap: Tap) -> None:
    await add(pool, outbox, [make_event(tap.key)])
    first, second = StuckPublisher(), StuckPublisher()
    tasks = [asyncio.create_task(
        OutboxRelay(pool, first, test_env.database_url, 0.2, outbox).drain_once())]
    try:
        await asyncio.wait_for(first.publishing.wait(), 10)
        # The first lease runs out and a second relay claims the row.
        await pool.execute(f"UPDATE {outbox.qualified}"
                           " SET next_attempt_at = now() - interval '1 second'")
        tasks.append(asyncio.create_task(
            OutboxRelay(pool, second, test_env.database_url, 0.2, outbox).drain_once()))
        await asyncio.wait_for(second.publishing.wait(), 10)
        tasks[0].cancel()
        await asyncio.wait([tasks[0]], timeout=10)
        assert tasks[0].cancelled()
        # The second relay's lease stands.
        (row,) = await rows(pool, outbox)
        assert row["lease_left"] > CLAIM_LEASE_SECONDS - 5
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_the_published_body_is_the_stored_payload(
        test_env: TestEnv, pool: asyncpg.Pool, outbox: Outbox, tap: Tap,
        publisher: Publisher) -> None:
    event = make_event(tap.key, text='naïve ☂ "quoted" \\ back\nslash', n=1.5, big=2**53 + 1,
                       nested={"list": [1, None, True, "x"], "empty": {}})
    await add(pool, outbox, [event])
    relay = OutboxRelay(pool, publisher, test_env.database_url, 0.2, outbox)
    assert await relay.drain_once() == 1
    (message,) = await received(tap.queue, 1)
    assert decode_event(message.body) == event
    stored = await pool.fetchval(f"SELECT payload FROM {outbox.qualified}")
    assert json.loads(message.body) == stored == json.loads(event.model_dump_json())
    assert message.message_id == str(event.event_id)
    assert message.correlation_id == event.correlation_id
    assert message.content_type == "application/json"


async def test_one_mark_settles_sent_unroutable_and_unheard_rows(
        test_env: TestEnv, pool: asyncpg.Pool, outbox: Outbox, tap: Tap,
        publisher: Publisher) -> None:
    """Against the real broker: a key no queue binds is returned and waits for a
    retry; a hint no queue binds (nobody listening) is dropped by the broker and
    counts as sent."""
    unroutable = f"test.nowhere.{uuid.uuid4().hex}"
    hint = f"test.hint.{uuid.uuid4().hex}"
    outbox = dataclasses.replace(outbox, hints=frozenset({hint}))
    events = [make_event(tap.key), make_event(unroutable), make_event(hint),
              make_event(tap.key)]
    await add(pool, outbox, events)
    relay = OutboxRelay(pool, publisher, test_env.database_url, 0.2, outbox)
    assert await relay.drain_once() == 3  # an unroutable row alone does not raise
    sent_a, waiting, unheard, sent_c = await rows(pool, outbox)
    for row in (sent_a, unheard, sent_c):
        assert row["published_at"] is not None
        assert row["attempts"] == 1
        assert row["next_attempt_at"] is None
        assert row["last_error"] is None
    assert waiting["published_at"] is None
    assert waiting["attempts"] == 1
    assert "no queue is bound" in waiting["last_error"]
    assert 0 < waiting["lease_left"] <= 1  # the first back-off step: 1 s
    assert (relay.state.published, relay.state.unroutable, relay.state.failures) == (3, 1, 0)
    assert relay.state.broker_ok
    assert len(await received(tap.queue, 2)) == 2


@pytest.mark.parametrize("failing", ["unreachable", "no_confirm"])
async def test_a_failed_publish_leaves_the_row_due_at_once(
        test_env: TestEnv, pool: asyncpg.Pool, outbox: Outbox, tap: Tap,
        monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    publisher = Publisher(UNREACHABLE)
    if failing == "no_confirm":
        monkeypatch.setattr(shared.outbox, "PUBLISH_DEADLINE_SECONDS", 0.3)
        publisher = StuckPublisher()
    await add(pool, outbox, [make_event(tap.key)])
    relay = OutboxRelay(pool, publisher, test_env.database_url, 0.2, outbox)
    try:
        with pytest.raises(PublishFailed):
            await asyncio.wait_for(relay.drain_once(), 20)
    finally:
        await publisher.close()
    (row,) = await rows(pool, outbox)
    assert row["published_at"] is None
    assert row["attempts"] == 1
    assert row["next_attempt_at"] is None
    assert row["last_error"]
    assert relay.state.failures == 1
    assert not relay.state.broker_ok


async def test_a_stop_that_comes_with_a_wake_up_still_stops_the_relay(
        test_env: TestEnv, pool: asyncpg.Pool, outbox: Outbox, publisher: Publisher) -> None:
    """A wake-up and the stop in the same moment (a commit at shutdown): the relay
    must end. Its idle wait was asyncio.wait_for, which on Python 3.11 returns the
    woken event instead of raising the cancellation, so the relay went on
    relaying and the service's stop hung (seen in the suite as a test timeout)."""
    for _ in range(3):
        relay = OutboxRelay(pool, publisher, test_env.database_url, 300, outbox)
        task = asyncio.create_task(relay.run())
        async with asyncio.timeout(10):
            while not relay.state.listening:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # past its first drain, idle in its wait
        relay.wake()
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=5)
        assert done == {task}, "the relay ignored its stop"
        assert task.cancelled()
