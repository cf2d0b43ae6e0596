"""Drills on the event path, in-process against the real Postgres and RabbitMQ:
a relay killed between publishing and marking sent, and a poison event."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime

import aio_pika
import asyncpg
import pytest
import structlog
from aiohttp.test_utils import TestClient, TestServer

from services.messaging.relay import MESSAGING_OUTBOX, messaging_relay
from services.notifier.app import CONSUMER_STATE, create_app
from services.notifier.consumer import QUEUE, EventConsumer
from shared.amqp import DELIVERY_LIMIT, EVENTS_EXCHANGE, Publisher
from shared.events import CHECKIN_SUBMITTED, Event, MessageEventData, new_event
from shared.outbox import add_event
from tests.conftest import TestEnv
from tests.support.stack import eventually

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]


def checkin_event() -> Event:
    data = MessageEventData(
        message_id=uuid.uuid4(), relationship_id=uuid.uuid4(), therapist_id=uuid.uuid4(),
        client_id=uuid.uuid4(), sender_id=uuid.uuid4(), sent_at=datetime.now(UTC))
    data = data.model_copy(update={"sender_id": data.client_id})
    return new_event(CHECKIN_SUBMITTED, data, "drill")


async def alerts_for(pool: asyncpg.Pool, event: Event) -> int:
    return int(await pool.fetchval(
        "SELECT count(*) FROM notifier.notifications WHERE message_id = $1",
        uuid.UUID(event.data["message_id"])))


async def consumer_ready(app: object) -> None:
    async def connected() -> bool:
        return bool(app[CONSUMER_STATE].connected)  # type: ignore[index]

    await eventually(connected, timeout=20)


class DyingPublisher(Publisher):
    """Publishes for real, then stops the relay (cancels its task) before it can
    mark the row sent."""

    def __init__(self, url: str, relay_task: list[asyncio.Task[None]]) -> None:
        super().__init__(url)
        self.relay_task = relay_task
        self.published = 0

    async def publish(self, *args: object, **kwargs: object) -> None:
        await super().publish(*args, **kwargs)  # type: ignore[arg-type]
        self.published += 1
        self.relay_task[0].cancel()  # the relay is stopped here
        await asyncio.sleep(3600)


async def test_relay_killed_between_publish_and_mark_sent(test_env: TestEnv,
                                                          db_pool: asyncpg.Pool) -> None:
    event = checkin_event()
    connection = await aio_pika.connect(test_env.amqp_url)
    app = create_app(test_env.settings())
    try:
        async with TestClient(TestServer(app)):
            await consumer_ready(app)  # the exchange exists from here on
            channel = await connection.channel()
            tap = await channel.declare_queue(f"drill-tap-{uuid.uuid4().hex}", exclusive=True)
            await tap.bind(EVENTS_EXCHANGE, routing_key=CHECKIN_SUBMITTED)
            async with db_pool.acquire() as conn, conn.transaction():
                await add_event(conn, MESSAGING_OUTBOX, event)
            # The first relay publishes and is stopped (its task cancelled) before
            # it marks the row sent: the broker has the event, the outbox says unsent.
            task_box: list[asyncio.Task[None]] = []
            dying = DyingPublisher(test_env.amqp_url, task_box)
            relay = messaging_relay(db_pool, dying, test_env.database_url, 0.2)
            task_box.append(asyncio.create_task(relay.run()))
            await asyncio.wait(task_box, timeout=30)
            await dying.close()
            assert dying.published >= 1
            sent, leased = await db_pool.fetchrow(
                "SELECT published_at, next_attempt_at FROM messaging.outbox"
                " WHERE event_id = $1", event.event_id)
            assert sent is None  # the mark never committed
            # A stopped relay gives its claim back, so the row is due at once. (A
            # relay killed outright keeps it leased until CLAIM_LEASE_SECONDS have
            # passed; tests/integration/test_outbox_relay.py covers that case.)
            assert leased is None
            # A fresh relay publishes the same event again and marks it.
            publisher = Publisher(test_env.amqp_url)
            relay = messaging_relay(db_pool, publisher, test_env.database_url, 0.2)
            task = asyncio.create_task(relay.run())
            try:
                async def marked() -> bool:
                    return bool(await db_pool.fetchval(
                        "SELECT published_at IS NOT NULL FROM messaging.outbox"
                        " WHERE event_id = $1", event.event_id))

                await eventually(marked, timeout=20)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await publisher.close()
            # The broker carried the event twice; downstream it had one effect.
            copies = 0
            async with asyncio.timeout(20):
                while copies < 2:
                    message = await tap.get(fail=False, timeout=5)
                    if message is None:
                        await asyncio.sleep(0.1)
                        continue
                    await message.ack()
                    copies += json.loads(message.body)["event_id"] == str(event.event_id)

            async def alerted() -> bool:
                return await alerts_for(db_pool, event) >= 1

            await eventually(alerted, timeout=20)
            await asyncio.sleep(1)  # room for a (wrong) second effect to show
            assert await alerts_for(db_pool, event) == 1
    finally:
        await connection.close()


async def test_poison_event_is_dead_lettered_after_bounded_attempts(
        test_env: TestEnv, db_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    poison, good = checkin_event(), checkin_event()
    real = EventConsumer.handle_event

    async def failing(self: EventConsumer, event: Event) -> None:
        if event.event_id == poison.event_id:
            raise RuntimeError("this handler always fails for the drill's poison event")
        await real(self, event)

    monkeypatch.setattr(EventConsumer, "handle_event", failing)
    app = create_app(test_env.settings())
    publisher = Publisher(test_env.amqp_url)
    connection = await aio_pika.connect(test_env.amqp_url)
    try:
        with structlog.testing.capture_logs() as logs:
            async with TestClient(TestServer(app)):
                await consumer_ready(app)
                for event in (poison, good):
                    await publisher.publish(event.type, event.model_dump_json().encode(),
                                            message_id=str(event.event_id))

                # The queue is not blocked: the good event behind it is handled.
                async def good_done() -> bool:
                    return await alerts_for(db_pool, good) == 1

                await eventually(good_done, timeout=30)
                channel = await connection.channel()
                dead = await channel.declare_queue(f"{QUEUE}.dead", passive=True)
                found = None
                async with asyncio.timeout(60):
                    while found is None:
                        message = await dead.get(fail=False, timeout=5)
                        if message is None:
                            await asyncio.sleep(0.2)
                            continue
                        await message.ack()
                        if message.message_id == str(poison.event_id):
                            found = message
                state = app[CONSUMER_STATE]
                assert state.retried >= DELIVERY_LIMIT  # bounded attempts, counted
        assert await alerts_for(db_pool, poison) == 0
        failures = [e for e in logs if e["event"] == "event handler failed; will be redelivered"]
        assert len(failures) >= DELIVERY_LIMIT
    finally:
        await publisher.close()
        await connection.close()
