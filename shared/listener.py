"""A listening socket that closes without resetting anyone waiting on it.

When a server closes its listening socket, the kernel resets every connection
that had completed its handshake but was still waiting in the accept queue: the
client had connected, may already have sent its request, and gets a reset
instead of an answer. asyncio's ``Server.close()`` (and so aiohttp's sites) do
exactly that at shutdown.

``DrainingListener`` accepts with its own loop, and ``close()`` first stops
that loop, then takes every connection still queued in the kernel and hands it
to the server like any other, and only then closes the socket. A connect that
comes after the close is refused (nothing was sent on it), never reset. The
connections taken last are served by the usual graceful shutdown: their
requests are read and answered before the process exits.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)
ProtocolFactory = Callable[[], asyncio.BaseProtocol]

# How many queued connections one close() takes at most: clients that keep
# connecting while it runs must not keep it from ever ending.
DRAIN_LIMIT = 4096
# After an accept fails (out of file descriptors, say), wait this long.
ACCEPT_RETRY_SECONDS = 1.0


class DrainingListener:
    """Listen on ``host``:``port``; each accepted connection goes to ``factory``.

    Accepting is a reader callback on the event loop, not a task, so stopping it
    is synchronous: ``close()`` removes the callback, empties the kernel's queue
    and closes the socket without yielding in between, and no connection can be
    accepted by one and lost by the other.
    """

    def __init__(self, factory: ProtocolFactory, host: str, port: int, *,
                 backlog: int = 128) -> None:
        self._factory = factory
        self._host = host
        self._port = port
        self._backlog = backlog
        self._sockets: list[socket.socket] = []
        self._connecting: set[asyncio.Task[None]] = set()
        self._retry: asyncio.TimerHandle | None = None
        self.last_accept = 0.0  # time.monotonic() of the latest accepted connection

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [sock.getsockname()[:2] for sock in self._sockets]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                self._sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    # One socket per address family, as asyncio's create_server does.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(self._backlog)
                sock.setblocking(False)
        except OSError:
            self._close_sockets()
            raise
        self._watch()

    async def close(self) -> int:
        """Stop accepting, take every connection already queued, close the
        sockets; returns how many queued connections were taken."""
        self._unwatch()
        taken = 0
        try:
            for sock in self._sockets:
                taken += self._accept_queued(sock, DRAIN_LIMIT - taken)
        finally:
            self._close_sockets()
        if self._connecting:
            await asyncio.gather(*self._connecting)
        return taken

    def _watch(self) -> None:
        self._retry = None
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.add_reader(sock.fileno(), self._accept_queued, sock, self._backlog)

    def _unwatch(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.remove_reader(sock.fileno())

    def _accept_queued(self, sock: socket.socket, limit: int) -> int:
        """Accept up to ``limit`` queued connections; how many were taken."""
        taken = 0
        while taken < limit:
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionAbortedError:
                continue  # the client gave up while it was queued
            except OSError as exc:  # out of file descriptors or memory, say
                log.error("accept failed", error=exc.__class__.__name__, errno=exc.errno)
                if self._retry is None and self._sockets:
                    self._unwatch()
                    self._retry = asyncio.get_running_loop().call_later(
                        ACCEPT_RETRY_SECONDS, self._watch)
                break
            taken += 1
            self._adopt(conn)
        return taken

    def _adopt(self, conn: socket.socket) -> None:
        self.last_accept = time.monotonic()
        conn.setblocking(False)
        task = asyncio.get_running_loop().create_task(self._connect(conn))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self._factory, conn)
        except OSError:  # the peer went away before we got to it
            conn.close()

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []
