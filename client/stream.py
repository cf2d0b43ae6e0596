"""A client of the live stream ``GET /v1/stream`` (docs/stream.md).

:class:`Watcher` keeps one WebSocket open: it authenticates with a first
``auth`` frame (never a token in the URL), resumes from the last notification it
saw (``?after=``), hands each ``notification`` and ``message`` frame to its
handler, and reconnects with backoff when the connection drops or the gateway
goes away (1001, 1011, 1013). A 4401 gets one session refresh and one
reconnect; a stream refused again, or closed for a reason retrying cannot fix
(4400, 4429, 1003, 1009), ends the watch with :class:`StreamRefused`.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp

from client.api import ServerUnreachable

STREAM_PATH = "/v1/stream"
CONNECT_TIMEOUT_SECONDS = 10.0
# The gateway sends a heartbeat after 20 s without other frames; this much
# silence means the link is dead even if TCP has not noticed.
SILENCE_SECONDS = 60.0
CLOSE_TIMEOUT_SECONDS = 2.0
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0

CLOSE_UNAUTHORIZED = 4401
# Close codes a reconnect cannot fix, with what to say.
REFUSALS = {
    1003: "the stream refused a binary frame (a bug in this client)",
    1008: "the stream refused this client (policy violation)",
    1009: "the stream refused a frame that was too large (a bug in this client)",
    4400: "the stream refused the resume position (a bug in this client)",
    4429: "you already have the most open streams the server allows (5); close another "
          "`watch` or app first",
}
EVENT_TYPES = ("notification", "message")


class StreamRefused(Exception):
    """The stream cannot be used: retrying would not help."""


class _Unauthorized(Exception):
    """The gateway closed the socket with 4401."""


class _Ended(Exception):
    """The connection ended in a way that a reconnect may fix."""


class Tokens(Protocol):
    """Where the watcher gets its access token, and a fresh one after a 4401."""

    def current(self) -> str: ...

    async def refresh(self, stale: str) -> None: ...


class Handler(Protocol):
    async def event(self, frame: dict[str, Any]) -> bool:
        """A ``notification`` or ``message`` frame; True stops the watch."""

    def status(self, text: str) -> None:
        """A line about the connection itself (not an event)."""


def stream_url(server: str, after: str | None = None) -> str:
    """``ws(s)://host/v1/stream[?after=ID]`` for the gateway at ``server`` (http(s)://)."""
    parts = urlsplit(server)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(f"the server URL {server!r} is not an http(s) URL")
    query = urlencode({"after": after}) if after else ""
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + STREAM_PATH, query, ""))


def backoff_delay(attempt: int) -> float:
    """Seconds to wait before reconnect ``attempt`` (0, 1, ...): doubling, capped,
    with jitter so that clients dropped together do not return together."""
    ceiling = min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** min(attempt, 16))
    return float(ceiling / 2 + random.uniform(0, ceiling / 2))


def _frame(data: str) -> dict[str, Any] | None:
    try:
        frame = json.loads(data)
    except ValueError:
        return None
    return frame if isinstance(frame, dict) and isinstance(frame.get("type"), str) else None


