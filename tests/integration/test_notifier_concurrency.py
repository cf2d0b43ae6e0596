"""The notifier's consumer handles events concurrently, against the real Postgres and
RabbitMQ: one therapist's events in order and one at a time, other therapists'
alongside; a stop lets every message in hand commit and leaves the rest queued."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import asyncpg
import pytest

from services.notifier.consumer import EventConsumer
from services.notifier.store import EventWork, NotifierStore
from shared.amqp import Publisher
from shared.amqp_consume import ConsumerState
from shared.db import create_pool
from shared.events import CHECKIN_SUBMITTED, Event, MessageEventData, new_event
from tests.support.stack import eventually

if TYPE_CHECKING:
    from tests.conftest import TestEnv

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

WAIT_SECONDS = 10.0


class GatedStore(NotifierStore):
    """Records when each event's work begins (inside its transaction, after the inbox
    row) and ends; the work of an event with a gate waits for the gate."""

    def __init__(self, pool: asyncpg.Pool, *, pause: float = 0.0) -> None:
        super().__init__(pool)
        self.gates: dict[uuid.UUID, asyncio.Event] = {}
        self.therapist_of: dict[uuid.UUID, uuid.UUID] = {}
        self.started: list[uuid.UUID] = []
        self.committed: list[uuid.UUID] = []
        self.active: dict[uuid.UUID, int] = {}
        self.most_active: dict[uuid.UUID, int] = {}
        self._pause = pause

    async def handle_event(self, event_id: uuid.UUID, event_type: str, work: EventWork, *,
                           lock_user: uuid.UUID | None = None) -> bool:
        therapist = self.therapist_of.get(event_id, event_id)

        async def gated(tx: object) -> None:
            self.started.append(event_id)
            self.active[therapist] = self.active.get(therapist, 0) + 1
            self.most_active[therapist] = max(self.most_active.get(therapist, 0),
                                              self.active[therapist])
            try:
                if event_id in self.gates:
                    await self.gates[event_id].wait()
                if self._pause:
                    await asyncio.sleep(random.uniform(0, self._pause))
                await work(tx)  # type: ignore[arg-type]
            finally:
                self.active[therapist] -= 1

        recorded = await super().handle_event(event_id, event_type, gated, lock_user=lock_user)
        self.committed.append(event_id)
        return recorded

    def checkin(self, therapist: uuid.UUID, *, gated: bool = False) -> Event:
        client = uuid.uuid4()
        data = MessageEventData(
            message_id=uuid.uuid4(), relationship_id=uuid.uuid4(), therapist_id=therapist,
            client_id=client, sender_id=client, sent_at=datetime.now(UTC))
        event = new_event(CHECKIN_SUBMITTED, data, correlation_id=f"test-{uuid.uuid4()}")
        self.therapist_of[event.event_id] = therapist
        if gated:
            self.gates[event.event_id] = asyncio.Event()
        return event


@pytest.fixture
async def pool(test_env: TestEnv) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(test_env.database_url)  # as the service makes it
    try:
        yield pool
    finally:
        await pool.close()


async def publish(publisher: Publisher, *events: Event) -> None:
    for event in events:  # one after another: the queue keeps this order
        await publisher.publish(event.type, event.model_dump_json().encode(),
                                message_id=str(event.event_id),
                                correlation_id=event.correlation_id)


@asynccontextmanager
async def consuming(consumer: EventConsumer, state: ConsumerState,
                    amqp_url: str) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(consumer.run(amqp_url))
    try:
        await eventually(lambda: asyncio.sleep(0, state.connected))
        yield task
    finally:
        task.cancel()
        await asyncio.wait([task])


async def alerted(pool: asyncpg.Pool, event: Event) -> bool:
    found = await pool.fetchval(
        "SELECT count(*) FROM notifier.notifications WHERE event_id = $1", event.event_id)
    return bool(found)


async def in_inbox(pool: asyncpg.Pool, event: Event) -> bool:
    found = await pool.fetchval("SELECT true FROM notifier.inbox WHERE event_id = $1",
                                event.event_id)
    return bool(found)


async def wait_started(store: GatedStore, *events: Event) -> None:
    await eventually(lambda: asyncio.sleep(0, all(e.event_id in store.started for e in events)))


async def test_a_blocked_therapist_does_not_hold_up_another(
    test_env: TestEnv, pool: asyncpg.Pool, publisher: Publisher,
) -> None:
    store, state = GatedStore(pool), ConsumerState()
    a, b = uuid.uuid4(), uuid.uuid4()
    first_a = store.checkin(a, gated=True)
    other_b, second_a = store.checkin(b), store.checkin(a)
    async with consuming(EventConsumer(store, state), state, test_env.amqp_url):
        await publish(publisher, first_a, other_b, second_a)
        # B commits while A's transaction is open and blocked...
        await eventually(lambda: alerted(pool, other_b))
        assert first_a.event_id in store.started
        assert not await alerted(pool, first_a)
        # ...and A's next event waits for A's first.
        await asyncio.sleep(0.2)
        assert second_a.event_id not in store.started
        store.gates[first_a.event_id].set()
        await eventually(lambda: alerted(pool, second_a))
        assert await alerted(pool, first_a)
    ours = [e for e in store.committed if e in store.therapist_of]
    assert ours == [other_b.event_id, first_a.event_id, second_a.event_id]


async def test_one_therapists_events_stay_in_order_and_one_at_a_time(
    test_env: TestEnv, pool: asyncpg.Pool, publisher: Publisher,
) -> None:
    store, state = GatedStore(pool, pause=0.02), ConsumerState()
    therapists = [uuid.uuid4() for _ in range(3)]
    events = [store.checkin(t) for _ in range(6) for t in therapists]
    async with consuming(EventConsumer(store, state), state, test_env.amqp_url):
        await publish(publisher, *events)

        async def all_alerted() -> bool:
            return all([await alerted(pool, e) for e in events])

        await eventually(all_alerted, timeout=WAIT_SECONDS * 2)
    for therapist in therapists:
        sent = [e.event_id for e in events if store.therapist_of[e.event_id] == therapist]
        assert [e for e in store.started if e in sent] == sent
        assert store.most_active[therapist] == 1
    assert state.in_hand == 0


async def test_stop_waits_for_every_message_in_hand(
    test_env: TestEnv, pool: asyncpg.Pool, publisher: Publisher,
) -> None:
    store, state = GatedStore(pool), ConsumerState()
    in_hand = [store.checkin(uuid.uuid4(), gated=True) for _ in range(3)]
    late = store.checkin(uuid.uuid4())
    consumer = EventConsumer(store, state, concurrency=4)
    async with consuming(consumer, state, test_env.amqp_url) as task:
        await publish(publisher, *in_hand)
        await wait_started(store, *in_hand)
        stopping = asyncio.create_task(consumer.stop(task, grace=WAIT_SECONDS))
        await eventually(lambda: asyncio.sleep(0, state.stopping))
        await publish(publisher, late)  # arrives after the stop began: not taken
        await asyncio.sleep(0.3)
        assert not stopping.done()
        assert state.in_hand == 3
        for event in in_hand:
            store.gates[event.event_id].set()
        async with asyncio.timeout(WAIT_SECONDS):
            await stopping
        assert task.done()
    for event in in_hand:
        assert await alerted(pool, event)
    assert late.event_id not in store.started
    assert not await in_inbox(pool, late)
    assert state.in_hand == 0

    # The message left over was never acked: the broker gives it to the next consumer.
    again = ConsumerState()
    async with consuming(EventConsumer(NotifierStore(pool), again), again, test_env.amqp_url):
        await eventually(lambda: alerted(pool, late))


async def test_stop_gives_up_on_a_stuck_message_after_the_grace(
    test_env: TestEnv, pool: asyncpg.Pool, publisher: Publisher,
) -> None:
    store, state = GatedStore(pool), ConsumerState()
    stuck = store.checkin(uuid.uuid4(), gated=True)
    consumer = EventConsumer(store, state)
    async with consuming(consumer, state, test_env.amqp_url) as task:
        await publish(publisher, stuck)
        await wait_started(store, stuck)
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(WAIT_SECONDS):
            await consumer.stop(task, grace=0.5)
        assert 0.5 <= asyncio.get_running_loop().time() - started < 5
        assert task.done()
    # Rolled back, not acked: redelivered, and applied once by the next consumer.
    assert not await in_inbox(pool, stuck)
    again = ConsumerState()
    async with consuming(EventConsumer(NotifierStore(pool), again), again, test_env.amqp_url):
        await eventually(lambda: alerted(pool, stuck))
    assert int(await pool.fetchval(
        "SELECT count(*) FROM notifier.notifications WHERE event_id = $1", stuck.event_id)) == 1
