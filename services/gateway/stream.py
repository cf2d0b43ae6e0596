"""``GET /v1/stream``: a WebSocket that pushes a user's notifications and message
arrivals as they happen (protocol: docs/stream.md). This module is one socket's
side: the handshake, what the client sends, and the :class:`Connection` that
feeds it; the events come from this process's hub
(:mod:`services.gateway.stream_hub`, which also installs the route).

A socket is fed through a bounded queue drained by one sender task: a slow
client is dropped (1013) and never holds up the others. What a client missed
(a reconnect, a broker outage) it asks for with ``resume``, which reads the
caller's notifications stored after the last one seen (an internal notifier
route).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import WSMessage, WSMsgType, web

from services.gateway.store import Caller, InvalidToken
from services.gateway.typedefs import NOTIFIER, STORE, STREAM_HUB
from shared.internal_auth import Identity
from shared.web import ApiError

if TYPE_CHECKING:
    from services.gateway.stream_hub import StreamHub

log = structlog.get_logger(__name__)

STREAM_PATH = "/v1/stream"

AUTH_TIMEOUT_SECONDS = 5.0
HEARTBEAT_SECONDS = 20.0
PING_SECONDS = 30.0                # WebSocket-level ping; a dead peer is dropped
REVALIDATE_SECONDS = 30.0          # expiry or revocation closes the socket within this
SEND_QUEUE_SIZE = 256
CLOSE_TIMEOUT_SECONDS = 2.0
MAX_CLIENT_MESSAGE_BYTES = 16 * 1024
RESUME_CAP = 500
SENT_IDS_REMEMBERED = 2000

# Close codes (4000-4999 are the application's own).
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN = 1013
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_TOO_MANY = 4429


@dataclass(frozen=True, slots=True)
class Push:
    """A frame for one socket, queued by the hub or by the socket itself."""

    payload: dict[str, Any]
    # Pushed at most once per socket: a notification's id, or a message's (events
    # may be redelivered, and resume races with live copies).
    key: str | None = None


@dataclass(frozen=True, slots=True)
class _Resume:
    after: uuid.UUID


class Connection:
    """One authenticated socket: its outgoing queue and the task that drains it."""

    def __init__(self, ws: web.WebSocketResponse, caller: Caller, token: str,
                 request: web.Request, *, queue_size: int) -> None:
        self.ws = ws
        self.caller = caller
        self.user_id = caller.account.id
        self.token = token
        self._request = request
        self._queue: asyncio.Queue[Push | _Resume] = asyncio.Queue(queue_size)
        self._sent: OrderedDict[str, None] = OrderedDict()
        self._sender: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None

    def offer(self, item: Push | _Resume) -> None:
        """Queue ``item`` for sending; a client too slow to keep up is dropped."""
        if self._closer is not None:
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            log.warning("stream client too slow; dropping it", user_id=str(self.user_id))
            self.close_soon(CLOSE_TRY_AGAIN, "too slow: send buffer full; reconnect and resume")

    def start(self) -> None:
        self._sender = asyncio.create_task(self._send_loop(), name="stream-sender")

    def close_soon(self, code: int, reason: str) -> None:
        """Close with ``code`` from any task; the first reason given wins."""
        if self._closer is None:
            self._closer = asyncio.create_task(self._close(code, reason), name="stream-close")

    async def close(self, code: int, reason: str) -> None:
        self.close_soon(code, reason)
        assert self._closer is not None
        await asyncio.shield(self._closer)

    async def stop(self) -> None:
        """Stop the sender (the socket has ended); wait for a close in progress."""
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        if self._closer is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._closer

    async def _close(self, code: int, reason: str) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        await close_socket(self.ws, code, reason)

    async def _send_loop(self) -> None:
        try:
            await self._send_until_done()
        except (ConnectionError, RuntimeError):
            # The peer went away mid-send; the reader sees the end and cleans up.
            self.close_soon(CLOSE_GOING_AWAY, "connection lost")
        except Exception:
            log.exception("stream sender failed", user_id=str(self.user_id))
            self.close_soon(CLOSE_INTERNAL_ERROR, "internal error; reconnect and resume")

    async def _send_until_done(self) -> None:
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + HEARTBEAT_SECONDS
        next_check = loop.time() + REVALIDATE_SECONDS
        while True:
            # Re-check the token on schedule whether or not the queue is busy: a
            # steady stream of frames must not keep a revoked session alive.
            if loop.time() >= next_check:
                next_check = loop.time() + REVALIDATE_SECONDS
                if not await self._still_valid():
                    self.close_soon(CLOSE_UNAUTHORIZED,
                                    "access token expired or revoked; reconnect with a "
                                    "fresh one")
                    return
            wait = max(0.0, min(next_beat, next_check) - loop.time())
            try:
                async with asyncio.timeout(wait):
                    item = await self._queue.get()
            except TimeoutError:
                now = loop.time()
                if now >= next_beat:
                    next_beat = now + HEARTBEAT_SECONDS
                    await self.ws.send_json({"type": "heartbeat", "at": _now().isoformat()})
                continue
            if isinstance(item, _Resume):
                await self._resume(item.after)
            else:
                await self._send(item)
            next_beat = loop.time() + HEARTBEAT_SECONDS

    async def _send(self, item: Push) -> None:
        if item.key is not None:
            if item.key in self._sent:
                return
            self._sent[item.key] = None
            if len(self._sent) > SENT_IDS_REMEMBERED:
                self._sent.popitem(last=False)
        await self.ws.send_json(item.payload)

    async def _still_valid(self) -> bool:
        try:
            await self._request.app[STORE].caller_for_access_token(self.token, _now(),
                                                                    fresh=True)
        except InvalidToken:
            return False
        except Exception:
            # The database is briefly unreachable: not the client's fault; check later.
            log.warning("stream token check failed", exc_info=True)
        return True

    async def reauthenticate(self, token: str) -> bool:
        """Switch to a fresh access token of the same user (no reconnect needed)."""
        caller = await authenticate(self._request.app, token)
        if caller is None or caller.account.id != self.user_id:
            return False
        self.token, self.caller = token, caller
        return True

    async def _resume(self, after: uuid.UUID) -> None:
        identity = Identity(user_id=self.user_id, role=self.caller.account.role,
                            request_id=f"stream-resume-{uuid.uuid4()}")
        try:
            missed, found = await fetch_missed(self._request.app, identity, after)
        except ApiError as exc:
            await self.ws.send_json({"type": "resumed", "after": str(after), "count": 0,
                                     "complete": False, "reason": exc.code})
            return
        for item in missed:
            await self._send(Push(notification_frame(item), item["id"]))
        await self.ws.send_json({"type": "resumed", "after": str(after), "count": len(missed),
                                 "complete": found})


async def fetch_missed(app: web.Application, identity: Identity, after: uuid.UUID
                       ) -> tuple[list[dict[str, Any]], bool]:
    """The caller's notifications stored after ``after``, oldest first, and whether
    that is all of them: False (and none) when ``after`` is not one of the
    caller's, or more than :data:`RESUME_CAP` were stored since.

    Stored order, not the feed's: a notification stored late with an earlier
    time (its event arrived late) sits below ``after`` in the feed and would be
    skipped by reading the feed down to ``after``.
    """
    result = await app[NOTIFIER].call(
        "GET", f"/v1/notifications/{after}/stored-after?limit={RESUME_CAP}", identity)
    if result.status == 404:
        return [], False
    if result.status != 200:
        raise ApiError(502, "upstream_error", "the notification store answered "
                       f"{result.status}")
    if result.data["more"]:
        return [], False
    return list(result.data["items"]), True


def notification_frame(n: dict[str, Any]) -> dict[str, Any]:
    return {"type": "notification", "notification": {
        key: n.get(key) for key in ("id", "kind", "relationship_id", "message_id", "actor_id",
                                    "details", "created_at")}}


def _now() -> datetime:
    return datetime.now(UTC)


async def close_socket(ws: web.WebSocketResponse, code: int, reason: str) -> None:
    """Close within a short time, even when the peer does not read (then abruptly)."""
    with contextlib.suppress(TimeoutError, ConnectionError, RuntimeError):
        async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
            await ws.close(code=code, message=reason.encode()[:120])


async def authenticate(app: web.Application, token: str) -> Caller | None:
    try:
        return await app[STORE].caller_for_access_token(token, _now())
    except InvalidToken:
        return None


def _header_token(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def _parse(msg: WSMessage) -> dict[str, Any] | None:
    if msg.type != WSMsgType.TEXT:
        return None
    try:
        data = json.loads(msg.data)
    except ValueError:
        return None
    return data if isinstance(data, dict) and isinstance(data.get("type"), str) else None


async def _first_message_token(ws: web.WebSocketResponse) -> str | None:
    try:
        async with asyncio.timeout(AUTH_TIMEOUT_SECONDS):
            msg = await ws.receive()
    except TimeoutError:
        return None
    data = _parse(msg)
    if data is None or data["type"] != "auth" or not isinstance(data.get("access_token"), str):
        return None
    return str(data["access_token"]) or None


def _uuid(raw: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(raw) if isinstance(raw, str) else None
    except ValueError:
        return None


async def stream(request: web.Request) -> web.StreamResponse:
    """``GET /v1/stream``: the caller's live notifications and message arrivals."""
    hub = request.app[STREAM_HUB]
    ws = web.WebSocketResponse(heartbeat=PING_SECONDS, max_msg_size=MAX_CLIENT_MESSAGE_BYTES,
                               timeout=CLOSE_TIMEOUT_SECONDS)
    await ws.prepare(request)
    if hub.closing:
        await close_socket(ws, CLOSE_GOING_AWAY, "server is shutting down")
        return ws
    if len(hub.sockets) >= hub.max_connections:
        await close_socket(ws, CLOSE_TRY_AGAIN, "server busy; try again later")
        return ws
    hub.sockets.add(ws)
    try:
        await _serve(request, ws, hub)
    finally:
        hub.sockets.discard(ws)
    return ws


