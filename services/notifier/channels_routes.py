"""The notifier's internal API for delivery channels and their deliveries.

The gateway calls it on behalf of a logged-in user; every route answers for the
signed caller only, and someone else's channel is "not found". A verification
code and a webhook secret are shown once (the code by email, the secret in the
answer that creates or rotates it) and stored only hashed or sealed.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import structlog
from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr

from services.notifier.channels_store import (
    MAX_CHANNELS_PER_USER,
    Channel,
    ChannelExists,
    ChannelNotFound,
    ChannelStore,
    CodeExpired,
    CodeSentRecently,
    CodeWrong,
    NotAnEmailChannel,
    NotAWebhookChannel,
    TooManyAttempts,
    TooManyChannels,
)
from services.notifier.deliveries_store import STATES, Delivery, DeliveryStore
from services.notifier.mail import Mailer, check_address, code_message
from services.notifier.secret_box import SecretBox, new_secret
from services.notifier.senders import SMTP_HOST_KEY, DeliveryFailed
from services.notifier.store import (
    CHECKIN_RECEIVED,
    DIGEST,
    KINDS,
    REMINDER_REPLY_DUE,
    REPLY_RECEIVED,
)
from services.notifier.unavailable import StoreUnavailable, reachable
from services.notifier.webhooks import BadWebhookUrl, check_url
from shared.web import ApiError, identity_of, parse_model, parse_uuid, query_int, read_json

log = structlog.get_logger(__name__)

CODE_TTL_SECONDS = 30 * 60
CODE_RESEND_SECONDS = 60
# The code email is sent while the caller waits, inside the gateway's own 10 s
# upstream timeout; a slower relay means "not sent, ask again" (code_sent false).
INLINE_SEND_SECONDS = 6.0
DEFAULT_DELIVERIES = 50
MAX_DELIVERIES = 200
# What a new channel gets when no kinds are given: what the caller's role receives.
DEFAULT_KINDS = {
    "therapist": (CHECKIN_RECEIVED, DIGEST, REMINDER_REPLY_DUE),
    "client": (REPLY_RECEIVED,),
}


@dataclass(frozen=True, slots=True)
class ChannelsContext:
    """What the channel routes need besides the stores."""

    box: SecretBox
    mailer: Mailer | None          # None: no SMTP relay, so no email channels
    production: bool


CHANNELS: web.AppKey[ChannelStore] = web.AppKey("notifier_channels", ChannelStore)
DELIVERIES: web.AppKey[DeliveryStore] = web.AppKey("notifier_deliveries", DeliveryStore)
CONTEXT: web.AppKey[ChannelsContext] = web.AppKey("notifier_channels_context", ChannelsContext)

Kind = Literal["checkin.received", "reply.received", "digest", "reminder.reply_due"]
Kinds = Annotated[list[Kind], Field(max_length=len(KINDS))]


def _address(value: str) -> str:
    return check_address(value)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NewEmailChannel(_Body):
    type: Literal["email"]
    address: Annotated[StrictStr, Field(max_length=254), AfterValidator(_address)]
    kinds: Kinds | None = None


class NewWebhookChannel(_Body):
    type: Literal["webhook"]
    url: Annotated[StrictStr, Field(min_length=1, max_length=2048)]
    kinds: Kinds | None = None


class VerifyBody(_Body):
    code: Annotated[StrictStr, Field(min_length=1, max_length=32)]


class KindsBody(_Body):
    kinds: Kinds


def channel_json(channel: Channel) -> dict[str, Any]:
    target = {"address": channel.address} if channel.type == "email" else {"url": channel.url}
    return {
        "id": str(channel.id),
        "type": channel.type,
        **target,
        "verified": channel.verified_at is not None,
        "kinds": list(channel.kinds),
        "created_at": channel.created_at.isoformat(),
    }


def delivery_json(delivery: Delivery) -> dict[str, Any]:
    next_at = delivery.next_attempt_at
    return {
        "id": str(delivery.id),
        "channel_id": str(delivery.channel_id),
        "notification_id": str(delivery.notification_id),
        "state": delivery.state,
        "attempts": delivery.attempts,
        "last_error": delivery.last_error,
        "next_attempt_at": next_at.isoformat() if next_at is not None else None,
        "created_at": delivery.created_at.isoformat(),
        "updated_at": delivery.updated_at.isoformat(),
    }


def _kinds(kinds: Sequence[str] | None, role: str) -> list[str]:
    if kinds is None:
        return list(DEFAULT_KINDS.get(role, KINDS))
    return [k for k in KINDS if k in kinds]  # de-duplicated, in a fixed order


@contextlib.asynccontextmanager
async def _store() -> AsyncIterator[None]:
    """Domain errors of the channel stores, as the HTTP answers they stand for."""
    try:
        async with reachable():
            yield
    except StoreUnavailable:
        raise ApiError(503, "unavailable", "the notification store is unavailable; try again",
                       headers={"Retry-After": "1"}) from None
    except ChannelNotFound:
        raise ApiError(404, "not_found", "no such channel") from None
    except ChannelExists:
        raise ApiError(409, "conflict", "you already have a channel to this address") from None
    except TooManyChannels:
        raise ApiError(409, "too_many_channels",
                       f"at most {MAX_CHANNELS_PER_USER} channels; remove one first") from None
    except NotAnEmailChannel:
        raise ApiError(409, "not_email", "only email channels have codes") from None
    except NotAWebhookChannel:
        raise ApiError(409, "not_webhook", "only webhook channels have secrets") from None


def _new_code() -> str:
    return f"{secrets.randbelow(10**6):06d}"


async def _send_code(ctx: ChannelsContext, address: str, code: str) -> bool:
    assert ctx.mailer is not None
    try:
        async with asyncio.timeout(INLINE_SEND_SECONDS):
            await ctx.mailer.send_message(code_message(ctx.mailer.sender, address, code,
                                                       CODE_TTL_SECONDS // 60))
    except DeliveryFailed as exc:
        log.warning("verification email not sent", reason=exc.reason)
        return False
    except TimeoutError:
        log.warning("verification email not sent", reason="the SMTP relay was too slow")
        return False
    return True


async def list_channels(request: web.Request) -> web.Response:
    """``GET /v1/channels``: the caller's channels."""
    caller = identity_of(request)
    async with _store():
        channels = await request.app[CHANNELS].list(caller.user_id)
    return web.json_response({"items": [channel_json(c) for c in channels]})


