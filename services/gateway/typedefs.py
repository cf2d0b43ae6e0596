"""Typed application state of the gateway."""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg
from aiohttp import web

from services.gateway.ratelimit import FailureLimiter
from services.gateway.store import Caller, GatewayStore
from services.gateway.upstream import Upstream
from shared.settings import Settings

if TYPE_CHECKING:
    from services.gateway.stream_hub import StreamHub

SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
POOL: web.AppKey[asyncpg.Pool] = web.AppKey("pool", asyncpg.Pool)
STORE: web.AppKey[GatewayStore] = web.AppKey("store", GatewayStore)
MESSAGING: web.AppKey[Upstream] = web.AppKey("messaging", Upstream)
NOTIFIER: web.AppKey[Upstream] = web.AppKey("notifier", Upstream)
LIMITER: web.AppKey[FailureLimiter] = web.AppKey("limiter", FailureLimiter)
CALLER: web.RequestKey[Caller] = web.RequestKey("caller", Caller)
# The stream modules import this one; its hub is known here by name only.
STREAM_HUB: web.AppKey[StreamHub] = web.AppKey("stream_hub")