async def _serve(request: web.Request, ws: web.WebSocketResponse, hub: StreamHub) -> None:
    after_raw = request.query.get("after")
    after = _uuid(after_raw) if after_raw is not None else None
    if after_raw is not None and after is None:
        await close_socket(ws, CLOSE_BAD_REQUEST, "query parameter 'after' is not an id")
        return
    token = _header_token(request) or await _first_message_token(ws)
    caller = await authenticate(request.app, token) if token else None
    if caller is None or token is None:
        await close_socket(ws, CLOSE_UNAUTHORIZED, "unauthorized: send a valid access token "
                           "(Authorization header or an auth message within 5 s)")
        return
    if hub.closing or ws.closed:
        await close_socket(ws, CLOSE_GOING_AWAY, "server is shutting down")
        return
    conn = Connection(ws, caller, token, request, queue_size=hub.queue_size)
    if not hub.add(conn):
        await close_socket(ws, CLOSE_TOO_MANY, f"too many streams for this user (at most "
                           f"{hub.max_per_user})")
        return
    started = time.monotonic()
    log.info("stream opened", user_id=str(conn.user_id))
    try:
        if after is not None:
            conn.offer(_Resume(after))
        # Subscribed before "ready": everything that happens after it reaches the client.
        await ws.send_json({"type": "ready", "user_id": str(conn.user_id),
                            "role": caller.account.role, "heartbeat_seconds": HEARTBEAT_SECONDS})
        conn.start()
        await _read_loop(ws, conn)
    finally:
        hub.remove(conn)
        await conn.stop()
        log.info("stream closed", user_id=str(conn.user_id), close_code=ws.close_code,
                 seconds=round(time.monotonic() - started, 1))


async def _read_loop(ws: web.WebSocketResponse, conn: Connection) -> None:
    async for msg in ws:
        if msg.type == WSMsgType.BINARY:
            conn.close_soon(CLOSE_UNSUPPORTED, "binary frames are not supported; send JSON text")
            continue
        data = _parse(msg)
        kind = data["type"] if data else None
        if kind == "resume" and data is not None and _uuid(data.get("after")) is not None:
            after = _uuid(data["after"])
            assert after is not None
            conn.offer(_Resume(after))
        elif kind == "auth" and data is not None and isinstance(data.get("access_token"), str):
            if await conn.reauthenticate(data["access_token"]):
                conn.offer(Push({"type": "reauthenticated"}))
            else:
                conn.close_soon(CLOSE_UNAUTHORIZED, "unauthorized: that token is not valid "
                                "for this stream's user")
        else:
            conn.offer(Push({"type": "error", "code": "bad_message", "message":
                              "expected {\"type\": \"resume\", \"after\": <id>} or "
                              "{\"type\": \"auth\", \"access_token\": <token>}"}))

