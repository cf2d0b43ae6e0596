"""Start one service in this process: settings, logging, then the aiohttp app.

The address is listened on before the app starts (a port in use is one line
on stderr and exit 1). SIGTERM or SIGINT stops it gracefully: the listening
socket closes without resetting a connection that was queued on it or still
in its handshake (``shared.listener``), a connection accepted just before the
stop gets a moment for its request to arrive, requests in progress get
``SHUTDOWN_TIMEOUT`` to finish, then the app's own shutdown runs (consumers
finish their current message, relays give back their claim). A second SIGINT
stops at once, with exit 1.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import sys
import time
from typing import NoReturn

import structlog
from aiohttp import web

from shared.listener import DrainingListener
from shared.logging import configure_logging
from shared.settings import Settings, SettingsError, load_settings

SERVICES = ("gateway", "messaging", "notifier")
# Requests already accepted get this long to finish after SIGTERM.
SHUTDOWN_TIMEOUT = 15.0
# An idle keep-alive connection (or one that never sends a request) is closed
# after this long (aiohttp's run_app default; AppRunner's own is an hour).
KEEPALIVE_TIMEOUT = 75.0
# A connection accepted this recently when the stop comes may not have sent its
# request yet: it is given the rest of this time before idle connections close.
FIRST_REQUEST_GRACE = 0.5

log = structlog.get_logger(__name__)


def port_of(settings: Settings, service: str) -> int:
    ports = {"gateway": settings.gateway_port, "messaging": settings.messaging_port,
             "notifier": settings.notifier_port}
    return ports[service]


def load_or_exit(prog: str) -> Settings:
    """Settings from the environment, or one clear line on stderr and exit 2."""
    try:
        return load_settings()
    except SettingsError as exc:
        print(f"{prog}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run_service(service: str) -> NoReturn:
    settings = load_or_exit(f"interlude {service}")
    configure_logging(service, settings.log_format)
    module = importlib.import_module(f"services.{service}.app")
    app: web.Application = module.create_app(settings)
    port = port_of(settings, service)
    log.info("starting", host=settings.host, port=port, env=settings.env)
    try:
        asyncio.run(serve(app, settings.host, port, name=f"interlude {service}"))
    except ListenError as exc:
        print(f"interlude {service}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    raise SystemExit(0)


class ListenError(Exception):
    """The service's address could not be listened on (in use, say)."""


async def serve(app: web.Application, host: str, port: int, *,
                keepalive_timeout: float = KEEPALIVE_TIMEOUT, name: str = "interlude") -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then stop as the module says.

    The address is taken before the app starts, so a port in use fails at once
    (``ListenError``); connections that come while it starts wait in the queue.
    A second SIGINT ends the process at once: one line on stderr, exit 1."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: signal.Signals) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            print(f"{name}: interrupted twice, exiting without finishing the stop",
                  file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)
        stop.set()

    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           keepalive_timeout=keepalive_timeout,
                           shutdown_timeout=SHUTDOWN_TIMEOUT)
    listener = DrainingListener(lambda: _server_of(runner)(), host, port)
    try:
        await listener.bind()
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        try:
            await runner.setup()
        except BaseException:
            await listener.close(drain=False)
            raise
        try:
            try:
                if not stop.is_set():
                    listener.start()
                    await stop.wait()
            finally:
                taken = await listener.close()
            log.info("stopping", queued_connections_taken=taken)
            await asyncio.sleep(max(0.0, listener.last_accept + FIRST_REQUEST_GRACE
                                    - time.monotonic()))
        finally:
            await runner.cleanup()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def _server_of(runner: web.AppRunner) -> web.Server:
    if runner.server is None:
        raise RuntimeError("the app runner is not set up")
    return runner.server
