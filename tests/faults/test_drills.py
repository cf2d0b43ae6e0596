"""Fault drills: break things while real check-ins stream in, then count.

Every check-in accepted with a 2xx must be stored exactly once and produce
exactly one alert; nothing accepted is lost, nothing is duplicated.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request

import aio_pika
import pytest

from tests.faults.conftest import Drill
from tests.faults.system import Outcome, drive, make_pairs, prepare, wait_for_exactly_once

pytestmark = [pytest.mark.faults, pytest.mark.timeout(420)]


async def consumer_count(url: str, queue: str) -> int:
    connection = await aio_pika.connect(url, timeout=5)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.consumer_count or 0)
    finally:
        await connection.close()


async def eventually_true(check, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.5)


async def test_broker_restarts_lose_nothing_and_consumers_come_back(drill: Drill) -> None:
    pairs = await make_pairs(drill.services, drill.database_url, 8)
    items = prepare(pairs, 2000)
    outcome, mid_stream = Outcome(), []

    async def break_the_broker() -> None:
        for _ in range(2):
            await asyncio.sleep(4)
            mid_stream.append(outcome.unfinished(items))
            await asyncio.to_thread(drill.mq.stop_app)
            await asyncio.sleep(3)
            await asyncio.to_thread(drill.mq.start_app)

    # At most 70 check-ins a second: the stream lasts 28 s or more, so both
    # stops land in it however fast the machine is (the second comes after
    # 11 s of sleeps plus one stop and one start of the broker, 5-10 s).
    await asyncio.gather(drive(drill.services.gateway, items, rate=70, outcome=outcome),
                         break_the_broker())
    assert mid_stream == [True, True], "a stop came after the stream: the drill proves nothing"
    # The outbox held: check-ins were accepted while the broker was away.
    assert len(outcome.accepted) == len(items)

    async def consumer_back() -> bool:
        try:
            return await consumer_count(drill.mq.url, "notifier.events") >= 1
        except Exception:  # the queue or broker not back yet
            return False

    await eventually_true(consumer_back)
    await wait_for_exactly_once(drill.database_url, outcome.accepted, timeout=150)


async def test_notifier_killed_mid_stream_has_exactly_once_effects(drill: Drill) -> None:
    pairs = await make_pairs(drill.services, drill.database_url, 4)
    items = prepare(pairs, 600)
    outcome, mid_stream = Outcome(), []

    async def kill_and_restart() -> None:
        await asyncio.sleep(2)
        mid_stream.append(outcome.unfinished(items))
        drill.services.kill("notifier")
        await asyncio.sleep(2)
        drill.services.start("notifier")

    await asyncio.gather(drive(drill.services.gateway, items, rate=100, outcome=outcome),
                         kill_and_restart())
    assert mid_stream == [True], "the kill came after the stream: the drill proves nothing"
    assert len(outcome.accepted) == len(items)
    await asyncio.to_thread(drill.services.wait_ready, ("notifier",))
    await wait_for_exactly_once(drill.database_url, outcome.accepted)


async def test_postgres_restart_answers_503_and_everything_recovers(drill: Drill) -> None:
    pairs = await make_pairs(drill.services, drill.database_url, 4)
    items = prepare(pairs, 600)

    outcome = Outcome()

    async def restart_postgres() -> None:
        await asyncio.sleep(2)
        await asyncio.to_thread(drill.pg.stop)
        await asyncio.sleep(4)
        await asyncio.to_thread(drill.pg.start)

    await asyncio.gather(
        drive(drill.services.gateway, items, retry_for=90, rate=100, outcome=outcome),
        restart_postgres())
    assert 500 not in outcome.statuses, outcome.statuses
    assert outcome.statuses[503] > 0, "the outage was not seen: the drill proves nothing"
    assert outcome.slowest < 15, f"a request hung for {outcome.slowest:.1f} s"
    assert len(outcome.accepted) == len(items)
    # Every service recovered without a restart, the LISTEN connection included.
    await asyncio.to_thread(drill.services.wait_ready)
    assert dict(drill.services.starts) == {"messaging": 1, "notifier": 1, "gateway": 1}
    await wait_for_exactly_once(drill.database_url, outcome.accepted)


@pytest.mark.parametrize("service", ["gateway", "messaging", "notifier"])
async def test_graceful_shutdown_under_load_resets_nothing(drill: Drill, service: str) -> None:
    pairs = await make_pairs(drill.services, drill.database_url, 4)
    items = prepare(pairs, 400)
    outcome, mid_stream = Outcome(), []

    async def stop_and_start() -> None:
        await asyncio.sleep(1.5)
        mid_stream.append(outcome.unfinished(items))
        code = await asyncio.to_thread(drill.services.terminate, service)
        assert code == 0, drill.services.log_tail(service)
        drill.services.start(service)

    await asyncio.gather(
        drive(drill.services.gateway, items, fresh_connections=True, rate=100,
              outcome=outcome),
        stop_and_start())
    assert mid_stream == [True], "the stop came after the stream: the drill proves nothing"
    # No connection was reset: requests in progress completed with their answer,
    # and so did those queued on the listener when it closed (shared.listener).
    # Connects after the close are refused (nothing was sent on them) and
    # retried with the same Idempotency-Key. No check-in was stored and then
    # answered with an error either, on the gateway's hop to a stopping service.
    assert outcome.resets == 0, outcome
    assert outcome.answers_lost == 0, outcome
    assert 500 not in outcome.statuses
    assert len(outcome.accepted) == len(items)
    await asyncio.to_thread(drill.services.wait_ready)
    await wait_for_exactly_once(drill.database_url, outcome.accepted)


async def test_client_disconnects_leave_all_or_nothing(drill: Drill) -> None:
    import aiohttp

    from tests.faults.system import count_effects

    pairs = await make_pairs(drill.services, drill.database_url, 2)
    items = prepare(pairs, 120)
    timeout_ids = set()
    async with aiohttp.ClientSession() as http:
        for i, item in enumerate(items):
            # Give up after a varying sliver of time: some requests are cut before the
            # server has read them, some while it stores, some after.
            try:
                async with asyncio.timeout(0.001 + (i % 40) * 0.002):
                    async with http.post(
                            f"{drill.services.gateway}/v1/relationships/"
                            f"{item.pair.relationship_id}/messages",
                            data=item.body, headers={
                                "Authorization": f"Bearer {item.pair.client_token}",
                                "Content-Type": "application/json"}) as response:
                        await response.read()
            except TimeoutError:
                timeout_ids.add(item.message_id)
    assert timeout_ids, "no request was cut: the drill proves nothing"
    await asyncio.sleep(3)  # let anything in flight finish
    all_ids = {item.message_id for item in items}
    effects = await count_effects(drill.database_url, all_ids)
    for message_id in all_ids:
        stored = effects["stored"].get(message_id, 0)
        announced = effects["events"].get(message_id, 0)
        assert (stored, announced) in ((0, 0), (1, 1)), (message_id, stored, announced)
    stored_ids = set(effects["stored"])
    await wait_for_exactly_once(drill.database_url, stored_ids)


def test_readiness_reports_a_stopped_broker(drill: Drill) -> None:
    drill.mq.stop_app()
    try:
        deadline = time.monotonic() + 30
        while drill.services.ready("messaging"):
            assert time.monotonic() < deadline, "messaging stays ready without its broker"
            time.sleep(0.5)
    finally:
        drill.mq.start_app()
    drill.services.wait_ready()
    with urllib.request.urlopen(drill.services.url("gateway", "/healthz"), timeout=5) as r:  # noqa: S310
        assert r.status == 200