@dataclass
class Watcher:
    """Follows the stream of the gateway at ``server`` until the handler says stop."""

    server: str
    tokens: Tokens
    handler: Handler
    after: str | None = None  # the last notification seen: where a reconnect resumes
    silence: float = SILENCE_SECONDS
    backoff: Callable[[int], float] = backoff_delay
    connections: int = field(default=0, init=False)  # how many reached "ready"
    _refreshed: bool = field(default=False, init=False)  # since the last "ready"

    async def run(self) -> None:
        attempt = 0
        timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_SECONDS,
                                        sock_connect=CONNECT_TIMEOUT_SECONDS)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                token = self.tokens.current()
                connected_before = self.connections
                try:
                    await self._connection(session, token)
                    return
                except _Unauthorized:
                    if self._refreshed:
                        raise StreamRefused("the stream refused the session even after it was "
                                            "refreshed; sign in again with `interlude-client "
                                            "login --email EMAIL`") from None
                    self.handler.status("the access token has expired; refreshing the session")
                    await self.tokens.refresh(token)
                    self._refreshed = True
                    continue
                except _Ended as exc:
                    problem = str(exc)
                except aiohttp.WSServerHandshakeError as exc:
                    if self.connections == 0 or exc.status < 500:
                        raise StreamRefused(f"the server at {self.server} does not offer the "
                                            f"live stream (HTTP {exc.status} on "
                                            f"{STREAM_PATH})") from None
                    problem = f"HTTP {exc.status}"
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    if self.connections == 0:
                        raise ServerUnreachable(f"cannot reach the Interlude stream at "
                                                f"{stream_url(self.server)} "
                                                f"({_describe(exc)})") from None
                    problem = _describe(exc)
                if self.connections > connected_before:
                    attempt = 0
                delay = self.backoff(attempt)
                attempt += 1
                self.handler.status(f"connection lost ({problem}); reconnecting in "
                                    f"{delay:.0f} s")
                await asyncio.sleep(delay)

    async def _connection(self, session: aiohttp.ClientSession, token: str) -> None:
        """One connection; returns when the handler says stop, else raises why it ended."""
        url = stream_url(self.server, self.after)
        async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
            ws = await session.ws_connect(
                url, autoping=True, heartbeat=None,
                timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_SECONDS))
        async with ws:
            await ws.send_json({"type": "auth", "access_token": token})
            while True:
                try:
                    async with asyncio.timeout(self.silence):
                        msg = await ws.receive()
                except TimeoutError:
                    raise _Ended(f"nothing heard for {self.silence:.0f} s") from None
                if msg.type == aiohttp.WSMsgType.TEXT:
                    frame = _frame(msg.data)
                    if frame is not None and await self._on_frame(frame):
                        await ws.close()
                        return
                elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                                  aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    code = msg.data if msg.type == aiohttp.WSMsgType.CLOSE else ws.close_code
                    reason = msg.extra if msg.type == aiohttp.WSMsgType.CLOSE else None
                    _closed(code, reason)

    async def _on_frame(self, frame: dict[str, Any]) -> bool:
        kind = frame["type"]
        if kind == "ready":
            again = self.connections > 0
            self.connections += 1
            self._refreshed = False
            self.handler.status("reconnected; messages that arrived meanwhile are not "
                                "announced again (`interlude-client inbox` shows them)"
                                if again else "connected; watching for notifications and "
                                "messages (Ctrl-C to stop)")
        elif kind == "resumed":
            if frame.get("complete", True):
                self.handler.status(f"resumed: {frame.get('count', 0)} missed notification(s)")
            else:
                reason = f" ({frame['reason']})" if frame.get("reason") else ""
                self.handler.status(f"could not fetch what was missed since the last "
                                    f"notification seen{reason}; `interlude-client "
                                    "notifications` lists everything")
        elif kind == "error":
            self.handler.status(f"the server did not understand this client: "
                                f"{frame.get('message', frame.get('code'))}")
        elif kind in EVENT_TYPES:
            if kind == "notification":
                notification = frame.get("notification")
                if isinstance(notification, dict) and isinstance(notification.get("id"), str):
                    self.after = notification["id"]
            return await self.handler.event(frame)
        # heartbeat, reauthenticated and frame types of later versions need nothing.
        return False


def _closed(code: int | None, reason: str | None) -> None:
    reason = (reason or "").strip()
    if code == CLOSE_UNAUTHORIZED:
        raise _Unauthorized(reason)
    if code in REFUSALS:
        detail = f" (server: {reason})" if reason else ""
        raise StreamRefused(f"{REFUSALS[code]}{detail}")
    described = f"closed with {code}" if code else "connection dropped"
    raise _Ended(f"{described}: {reason}" if reason else described)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or exc.__class__.__name__
