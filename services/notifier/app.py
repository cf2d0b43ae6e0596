"""The notifier's app factory: wiring only, no I/O.

The database pool, the outbox relay, the delivery worker, the event consumer
and the scheduler live in cleanup contexts: they start with the app and stop,
in reverse order, when it shuts down (aiohttp's graceful shutdown on SIGTERM):
the scheduler first, then the consumer after the messages in hand, then the
deliveries in flight, then the relay. The consumer and the scheduler take "now"
from the injected clock; delivery retries run on the database's clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import datetime

import aiohttp
import asyncpg
import structlog
from aiohttp import web

from services.notifier.channels_routes import (
    CHANNELS,
    CONTEXT,
    DELIVERIES,
    ChannelsContext,
    setup_channel_routes,
)
from services.notifier.channels_store import ChannelStore
from services.notifier.consumer import EventConsumer, utc_clock
from services.notifier.deliveries_store import DeliveryStore
from services.notifier.delivery import DeliveryLimits, DeliveryWorker, RetryPolicy
from services.notifier.mail import Mailer
from services.notifier.routes import STORE, setup_routes
from services.notifier.scheduler import DEFAULT_INTERVAL_SECONDS, Scheduler
from services.notifier.scheduler_store import SchedulerStore
from services.notifier.secret_box import SecretBox
from services.notifier.senders import EMAIL, WEBHOOK, Sender
from services.notifier.store import NOTIFIER_OUTBOX, NotifierStore
from services.notifier.webhooks import PublicOnlyResolver, WebhookSender
from shared.amqp import Publisher
from shared.amqp_consume import ConsumerState
from shared.db import check_database, create_pool
from shared.outbox import OutboxRelay
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
PUBLISHER: web.AppKey[Publisher] = web.AppKey("notifier_publisher", Publisher)
RELAY: web.AppKey[OutboxRelay] = web.AppKey("notifier_relay", OutboxRelay)
RELAY_TASK: web.AppKey[asyncio.Task[None]] = web.AppKey("notifier_relay_task")
RETRY_POLICY: web.AppKey[RetryPolicy] = web.AppKey("notifier_retry_policy", RetryPolicy)
DELIVERY_LIMITS: web.AppKey[DeliveryLimits] = web.AppKey("notifier_delivery_limits",
                                                         DeliveryLimits)
DELIVERY_WORKER: web.AppKey[DeliveryWorker] = web.AppKey("notifier_delivery_worker",
                                                         DeliveryWorker)
DELIVERY_TASK: web.AppKey[asyncio.Task[None]] = web.AppKey("notifier_delivery_task")
MAX_BODY_BYTES = 64 * 1024


def create_app(settings: Settings, *, clock: Callable[[], datetime] | None = None,
               scheduler_interval: float = DEFAULT_INTERVAL_SECONDS,
               retry: RetryPolicy | None = None,
               delivery_limits: DeliveryLimits | None = None) -> web.Application:
    """The notifier app for ``settings``; connects to nothing until it starts.

    ``clock`` (default: the real UTC clock) is "now" for the consumer's planning
    and the scheduler's ticks; the scheduler ticks every ``scheduler_interval`` s.
    ``retry`` and ``delivery_limits`` tune the delivery worker (tests shorten the
    backoff; the defaults are production's).
    """
    app = web.Application(client_max_size=MAX_BODY_BYTES,
                          middlewares=[error_middleware,
                                       internal_auth_middleware(settings.internal_key)])
    app[SETTINGS] = settings
    app[CLOCK] = clock or utc_clock
    app[SCHEDULER_INTERVAL] = scheduler_interval
    app[CONSUMER_STATE] = ConsumerState()
    app[RETRY_POLICY] = retry or RetryPolicy()
    app[DELIVERY_LIMITS] = delivery_limits or DeliveryLimits()
    box = SecretBox(settings.internal_key)
    mailer = Mailer(settings.smtp, settings.public_url) if settings.smtp else None
    app[CONTEXT] = ChannelsContext(box=box, mailer=mailer, production=settings.is_production)
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_relay)
    app.cleanup_ctx.append(_deliveries)
    app.cleanup_ctx.append(_consumer)
    app.cleanup_ctx.append(_scheduler)
    add_health_routes(app, _ready_problems)
    setup_routes(app)
    setup_channel_routes(app)
    return app


async def _database(app: web.Application) -> AsyncIterator[None]:
    pool = await create_pool(app[SETTINGS].database_url)
    app[DB_POOL] = pool
    # The consumer's alerts wake this process's relay directly after their commit
    # (no NOTIFY through Postgres; until the relay runs, its polling finds them).
    app[STORE] = NotifierStore(pool, wake_relay=lambda: _wake_relay(app))
    app[CHANNELS] = ChannelStore(pool)
    app[DELIVERIES] = DeliveryStore(pool)
    try:
        yield
    finally:
        await pool.close()


def _wake_relay(app: web.Application) -> None:
    relay = app.get(RELAY)
    if relay is not None:
        relay.wake()


def _log_task_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task stopped unexpectedly", task=task.get_name(),
                  exc_info=task.exception())


async def _relay(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    publisher = Publisher(settings.amqp_url)
    app[PUBLISHER] = publisher
    relay = OutboxRelay(app[DB_POOL], publisher, settings.database_url,
                        settings.outbox_poll_seconds, NOTIFIER_OUTBOX)
    app[RELAY] = relay
    task = asyncio.create_task(relay.run(), name="notifier-outbox-relay")
    task.add_done_callback(_log_task_end)
    app[RELAY_TASK] = task
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait([task])
        await publisher.close()


async def _deliveries(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    limits = app[DELIVERY_LIMITS]
    # Bounded overall and per endpoint host; redirects and cookies play no part.
    # In production webhooks may only reach public addresses, checked on every
    # connect (a name can be re-pointed after the channel was added).
    resolver = PublicOnlyResolver() if settings.is_production else None
    connector = aiohttp.TCPConnector(limit=limits.concurrency,
                                     limit_per_host=limits.per_host, resolver=resolver)
    async with aiohttp.ClientSession(connector=connector,
                                     cookie_jar=aiohttp.DummyCookieJar()) as session:
        senders: dict[str, Sender] = {
            WEBHOOK: WebhookSender(session, app[CONTEXT].box, timeout=settings.webhook_timeout)}
        mailer = app[CONTEXT].mailer
        if mailer is not None:
            senders[EMAIL] = mailer
        worker = DeliveryWorker(app[DELIVERIES], senders, settings.database_url,
                                retry=app[RETRY_POLICY], limits=limits)
        app[DELIVERY_WORKER] = worker
        task = asyncio.create_task(worker.run(), name="notifier-deliveries")
        task.add_done_callback(_log_task_end)
        app[DELIVERY_TASK] = task
        try:
            yield
        finally:
            await worker.stop(task)


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
    relay = app.get(RELAY_TASK)
    if relay is None or relay.done():
        problems["outbox_relay"] = "not running"
    elif not app[RELAY].state.listening:
        problems["outbox_relay"] = "not listening for outbox notifications"
    deliveries = app.get(DELIVERY_TASK)
    if deliveries is None or deliveries.done():
        problems["deliveries"] = "not running"
    elif not app[DELIVERY_WORKER].state.listening:
        problems["deliveries"] = "not listening for new deliveries"
    return problems
