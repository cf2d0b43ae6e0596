"""``services.runner.serve`` over real loopback sockets: a request in progress
when SIGTERM comes is answered and serve returns; an idle keep-alive connection
is closed after the keep-alive timeout; a port in use is a ``ListenError``
before the app starts; a second SIGINT (in a process of its own) ends the
process at once."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

import pytest
from aiohttp import web

from services.runner import ListenError, serve

pytestmark = pytest.mark.timeout(30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_app(started: list[str]) -> web.Application:
    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(0.5)
        return web.Response(text="done")

    async def quick(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def on_startup(_: web.Application) -> None:
        started.append("app")

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/quick", quick)
    app.on_startup.append(on_startup)
    return app


def get(conn: socket.socket, path: str) -> bytes:
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    return conn.recv(4096)


async def until_serving(port: int) -> None:
    async with asyncio.timeout(10):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return


async def test_sigterm_lets_a_request_in_progress_finish() -> None:
    port = free_port()
    serving = asyncio.create_task(serve(make_app([]), "127.0.0.1", port))
    await until_serving(port)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        answer = asyncio.create_task(asyncio.to_thread(get, conn, "/slow"))
        await asyncio.sleep(0.2)  # the request is in its handler
        os.kill(os.getpid(), signal.SIGTERM)
        response = await answer
    assert response.startswith(b"HTTP/1.1 200"), response
    assert response.endswith(b"done")
    await asyncio.wait_for(serving, 10)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


async def test_an_idle_keep_alive_connection_is_closed_after_the_timeout() -> None:
    port = free_port()
    serving = asyncio.create_task(serve(make_app([]), "127.0.0.1", port,
                                        keepalive_timeout=0.3))
    try:
        await until_serving(port)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            assert (await asyncio.to_thread(get, conn, "/quick")).startswith(b"HTTP/1.1 200")
            # The server closes the idle connection: recv sees the end, well
            # before the socket's own 5 s timeout.
            assert await asyncio.to_thread(conn.recv, 100) == b""
    finally:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(serving, 10)


async def test_a_port_in_use_fails_before_the_app_starts() -> None:
    started: list[str] = []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port}: "
                                              "Address already in use"):
            await serve(make_app(started), "127.0.0.1", port)
    assert started == []


SERVE_SLOW_APP = """
import asyncio, sys
from aiohttp import web
from services.runner import serve

async def slow(_):
    await asyncio.sleep(30)
    return web.Response(text="late")

app = web.Application()
app.router.add_get("/slow", slow)
asyncio.run(serve(app, "127.0.0.1", int(sys.argv[1]), name="test-service"))
"""


async def test_a_second_sigint_exits_at_once_with_one_line() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVE_SLOW_APP, str(port), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        await until_serving(port)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
            await asyncio.sleep(0.3)  # the request is in its handler, for 30 s
            proc.send_signal(signal.SIGINT)
            await asyncio.sleep(0.3)
            assert proc.returncode is None  # the first one waits for the request
            proc.send_signal(signal.SIGINT)
            async with asyncio.timeout(5):
                _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1
    assert err.decode().strip() == (
        "test-service: interrupted twice, exiting without finishing the stop")
