"""The load generator: closed loop (saturation) and open loop (a fixed offered rate).

Every request body is pre-built; the generator only sends bytes and times the
answers. In the open loop each request's latency is measured from the moment it
was *scheduled*, so a stalled server cannot hide its queueing delay
(coordinated omission).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from bench.population import Pair

REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=10)


@dataclass
class Sample:
    at: float        # seconds since the phase started (scheduled time in the open loop)
    latency: float   # seconds
    status: int      # HTTP status, 0 for a transport error or timeout


@dataclass
class PhaseResult:
    name: str
    target: str
    started_wall: float
    duration: float
    samples: list[Sample] = field(default_factory=list)
    offered_rps: float | None = None
    concurrency: int | None = None
    ran_out: bool = False
    skipped: int = 0  # open loop: not sent because too many were in flight

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.status in (200, 201)]

    @property
    def throughput(self) -> float:
        return len(self.ok) / self.duration if self.duration else 0.0


class Bodies:
    """The pre-built bodies of each pair, handed out once each."""

    def __init__(self, pairs: list[Pair], bodies: list[list[bytes]], *,
                 cycle: bool = False) -> None:
        self.pairs = pairs
        self._bodies = [list(reversed(b)) for b in bodies]
        # The baseline stores whatever it is sent under fresh ids, so it may reuse bodies.
        self._cycle = cycle
        self._turn = [0] * len(bodies)

    def take(self, index: int) -> bytes | None:
        stack = self._bodies[index]
        if self._cycle and stack:
            self._turn[index] += 1
            return stack[self._turn[index] % len(stack)]
        return stack.pop() if stack else None

    def snapshot(self) -> list[list[bytes]]:
        """The bodies not yet handed out, per pair, in order."""
        return [list(reversed(b)) for b in self._bodies]

    def left(self) -> int:
        return sum(len(b) for b in self._bodies)


async def _post(http: aiohttp.ClientSession, url: str, headers: dict[str, str],
                body: bytes) -> int:
    try:
        async with http.post(url, data=body, headers=headers) as response:
            await response.read()
            return response.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


async def _ticker(result: PhaseResult, t0: float, tick: Callable[[float, int], None]) -> None:
    while True:
        await asyncio.sleep(0.5)
        tick(time.monotonic() - t0, len(result.samples))


async def closed_loop(name: str, base: str, source: Bodies, *, workers_per_pair: int,
                      duration: float, tick: Callable[[float, int], None],
                      target: str = "interlude") -> PhaseResult:
    """Every worker sends its next request as soon as the last one is answered."""
    pairs = source.pairs
    workers = len(pairs) * workers_per_pair
    result = PhaseResult(name, target, time.time(), duration, concurrency=workers)
    connector = aiohttp.TCPConnector(limit=workers)
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as http:
        t0 = time.monotonic()
        deadline = t0 + duration

        async def worker(index: int) -> None:
            pair = pairs[index % len(pairs)]
            url, headers = base + pair.path, pair.headers
            while time.monotonic() < deadline:
                body = source.take(index % len(pairs))
                if body is None:
                    result.ran_out = True
                    return
                start = time.monotonic()
                status = await _post(http, url, headers, body)
                end = time.monotonic()
                result.samples.append(Sample(start - t0, end - start, status))

        ticker = asyncio.create_task(_ticker(result, t0, tick))
        try:
            await asyncio.gather(*(worker(i) for i in range(workers)))
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        if result.ran_out:
            # Throughput over the time the bodies lasted, not the planned time.
            last = max((s.at + s.latency for s in result.samples), default=duration)
            result.duration = max(0.001, min(duration, last))
    return result


async def open_loop(name: str, base: str, source: Bodies, *, rate: float, duration: float,
                    tick: Callable[[float, int], None], max_in_flight: int = 512,
                    target: str = "interlude") -> PhaseResult:
    """``rate`` requests per second, round robin over the pairs, whatever the answers."""
    pairs = source.pairs
    result = PhaseResult(name, target, time.time(), duration, offered_rps=rate)
    total = int(rate * duration)
    connector = aiohttp.TCPConnector(limit=max_in_flight)
    in_flight: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as http:
        t0 = time.monotonic()

        async def one(scheduled: float, index: int, body: bytes) -> None:
            pair = pairs[index]
            status = await _post(http, base + pair.path, pair.headers, body)
            result.samples.append(Sample(scheduled - t0, time.monotonic() - scheduled, status))

        ticker = asyncio.create_task(_ticker(result, t0, tick))
        try:
            for n in range(total):
                scheduled = t0 + n / rate
                delay = scheduled - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                index = n % len(pairs)
                body = source.take(index)
                if body is None:
                    result.ran_out = True
                    break
                if len(in_flight) >= max_in_flight:
                    result.skipped += 1
                    continue
                task = asyncio.create_task(one(scheduled, index, body))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            if in_flight:
                await asyncio.wait(set(in_flight), timeout=15)
        finally:
            ticker.cancel()
            for task in list(in_flight):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
    return result
