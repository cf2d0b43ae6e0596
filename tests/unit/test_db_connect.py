"""``shared.db.connect`` cancelled mid-connect, over a fake ``asyncpg.connect``:
the attempt is never cut off, the connection it makes is closed, its failure is
retrieved, and the cancellation goes on without waiting for a slow server.
(The real handshake this protects is exercised by the operator CLI test that
stops a service right after it started.)"""

from __future__ import annotations

import asyncio
import gc
import time

import pytest

from shared import db

pytestmark = pytest.mark.timeout(20)


class FakeConnection:
    def __init__(self) -> None:
        self.terminated = False

    def terminate(self) -> None:
        self.terminated = True


def fake_connect(seconds: float, made: list[FakeConnection],
                 fail: BaseException | None = None) -> object:
    async def connect(dsn: str, *, timeout: float) -> FakeConnection:
        await asyncio.sleep(seconds)
        if fail is not None:
            raise fail
        made.append(FakeConnection())
        return made[-1]
    return connect


async def cancel_after(delay: float) -> float:
    task = asyncio.create_task(db.connect("postgresql://fake/db"))
    await asyncio.sleep(delay)
    task.cancel()
    started = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    return time.monotonic() - started


async def test_a_connection_made_after_the_cancel_is_closed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[FakeConnection] = []
    monkeypatch.setattr(db.asyncpg, "connect", fake_connect(0.2, made))
    await cancel_after(0.05)
    assert len(made) == 1
    assert made[0].terminated


async def test_a_slow_server_does_not_hold_the_cancel_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[FakeConnection] = []
    monkeypatch.setattr(db.asyncpg, "connect", fake_connect(2.0, made))
    waited = await cancel_after(0.05)
    assert waited < db.ORPHAN_WAIT_SECONDS + 0.5
    assert made == []
    await asyncio.sleep(2.0)  # the attempt ends on its own, and is closed then
    assert len(made) == 1
    assert made[0].terminated


async def test_a_failed_attempt_is_retrieved_not_logged(
        monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: unretrieved.append(context))
    try:
        monkeypatch.setattr(db.asyncpg, "connect",
                            fake_connect(0.2, [], ConnectionError("handshake cut")))
        await cancel_after(0.05)
        await asyncio.sleep(0)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert unretrieved == []


async def test_an_uncancelled_connect_returns_the_connection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[FakeConnection] = []
    monkeypatch.setattr(db.asyncpg, "connect", fake_connect(0.01, made))
    conn = await db.connect("postgresql://fake/db")
    assert conn is made[0]
    assert not made[0].terminated
