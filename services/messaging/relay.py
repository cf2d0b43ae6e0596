"""The outbox relay: publishes committed events to RabbitMQ, never losing one.

Rows are claimed with ``FOR UPDATE SKIP LOCKED`` (so several relays can run),
published with publisher confirms and ``mandatory``, and marked sent only after
the broker confirmed them, in the same transaction that holds their locks. A
crash between the confirm and the commit republishes the row later: consumers
deduplicate by event id. The relay wakes on LISTEN/NOTIFY and polls as a
fallback; the LISTEN connection is re-made whenever it breaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from dataclasses import dataclass

import asyncpg
import structlog

from services.messaging.store import OUTBOX_CHANNEL
from shared.amqp import Publisher, PublishFailed, Unroutable

log = structlog.get_logger(__name__)
BATCH_SIZE = 200


@dataclass
class RelayState:
    published: int = 0
    failures: int = 0
    unroutable: int = 0
    broker_ok: bool = False
    listening: bool = False


class OutboxRelay:
    def __init__(self, pool: asyncpg.Pool, publisher: Publisher, dsn: str,
                 poll_seconds: float) -> None:
        self._pool = pool
        self._publisher = publisher
        self._dsn = dsn
        self._poll_seconds = poll_seconds
        self._wake = asyncio.Event()
        self.state = RelayState()

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def drain_once(self) -> int:
        """Publish one batch; returns how many rows were marked sent."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT id, event_id, routing_key, payload FROM messaging.outbox"
                " WHERE published_at IS NULL"
                " AND (next_attempt_at IS NULL OR next_attempt_at <= now())"
                " ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                BATCH_SIZE,
            )
            if not rows:
                return 0
            results = await asyncio.gather(*(
                self._publisher.publish(
                    row["routing_key"], json.dumps(row["payload"]).encode(),
                    message_id=str(row["event_id"]),
                    correlation_id=str(row["payload"].get("correlation_id", "")),
                ) for row in rows
            ), return_exceptions=True)
            sent = [row["id"] for row, result in zip(rows, results, strict=True)
                    if result is None]
            failed: list[tuple[int, BaseException]] = [
                (row["id"], result) for row, result in zip(rows, results, strict=True)
                if isinstance(result, BaseException)]
            if sent:
                await conn.execute(
                    "UPDATE messaging.outbox SET published_at = now(),"
                    " attempts = attempts + 1 WHERE id = ANY($1::bigint[])", sent)
            for row_id, error in failed:
                # Unroutable rows wait (doubling, at most 5 minutes); the others are
                # retried as soon as the broker is back.
                await conn.execute(
                    "UPDATE messaging.outbox SET attempts = attempts + 1, last_error = $2,"
                    " next_attempt_at = CASE WHEN $3 THEN now() + least(interval '5 minutes',"
                    " interval '1 second' * power(2, least(attempts, 9))) END"
                    " WHERE id = $1", row_id, str(error)[:500], isinstance(error, Unroutable))
            self.state.published += len(sent)
            self.state.unroutable += sum(isinstance(e, Unroutable) for _, e in failed)
            failed = [(i, e) for i, e in failed if not isinstance(e, Unroutable)]
            if failed:
                self.state.failures += len(failed)
                self.state.broker_ok = False
                # The sent rows commit with this transaction; the rest wait a retry.
                error = failed[0][1]
                assert isinstance(error, BaseException)
                return_error = error
            else:
                return_error = None
                self.state.broker_ok = True
        if return_error is not None:
            raise return_error
        return len(sent)

    async def _listen(self) -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(self._dsn, timeout=10)
        await conn.add_listener(OUTBOX_CHANNEL, self._on_notify)
        self.state.listening = True
        return conn

    async def run(self) -> None:
        """Relay until cancelled."""
        listen_conn: asyncpg.Connection | None = None
        backoff = 0.2
        try:
            while True:
                try:
                    if listen_conn is None or listen_conn.is_closed():
                        self.state.listening = False
                        listen_conn = await self._listen()
                        log.info("relay listening for outbox notifications")
                    self._wake.clear()
                    while await self.drain_once() == BATCH_SIZE:
                        pass
                    backoff = 0.2
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self._poll_seconds)
                except asyncio.CancelledError:
                    raise
                except (PublishFailed, OSError, asyncpg.PostgresError,
                        asyncpg.InterfaceError, TimeoutError) as exc:
                    log.warning("relay paused", error=exc.__class__.__name__,
                                detail=str(exc)[:200], retry_in=round(backoff, 2))
                    if listen_conn is not None and listen_conn.is_closed():
                        listen_conn = None
                    await asyncio.sleep(backoff + random.uniform(0, backoff / 2))
                    backoff = min(backoff * 2, 5.0)
        finally:
            self.state.listening = False
            if listen_conn is not None and not listen_conn.is_closed():
                await listen_conn.close(timeout=2)
