"""The event consumer: decode, plan, record, each event in one transaction.

Each message is handled in one database transaction that records its event id in
the inbox and applies its effects (notifications, held alerts, reminders, the
read model); the message is acked (by :func:`shared.amqp_consume.consume_forever`) only
after that commit, so a redelivery is recognised in the inbox and has no second
effect. "Now" comes from the injected clock, never from the rules.

Several events are handled at once, but the events of one therapist (their
check-ins, replies, hours and agreements) one at a time and in delivery order:
see :func:`lane_key`.
"""

from __future__ import annotations

import asyncio
import functools
import random
import uuid
from collections.abc import Awaitable, Callable, Hashable, Mapping
from datetime import UTC, datetime

import aio_pika.abc
import structlog

from services.notifier import (
    agreement_updated,
    availability_updated,
    checkin_submitted,
    reply_sent,
)
from services.notifier.store import EventTransaction, NotifierStore
from services.notifier.unavailable import StoreUnavailable
from shared.amqp_consume import ConsumerState, PoisonMessage, consume_forever
from shared.events import (
    AGREEMENT_UPDATED,
    AVAILABILITY_UPDATED,
    CHECKIN_SUBMITTED,
    MESSAGING_EVENTS,
    REPLY_SENT,
    Event,
    MalformedEvent,
    decode_event,
)

log = structlog.get_logger(__name__)

QUEUE = "notifier.events"
# Every event messaging announces, so that none of them is unroutable (the
# handlers ignore those they have nothing to do for). Not the notifier's own
# notification.created: those are for gateways' streams only (they came back
# here, one per alert, for nothing).
BINDINGS = MESSAGING_EVENTS
# Bound by earlier releases; `interlude migrate` and the consumer remove them.
RETIRED_BINDINGS = ("#",)
# How long a stop waits for the messages in hand before cancelling them (they are
# then rolled back and redelivered, which the inbox makes harmless).
STOP_GRACE_SECONDS = 15.0
# Events handled at once. Each is a transaction of a few short round trips, so
# one at a time leaves the process idle on Postgres most of the time; 8 overlap
# those waits well past the point where this one process is CPU-bound, while
# leaving 2 of the pool's 10 connections (shared.db.create_pool) to the
# scheduler, delivery worker, outbox relay and feed API (a busy pool only makes
# them queue briefly, never deadlock: each transaction holds one connection).
# The prefetch of 32 keeps every slot fed.
CONCURRENCY = 8
# Acks go out together, at most this long after the commit (one socket write for
# several events; a crash in between redelivers them, and the inbox absorbs it).
ACK_DELAY_SECONDS = 0.02
_MAX_DB_BACKOFF = 5.0

Clock = Callable[[], datetime]
# Applies one event inside its transaction; returns a few words for the log.
Handler = Callable[[EventTransaction, Event, datetime], Awaitable[str]]

# One module per event kind consumed; types not listed are acked and ignored.
HANDLERS: Mapping[str, Handler] = {
    CHECKIN_SUBMITTED: checkin_submitted.handle,
    REPLY_SENT: reply_sent.handle,
    AVAILABILITY_UPDATED: availability_updated.handle,
    AGREEMENT_UPDATED: agreement_updated.handle,
}
# Events that read or change what is one therapist's (each handler takes that
# therapist's lock first): kept in delivery order per therapist. The lock alone
# would serialise them, but in whatever order they reached it.
THERAPIST_LANED = frozenset({CHECKIN_SUBMITTED, REPLY_SENT, AVAILABILITY_UPDATED,
                             AGREEMENT_UPDATED})


def utc_clock() -> datetime:
    """The real clock, in UTC."""
    return datetime.now(UTC)


def read_clock(clock: Clock) -> datetime:
    """``clock()`` as an aware UTC instant (a naive reading is taken as UTC)."""
    now = clock()
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


@functools.lru_cache(maxsize=256)
def decoded(body: bytes) -> Event:
    """``decode_event(body)``, remembered for the few bodies in hand: the lane key
    and the handler both need the event, and a body is decoded once for both
    (the same bytes are the same event; events are never changed in place)."""
    return decode_event(body)


def lane_key(message: aio_pika.abc.AbstractIncomingMessage) -> Hashable:
    """What ``message`` must stay in order with: its therapist, for the events that
    change or read what is theirs; otherwise the event itself (so a redelivered
    copy waits for the first). Never raises: what cannot be read gets a lane of
    its own, and the handler dead-letters it."""
    try:
        event = decoded(message.body)
    except MalformedEvent:
        return ("delivery", message.delivery_tag)
    therapist = therapist_of(event)
    return ("event", event.event_id) if therapist is None else ("therapist", therapist)


