"""The notifier's app factory: wiring only, no I/O.

The database pool, the event consumer and the scheduler live in cleanup
contexts: they start with the app and stop, in reverse order, when it shuts
down (aiohttp's graceful shutdown on SIGTERM): the scheduler first, then the
consumer after the message in hand. Both take "now" from the injected clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import datetime

import asyncpg
import structlog
from aiohttp import web

from services.notifier.consumer import EventConsumer, utc_clock
from services.notifier.routes import STORE, setup_routes
from services.notifier.scheduler import DEFAULT_INTERVAL_SECONDS, Scheduler
from services.notifier.scheduler_store import SchedulerStore
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
CLOCK: web.AppKey[Callable[[], datetime]] = web.AppKey("notifier_clock")
SCHEDULER_INTERVAL: web.AppKey[float] = web.AppKey("notifier_scheduler_interval", float)
SCHEDULER: web.AppKey[Scheduler] = web.AppKey("notifier_scheduler", Scheduler)
SCHEDULER_TASK: web.AppKey[asyncio.Task[None]] = web.AppKey("notifier_scheduler_task")


def create_app(settings: Settings, *, clock: Callable[[], datetime] | None = None,
               scheduler_interval: float = DEFAULT_INTERVAL_SECONDS) -> web.Application:
    """The notifier app for ``settings``; connects to nothing until it starts.

    ``clock`` (default: the real UTC clock) is "now" for the consumer's planning
    and the scheduler's ticks; the scheduler ticks every ``scheduler_interval`` s.
    """
    app = web.Application(middlewares=[error_middleware,
                                       internal_auth_middleware(settings.internal_key)])
    app[SETTINGS] = settings
    app[CLOCK] = clock or utc_clock
    app[SCHEDULER_INTERVAL] = scheduler_interval
    app[CONSUMER_STATE] = ConsumerState()
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_consumer)
    app.cleanup_ctx.append(_scheduler)
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


def _log_task_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task stopped unexpectedly", task=task.get_name(),
                  exc_info=task.exception())


async def _consumer(app: web.Application) -> AsyncIterator[None]:
    consumer = EventConsumer(app[STORE], app[CONSUMER_STATE], clock=app[CLOCK])
    task = asyncio.create_task(consumer.run(app[SETTINGS].amqp_url), name="notifier-consumer")
    task.add_done_callback(_log_task_end)
    app[CONSUMER_TASK] = task
    try:
        yield
    finally:
        await consumer.stop(task)


async def _scheduler(app: web.Application) -> AsyncIterator[None]:
    scheduler = Scheduler(SchedulerStore(app[DB_POOL]), app[CLOCK],
                          interval=app[SCHEDULER_INTERVAL])
    app[SCHEDULER] = scheduler
    task = asyncio.create_task(scheduler.run(), name="notifier-scheduler")
    task.add_done_callback(_log_task_end)
    app[SCHEDULER_TASK] = task
    try:
        yield
    finally:
        # A pass cut short rolls back whole; the next start (or replica) redoes it.
        task.cancel()
        await asyncio.wait([task])


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
    scheduler = app.get(SCHEDULER_TASK)
    if scheduler is None or scheduler.done():
        problems["scheduler"] = "not running"
    return problems
