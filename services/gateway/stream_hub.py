"""The live stream's process-wide half: the :class:`StreamHub` that holds this
gateway process's sockets, the broker consumer that feeds it, and
:func:`setup_stream`, which installs both with the route (one socket's side is
in :mod:`services.gateway.stream`).

Each gateway process consumes its own exclusive, auto-deleted queue bound to
the events it pushes, so every replica sees every event and serves only its
own sockets. An event becomes a frame offered to each of its user's sockets
here; a message that becomes visible shortly is held on a timer until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aio_pika.abc
import structlog
from aiohttp import web

from services.gateway.stream import (
    CLOSE_GOING_AWAY,
    SEND_QUEUE_SIZE,
    STREAM_PATH,
    Connection,
    Push,
    close_socket,
    stream,
)
from services.gateway.typedefs import SETTINGS, STREAM_HUB
from shared.amqp_consume import ConsumerState, consume_transient_forever
from shared.events import (
    CHECKIN_SUBMITTED,
    NOTIFICATION_CREATED,
    REPLY_SENT,
    Event,
    MalformedEvent,
    MessageEventData,
    NotificationEventData,
    decode_data,
    decode_event,
)

log = structlog.get_logger(__name__)

BINDINGS = (NOTIFICATION_CREATED, CHECKIN_SUBMITTED, REPLY_SENT)

# A message that becomes visible this soon is pushed at that moment, not dropped
# (it also absorbs small clock differences between the hosts).
DELAY_WINDOW_SECONDS = 60.0
MAX_DELAYED = 10_000


def _iso(value: datetime) -> str:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def _id(value: uuid.UUID | None) -> str | None:
    return None if value is None else str(value)


class StreamHub:
    """The sockets of this gateway process, by user, and the routing of events to them."""

    def __init__(self, *, max_connections: int = 10_000, max_per_user: int = 5,
                 queue_size: int = SEND_QUEUE_SIZE) -> None:
        self.max_connections = max_connections
        self.max_per_user = max_per_user
        self.queue_size = queue_size
        self.queue_name = f"gateway.stream.{uuid.uuid4().hex}"
        self.state = ConsumerState()
        self.sockets: set[web.WebSocketResponse] = set()   # authenticated or not yet
        self._by_user: dict[uuid.UUID, set[Connection]] = {}
        self._delayed: set[asyncio.TimerHandle] = set()
        self.closing = False

    def connections(self) -> list[Connection]:
        return [c for conns in self._by_user.values() for c in conns]

    def add(self, conn: Connection) -> bool:
        conns = self._by_user.setdefault(conn.user_id, set())
        if len(conns) >= self.max_per_user:
            return False
        conns.add(conn)
        return True

    def remove(self, conn: Connection) -> None:
        conns = self._by_user.get(conn.user_id)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self._by_user[conn.user_id]

    def push(self, user_id: uuid.UUID, item: Push) -> None:
        for conn in list(self._by_user.get(user_id, ())):
            conn.offer(item)

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        """The AMQP handler: route one event; never raises (a copy is only a hint)."""
        if not self._by_user:
            # Nobody here to push to. A socket opened later recovers notifications
            # with resume; a held reply it would have got from a timer (the delay
            # window) still comes as a reply.received notification.
            return
        try:
            self.dispatch(decode_event(message.body), datetime.now(UTC))
        except MalformedEvent as exc:
            log.warning("stream ignored a malformed event", reason=str(exc),
                        message_id=message.message_id)

    def dispatch(self, event: Event, now: datetime) -> None:
        if event.type == NOTIFICATION_CREATED:
            n = decode_data(event, NotificationEventData)
            frame = {"type": "notification", "notification": {
                "id": str(n.notification_id), "kind": n.kind,
                "relationship_id": _id(n.relationship_id), "message_id": _id(n.message_id),
                "actor_id": _id(n.actor_id), "details": n.details,
                "created_at": _iso(n.created_at)}}
            self.push(n.user_id, Push(frame, str(n.notification_id)))
        elif event.type in (CHECKIN_SUBMITTED, REPLY_SENT):
            self._message(decode_data(event, MessageEventData),
                          "checkin" if event.type == CHECKIN_SUBMITTED else "reply", now)

    def _message(self, m: MessageEventData, kind: str, now: datetime) -> None:
        item = Push({"type": "message", "relationship_id": str(m.relationship_id),
                     "message_id": str(m.message_id), "kind": kind, "sent_at": _iso(m.sent_at)},
                    f"message:{m.message_id}")
        for member in (m.therapist_id, m.client_id):
            if member == m.sender_id or m.visible_at is None:
                self.push(member, item)
                continue
            delay = (m.visible_at if m.visible_at.tzinfo else m.visible_at.replace(tzinfo=UTC)
                     ) - now
            seconds = delay.total_seconds()
            if seconds <= 0:
                self.push(member, item)
            elif seconds <= DELAY_WINDOW_SECONDS and len(self._delayed) < MAX_DELAYED:
                self._push_later(seconds, member, item)
            # Otherwise (a held reply): the notifier's notification comes at release.

    def _push_later(self, seconds: float, member: uuid.UUID, item: Push) -> None:
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._delayed.discard(handle)
            self.push(member, item)

        handle = loop.call_later(seconds, fire)
        self._delayed.add(handle)

    async def close_all(self, code: int, reason: str) -> None:
        self.closing = True
        for handle in self._delayed:
            handle.cancel()
        self._delayed.clear()
        conns = self.connections()
        served = {c.ws for c in conns}
        await asyncio.gather(*(c.close(code, reason) for c in conns),
                             *(close_socket(ws, code, reason) for ws in self.sockets - served),
                             return_exceptions=True)


async def stream_context(app: web.Application) -> AsyncIterator[None]:
    """The event consumer of this process, for the life of the app."""
    hub = app[STREAM_HUB]
    task = asyncio.create_task(
        consume_transient_forever(app[SETTINGS].amqp_url, hub.queue_name, BINDINGS,
                                  hub.on_message, hub.state),
        name="gateway-stream-consumer")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await hub.close_all(CLOSE_GOING_AWAY, "server is shutting down")


async def close_streams_on_shutdown(app: web.Application) -> None:
    # aiohttp waits for open handlers before the cleanup contexts run, so the
    # sockets must be closed at shutdown already.
    await app[STREAM_HUB].close_all(CLOSE_GOING_AWAY, "server is shutting down")


def setup_stream(app: web.Application, hub: StreamHub | None = None) -> None:
    app[STREAM_HUB] = hub or StreamHub()
    app.router.add_get(STREAM_PATH, stream)
    app.cleanup_ctx.append(stream_context)
    app.on_shutdown.append(close_streams_on_shutdown)
