"""Consuming AMQP: the loops that take messages, run a handler, and settle them.

:func:`consume_forever` serves a durable queue (acked after the handler commits,
dead-lettered when it can never succeed, optionally several lanes at once);
:func:`consume_transient_forever` a process's own fan-out queue of hints. Both
own their connection and make it again after any broker failure (plain
connections: robust ones are known to come back without their consumers).
Connecting, declaring and publishing are in :mod:`shared.amqp`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aio_pika.abc
import structlog

from shared.amqp import (
    CONNECTION_ERRORS,
    connect,
    declare_consumer_queue,
    declare_transient_queue,
)
from shared.amqp_acks import AckWindow, BatchedAcks, Batching

log = structlog.get_logger(__name__)

REQUEUE_DELAY_SECONDS = 1.0
# Transient queues ack in batches: every socket write costs (see
# consume_transient_forever). The batch stays well under their prefetch.
ACK_BATCH = 64
ACK_DELAY_SECONDS = 0.05
ACK_FLUSH_TIMEOUT_SECONDS = 2.0
# A concurrent consumer's acks (consume_forever's ack_delay) go out at once when
# this many are due, well under its prefetch.
ACK_WINDOW_LIMIT = 16


class PoisonMessage(Exception):
    """The message can never be handled; it goes to the dead-letter queue."""



Handler = Callable[[aio_pika.abc.AbstractIncomingMessage], Awaitable[None]]
# What must stay in order: messages with equal keys are handled one at a time, in
# delivery order; messages with different keys may be handled concurrently.
LaneKey = Callable[[aio_pika.abc.AbstractIncomingMessage], Hashable]


@dataclass
class ConsumerState:
    """What the consume loop reports about itself (for readiness and tests)."""

    connected: bool = False
    handled: int = 0
    dead_lettered: int = 0
    retried: int = 0
    reconnects: int = 0
    # Set by the owner to stop taking messages: one not yet begun is left unacked
    # (redelivered once the connection closes) and its handler is not called.
    stopping: bool = False
    # Messages whose handler has begun and that are not yet settled (acked,
    # nacked or rejected): what a graceful stop waits for.
    in_hand: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


async def _run_handler(message: aio_pika.abc.AbstractIncomingMessage, handler: Handler,
                       state: ConsumerState, acks: AckWindow | None = None) -> bool:
    """Run ``handler`` and ack (or reject a poison message); False if it failed.

    With ``acks``, the ack is left to the window (it goes out with others), and
    a reject or nack sent here is reported to it.
    """
    try:
        await handler(message)
    except PoisonMessage as exc:
        state.dead_lettered += 1
        log.warning("event dead-lettered", reason=str(exc), message_id=message.message_id)
        await message.reject(requeue=False)
        # Only once the reject went out: an entry left unsettled keeps a later
        # ack with ``multiple`` from covering (and so acking) this message.
        if acks is not None:
            acks.settled(message)
        return True
    except asyncio.CancelledError:
        # Back to the queue now; on a closed channel the broker does it anyway.
        nacked = False
        with contextlib.suppress(*CONNECTION_ERRORS):
            await message.nack(requeue=True)
            nacked = True
        if nacked and acks is not None:
            acks.settled(message)
        raise
    except Exception:
        # The quorum queue counts deliveries and dead-letters after DELIVERY_LIMIT.
        state.retried += 1
        log.exception("event handler failed; will be redelivered", message_id=message.message_id)
        return False
    if acks is None:
        await message.ack()
    else:
        acks.ack(message)
    state.handled += 1
    return True


async def _handle_one(message: aio_pika.abc.AbstractIncomingMessage, handler: Handler,
                      state: ConsumerState, slot: asyncio.Semaphore | None = None,
                      acks: AckWindow | None = None) -> None:
    """Handle ``message`` and settle it: ack, reject (poison) or nack for redelivery.

    ``slot``, if given, is held while the handler runs (not during the pause
    before a nack). Once ``state.stopping`` is set no handler begins: the
    message waits here, unacked, to be cancelled with the loop, and the broker
    redelivers it when the connection closes.
    """
    async with slot or contextlib.nullcontext():
        if state.stopping:
            await asyncio.get_running_loop().create_future()
        state.in_hand += 1
        try:
            settled = await _run_handler(message, handler, state, acks)
        except BaseException:
            state.in_hand -= 1
            raise
    nacked = False
    try:
        if not settled:
            # A pause before the requeue, so a short outage does not use up the
            # delivery limit in milliseconds and dead-letter a good message.
            await asyncio.sleep(REQUEUE_DELAY_SECONDS)
            await message.nack(requeue=True)
            nacked = True
    finally:
        state.in_hand -= 1
        # Settled for the ack window only if the nack went out; a message left
        # unsettled (a stop during the pause) is redelivered when the connection
        # closes, and no ack with ``multiple`` may cover it before then.
        if nacked and acks is not None:
            acks.settled(message)


Declare = Callable[[aio_pika.abc.AbstractChannel], Awaitable[aio_pika.abc.AbstractQueue]]


async def consume_forever(url: str, queue_name: str, bindings: Sequence[str], handler: Handler,
                          state: ConsumerState, *, prefetch: int = 32,
                          max_backoff: float = 5.0, concurrency: int = 1,
                          lane_key: LaneKey | None = None, ack_delay: float = 0.0,
                          retired: Sequence[str] = ()) -> None:
    """Consume ``queue_name`` until cancelled, reconnecting after any broker failure.
    (Each (re)connection declares the queue: see :func:`declare_consumer_queue`.)

    The handler must commit its own effects before returning: the message is
    acked only afterwards. It raises :class:`PoisonMessage` for a message that
    can never succeed, which is then rejected to the dead-letter queue.

    With ``concurrency`` > 1, up to that many messages are handled at once, but
    messages with the same ``lane_key`` (default: each message its own) strictly
    one after another, in delivery order. Each is acked on its own, or with
    ``ack_delay`` > 0 together with others (:class:`shared.amqp_acks.AckWindow`):
    at most that many seconds later, so a crash in between redelivers messages
    whose effects are committed; the handler must absorb a repeat.
    """
    async def declare(channel: aio_pika.abc.AbstractChannel) -> aio_pika.abc.AbstractQueue:
        return await declare_consumer_queue(channel, queue_name, bindings, retired=retired)

    await _consume_loop(url, queue_name, declare, handler, state, prefetch=prefetch,
                        max_backoff=max_backoff, concurrency=concurrency, lane_key=lane_key,
                        ack_delay=ack_delay)


async def consume_transient_forever(url: str, queue_name: str, bindings: Sequence[str],
                                    handler: Handler, state: ConsumerState, *,
                                    prefetch: int = 256, max_backoff: float = 5.0,
                                    ack_batch: int = ACK_BATCH,
                                    ack_delay: float = ACK_DELAY_SECONDS) -> None:
    """Like :func:`consume_forever`, but on an exclusive auto-delete queue that is
    declared again after every reconnect. What was published while the
    connection was down is not in it: the caller must not need it (or recover
    it some other way).

    The messages are hints, handled one at a time. ``handler`` should never
    raise; if it does, the error is logged and the message is dropped (counted
    as handled and acked), never requeued. Acks go out in batches, one
    ``basic.ack`` with ``multiple`` for the latest handled message, once
    ``ack_batch`` are waiting or ``ack_delay`` seconds after the first of them,
    and for what is waiting when the consumer stops (if the channel still lives;
    otherwise the queue goes with the connection anyway).
    """
    if not 0 < ack_batch <= prefetch:
        raise ValueError("ack_batch must be between 1 and the prefetch")

    async def declare(channel: aio_pika.abc.AbstractChannel) -> aio_pika.abc.AbstractQueue:
        return await declare_transient_queue(channel, queue_name, bindings)

    await _consume_loop(url, queue_name, declare, handler, state, prefetch=prefetch,
                        max_backoff=max_backoff, batching=Batching(ack_batch, ack_delay))


async def _handle_hint(message: aio_pika.abc.AbstractIncomingMessage, handler: Handler,
                       state: ConsumerState, acks: BatchedAcks) -> None:
    if state.stopping:
        await asyncio.get_running_loop().create_future()
    state.in_hand += 1
    try:
        await handler(message)
    except Exception:
        log.exception("transient handler failed; the message is dropped",
                      message_id=message.message_id)
    finally:
        state.in_hand -= 1
    # Taken off the queue for good: its ack goes with the batch.
    state.handled += 1
    await acks.handled(message)


class _Lanes:
    """Runs each message in a task of its own, at most ``limit`` handlers at once;
    a message waits for the one before it with the same lane key to be settled."""

    def __init__(self, handler: Handler, state: ConsumerState, limit: int,
                 lane_key: LaneKey | None, acks: AckWindow | None = None) -> None:
        self._handler = handler
        self._state = state
        self._acks = acks
        self._slots = asyncio.Semaphore(limit)
        self._lane_key = lane_key
        self._tails: dict[Hashable, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Set when a task fails outside its handler (e.g. an ack on a dead
        # channel): the pump then ends and the loop reconnects.
        self.failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def _key(self, message: aio_pika.abc.AbstractIncomingMessage) -> Hashable:
        if self._lane_key is not None:
            try:
                return self._lane_key(message)
            except Exception:
                log.exception("lane key failed; the message gets a lane of its own",
                              message_id=message.message_id)
        return ("delivery", message.delivery_tag)

    def submit(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if self._acks is not None:
            self._acks.delivered(message)
        key = self._key(message)
        task = asyncio.create_task(self._run(message, self._tails.get(key)))
        self._tails[key] = task
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._done, key))

    async def _run(self, message: aio_pika.abc.AbstractIncomingMessage,
                   before: asyncio.Task[None] | None) -> None:
        if before is not None:
            await asyncio.wait([before])  # its outcome is its own; this only waits
        await _handle_one(message, self._handler, self._state, self._slots, self._acks)

    def _done(self, key: Hashable, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._tails.get(key) is task:
            del self._tails[key]
        if not task.cancelled() and (error := task.exception()) is not None \
                and not self.failed.done():
            self.failed.set_exception(error)

    async def close(self) -> None:
        """Cancel every message's task and wait for them all (unsettled ones are
        redelivered when the connection closes)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.failed.done():
            self.failed.exception()  # retrieved: the pump has raised it, or another error
        else:
            self.failed.cancel()


