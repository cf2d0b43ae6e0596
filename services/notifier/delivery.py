"""The delivery worker: sends due deliveries through their channels, retrying.

Every replica runs one. It claims (leases) due rows from the store, never more
than it has free slots for (``concurrency`` overall, ``per_host`` per endpoint
host, the SMTP relay counting as one host), so a slow or dead endpoint holds at
most ``per_host`` slots for at most its timeout, and everyone else's deliveries
go on. Each attempt is bounded in time by its sender. A failure is retried with
exponential backoff and jitter (:class:`RetryPolicy`) until the attempts are
used up; then the delivery is ``dead``, and stays visible to its owner and the
operator. The worker wakes on NOTIFY when deliveries are created, when a send
finishes, and when the next retry is due, polling as a fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections import Counter
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass

import asyncpg
import structlog

from services.notifier.deliveries_store import DELIVERIES_CHANNEL, DeliveryStore
from services.notifier.senders import Claimed, DeliveryFailed, Sender
from shared.db import connect

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Attempt ``n`` failed -> wait ``base * factor**(n-1)`` (at most ``cap``), less a
    random 0-25 %; after ``max_attempts`` attempts the delivery is dead.

    The defaults wait about 20 s, 1 min, 3 min, 9 min, 27 min, 81 min, 4 h: an
    endpoint may be down for some 6 hours before anything is given up.
    """

    base_seconds: float = 20.0
    factor: float = 3.0
    cap_seconds: float = 6 * 3600.0
    max_attempts: int = 8

    def retry_in(self, attempts: int) -> float | None:
        """Seconds to wait after ``attempts`` failed attempts; None: give up."""
        if attempts >= self.max_attempts:
            return None
        delay = min(self.cap_seconds, self.base_seconds * self.factor ** max(attempts - 1, 0))
        # Jitter spreads the retries of many deliveries to one recovering endpoint;
        # taking at most a quarter off keeps every gap longer than the one before.
        return delay * random.uniform(0.75, 1.0)


@dataclass(frozen=True, slots=True)
class DeliveryLimits:
    concurrency: int = 16          # sends in flight in this worker
    per_host: int = 4              # of which to one endpoint host (or the SMTP relay)
    poll_seconds: float = 2.0      # fallback wake-up when no NOTIFY arrives
    busy_retry_seconds: float = 0.5


@dataclass
class WorkerState:
    sent: int = 0
    failed: int = 0
    dead: int = 0
    listening: bool = False