async def add_channel(request: web.Request) -> web.Response:
    """``POST /v1/channels``: an email channel (a code is mailed to it) or a webhook
    channel (the answer carries its secret, once)."""
    caller = identity_of(request)
    ctx = request.app[CONTEXT]
    data = await read_json(request)
    kind = data.get("type") if isinstance(data, dict) else None
    channel_id = uuid.uuid4()
    if kind == "email":
        email = parse_model(NewEmailChannel, data)
        if ctx.mailer is None:
            raise ApiError(422, "invalid", "email channels are not available: this server has"
                           " no SMTP relay configured", field="type")
        code = _new_code()
        try:
            async with _store():
                channel = await request.app[CHANNELS].add_email(
                    channel_id, caller.user_id, email.address, _kinds(email.kinds, caller.role),
                    ctx.box.code_hash(channel_id, code), CODE_TTL_SECONDS, SMTP_HOST_KEY)
        except CodeSentRecently as exc:
            raise ApiError(429, "rate_limited", "too many new email addresses in the last hour;"
                           " try again later",
                           headers={"Retry-After": str(exc.retry_after)}) from None
        sent = await _send_code(ctx, email.address, code)
        log.info("email channel added", channel_id=str(channel.id), code_sent=sent)
        return web.json_response({"channel": channel_json(channel), "code_sent": sent},
                                 status=201)
    if kind == "webhook":
        hook = parse_model(NewWebhookChannel, data)
        try:
            url, host = check_url(hook.url, production=ctx.production)
        except BadWebhookUrl as exc:
            raise ApiError(422, "invalid", f"field 'url': {exc}", field="url") from None
        secret = new_secret()
        async with _store():
            channel = await request.app[CHANNELS].add_webhook(
                channel_id, caller.user_id, url, host, _kinds(hook.kinds, caller.role),
                ctx.box.seal(channel_id, secret))
        log.info("webhook channel added", channel_id=str(channel.id))
        return web.json_response({"channel": channel_json(channel), "secret": secret},
                                 status=201)
    raise ApiError(422, "invalid", "field 'type': must be 'email' or 'webhook'", field="type")


async def verify_channel(request: web.Request) -> web.Response:
    """``POST /v1/channels/{id}/verify``: confirm an email channel with its code."""
    caller = identity_of(request)
    channel_id = parse_uuid(request.match_info["channel_id"], "channel")
    body = parse_model(VerifyBody, await read_json(request))
    box = request.app[CONTEXT].box
    try:
        async with _store():
            channel = await request.app[CHANNELS].verify(
                caller.user_id, channel_id, box.code_hash(channel_id, body.code))
    except CodeWrong as exc:
        raise ApiError(422, "invalid", f"field 'code': wrong code ({exc.attempts_left} attempts"
                       " left)", field="code") from None
    except CodeExpired:
        raise ApiError(410, "code_expired", "the code has expired; ask for a new one") from None
    except TooManyAttempts:
        raise ApiError(429, "too_many_attempts", "too many wrong codes; ask for a new one",
                       headers={"Retry-After": str(CODE_RESEND_SECONDS)}) from None
    return web.json_response({"channel": channel_json(channel)})


