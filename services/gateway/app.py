"""The gateway's application factory. No I/O happens here."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from services.gateway.accounts import setup_account_routes
from services.gateway.auth import auth_middleware
from services.gateway.proxy import setup_proxy_routes
from services.gateway.ratelimit import FailureLimiter
from services.gateway.store import GatewayStore
from services.gateway.stream_hub import setup_stream
from services.gateway.typedefs import LIMITER, MESSAGING, NOTIFIER, POOL, SETTINGS, STORE
from services.gateway.upstream import Upstream
from shared.db import check_database, create_pool
from shared.settings import Settings
from shared.web import add_health_routes, error_middleware

# Envelopes are at most 160 kB, base64 makes that ~214 kB, plus JSON framing.
MAX_BODY_BYTES = 256 * 1024
LOGIN_FAILURES_ALLOWED = 10
LOGIN_WINDOW_SECONDS = 15 * 60


async def _database(app: web.Application) -> AsyncIterator[None]:
    pool = await create_pool(app[SETTINGS].database_url, max_size=10)
    app[POOL] = pool
    app[STORE] = GatewayStore(pool, token_cache_seconds=app[SETTINGS].token_cache_seconds)
    yield
    await pool.close()


async def _upstreams(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200))
    app[MESSAGING] = Upstream("messaging", settings.messaging_url, settings.internal_key,
                              session)
    app[NOTIFIER] = Upstream("notifier", settings.notifier_url, settings.internal_key, session)
    yield
    await session.close()


async def _ready(app: web.Application) -> dict[str, str]:
    problems: dict[str, str] = {}
    try:
        await check_database(app[POOL])
    except Exception as exc:
        problems["database"] = exc.__class__.__name__
    for upstream in (app[MESSAGING], app[NOTIFIER]):
        if not await upstream.ready():
            problems[upstream.name] = "unreachable"
    return problems


def create_app(settings: Settings) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES,
                          middlewares=[error_middleware, auth_middleware])
    app[SETTINGS] = settings
    app[LIMITER] = FailureLimiter(LOGIN_FAILURES_ALLOWED, LOGIN_WINDOW_SECONDS)
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_upstreams)
    add_health_routes(app, _ready)
    setup_account_routes(app)
    setup_proxy_routes(app)
    # Last cleanup context: its consumer stops first, before the pool closes.
    setup_stream(app)
    return app