async def _pump_until_closed(connection: aio_pika.abc.AbstractConnection,
                             messages: aio_pika.abc.AbstractQueueIterator, handler: Handler,
                             state: ConsumerState, *, concurrency: int = 1,
                             lane_key: LaneKey | None = None,
                             batching: Batching | None = None,
                             ack_delay: float = 0.0) -> None:
    """Handle messages until the iterator ends or the connection closes.

    An idle iterator does not always notice that the broker went away, so the
    connection's own close is watched too; whichever comes first ends the pump,
    and any message still being handled is cancelled (and redelivered).

    With ``batching`` (transient queues: serial, handler errors dropped) acks
    are batched, and what is waiting is flushed when the pump ends. With lanes
    (``concurrency`` > 1) and ``ack_delay``, acks go out together through an
    :class:`AckWindow`, also flushed when the pump ends.
    """
    window = AckWindow(delay=ack_delay, limit=ACK_WINDOW_LIMIT) \
        if concurrency > 1 and ack_delay > 0 else None
    lanes = _Lanes(handler, state, concurrency, lane_key, window) if concurrency > 1 else None
    acks = BatchedAcks(batching) if batching is not None else None

    async def pump() -> None:
        async for message in messages:
            if acks is not None:
                await _handle_hint(message, handler, state, acks)
            elif lanes is None:
                await _handle_one(message, handler, state)
            else:
                lanes.submit(message)

    pumping = asyncio.ensure_future(pump())
    closed = asyncio.ensure_future(connection.closed())
    watched: set[asyncio.Future[Any]] = {pumping, closed}
    if lanes is not None:
        watched.add(lanes.failed)
    flushing: asyncio.Future[None] | None = None
    if acks is not None:
        flushing = asyncio.ensure_future(acks.flush_when_due())
    elif window is not None:
        flushing = asyncio.ensure_future(window.run())
    if flushing is not None:
        watched.add(flushing)  # it ends only by failing (an ack on a dead channel)
    try:
        await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        if pumping.done():
            pumping.result()
        if lanes is not None and lanes.failed.done():
            lanes.failed.result()
        if flushing is not None and flushing.done():
            flushing.result()
    finally:
        tasks = [t for t in (pumping, closed, flushing) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if lanes is not None:
            await lanes.close()
        if acks is not None:
            await _flush_on_stop(acks.flush())
        if window is not None:
            await _flush_on_stop(window.flush(everything=True))


async def _flush_on_stop(flush: Coroutine[Any, Any, object]) -> None:
    # Best effort: on a dead channel there is nothing to ack (an exclusive queue
    # dies with its connection; a durable one redelivers, which the consumer
    # absorbs); the timeout keeps a stuck socket from holding up the stop.
    with contextlib.suppress(*CONNECTION_ERRORS):
        async with asyncio.timeout(ACK_FLUSH_TIMEOUT_SECONDS):
            await flush


async def _consume_loop(url: str, queue_name: str, declare: Declare, handler: Handler,
                        state: ConsumerState, *, prefetch: int, max_backoff: float,
                        concurrency: int = 1, lane_key: LaneKey | None = None,
                        batching: Batching | None = None, ack_delay: float = 0.0) -> None:
    backoff = 0.2
    while True:
        connection: aio_pika.abc.AbstractConnection | None = None
        try:
            connection = await connect(url)
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=prefetch)
            queue = await declare(channel)
            state.connected = True
            backoff = 0.2
            log.info("consumer connected", queue=queue_name)
            async with queue.iterator() as messages:
                await _pump_until_closed(connection, messages, handler, state,
                                         concurrency=concurrency, lane_key=lane_key,
                                         batching=batching, ack_delay=ack_delay)
            raise ConnectionError("consumer channel closed")
        except asyncio.CancelledError:
            raise
        except CONNECTION_ERRORS as exc:
            state.connected = False
            state.reconnects += 1
            log.warning("consumer lost the broker; reconnecting", error=exc.__class__.__name__,
                        retry_in=round(backoff, 2))
        except Exception:
            # Whatever went wrong, a consumer that stops consuming loses alerts:
            # log it loudly and start over with a new connection.
            state.reconnects += 1
            log.exception("consumer failed; reconnecting", retry_in=round(backoff, 2))
        finally:
            state.connected = False
            if connection is not None and not connection.is_closed:
                with contextlib.suppress(*CONNECTION_ERRORS):
                    await asyncio.shield(connection.close())
        await asyncio.sleep(backoff + random.uniform(0, backoff / 2))
        backoff = min(backoff * 2, max_backoff)
