"""The messaging service's application factory. No I/O happens here."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from services.messaging.boundaries_routes import setup_boundary_routes
from services.messaging.boundaries_store import BoundariesStore
from services.messaging.relay import messaging_relay
from services.messaging.routes import setup_routes
from services.messaging.store import MessagingStore
from services.messaging.submission import CheckinPeriods
from services.messaging.typedefs import (
    BOUNDARIES,
    CHECKIN_PERIODS,
    POOL,
    PUBLISHER,
    RELAY,
    RELAY_TASK,
    SETTINGS,
    STORE,
)
from shared.amqp import Publisher
from shared.db import check_database, create_pool
from shared.settings import Settings
from shared.web import add_health_routes, error_middleware, internal_auth_middleware

MAX_BODY_BYTES = 256 * 1024


async def _database(app: web.Application) -> AsyncIterator[None]:
    pool = await create_pool(app[SETTINGS].database_url, max_size=10)
    app[POOL] = pool
    app[STORE] = MessagingStore(pool)
    app[CHECKIN_PERIODS] = CheckinPeriods()
    app[BOUNDARIES] = BoundariesStore(pool)
    yield
    await pool.close()


async def _relay(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    publisher = Publisher(settings.amqp_url)
    app[PUBLISHER] = publisher
    relay = messaging_relay(app[POOL], publisher, settings.database_url,
                            settings.outbox_poll_seconds)
    app[RELAY] = relay
    app[RELAY_TASK] = asyncio.create_task(relay.run(), name="outbox-relay")
    yield
    app[RELAY_TASK].cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await app[RELAY_TASK]
    await publisher.close()


async def _ready(app: web.Application) -> dict[str, str]:
    problems: dict[str, str] = {}
    try:
        await check_database(app[POOL])
    except Exception as exc:
        problems["database"] = exc.__class__.__name__
    if not app[RELAY].state.listening:
        problems["database_listen"] = "not listening"
    try:
        await app[PUBLISHER].check()
    except Exception as exc:  # readiness reports any failure to reach the broker
        problems["broker"] = exc.__class__.__name__
    return problems


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[error_middleware, internal_auth_middleware(settings.internal_key)],
    )
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_relay)
    add_health_routes(app, _ready)
    setup_routes(app)
    setup_boundary_routes(app)
    return app
