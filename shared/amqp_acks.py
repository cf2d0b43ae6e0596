"""Acks sent together: one ``basic.ack`` with ``multiple`` instead of one per message.

Every socket write costs on a small machine (docs/performance.md), and a
consumer that acks each message writes once per message. Two ways to batch:

* :class:`BatchedAcks`, for a serial consumer of hints (the gateway's transient
  stream queue): messages are handled in delivery order, so the latest handled
  one acks everything before it.
* :class:`AckWindow`, for a concurrent consumer (the notifier's lanes): messages
  finish out of order, so an ack with ``multiple`` goes only up to the highest
  delivery below which every message is settled; a nack or reject is sent on
  its own at once, and a message finished behind a slow one is acked on its own
  once it has waited a while, so a slow message never holds the prefetch window.

An ack that has not gone out when the process dies means a redelivery; the
consumers this serves absorb one (the inbox; hints are dropped anyway).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
from dataclasses import dataclass

import aio_pika.abc


@dataclass(frozen=True)
class Batching:
    limit: int
    delay: float


class BatchedAcks:
    """Acks the messages of a serial pump together: ``basic.ack`` with ``multiple``
    for the latest handled one (so every earlier delivery on the channel, all
    handled already, goes with it). One socket write instead of ``limit``."""

    def __init__(self, batching: Batching) -> None:
        self._batching = batching
        self._latest: aio_pika.abc.AbstractIncomingMessage | None = None
        self._waiting = 0
        self._first_at = 0.0
        self._some = asyncio.Event()
        # An ack with a lower tag after one with a higher tag would be an unknown
        # delivery tag to the broker, which closes the channel: keep them in order.
        self._sending = asyncio.Lock()

    async def handled(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self._latest = message
        self._waiting += 1
        if self._waiting == 1:
            self._first_at = asyncio.get_running_loop().time()
            self._some.set()
        if self._waiting >= self._batching.limit:
            await self.flush()

    async def flush(self) -> None:
        """Ack everything handled so far, if anything."""
        async with self._sending:
            message, self._latest, self._waiting = self._latest, None, 0
            self._some.clear()
            if message is not None:
                await message.ack(multiple=True)

    async def flush_when_due(self) -> None:
        """Runs beside the pump: flushes ``delay`` after the first waiting message."""
        loop = asyncio.get_running_loop()
        while True:
            await self._some.wait()
            wait = self._first_at + self._batching.delay - loop.time()
            if wait > 0:
                # Then look again: a full batch may have gone out meanwhile.
                await asyncio.sleep(wait)
            else:
                await self.flush()


class _Ack(enum.Enum):
    PENDING = "pending"     # delivered, not settled yet
    DUE = "due"             # handled: to be acked (with multiple, if it can)
    SETTLED = "settled"     # acked, nacked or rejected on its own


@dataclass
class _Delivery:
    message: aio_pika.abc.AbstractIncomingMessage
    state: _Ack = _Ack.PENDING
    due_at: float = 0.0


class AckWindow:
    """The acks of a concurrent consumer (see the module's docs).

    :meth:`delivered` is called for each message as it arrives (in delivery
    order), then exactly one of :meth:`ack` (handled; the ack goes out with the
    next flush) or :meth:`settled` (the caller nacked or rejected it itself).
    :meth:`run` sends the acks ``delay`` seconds after the first one is due, or
    at once when ``limit`` are due; :meth:`flush` sends what can go now.
    """

    def __init__(self, *, delay: float, limit: int, straggler_seconds: float = 0.1) -> None:
        self._delay = delay
        self._limit = limit
        self._straggler_seconds = straggler_seconds
        self._order: collections.deque[_Delivery] = collections.deque()
        self._by_tag: dict[int | None, _Delivery] = {}
        self._due = 0
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        # Frames go out in the order they were decided: a multiple ack must not
        # overtake the single ack or nack of a message it would then cover.
        self._sending = asyncio.Lock()

    @property
    def due(self) -> int:
        """Messages handled whose ack has not gone out yet."""
        return self._due

    def delivered(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        entry = _Delivery(message)
        self._order.append(entry)
        self._by_tag[message.delivery_tag] = entry

    def ack(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        entry = self._by_tag[message.delivery_tag]
        entry.state, entry.due_at = _Ack.DUE, asyncio.get_running_loop().time()
        self._due += 1
        self._wake.set()
        if self._due >= self._limit:
            self._full.set()

    def settled(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        entry = self._by_tag.get(message.delivery_tag)
        if entry is not None:
            entry.state = _Ack.SETTLED
            self._wake.set()

    async def flush(self, *, everything: bool = False) -> int:
        """Ack with ``multiple`` the settled prefix of the deliveries, and on its own
        each due message that has waited ``straggler_seconds`` behind an unsettled
        one (all of them with ``everything``); returns how many frames went out."""
        sent = 0
        async with self._sending:
            last_due: _Delivery | None = None
            while self._order and self._order[0].state is not _Ack.PENDING:
                entry = self._order.popleft()
                del self._by_tag[entry.message.delivery_tag]
                if entry.state is _Ack.DUE:
                    last_due = entry
            if last_due is not None:
                self._due = sum(e.state is _Ack.DUE for e in self._order)
                await last_due.message.ack(multiple=True)
                sent += 1
            now = asyncio.get_running_loop().time()
            for entry in list(self._order):
                if entry.state is _Ack.DUE and (
                        everything or now - entry.due_at >= self._straggler_seconds):
                    entry.state = _Ack.SETTLED
                    self._due -= 1
                    await entry.message.ack()
                    sent += 1
        return sent

    async def run(self) -> None:
        """Flush on schedule until cancelled; raises if an ack fails (a dead
        channel), which ends the consumer's pump."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._due < self._limit:
                # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation
                # that arrives as the event is set, and a stop never ends.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._delay):
                        await self._full.wait()
            self._full.clear()
            sent = await self.flush()
            if self._due:
                # Due messages wait behind an unsettled one: look again after a
                # pause (never in a tight loop), to ack them once they straggle.
                if not sent:
                    await asyncio.sleep(self._delay)
                self._wake.set()
