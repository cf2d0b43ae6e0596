"""The transactional outbox: add events in a transaction, relay them to RabbitMQ.

A service adds an event to its outbox table in the same transaction as the state
change it announces (:func:`add_event`), which also NOTIFYs the relay. The relay
(:class:`OutboxRelay`) works in two autocommit statements per batch, with no
transaction held across the publish:

1. *Claim*: one ``UPDATE`` leases due rows (picked ``FOR UPDATE SKIP LOCKED``, so
   several relays can run) by moving their ``next_attempt_at``
   :data:`CLAIM_LEASE_SECONDS` ahead; no other relay takes them until then.
2. Publish them with publisher confirms and ``mandatory`` (except the
   :attr:`Outbox.hints`; bounded by
   :data:`PUBLISH_DEADLINE_SECONDS`, which the lease outlasts), then *mark* them
   in one ``UPDATE``: confirmed rows sent, the others due again (at once, or
   after a back-off if the broker could not route them).

A relay that is stopped (cancelled) from its claim until its mark gives its rows
back at once (best effort, before its stop returns). One that is killed
outright leaves them leased: any relay publishes them again once the lease
ends, so an event may reach the broker twice, and consumers deduplicate by
event id. The relay wakes on LISTEN/NOTIFY
and polls as a fallback; the LISTEN connection is re-made whenever it breaks. A
hot path of the relay's own process may skip the NOTIFY and call
:meth:`OutboxRelay.wake` after its commit instead.

Each service has its own table (``<schema>.outbox``) and NOTIFY channel, named
by an :class:`Outbox`; the table's shape is the same everywhere (see the
messaging and notifier migrations).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import structlog

from shared.amqp import Publisher, PublishFailed, Unroutable
from shared.db import connect
from shared.events import Event

log = structlog.get_logger(__name__)
BATCH_SIZE = 200
# Publisher.publish waits at most 10 s for a confirm, but (re)connecting to the
# broker before that has timeouts of its own; the relay bounds a batch's whole
# publish here, so that it surely ends before the claim's lease does.
PUBLISH_DEADLINE_SECONDS = 20.0
# How long a claim holds its rows: longer than the publish deadline, with room for
# the mark, so a live relay's rows are not claimed again while it publishes (a
# mark slower still costs at most a duplicate, which consumers drop); short enough
# that the rows of a killed relay go out again soon.
CLAIM_LEASE_SECONDS = 30
# Giving rows back on a stop is a courtesy (the lease ends anyway): it may not
# hold up the shutdown for longer than this.
RELEASE_TIMEOUT_SECONDS = 2.0
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class Outbox:
    """Where a service's outbox lives: ``schema.table``, woken on ``channel``.

    ``hints`` are routing keys of events that only queues of live listeners bind
    (a gateway's stream queue): they are published without ``mandatory``, so
    while nobody listens the broker drops them, as there is no one to tell,
    instead of returning them for the relay to retry. Every other key must reach
    a queue, or its row waits and is retried."""

    schema: str
    channel: str
    table: str = "outbox"
    hints: frozenset[str] = frozenset()

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
        # Releases outlive a second cancellation; they are held here till done.
        self._releases: set[asyncio.Future[object]] = set()
        self.state = RelayState()

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    def wake(self) -> None:
        """Publish soon: called in-process by a writer that has just committed rows
        (no NOTIFY round trip through Postgres for the writes of this process)."""
        self._wake.set()

    async def drain_once(self) -> int:
        """Publish one batch; returns how many rows were marked sent."""
        table = self._outbox.qualified
        claim = asyncio.ensure_future(self._pool.fetch(
            f"/* relay_claim */ UPDATE {table}"
            " SET next_attempt_at = now() + make_interval(secs => $2)"
            f" WHERE id IN (SELECT id FROM {table} WHERE published_at IS NULL"
            " AND (next_attempt_at IS NULL OR next_attempt_at <= now())"
            " ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)"
            # The payload as text is the message body as it is: no decode/encode.
            " RETURNING id, event_id, routing_key, payload::text AS payload,"
            " payload->>'correlation_id' AS correlation_id, next_attempt_at AS leased_until",
            BATCH_SIZE, CLAIM_LEASE_SECONDS,
        ))
        try:
            claimed = await asyncio.shield(claim)
        except asyncio.CancelledError:
            # A stop during the claim: the statement may commit all the same.
            # Wait for it (briefly) and give back what it took, so a restart
            # need not wait out the lease.
            with contextlib.suppress(Exception):
                taken = await asyncio.wait_for(claim, RELEASE_TIMEOUT_SECONDS)
                if taken:
                    await self._release([r["id"] for r in taken], taken[0]["leased_until"])
            raise
        # RETURNING order is not guaranteed; publish in outbox order.
        rows = sorted(claimed, key=lambda row: row["id"])
        if not rows:
            return 0
        marked = False
        try:
            results = await self._publish(rows)
            errors = [None if result is None else (str(result)[:500] or type(result).__name__)
                      for result in results]
            unroutable = [isinstance(result, Unroutable) for result in results]
            # Sent rows are marked published; the others are due again at once
            # (retried as soon as the broker is back) or, if unroutable, after a
            # doubling wait of at most 5 minutes, so they never hold up the rows
            # behind them. A row another relay published meanwhile (our lease ran
            # out) is left alone.
            await self._pool.execute(
                f"/* relay_mark */ UPDATE {table} AS o SET attempts = o.attempts + 1,"
                " published_at = CASE WHEN r.error IS NULL THEN now() END,"
                " last_error = coalesce(r.error, o.last_error),"
                " next_attempt_at = CASE WHEN r.unroutable THEN now() + least("
                "interval '5 minutes', interval '1 second' * power(2, least(o.attempts, 9))) END"
                " FROM unnest($1::bigint[], $2::text[], $3::bool[]) AS r (id, error, unroutable)"
                " WHERE o.id = r.id AND o.published_at IS NULL",
                [row["id"] for row in rows], errors, unroutable)
            marked = True
        finally:
            if not marked:
                await self._release([row["id"] for row in rows], rows[0]["leased_until"])
        sent = sum(result is None for result in results)
        failed = [result for result in results if result is not None]
        self.state.published += sent
        self.state.unroutable += sum(isinstance(e, Unroutable) for e in failed)
        failed = [e for e in failed if not isinstance(e, Unroutable)]
        if failed:
            self.state.failures += len(failed)
            self.state.broker_ok = False
            # The sent rows are marked; the rest wait a retry.
            raise failed[0]
        self.state.broker_ok = True
        return sent

    async def _publish(self, rows: Sequence[asyncpg.Record]) -> list[BaseException | None]:
        """Publish ``rows`` concurrently; per row, None (confirmed) or the error."""
        tasks = [asyncio.ensure_future(self._publisher.publish(
            row["routing_key"], row["payload"].encode(), message_id=str(row["event_id"]),
            correlation_id=row["correlation_id"] or "",
            mandatory=row["routing_key"] not in self._outbox.hints,
        )) for row in rows]
        try:
            await asyncio.wait(tasks, timeout=PUBLISH_DEADLINE_SECONDS)
        finally:
            # On the deadline (or a stop), every publish still waiting is
            # cancelled, and all have ended before this returns.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        late = PublishFailed(f"no confirm within {PUBLISH_DEADLINE_SECONDS:g} s")
        return [late if task.cancelled() else task.exception() for task in tasks]

    async def _release(self, ids: list[int], leased_until: datetime) -> None:
        """Make claimed rows due again at once. Best effort: a failure is logged,
        and a second cancellation stops the wait, not the release."""
        # Only rows still under this claim's lease: once it has run out, another
        # relay may hold them.
        release = asyncio.ensure_future(asyncio.wait_for(self._pool.execute(
            f"/* relay_release */ UPDATE {self._outbox.qualified} SET next_attempt_at = NULL"
            " WHERE id = ANY($1::bigint[]) AND published_at IS NULL AND next_attempt_at = $2",
            ids, leased_until), RELEASE_TIMEOUT_SECONDS))
        self._releases.add(release)
        release.add_done_callback(self._releases.discard)
        try:
            await asyncio.shield(release)
        except Exception as exc:
            log.warning("relay could not give back its claim; it waits out the lease",
                        outbox=self._outbox.qualified, rows=len(ids),
                        error=exc.__class__.__name__, lease_seconds=CLAIM_LEASE_SECONDS)

    async def _listen(self) -> asyncpg.Connection:
        conn = await connect(self._dsn)
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
                    # Not asyncio.wait_for: on Python 3.11 it swallows a
                    # cancellation that arrives as the event is set (it returns
                    # the result instead), and a stop then never ends.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._poll_seconds):
                            await self._wake.wait()
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
            if self._releases:
                # Claims being given back finish before the owner closes the pool
                # (else their rows wait out the lease); bounded by their timeout.
                await asyncio.wait(list(self._releases))


async def _discard(conn: asyncpg.Connection | None) -> None:
    """Close a connection that may already be broken; never raises."""
    if conn is not None and not conn.is_closed():
        try:
            await conn.close(timeout=2)
        except Exception:
            conn.terminate()

