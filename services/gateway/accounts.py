"""Enrollment, login, token refresh, logout and the caller's own account."""

from __future__ import annotations

import re
import unicodedata
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

import structlog
from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr

from services.gateway.passwords import (
    MAX_PASSWORD_LENGTH,
    MIN_PASSWORD_LENGTH,
    hash_password,
    verify_password,
)
from services.gateway.store import (
    Account,
    CodeUsed,
    EmailMismatch,
    EmailTaken,
    InvalidCode,
    InvalidToken,
    TokenReused,
    Tokens,
)
from services.gateway.typedefs import CALLER, LIMITER, MESSAGING, SETTINGS, STORE
from shared.internal_auth import SYSTEM_USER, Identity
from shared.web import REQUEST_ID, ApiError, read_model

log = structlog.get_logger(__name__)
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$")


def _email(value: str) -> str:
    value = value.strip()
    if len(value) > 254 or not _EMAIL.match(value):
        raise ValueError("not an email address")
    return value


def _name(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    if any(unicodedata.category(ch).startswith("C") for ch in value):
        raise ValueError("must not contain control characters")
    return value


def _password(value: str) -> str:
    if len(value) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"must be at least {MIN_PASSWORD_LENGTH} characters")
    return value


Email = Annotated[StrictStr, AfterValidator(_email)]
Name = Annotated[StrictStr, Field(max_length=100), AfterValidator(_name)]
Password = Annotated[StrictStr, Field(max_length=MAX_PASSWORD_LENGTH), AfterValidator(_password)]
Code = Annotated[StrictStr, Field(min_length=4, max_length=64)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EnrollBody(_Body):
    code: Code
    email: Email
    password: Password
    display_name: Name


class LoginBody(_Body):
    email: Email
    password: Annotated[StrictStr, Field(min_length=1, max_length=MAX_PASSWORD_LENGTH)]


class RefreshBody(_Body):
    refresh_token: Annotated[StrictStr, Field(min_length=1, max_length=256)]


def account_json(account: Account) -> dict[str, Any]:
    return {"id": str(account.id), "email": account.email,
            "display_name": account.display_name, "role": account.role}


def _session_json(account: Account, tokens: Tokens, **extra: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {"user": account_json(account), "access_token": tokens.access_token,
            "refresh_token": tokens.refresh_token, "token_type": "Bearer",
            "expires_in": int((tokens.access_expires_at - now).total_seconds()), **extra}


def _peer(request: web.Request) -> str:
    """The client's address: the connecting one, or, behind N trusted proxies, the
    address the outermost of them saw (the Nth entry of X-Forwarded-For from the
    right). Entries further left are written by the client and never trusted."""
    hops = request.app[SETTINGS].trusted_proxy_hops
    if hops:
        forwarded = [part.strip() for part in
                     ",".join(request.headers.getall("X-Forwarded-For", [])).split(",")
                     if part.strip()]
        if len(forwarded) >= hops:
            return forwarded[-hops]
    return request.remote or "unknown"


def _check_limit(request: web.Request, *keys: str) -> None:
    limiter = request.app[LIMITER]
    wait = max(limiter.retry_after(k) for k in keys)
    if wait:
        raise ApiError(429, "rate_limited", f"too many failed attempts; try again in {wait} s",
                       headers={"Retry-After": str(wait)})


async def enroll(request: web.Request) -> web.Response:
    limit_key = f"enroll:{_peer(request)}"
    _check_limit(request, limit_key)
    body = await read_model(request, EnrollBody)
    store = request.app[STORE]
    now = datetime.now(UTC)
    try:
        if await store.has_therapist_code(body.code):
            password_hash = await hash_password(body.password)
            account, tokens = await store.enroll_therapist(
                body.code, body.email, body.display_name, password_hash, now)
            log.info("therapist enrolled", account_id=str(account.id))
            return web.json_response(_session_json(account, tokens, relationship_id=None),
                                     status=201)
        if await store.email_in_use(body.email):
            raise EmailTaken(body.email)
        system = Identity(SYSTEM_USER, "system", request[REQUEST_ID])
        redeemed = await request.app[MESSAGING].call(
            "POST", "/internal/invites/redeem", system, payload={"code": body.code})
        if redeemed.status == 404:
            raise InvalidCode()
        if redeemed.status == 410:
            raise ApiError(410, "code_expired", redeemed.data["error"]["message"], field="code")
        if redeemed.status != 200:
            raise ApiError(502, "upstream_error", "could not check the code")
        client_id = uuid.UUID(redeemed.data["client_id"])
        if await store.account_exists(client_id):
            raise CodeUsed()
        password_hash = await hash_password(body.password)
        account, tokens = await store.create_client(client_id, body.email, body.display_name,
                                                    password_hash, now)
        log.info("client enrolled", account_id=str(account.id),
                 relationship_id=redeemed.data["relationship_id"])
        return web.json_response(
            _session_json(account, tokens, relationship_id=redeemed.data["relationship_id"]),
            status=201)
    except InvalidCode:
        request.app[LIMITER].failed(limit_key)
        raise ApiError(400, "invalid_code", "this enrollment code is not valid",
                       field="code") from None
    except CodeUsed:
        request.app[LIMITER].failed(limit_key)
        raise ApiError(409, "code_used", "this enrollment code has already been used",
                       field="code") from None
    except EmailMismatch:
        raise ApiError(422, "email_mismatch",
                       "use the email address this code was issued for", field="email") from None
    except EmailTaken:
        raise ApiError(409, "email_taken", "an account with this email already exists",
                       field="email") from None


async def login(request: web.Request) -> web.Response:
    body = await read_model(request, LoginBody)
    email_key, peer_key = f"login:{body.email.lower()}", f"login-ip:{_peer(request)}"
    _check_limit(request, email_key, peer_key)
    store = request.app[STORE]
    account = await store.account_by_email(body.email)
    active = account is not None and account.status == "active"
    stored_hash = account.password_hash if account is not None and active else None
    if not await verify_password(stored_hash, body.password) or account is None:
        limiter = request.app[LIMITER]
        limiter.failed(email_key)
        limiter.failed(peer_key)
        log.info("login failed")
        raise ApiError(401, "invalid_credentials", "email or password is wrong")
    request.app[LIMITER].succeeded(email_key)
    tokens = await store.start_session(account.id, datetime.now(UTC))
    log.info("login", account_id=str(account.id))
    return web.json_response(_session_json(account, tokens))


async def refresh(request: web.Request) -> web.Response:
    limit_key = f"refresh:{_peer(request)}"
    _check_limit(request, limit_key)
    body = await read_model(request, RefreshBody)
    try:
        account, tokens = await request.app[STORE].refresh(body.refresh_token, datetime.now(UTC))
    except TokenReused:
        log.warning("refresh token reused; session revoked")
        raise ApiError(401, "session_revoked", "this refresh token was already used; the "
                       "session has been ended for safety. Sign in again.") from None
    except InvalidToken:
        request.app[LIMITER].failed(limit_key)
        raise ApiError(401, "invalid_token", "refresh token is invalid or expired; "
                       "sign in again") from None
    return web.json_response(_session_json(account, tokens))


async def logout(request: web.Request) -> web.Response:
    caller = request[CALLER]
    await request.app[STORE].revoke_session(caller.session_id, "logout", datetime.now(UTC))
    log.info("logout", account_id=str(caller.account.id))
    return web.Response(status=204)


async def me(request: web.Request) -> web.Response:
    return web.json_response({"user": account_json(request[CALLER].account)})


def setup_account_routes(app: web.Application) -> None:
    app.router.add_post("/v1/enroll", enroll)
    app.router.add_post("/v1/auth/login", login)
    app.router.add_post("/v1/auth/refresh", refresh)
    app.router.add_post("/v1/auth/logout", logout)
    app.router.add_get("/v1/me", me)