async def resend_code(request: web.Request) -> web.Response:
    """``POST /v1/channels/{id}/resend-code``: a new code for an unverified email channel."""
    caller = identity_of(request)
    channel_id = parse_uuid(request.match_info["channel_id"], "channel")
    ctx = request.app[CONTEXT]
    code = _new_code()
    try:
        async with _store():
            channel = await request.app[CHANNELS].new_code(
                caller.user_id, channel_id, ctx.box.code_hash(channel_id, code),
                CODE_TTL_SECONDS, CODE_RESEND_SECONDS)
    except CodeSentRecently as exc:
        raise ApiError(429, "rate_limited", "a code was sent moments ago; wait before asking"
                       " again", headers={"Retry-After": str(exc.retry_after)}) from None
    if channel.verified_at is not None:
        return web.json_response({"channel": channel_json(channel), "code_sent": False})
    if ctx.mailer is None or channel.address is None:
        raise ApiError(409, "email_unavailable", "this server has no SMTP relay configured")
    sent = await _send_code(ctx, channel.address, code)
    return web.json_response({"channel": channel_json(channel), "code_sent": sent})


async def rotate_secret(request: web.Request) -> web.Response:
    """``POST /v1/channels/{id}/rotate-secret``: a new webhook secret, shown once."""
    caller = identity_of(request)
    channel_id = parse_uuid(request.match_info["channel_id"], "channel")
    secret = new_secret()
    box = request.app[CONTEXT].box
    async with _store():
        channel = await request.app[CHANNELS].rotate_secret(
            caller.user_id, channel_id, box.seal(channel_id, secret))
    log.info("webhook secret rotated", channel_id=str(channel.id))
    return web.json_response({"channel": channel_json(channel), "secret": secret})


async def update_channel(request: web.Request) -> web.Response:
    """``PUT /v1/channels/{id}``: which kinds of notification the channel gets."""
    caller = identity_of(request)
    channel_id = parse_uuid(request.match_info["channel_id"], "channel")
    body = parse_model(KindsBody, await read_json(request))
    async with _store():
        channel = await request.app[CHANNELS].set_kinds(caller.user_id, channel_id,
                                                        _kinds(body.kinds, caller.role))
    return web.json_response({"channel": channel_json(channel)})


async def remove_channel(request: web.Request) -> web.Response:
    """``DELETE /v1/channels/{id}``: remove it; what it still owed ends as dead."""
    caller = identity_of(request)
    channel_id = parse_uuid(request.match_info["channel_id"], "channel")
    async with _store():
        ended = await request.app[CHANNELS].remove(caller.user_id, channel_id)
    log.info("channel removed", channel_id=str(channel_id), undelivered=ended)
    return web.Response(status=204)


def _states(request: web.Request) -> list[str]:
    raw = request.query.get("state")
    if not raw:
        return []
    states = raw.split(",")
    unknown = [s for s in states if s not in STATES]
    if unknown:
        raise ApiError(422, "invalid", f"query parameter 'state' must be one of"
                       f" {', '.join(STATES)} (comma-separated)", field="state")
    return states


async def list_deliveries(request: web.Request) -> web.Response:
    """``GET /v1/deliveries?state=&limit=``: the caller's deliveries, newest first."""
    caller = identity_of(request)
    states = _states(request)
    limit = query_int(request, "limit", DEFAULT_DELIVERIES, low=1, high=MAX_DELIVERIES)
    async with _store():
        deliveries = await request.app[DELIVERIES].of_user(caller.user_id, states=states,
                                                           limit=limit)
    return web.json_response({"items": [delivery_json(d) for d in deliveries]})


def setup_channel_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v1/channels", list_channels)
    r.add_post("/v1/channels", add_channel)
    r.add_put("/v1/channels/{channel_id}", update_channel)
    r.add_delete("/v1/channels/{channel_id}", remove_channel)
    r.add_post("/v1/channels/{channel_id}/verify", verify_channel)
    r.add_post("/v1/channels/{channel_id}/resend-code", resend_code)
    r.add_post("/v1/channels/{channel_id}/rotate-secret", rotate_secret)
    r.add_get("/v1/deliveries", list_deliveries)
