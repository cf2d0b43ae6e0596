"""The notifier's app factory: wiring only, no I/O.

The database pool and the event consumer live in cleanup contexts: they start
with the app and stop, in reverse order, when it shuts down (aiohttp's graceful
shutdown on SIGTERM), the consumer first, after the message in hand.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import structlog
from aiohttp import web

from services.notifier.consumer import EventConsumer
from services.notifier.routes import STORE, setup_routes
from services.notifier.store import NotifierStore
from shared.amqp import ConsumerState
from shared.db import check_database, create_pool
from shared.settings import Settings
from shared.web import add_health_routes, error_middleware, internal_auth_middleware

log = structlog.get_logger(__name__)

SETTINGS: web.AppKey[Settings] = web.AppKey("notifier_settings", Settings)
DB_POOL: web.AppKey[asyncpg.Pool] = web.AppKey("notifier_db_pool", asyncpg.Pool)
CONSUMER_STATE: web.AppKey[ConsumerState] = web.AppKey("notifier_consumer_state", ConsumerState)
CONSUMER_TASK: web.AppKey[asyncio.Task[None]] = web.AppKey("notifier_consumer_task")


def create_app(settings: Settings) -> web.Application:
    """The notifier app for ``settings``; connects to nothing until it starts."""
    app = web.Application(middlewares=[error_middleware,
                                       internal_auth_middleware(settings.internal_key)])
    app[SETTINGS] = settings
    app[CONSUMER_STATE] = ConsumerState()
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_consumer)
    add_health_routes(app, _ready_problems)
    setup_routes(app)
    return app


async def _database(app: web.Application) -> AsyncIterator[None]:
    pool = await create_pool(app[SETTINGS].database_url)
    app[DB_POOL] = pool
    app[STORE] = NotifierStore(pool)
    try:
        yield
    finally:
        await pool.close()


def _log_consumer_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("event consumer stopped unexpectedly", exc_info=task.exception())


async def _consumer(app: web.Application) -> AsyncIterator[None]:
    consumer = EventConsumer(app[STORE], app[CONSUMER_STATE])
    task = asyncio.create_task(consumer.run(app[SETTINGS].amqp_url), name="notifier-consumer")
    task.add_done_callback(_log_consumer_end)
    app[CONSUMER_TASK] = task
    try:
        yield
    finally:
        await consumer.stop(task)


async def _ready_problems(app: web.Application) -> dict[str, str]:
    problems: dict[str, str] = {}
    try:
        await check_database(app[DB_POOL])
    except Exception as exc:  # readiness reports any failure, whatever its kind
        problems["database"] = f"unreachable ({exc.__class__.__name__})"
    task = app.get(CONSUMER_TASK)
    if task is None or task.done():
        problems["consumer"] = "not running"
    elif not app[CONSUMER_STATE].connected:
        problems["consumer"] = "not connected to the broker"
    return problems
