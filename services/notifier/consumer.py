"""The event consumer: decode, plan notifications, decide when to alert, record.

Each message is handled in one database transaction that records its event id in
the inbox and creates its notifications; the message is acked (by
:func:`shared.amqp.consume_forever`) only after that commit, so a redelivery is
recognised in the inbox and has no second effect.
"""

from __future__ import annotations

import asyncio
import enum
import random
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import assert_never

import aio_pika.abc
import structlog

from services.notifier import checkin_submitted, reply_sent
from services.notifier.store import NewNotification, NotifierStore, StoreUnavailable
from shared.amqp import ConsumerState, PoisonMessage, consume_forever
from shared.events import CHECKIN_SUBMITTED, REPLY_SENT, Event, MalformedEvent, decode_event

log = structlog.get_logger(__name__)

QUEUE = "notifier.events"
BINDINGS = ("#",)  # every event: none is unroutable, and later rules need them
# How long a stop waits for the message in hand before cancelling it (it is then
# rolled back and redelivered, which the inbox makes harmless).
STOP_GRACE_SECONDS = 15.0
_MAX_DB_BACKOFF = 5.0

Planner = Callable[[Event], list[NewNotification]]

# One module per event kind consumed; types not listed are recorded and ignored.
PLANNERS: Mapping[str, Planner] = {
    CHECKIN_SUBMITTED: checkin_submitted.plan,
    REPLY_SENT: reply_sent.plan,
}


class AlertTiming(enum.Enum):
    """When a recipient is alerted. Office hours will add holding for a digest."""

    NOW = "now"


def decide_alert(notification: NewNotification, *, now: datetime) -> AlertTiming:
    """When to alert the recipient of ``notification``.

    Every alert is immediate for now; this is the step that office hours and
    agreements will replace.
    """
    return AlertTiming.NOW


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

    def __init__(self, store: NotifierStore, state: ConsumerState) -> None:
        self._store = store
        self._state = state
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
                await self._handle_event(event)

    async def _handle_event(self, event: Event) -> None:
        now = datetime.now(UTC)
        event = normalise_event(event, now=now)
        planner = PLANNERS.get(event.type)
        if planner is None:
            await self._record(event, [])
            log.info("event ignored: the notifier has nothing to do for this type")
            return
        try:
            planned = planner(event)
        except MalformedEvent as exc:
            log.warning("event data is malformed; dead-lettering it", reason=str(exc))
            raise PoisonMessage(f"malformed {event.type} data: {exc}") from None

        alert_now: list[NewNotification] = []
        for notification in planned:
            timing = decide_alert(notification, now=now)
            if timing is AlertTiming.NOW:
                alert_now.append(notification)
            else:
                assert_never(timing)

        if await self._record(event, alert_now):
            log.info("notifications created", count=len(alert_now))
        else:
            log.info("duplicate event ignored")

    async def _record(self, event: Event, notifications: list[NewNotification]) -> bool:
        # A database outage must not use up the message's delivery limit (it would
        # be dead-lettered though nothing is wrong with it): hold it and retry here
        # until the database is back or the consumer is stopped.
        backoff = 0.2
        while True:
            try:
                return await self._store.record_event(event.event_id, event.type, notifications)
            except StoreUnavailable as exc:
                log.warning("database unavailable; retrying the event", error=str(exc),
                            retry_in=round(backoff, 2))
            await asyncio.sleep(backoff + random.uniform(0, backoff / 2))
            backoff = min(backoff * 2, _MAX_DB_BACKOFF)
