"""Start one service in this process: settings, logging, then the aiohttp app.

SIGTERM or SIGINT stops it gracefully: the listening socket closes without
resetting a connection still waiting in the kernel's accept queue
(``shared.listener``), a connection accepted just before the stop gets a moment
for its request to arrive, requests in progress get ``SHUTDOWN_TIMEOUT`` to
finish, then the app's own shutdown runs (consumers finish their current
message, relays give back their claim).
"""

from __future__ import annotations

import asyncio
import importlib
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
        asyncio.run(serve(app, settings.host, port))
    except ListenError as exc:
        print(f"interlude {service}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    raise SystemExit(0)


class ListenError(Exception):
    """The service's address could not be listened on (in use, say)."""


async def serve(app: web.Application, host: str, port: int) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then stop as the module says."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    assert runner.server is not None  # setup() made it
    try:
        listener = DrainingListener(runner.server, host, port)
        try:
            await listener.start()
        except OSError as exc:
            raise ListenError(f"cannot listen on {host}:{port}: "
                              f"{exc.strerror or exc}") from None
        try:
            await stop.wait()
        finally:
            taken = await listener.close()
        log.info("stopping", queued_connections_taken=taken)
        await asyncio.sleep(max(0.0, listener.last_accept + FIRST_REQUEST_GRACE
                                - time.monotonic()))
    finally:
        await runner.cleanup()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