def therapist_of(event: Event) -> uuid.UUID | None:
    """The therapist whose lane (and lock) ``event`` takes; None for other events
    and for malformed data (which the handler dead-letters)."""
    if event.type not in THERAPIST_LANED:
        return None
    try:
        return uuid.UUID(str(event.data.get("therapist_id")))
    except ValueError:
        return None


def normalise_event(event: Event, *, now: datetime) -> Event:
    """``event`` with ``occurred_at`` in UTC and not in the future.

    A naive time is taken as UTC; a time ahead of ours (a skewed clock) becomes
    ``now`` so it cannot pin a notification to the top of a feed.
    """
    occurred = event.occurred_at
    if occurred.tzinfo is None:
        occurred = occurred.replace(tzinfo=UTC)
    occurred = min(occurred.astimezone(UTC), now)
    return event.model_copy(update={"occurred_at": occurred})


class EventConsumer:
    """Handles up to ``concurrency`` events at once, one therapist's in order; a stop
    lets every message already in hand finish."""

    def __init__(self, store: NotifierStore, state: ConsumerState, *,
                 clock: Clock = utc_clock, concurrency: int = CONCURRENCY) -> None:
        self._store = store
        self._state = state
        self._clock = clock
        self._concurrency = concurrency

    async def run(self, amqp_url: str) -> None:
        """Consume ``notifier.events`` until cancelled."""
        await consume_forever(amqp_url, QUEUE, BINDINGS, self.handle, self._state,
                              concurrency=self._concurrency, lane_key=lane_key,
                              ack_delay=ACK_DELAY_SECONDS, retired=RETIRED_BINDINGS)

    async def stop(self, task: asyncio.Task[None], *, grace: float = STOP_GRACE_SECONDS) -> None:
        """Take no new message, let those in hand commit and be settled (for at most
        ``grace`` seconds), then cancel ``task`` (running :meth:`run`)."""
        # From here on no handler begins; the messages not begun are cancelled
        # with the task, unacked, and redelivered.
        self._state.stopping = True
        try:
            async with asyncio.timeout(grace):
                # ``in_hand`` counts down as each message is acked (or nacked); the
                # loop has no signal for "all settled", hence the short poll.
                while self._state.in_hand:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        except TimeoutError:
            log.warning("consumer stop: messages in hand did not finish; they will be"
                        " redelivered", in_hand=self._state.in_hand)
        task.cancel()
        await asyncio.wait([task])

    async def handle(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        """Handle one message; raises :class:`PoisonMessage` for one that can never succeed."""
        try:
            event = decoded(message.body)
        except MalformedEvent as exc:
            raise PoisonMessage(f"malformed event: {exc}") from None
        if event.type not in HANDLERS:
            # Nothing to apply, so nothing to record: acked without a transaction.
            return
        with structlog.contextvars.bound_contextvars(
            event_id=str(event.event_id), event_type=event.type,
        ):
            await self.handle_event(event)

    async def handle_event(self, event: Event) -> None:
        """Apply one decoded event exactly once (a repeat is recognised and ignored)."""
        now = read_clock(self._clock)
        event = normalise_event(event, now=now)
        handler = HANDLERS.get(event.type)
        outcome = "ignored: the notifier has nothing to do for this type"

        async def work(tx: EventTransaction) -> None:
            nonlocal outcome
            if handler is not None:
                outcome = await handler(tx, event, now)

        try:
            recorded = await self._record(event, work)
        except MalformedEvent as exc:
            log.warning("event data is malformed; dead-lettering it", reason=str(exc))
            raise PoisonMessage(f"malformed {event.type} data: {exc}") from None
        if recorded:
            # Debug: one line per event costs the busy loop measurably (docs/performance.md).
            log.debug("event handled", outcome=outcome)
        else:
            log.info("duplicate event ignored")

    async def _record(self, event: Event,
                      work: Callable[[EventTransaction], Awaitable[None]]) -> bool:
        # A database outage must not use up the message's delivery limit (it would
        # be dead-lettered though nothing is wrong with it): hold it and retry here
        # until the database is back or the consumer is stopped.
        backoff = 0.2
        while True:
            try:
                # The handlers of therapist-laned events lock that therapist
                # first; taking it with BEGIN saves them the round trip.
                return await self._store.handle_event(event.event_id, event.type, work,
                                                      lock_user=therapist_of(event))
            except StoreUnavailable as exc:
                log.warning("database unavailable; retrying the event", error=str(exc),
                            retry_in=round(backoff, 2))
            await asyncio.sleep(backoff + random.uniform(0, backoff / 2))
            backoff = min(backoff * 2, _MAX_DB_BACKOFF)
