"""Typed application state of the messaging service."""

from __future__ import annotations

import asyncio

import asyncpg
from aiohttp import web

from services.messaging.boundaries_store import BoundariesStore
from services.messaging.store import MessagingStore
from services.messaging.submission import CheckinPeriods
from shared.amqp import Publisher
from shared.outbox import OutboxRelay
from shared.settings import Settings

SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
POOL: web.AppKey[asyncpg.Pool] = web.AppKey("pool", asyncpg.Pool)
STORE: web.AppKey[MessagingStore] = web.AppKey("store", MessagingStore)
BOUNDARIES: web.AppKey[BoundariesStore] = web.AppKey("boundaries", BoundariesStore)
PUBLISHER: web.AppKey[Publisher] = web.AppKey("publisher", Publisher)
RELAY: web.AppKey[OutboxRelay] = web.AppKey("relay", OutboxRelay)
RELAY_TASK: web.AppKey[asyncio.Task[None]] = web.AppKey("relay_task", asyncio.Task)
CHECKIN_PERIODS: web.AppKey[CheckinPeriods] = web.AppKey("checkin_periods", CheckinPeriods)
