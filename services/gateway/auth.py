"""Bearer-token authentication of every gateway route but the public few."""

from __future__ import annotations

from datetime import UTC, datetime

import structlog
from aiohttp import web

from services.gateway.store import InvalidToken
from services.gateway.stream import STREAM_PATH
from services.gateway.typedefs import CALLER, STORE
from shared.internal_auth import Identity
from shared.web import REQUEST_ID, ApiError, Handler

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/v1/enroll", "/v1/auth/login",
                          "/v1/auth/refresh"})
# Authenticates itself: a browser cannot set headers on a WebSocket (docs/stream.md).
SELF_AUTHENTICATING_PATHS = frozenset({STREAM_PATH})


def bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "sign in first: missing bearer token",
                       headers={"WWW-Authenticate": "Bearer"})
    return token.strip()


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS or request.path in SELF_AUTHENTICATING_PATHS:
        return await handler(request)
    token = bearer_token(request)
    try:
        caller = await request.app[STORE].caller_for_access_token(token, datetime.now(UTC))
    except InvalidToken:
        raise ApiError(401, "unauthorized", "access token is invalid or expired; refresh it",
                       headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}) from None
    request[CALLER] = caller
    structlog.contextvars.bind_contextvars(user_id=str(caller.account.id))
    try:
        return await handler(request)
    finally:
        structlog.contextvars.unbind_contextvars("user_id")


def identity_for(request: web.Request) -> Identity:
    account = request[CALLER].account
    return Identity(user_id=account.id, role=account.role, request_id=request[REQUEST_ID])
