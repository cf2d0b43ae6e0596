"""The transactional outbox: add events in a transaction, relay them to RabbitMQ.

A service adds an event to its outbox table in the same transaction as the state
change it announces (:func:`add_event`), which also NOTIFYs the relay. The relay
(:class:`OutboxRelay`) claims rows with ``FOR UPDATE SKIP LOCKED`` (so several
relays can run), publishes them with publisher confirms and ``mandatory``, and
marks them sent only after the broker confirmed them, in the same transaction
that holds their locks. A crash between the confirm and the commit republishes
the row later: consumers deduplicate by event id. The relay wakes on
LISTEN/NOTIFY and polls as a fallback; the LISTEN connection is re-made whenever
it breaks.

Each service has its own table (``<schema>.outbox``) and NOTIFY channel, named
by an :class:`Outbox`; the table's shape is the same everywhere (see the
messaging and notifier migrations).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import structlog

from shared.amqp import Publisher, PublishFailed, Unroutable
from shared.events import Event

log = structlog.get_logger(__name__)
BATCH_SIZE = 200
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class Outbox:
    """Where a service's outbox lives: ``schema.table``, woken on ``channel``."""

    schema: str
    channel: str
    table: str = "outbox"

    def __post_init__(self) -> None:
        # The names are spliced into SQL text; only plain identifiers are accepted.
        for name in (self.schema, self.table, self.channel):
            if not _IDENTIFIER.match(name):
                raise ValueError(f"not a plain SQL identifier: {name!r}")

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"


async def add_events(conn: asyncpg.Connection, outbox: Outbox, events: Sequence[Event]) -> None:
    """Add ``events`` to ``outbox`` in the caller's transaction and wake the relays
    (at commit), in one round trip."""
    if not events:
        return
    await conn.execute(
        f"/* add_events */ WITH added AS ("
        f" INSERT INTO {outbox.qualified} (event_id, routing_key, payload)"
        # Payloads go as text and are cast in SQL: the same with or without a
        # jsonb codec on the connection.
        " SELECT e.event_id, e.routing_key, e.payload::jsonb"
        " FROM unnest($1::uuid[], $2::text[], $3::text[]) AS e (event_id, routing_key, payload))"
        # A data-modifying WITH runs whatever the outer query reads. NOTIFY is
        # delivered at commit, once per channel and transaction.
        " SELECT pg_notify($4, '')",
        [e.event_id for e in events], [e.type for e in events],
        [e.model_dump_json() for e in events], outbox.channel,
    )


async def add_event(conn: asyncpg.Connection, outbox: Outbox, event: Event) -> None:
    """Add ``event`` to ``outbox`` in the caller's transaction and wake the relays."""
    await add_events(conn, outbox, [event])


@dataclass
class RelayState:
    published: int = 0
    failures: int = 0
    unroutable: int = 0
    broker_ok: bool = False
    listening: bool = False


class OutboxRelay:
    """Publishes one service's outbox until cancelled (:meth:`run`)."""

    def __init__(self, pool: asyncpg.Pool, publisher: Publisher, dsn: str,
                 poll_seconds: float, outbox: Outbox) -> None:
        self._pool = pool
        self._publisher = publisher
        self._dsn = dsn
        self._poll_seconds = poll_seconds
        self._outbox = outbox
        self._wake = asyncio.Event()
        self.state = RelayState()

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def drain_once(self) -> int:
        """Publish one batch; returns how many rows were marked sent."""
        table = self._outbox.qualified
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"/* relay_claim */ SELECT id, event_id, routing_key, payload FROM {table}"
                " WHERE published_at IS NULL"
                " AND (next_attempt_at IS NULL OR next_attempt_at <= now())"
                " ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                BATCH_SIZE,
            )
            if not rows:
                return 0
            payloads = [_payload(row) for row in rows]
            results = await asyncio.gather(*(
                self._publisher.publish(
                    row["routing_key"], json.dumps(payload).encode(),
                    message_id=str(row["event_id"]),
                    correlation_id=str(payload.get("correlation_id", "")),
                ) for row, payload in zip(rows, payloads, strict=True)
            ), return_exceptions=True)
            sent = [row["id"] for row, result in zip(rows, results, strict=True)
                    if result is None]
            failed: list[tuple[int, BaseException]] = [
                (row["id"], result) for row, result in zip(rows, results, strict=True)
                if isinstance(result, BaseException)]
            if sent:
                await conn.execute(
                    f"/* relay_sent */ UPDATE {table} SET published_at = now(),"
                    " attempts = attempts + 1 WHERE id = ANY($1::bigint[])", sent)
            for row_id, error in failed:
                # Unroutable rows wait (doubling, at most 5 minutes); the others are
                # retried as soon as the broker is back.
                await conn.execute(
                    f"/* relay_failed */ UPDATE {table} SET attempts = attempts + 1,"
                    " last_error = $2,"
                    " next_attempt_at = CASE WHEN $3 THEN now() + least(interval '5 minutes',"
                    " interval '1 second' * power(2, least(attempts, 9))) END"
                    " WHERE id = $1", row_id, str(error)[:500], isinstance(error, Unroutable))
            self.state.published += len(sent)
            self.state.unroutable += sum(isinstance(e, Unroutable) for _, e in failed)
            failed = [(i, e) for i, e in failed if not isinstance(e, Unroutable)]
            return_error: BaseException | None = None
            if failed:
                self.state.failures += len(failed)
                self.state.broker_ok = False
                # The sent rows commit with this transaction; the rest wait a retry.
                return_error = failed[0][1]
            else:
                self.state.broker_ok = True
        if return_error is not None:
            raise return_error
        return len(sent)

    async def _listen(self) -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(self._dsn, timeout=10)
        try:
            await conn.add_listener(self._outbox.channel, self._on_notify)
        except BaseException:
            # Cancelled (a stop right after start) or failed: nobody else holds it.
            conn.terminate()
            raise
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
                        log.info("relay listening for outbox notifications",
                                 outbox=self._outbox.qualified)
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
                    log.warning("relay paused", outbox=self._outbox.qualified,
                                error=exc.__class__.__name__, detail=str(exc)[:200],
                                retry_in=round(backoff, 2))
                    if listen_conn is not None and listen_conn.is_closed():
                        listen_conn = None
                    await asyncio.sleep(backoff + random.uniform(0, backoff / 2))
                    backoff = min(backoff * 2, 5.0)
                except Exception:
                    # Anything else (asyncpg's internal state errors after a database
                    # restart, a bug): a relay that stops loses nothing but delays
                    # everything, so start over with a fresh LISTEN connection.
                    log.exception("relay failed; starting over", outbox=self._outbox.qualified,
                                  retry_in=round(backoff, 2))
                    await _discard(listen_conn)
                    listen_conn = None
                    self.state.listening = False
                    await asyncio.sleep(backoff + random.uniform(0, backoff / 2))
                    backoff = min(backoff * 2, 5.0)
        finally:
            self.state.listening = False
            await _discard(listen_conn)


async def _discard(conn: asyncpg.Connection | None) -> None:
    """Close a connection that may already be broken; never raises."""
    if conn is not None and not conn.is_closed():
        try:
            await conn.close(timeout=2)
        except Exception:
            conn.terminate()


def _payload(row: asyncpg.Record) -> dict[str, object]:
    # Pools with the jsonb codec give a dict; a plain connection gives JSON text.
    payload = row["payload"]
    return json.loads(payload) if isinstance(payload, str) else dict(payload)
