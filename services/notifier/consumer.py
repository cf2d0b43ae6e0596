"""The event consumer: decode, plan, record, each event in one transaction.

Each message is handled in one database transaction that records its event id in
the inbox and applies its effects (notifications, held alerts, reminders, the
read model); the message is acked (by :func:`shared.amqp.consume_forever`) only
after that commit, so a redelivery is recognised in the inbox and has no second
effect. "Now" comes from the injected clock, never from the rules.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime

import aio_pika.abc
import structlog

from services.notifier import (
    agreement_updated,
    availability_updated,
    checkin_submitted,
    reply_sent,
)
from services.notifier.store import EventTransaction, NotifierStore, StoreUnavailable
from shared.amqp import ConsumerState, PoisonMessage, consume_forever
from shared.events import (
    AGREEMENT_UPDATED,
    AVAILABILITY_UPDATED,
    CHECKIN_SUBMITTED,
    REPLY_SENT,
    Event,
    MalformedEvent,
    decode_event,
)

log = structlog.get_logger(__name__)

QUEUE = "notifier.events"
BINDINGS = ("#",)  # every event: none is unroutable, and later rules need them
# How long a stop waits for the message in hand before cancelling it (it is then
# rolled back and redelivered, which the inbox makes harmless).
STOP_GRACE_SECONDS = 15.0
_MAX_DB_BACKOFF = 5.0

Clock = Callable[[], datetime]
# Applies one event inside its transaction; returns a few words for the log.
Handler = Callable[[EventTransaction, Event, datetime], Awaitable[str]]

# One module per event kind consumed; types not listed are recorded and ignored.
HANDLERS: Mapping[str, Handler] = {
    CHECKIN_SUBMITTED: checkin_submitted.handle,
    REPLY_SENT: reply_sent.handle,
    AVAILABILITY_UPDATED: availability_updated.handle,
    AGREEMENT_UPDATED: agreement_updated.handle,
}


def utc_clock() -> datetime:
    """The real clock, in UTC."""
    return datetime.now(UTC)


def read_clock(clock: Clock) -> datetime:
    """``clock()`` as an aware UTC instant (a naive reading is taken as UTC)."""
    now = clock()
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


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
    """Handles one message at a time, so that a stop can wait for the one in hand."""

    def __init__(self, store: NotifierStore, state: ConsumerState, *,
                 clock: Clock = utc_clock) -> None:
        self._store = store
        self._state = state
        self._clock = clock
        self._busy = asyncio.Lock()
        self._in_hand: aio_pika.abc.AbstractIncomingMessage | None = None

    async def run(self, amqp_url: str) -> None:
        """Consume ``notifier.events`` until cancelled."""
        await consume_forever(amqp_url, QUEUE, BINDINGS, self.handle, self._state)

    async def stop(self, task: asyncio.Task[None], *, grace: float = STOP_GRACE_SECONDS) -> None:
        """Let the message in hand commit, then cancel ``task`` (running :meth:`run`)."""
        self._state.stopping = True
        try:
            async with asyncio.timeout(grace):
                # Held from here on: the next message waits for it and is cancelled
                # back to the queue unhandled.
                await self._busy.acquire()
                # The loop settles (acks) the last message just after the handler
                # returns; let it, rather than have it redelivered for nothing.
                # aio-pika has no signal for "settled", hence the short poll.
                while self._in_hand is not None and not self._in_hand.processed:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        except TimeoutError:
            log.warning("consumer stop: message in hand did not finish; it will be redelivered")
        task.cancel()
        await asyncio.wait([task])

    async def handle(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        """Handle one message; raises :class:`PoisonMessage` for one that can never succeed."""
        async with self._busy:
            self._in_hand = message
            try:
                event = decode_event(message.body)
            except MalformedEvent as exc:
                raise PoisonMessage(f"malformed event: {exc}") from None
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
            log.info("event handled", outcome=outcome)
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
                return await self._store.handle_event(event.event_id, event.type, work)
            except StoreUnavailable as exc:
                log.warning("database unavailable; retrying the event", error=str(exc),
                            retry_in=round(backoff, 2))
            await asyncio.sleep(backoff + random.uniform(0, backoff / 2))
            backoff = min(backoff * 2, _MAX_DB_BACKOFF)
