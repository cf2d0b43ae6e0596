"""A listening socket that closes without resetting anyone waiting on it.

When a server closes its listening socket, the kernel resets every connection
whose handshake had completed but which was still waiting in the accept queue,
and every handshake still under way: the client believes it is connected, may
already have sent its request, and gets a reset instead of an answer.
asyncio's ``Server.close()`` (and so aiohttp's sites) do exactly that at
shutdown.

``DrainingListener.close()`` instead:

1. stops new handshakes: a socket filter drops bare SYNs arriving at the
   listening socket (Linux; elsewhere this step is skipped). A client whose SYN
   is dropped sends it again about a second later and is then refused, which
   carried nothing and is safe to retry;
2. goes on accepting for ``HANDSHAKE_SETTLE_SECONDS``, so handshakes already
   under way complete and are served;
3. stops accepting, takes every connection still queued in the kernel, hands
   each to the server like any other, and only then closes the socket, without
   yielding to the event loop in between.

The connections taken last are served by the usual graceful shutdown: their
requests are read and answered before the process exits.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import socket
import struct
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)
ProtocolFactory = Callable[[], asyncio.BaseProtocol]

# How many queued connections one drain takes at most: clients that keep
# connecting while it runs must not keep it from ever ending.
DRAIN_LIMIT = 4096
# After the process runs out of descriptors or memory, accepting pauses this long.
ACCEPT_RETRY_SECONDS = 1.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# How long handshakes already under way get to complete once new ones are dropped.
HANDSHAKE_SETTLE_SECONDS = 0.25

# Classic BPF, run on each TCP segment for the listening socket, which starts
# at the TCP header: drop it (return 0) if its flags have SYN without ACK, keep
# it otherwise. Offset 13 is the flags byte; SYN is 0x02, ACK 0x10.
_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
_DROP_BARE_SYN = (
    (0x30, 0, 0, 13),          # ldb [13]
    (0x54, 0, 0, 0x12),        # and #0x12
    (0x15, 0, 1, 0x02),        # jeq #0x02, next, skip one
    (0x06, 0, 0, 0),           # ret #0: drop
    (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1: keep the whole segment
)


def drop_new_handshakes(sock: socket.socket) -> bool:
    """Attach the bare-SYN filter to ``sock``; False where that is not possible."""
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *insn)
                                                for insn in _DROP_BARE_SYN))
    program = struct.pack("HP", len(_DROP_BARE_SYN), ctypes.addressof(code))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, program)
    except OSError:
        return False
    return True


class DrainingListener:
    """Listen on ``host``:``port``; each accepted connection goes to ``factory``.

    ``bind()`` listens (connections queue in the kernel), ``start()`` begins
    accepting them, ``close()`` drains as the module says. Accepting is a reader
    callback on the event loop, not a task, so stopping it is synchronous and no
    connection can be accepted by one and lost by the other.
    """

    def __init__(self, factory: ProtocolFactory, host: str, port: int, *,
                 backlog: int = 128) -> None:
        self._factory = factory
        self._host = host
        self._port = port
        self._backlog = backlog
        self._sockets: list[socket.socket] = []
        self._connecting: set[asyncio.Task[None]] = set()
        self._accepting = False
        self._retry: asyncio.TimerHandle | None = None
        self.last_accept = 0.0  # time.monotonic() of the latest accepted connection

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [sock.getsockname()[:2] for sock in self._sockets]

    async def bind(self) -> None:
        """Listen on every address ``host`` resolves to (OSError if on none)."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                try:
                    sock = socket.socket(family, kind, proto)
                except OSError:  # an address family this kernel lacks (IPv6, say)
                    continue
                self._sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    # One socket per address family, as asyncio's create_server does.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(self._backlog)
                sock.setblocking(False)
            if not self._sockets:
                raise OSError(errno.EAFNOSUPPORT, "no usable address")
        except OSError:
            self._close_sockets()
            raise

    def start(self) -> None:
        """Accept what is queued and what comes, until ``close()``."""
        self._accepting = True
        self._watch()

    async def close(self, *, drain: bool = True) -> int:
        """Drain (unless ``drain`` is false: the server never came up) and close;
        returns how many connections were taken from the kernel's queue once
        accepting had stopped."""
        taken = 0
        try:
            if drain and self._sockets:
                filtered = [drop_new_handshakes(sock) for sock in self._sockets]
                if any(filtered):
                    await asyncio.sleep(HANDSHAKE_SETTLE_SECONDS)
            self._accepting = False
            self._unwatch()
            for sock in self._sockets if drain else ():
                taken += self._accept_queued(sock, DRAIN_LIMIT - taken)
        finally:
            self._accepting = False
            self._unwatch()
            self._close_sockets()
        if self._connecting:
            await asyncio.gather(*self._connecting, return_exceptions=True)
        return taken

    def _watch(self) -> None:
        self._retry = None
        if not self._accepting:
            return
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
        taken = attempts = 0
        while taken < limit and attempts < limit:
            attempts += 1
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    # The client gave up while queued, or a network error Linux
                    # reports on accept: that connection is gone, try the next.
                    log.warning("accept failed", error=exc.__class__.__name__,
                                errno=exc.errno)
                    continue
                log.error("accept paused", error=exc.__class__.__name__, errno=exc.errno,
                          retry_in=ACCEPT_RETRY_SECONDS)
                if self._retry is None and self._accepting:
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
        except BaseException:
            conn.close()
            raise

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []
