"""The delivery machinery against the real Postgres and RabbitMQ: retries with
backoff, dead deliveries (API and operator command), isolation from a hanging
endpoint, exactly once across two notifiers, and notification.created events.

The notifier runs alone here; check-ins arrive as events published to the
broker, for a therapist with no office hours (so every alert is immediate).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aio_pika
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.notifier.app import create_app as notifier_app
from services.notifier.delivery import DeliveryLimits, RetryPolicy
from shared.amqp import EVENTS_EXCHANGE, Publisher
from shared.events import (
    CHECKIN_SUBMITTED,
    NOTIFICATION_CREATED,
    MessageEventData,
    NotificationEventData,
    new_event,
)
from shared.internal_auth import Identity, sign_headers
from tests.conftest import TEST_INTERNAL_KEY
from tests.integration.test_channels import QUICK_RETRY, Receiver, receiver
from tests.support.stack import eventually

if TYPE_CHECKING:
    from tests.conftest import TestEnv

pytestmark = pytest.mark.integration

Client = TestClient[web.Request, web.Application]


@asynccontextmanager
async def running_notifier(test_env: TestEnv, *, retry: RetryPolicy = QUICK_RETRY,
                           limits: DeliveryLimits | None = None,
                           **env: str) -> AsyncIterator[Client]:
    app = notifier_app(test_env.settings(**env), retry=retry, delivery_limits=limits)
    async with TestClient(TestServer(app)) as client:

        async def ready() -> bool:
            return (await client.get("/readyz")).status == 200

        await eventually(ready, timeout=20)
        yield client


async def api(client: Client, method: str, path: str, user_id: uuid.UUID,
              body: Any = None, role: str = "therapist") -> tuple[int, Any]:
    raw = json.dumps(body).encode() if body is not None else b""
    identity = Identity(user_id=user_id, role=role, request_id=f"req-{uuid.uuid4()}")
    headers = sign_headers(TEST_INTERNAL_KEY.encode(), method=method, path_qs=path,
                           identity=identity, body=raw)
    if raw:
        headers["Content-Type"] = "application/json"
    response = await client.request(method, path, data=raw, headers=headers)
    data = await response.json() if response.status != 204 else None
    return response.status, data


async def checkin_for(publisher: Publisher, therapist: uuid.UUID) -> uuid.UUID:
    """Publish a check-in to ``therapist`` from a new client; returns the event id."""
    client = uuid.uuid4()
    event = new_event(CHECKIN_SUBMITTED, MessageEventData(
        message_id=uuid.uuid4(), relationship_id=uuid.uuid4(), therapist_id=therapist,
        client_id=client, sender_id=client, sent_at=datetime.now(UTC)), "test")
    await publisher.publish(event.type, event.model_dump_json().encode(),
                            message_id=str(event.event_id), correlation_id="test")
    return event.event_id


async def add_webhook(client: Client, user: uuid.UUID, endpoint: Receiver) -> str:
    status, created = await api(client, "POST", "/v1/channels", user,
                                {"type": "webhook", "url": endpoint.url})
    assert status == 201, created
    endpoint.secret = created["secret"]
    channel_id: str = created["channel"]["id"]
    return channel_id


async def _value(value: Any) -> Any:
    return value


async def test_a_failing_endpoint_is_retried_with_growing_gaps_until_it_accepts(
        test_env: TestEnv, publisher: Publisher) -> None:
    therapist = uuid.uuid4()
    retry = RetryPolicy(base_seconds=0.2, factor=2.0, max_attempts=8)
    async with receiver(fail=3) as endpoint, running_notifier(test_env, retry=retry) as client:
        await add_webhook(client, therapist, endpoint)
        await checkin_for(publisher, therapist)
        await eventually(lambda: _value(endpoint.accepted()), timeout=15)

        assert len(endpoint.hits) == 4
        assert len({h.headers["webhook-id"] for h in endpoint.hits}) == 1  # one delivery
        assert all(h.verified for h in endpoint.hits)
        gaps = [b.at - a.at for a, b in zip(endpoint.hits, endpoint.hits[1:], strict=False)]
        # 0.2 s, 0.4 s, 0.8 s, each less up to a quarter of jitter.
        assert 0.14 <= gaps[0] <= 0.6, gaps
        assert gaps[0] < gaps[1] < gaps[2], gaps
        assert gaps[2] >= 0.55, gaps

        async def sent() -> Any:
            status, data = await api(client, "GET", "/v1/deliveries?state=sent", therapist)
            return data["items"] if status == 200 else None

        [delivery] = await eventually(sent)
        assert delivery["attempts"] == 4
        assert delivery["id"] == endpoint.hits[0].headers["webhook-id"]


async def test_an_endpoint_that_never_accepts_ends_dead_for_the_user_and_the_operator(
        test_env: TestEnv, publisher: Publisher) -> None:
    therapist = uuid.uuid4()
    retry = RetryPolicy(base_seconds=0.05, factor=2.0, max_attempts=3)
    async with receiver(always_fail=True) as endpoint, \
            running_notifier(test_env, retry=retry) as client:
        channel_id = await add_webhook(client, therapist, endpoint)
        await checkin_for(publisher, therapist)

        async def dead() -> Any:
            status, data = await api(client, "GET", "/v1/deliveries?state=dead", therapist)
            return data["items"] if status == 200 else None

        [delivery] = await eventually(dead, timeout=15)
        assert delivery["channel_id"] == channel_id
        assert (delivery["attempts"], delivery["last_error"]) == (3, "HTTP 500")
        assert delivery["next_attempt_at"] is None
        await asyncio.sleep(0.3)
        assert len(endpoint.hits) == 3  # and no more after it died
        status, data = await api(client, "GET", "/v1/deliveries?state=pending,failed",
                                 therapist)
        assert (status, data["items"]) == (200, [])

        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "services.cli", "admin", "deliveries",
                             "--failed"],
            env={**os.environ, **test_env.env()}, capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL, check=False)
        assert result.returncode == 0, result.stderr
        [line] = [ln for ln in result.stdout.splitlines() if delivery["id"] in ln]
        assert " dead " in line
        assert "HTTP 500" in line
        assert "webhook" in line
        assert endpoint.url not in result.stdout
        assert result.stdout.splitlines()[0].split()[:2] == ["DELIVERY", "USER"]


async def test_removing_a_channel_ends_what_it_still_owed_as_dead(
        test_env: TestEnv, publisher: Publisher) -> None:
    therapist = uuid.uuid4()
    slow_retry = RetryPolicy(base_seconds=30, factor=2.0, max_attempts=8)
    async with receiver(always_fail=True) as endpoint, \
            running_notifier(test_env, retry=slow_retry) as client:
        channel_id = await add_webhook(client, therapist, endpoint)
        await checkin_for(publisher, therapist)

        async def failed() -> Any:
            status, data = await api(client, "GET", "/v1/deliveries?state=failed", therapist)
            return data["items"] if status == 200 else None

        await eventually(failed)
        status, _ = await api(client, "DELETE", f"/v1/channels/{channel_id}", therapist)
        assert status == 204
        status, data = await api(client, "GET", "/v1/deliveries", therapist)
        [delivery] = data["items"]
        assert delivery["state"] == "dead"
        assert delivery["last_error"] == "the channel was removed before delivery"


async def test_a_hanging_endpoint_does_not_hold_up_another_users_delivery(
        test_env: TestEnv, publisher: Publisher) -> None:
    stuck, other = uuid.uuid4(), uuid.uuid4()
    limits = DeliveryLimits(concurrency=2, per_host=1)
    async with receiver(hang=True) as hanging, receiver() as healthy, \
            running_notifier(test_env, limits=limits, INTERLUDE_WEBHOOK_TIMEOUT="5") as client:
        await add_webhook(client, stuck, hanging)
        await add_webhook(client, other, healthy)
        for _ in range(3):
            await checkin_for(publisher, stuck)
        await eventually(lambda: _value(hanging.hits))

        started = time.monotonic()
        await checkin_for(publisher, other)
        await eventually(lambda: _value(healthy.accepted()), timeout=5)
        assert time.monotonic() - started < 2.0
        # The hanging host holds at most its own share of the slots.
        assert len(hanging.hits) == 1


async def test_two_notifiers_deliver_each_alert_exactly_once(
        test_env: TestEnv, publisher: Publisher) -> None:
    therapist = uuid.uuid4()
    count = 12
    async with receiver() as endpoint, running_notifier(test_env) as first, \
            running_notifier(test_env):
        await add_webhook(first, therapist, endpoint)
        for _ in range(count):
            await checkin_for(publisher, therapist)
        await eventually(lambda: _value(len(endpoint.accepted()) >= count), timeout=20)
        await asyncio.sleep(1.0)
        ids = [h.headers["webhook-id"] for h in endpoint.hits]
        assert len(ids) == count
        assert len(set(ids)) == count
        notification_ids = {json.loads(h.body)["data"]["notification_id"]
                            for h in endpoint.hits}
        assert len(notification_ids) == count


async def test_notification_created_events_reach_the_broker(
        test_env: TestEnv, publisher: Publisher, db_pool: asyncpg.Pool) -> None:
    therapist = uuid.uuid4()
    connection = await aio_pika.connect(test_env.amqp_url, timeout=10)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC,
                                                  durable=True)
        queue = await channel.declare_queue(f"test-notification-created-{uuid.uuid4().hex}",
                                            exclusive=True)
        await queue.bind(exchange, routing_key=NOTIFICATION_CREATED)
        try:
            async with running_notifier(test_env):
                event_id = await checkin_for(publisher, therapist)

                async def ours() -> dict[str, Any] | None:
                    message = await queue.get(fail=False, timeout=5)
                    if message is None:
                        return None
                    await message.ack()
                    body: dict[str, Any] = json.loads(message.body)
                    return body if body["data"]["user_id"] == str(therapist) else None

                event = await eventually(ours, timeout=15)
            assert event["type"] == NOTIFICATION_CREATED
            data = NotificationEventData.model_validate(event["data"])
            row = await db_pool.fetchrow(
                "SELECT id, kind FROM notifier.notifications WHERE event_id = $1", event_id)
            assert row is not None
            assert (data.notification_id, data.kind) == (row["id"], "checkin.received")
            assert event["correlation_id"] == str(event_id)
        finally:
            await queue.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()