class DeliveryWorker:
    def __init__(self, store: DeliveryStore, senders: Mapping[str, Sender], dsn: str, *,
                 retry: RetryPolicy, limits: DeliveryLimits) -> None:
        self._store = store
        self._senders = dict(senders)
        self._dsn = dsn
        self._retry = retry
        self._limits = limits
        longest = max((s.max_seconds for s in self._senders.values()), default=10.0)
        # Past the longest a send may take: a live worker settles its rows well
        # inside the lease, so only a dead one's claims ever run out.
        self._lease_seconds = 2 * longest + 30.0
        self._in_flight: set[asyncio.Task[None]] = set()
        self._per_host: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self.state = WorkerState()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    def _busy_hosts(self) -> list[str]:
        return [h for h, n in self._per_host.items() if n >= self._limits.per_host]

    @staticmethod
    def _host_of(delivery: Claimed) -> str:
        return delivery.host or f"channel:{delivery.channel_id}"

    async def run(self) -> None:
        """Deliver until cancelled."""
        listen_conn: asyncpg.Connection | None = None
        backoff = 0.2
        try:
            while True:
                try:
                    if listen_conn is None or listen_conn.is_closed():
                        self.state.listening = False
                        listen_conn = await connect(self._dsn)
                        await listen_conn.add_listener(DELIVERIES_CHANNEL, self._on_notify)
                        self.state.listening = True
                    self._wake.clear()
                    await self._dispatch()
                    await self._wait()
                    backoff = 0.2
                except asyncio.CancelledError:
                    raise
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                        TimeoutError) as exc:
                    log.warning("delivery worker paused", error=exc.__class__.__name__,
                                retry_in=round(backoff, 2))
                    if listen_conn is not None and listen_conn.is_closed():
                        listen_conn = None
                    await asyncio.sleep(backoff + random.uniform(0, backoff / 2))
                    backoff = min(backoff * 2, 5.0)
                except Exception:
                    # Anything else: a worker that stops delays every delivery; log
                    # it and start over with a fresh LISTEN connection.
                    log.exception("delivery worker failed; starting over",
                                  retry_in=round(backoff, 2))
                    if listen_conn is not None and not listen_conn.is_closed():
                        listen_conn.terminate()
                    listen_conn = None
                    self.state.listening = False
                    await asyncio.sleep(backoff + random.uniform(0, backoff / 2))
                    backoff = min(backoff * 2, 5.0)
        finally:
            self.state.listening = False
            if listen_conn is not None and not listen_conn.is_closed():
                with contextlib.suppress(Exception):
                    await listen_conn.close(timeout=2)

    async def stop(self, task: asyncio.Task[None], *, grace: float = 5.0) -> None:
        """Stop claiming, give the sends in flight ``grace`` seconds, cancel the rest
        (their leases run out and another worker, or the next start, retries them)."""
        task.cancel()
        await asyncio.wait([task])
        if self._in_flight:
            _, pending = await asyncio.wait(set(self._in_flight), timeout=grace)
            for unfinished in pending:
                unfinished.cancel()
            if pending:
                await asyncio.wait(pending)

    async def _dispatch(self) -> None:
        while (free := self._limits.concurrency - len(self._in_flight)) > 0:
            claimed = await self._store.claim(free, busy_hosts=self._busy_hosts(),
                                              lease_id=uuid.uuid4(),
                                              lease_seconds=self._lease_seconds)
            for delivery in claimed:
                host = self._host_of(delivery)
                if self._per_host[host] >= self._limits.per_host:
                    # Several rows of one host in a batch: give back the extra ones.
                    await self._store.release(delivery, retry_in=self._limits.busy_retry_seconds)
                    continue
                self._start(delivery, host)
            if len(claimed) < free:
                return

    async def _wait(self) -> None:
        timeout = self._limits.poll_seconds
        if len(self._in_flight) < self._limits.concurrency:
            due_in = await self._store.seconds_to_next_due(busy_hosts=self._busy_hosts())
            if due_in is not None:
                timeout = min(timeout, max(due_in, 0.0))
        # Not asyncio.wait_for, which on Python 3.11 swallows a cancellation that
        # arrives as the event is set: a stop would then never end.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    def _start(self, delivery: Claimed, host: str) -> None:
        self._per_host[host] += 1
        task = asyncio.create_task(self._deliver(delivery), name=f"delivery-{delivery.id}")
        self._in_flight.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._in_flight.discard(finished)
            self._per_host[host] -= 1
            if self._per_host[host] <= 0:
                del self._per_host[host]
            self._wake.set()

        task.add_done_callback(done)

    async def _deliver(self, delivery: Claimed) -> None:
        with structlog.contextvars.bound_contextvars(
            delivery_id=str(delivery.id), channel_id=str(delivery.channel_id),
            channel_type=delivery.channel_type, attempt=delivery.attempts,
        ):
            try:
                await self._attempt(delivery)
            except DeliveryFailed as exc:
                await self._failed(delivery, exc)
            except Exception:  # a bug in one send must not stop the others
                log.exception("delivery attempt crashed")
                await self._failed(delivery, DeliveryFailed("internal error"))
            else:
                await self._settle(self._store.mark_sent(delivery))
                self.state.sent += 1
                log.info("delivery sent")

    async def _attempt(self, delivery: Claimed) -> None:
        if delivery.channel_removed:
            raise DeliveryFailed("the channel was removed before delivery", permanent=True)
        sender = self._senders.get(delivery.channel_type)
        if sender is None:
            raise DeliveryFailed(f"{delivery.channel_type} delivery is not configured on this"
                                 " server")
        try:
            async with asyncio.timeout(sender.max_seconds + 5.0):
                await sender.send(delivery)
        except TimeoutError:
            raise DeliveryFailed("the attempt took too long") from None

    async def _failed(self, delivery: Claimed, failure: DeliveryFailed) -> None:
        retry_in = None if failure.permanent else self._retry.retry_in(delivery.attempts)
        await self._settle(self._store.mark_failed(delivery, failure.reason, retry_in=retry_in))
        if retry_in is None:
            self.state.dead += 1
            log.warning("delivery dead", reason=failure.reason)
        else:
            self.state.failed += 1
            log.info("delivery failed; will retry", reason=failure.reason,
                     retry_in=round(retry_in, 2))

    async def _settle(self, settling: Awaitable[bool]) -> None:
        try:
            settled = await settling
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            # The lease runs out and the delivery is tried again: a receiver may see
            # it twice (with the same webhook-id), but it is not lost.
            log.warning("could not record the delivery outcome", error=exc.__class__.__name__)
            return
        if not settled:
            log.warning("delivery lease ran out before its outcome was recorded")
