"""Start one service in this process: settings, logging, then the aiohttp app."""

from __future__ import annotations

import importlib
import sys
from typing import NoReturn

import structlog
from aiohttp import web

from shared.logging import configure_logging
from shared.settings import Settings, SettingsError, load_settings

SERVICES = ("gateway", "messaging", "notifier")
# Requests already accepted get this long to finish after SIGTERM.
SHUTDOWN_TIMEOUT = 15.0


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
    structlog.get_logger(__name__).info("starting", host=settings.host, port=port,
                                        env=settings.env)
    web.run_app(app, host=settings.host, port=port, print=None,
                shutdown_timeout=SHUTDOWN_TIMEOUT, access_log=None)
    raise SystemExit(0)
