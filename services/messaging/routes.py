"""HTTP routes of the messaging service (called only by the gateway, signed)."""

from __future__ import annotations

import base64
import binascii
import hashlib
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from services.messaging.checks import EnvelopeRejected, check_envelope, sent_at_of
from services.messaging.store import (
    Conflict,
    Device,
    Gone,
    LimitReached,
    MessagingStore,
    NotFound,
    Relationship,
    StoredMessage,
)
from services.messaging.submission import NewMessage, Submission, Terms, begin_submission
from services.messaging.typedefs import CHECKIN_PERIODS, RELAY, SETTINGS, STORE
from shared.boundaries import expectation_for_checkin, period_start, reply_release_time
from shared.envelope import (
    KIND_CHECKIN,
    Envelope,
    EnvelopeError,
    key_id_for,
    parse_envelope,
    verify_device_record,
)
from shared.internal_auth import Identity
from shared.web import ApiError, identity_of, parse_uuid, query_int, read_model

IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY = 128


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PublishDevice(_Body):
    suite: Literal[1, 2]
    hpke_public_key: Annotated[StrictStr, Field(max_length=4096)]
    signing_public_key: Annotated[StrictStr, Field(max_length=128)]
    signature: Annotated[StrictStr, Field(max_length=256)]


class PostMessage(_Body):
    envelope: Annotated[StrictStr, Field(min_length=1, max_length=220_000)]
    # Replies only: deliver now even outside the therapist's office hours.
    deliver_now: StrictBool = False


class RedeemInvite(_Body):
    code: Annotated[StrictStr, Field(min_length=4, max_length=64)]


def _b64(value: str, field: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid", f"field {field!r} is not valid base64",
                       field=field) from None


def _enc(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _store(request: web.Request) -> MessagingStore:
    return request.app[STORE]


def require_role(identity: Identity, role: str) -> None:
    if identity.role != role:
        raise ApiError(403, "forbidden", f"only a {role} can do this")


def relationship_json(rel: Relationship) -> dict[str, Any]:
    return {"id": str(rel.id), "therapist_id": str(rel.therapist_id),
            "client_id": str(rel.client_id), "status": rel.status,
            "created_at": rel.created_at.isoformat()}


def device_json(device: Device) -> dict[str, Any]:
    return {"user_id": str(device.user_id), "device_id": str(device.device_id),
            "version": device.version, "suite": device.suite,
            "hpke_public_key": _enc(device.hpke_public_key),
            "signing_public_key": _enc(device.signing_public_key),
            "signature": _enc(device.signature), "key_id": device.key_id.hex(),
            "updated_at": device.updated_at.isoformat()}


def message_json(msg: StoredMessage, *, include_envelope: bool = True) -> dict[str, Any]:
    data = {"id": str(msg.id), "seq": msg.seq, "relationship_id": str(msg.relationship_id),
            "kind": msg.kind, "sender_id": str(msg.sender_id),
            "sender_device_id": str(msg.sender_device_id), "urgent": msg.urgent,
            "sent_at": msg.sent_at.isoformat(), "created_at": msg.created_at.isoformat(),
            "visible_at": msg.visible_at.isoformat()}
    if include_envelope:
        data["envelope"] = _enc(msg.envelope)
    return data


async def member_relationship(request: web.Request) -> Relationship:
    identity = identity_of(request)
    rid = parse_uuid(request.match_info["relationship_id"], "relationship")
    try:
        return await _store(request).relationship_for_member(rid, identity.user_id)
    except NotFound:
        raise ApiError(404, "not_found", "no such relationship") from None


async def create_invite(request: web.Request) -> web.Response:
    identity = identity_of(request)
    require_role(identity, "therapist")
    invite = await _store(request).create_invite(identity.user_id, datetime.now(UTC))
    return web.json_response({"id": str(invite.id), "code": invite.code,
                              "expires_at": invite.expires_at.isoformat()}, status=201)


async def redeem_invite(request: web.Request) -> web.Response:
    identity = identity_of(request)
    require_role(identity, "system")
    body = await read_model(request, RedeemInvite)
    try:
        redemption = await _store(request).redeem_invite(body.code, datetime.now(UTC),
                                                         identity.request_id)
    except NotFound:
        raise ApiError(404, "invalid_code", "this enrollment code is not valid") from None
    except Gone as exc:
        raise ApiError(410, "code_expired", str(exc)) from None
    return web.json_response({"relationship_id": str(redemption.relationship_id),
                              "therapist_id": str(redemption.therapist_id),
                              "client_id": str(redemption.client_id)})


async def list_relationships(request: web.Request) -> web.Response:
    identity = identity_of(request)
    rels = await _store(request).relationships_of(identity.user_id)
    return web.json_response({"items": [relationship_json(r) for r in rels]})


async def get_relationship(request: web.Request) -> web.Response:
    return web.json_response(relationship_json(await member_relationship(request)))


async def publish_device(request: web.Request) -> web.Response:
    identity = identity_of(request)
    if identity.role not in ("therapist", "client"):
        raise ApiError(403, "forbidden", "only people have devices")
    device_id = parse_uuid(request.match_info["device_id"], "device")
    body = await read_model(request, PublishDevice)
    hpke_pk = _b64(body.hpke_public_key, "hpke_public_key")
    signing_pk = _b64(body.signing_public_key, "signing_public_key")
    signature = _b64(body.signature, "signature")
    if not verify_device_record(identity.user_id, device_id, body.suite, hpke_pk, signing_pk,
                                signature):
        raise ApiError(422, "bad_signature",
                       "device record is malformed or not self-signed by its signing key",
                       field="signature")
    try:
        device, changed = await _store(request).publish_device(
            user_id=identity.user_id, device_id=device_id, suite=body.suite,
            hpke_public_key=hpke_pk, signing_public_key=signing_pk, signature=signature,
            key_id=key_id_for(hpke_pk), correlation_id=identity.request_id)
    except LimitReached as exc:
        raise ApiError(409, "too_many_devices", str(exc)) from None
    status = 201 if changed and device.version == 1 else 200
    return web.json_response({**device_json(device), "changed": changed}, status=status)


async def relationship_devices(request: web.Request) -> web.Response:
    rel = await member_relationship(request)
    devices = await _store(request).devices_of([rel.therapist_id, rel.client_id])
    return web.json_response({"items": [device_json(d) for d in devices]})


async def relationship_device_history(request: web.Request) -> web.Response:
    rel = await member_relationship(request)
    store = _store(request)
    history = sorted([*await store.device_history(rel.therapist_id),
                      *await store.device_history(rel.client_id)],
                     key=lambda d: (d.updated_at, d.user_id.bytes, d.device_id.bytes, d.version))
    return web.json_response({"items": [device_json(d) for d in history]})


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise ApiError(422, "invalid", f"{IDEMPOTENCY_HEADER} must be 1-{MAX_IDEMPOTENCY_KEY}"
                       " printable characters", field=IDEMPOTENCY_HEADER)
    return key


async def post_message(request: web.Request) -> web.Response:
    identity = identity_of(request)
    if identity.role not in ("therapist", "client"):
        raise ApiError(403, "forbidden", "only people send messages")
    rid = parse_uuid(request.match_info["relationship_id"], "relationship")
    # Everything that needs no database first: no connection is held while the
    # body is read, and a malformed request costs no round trip.
    key = _idempotency_key(request)
    body = await read_model(request, PostMessage)
    raw = _b64(body.envelope, "envelope")
    try:
        env = parse_envelope(raw)
    except EnvelopeError as exc:
        raise ApiError(422, "invalid_envelope", f"envelope: {exc}", field="envelope") from None
    kind = "checkin" if env.kind == KIND_CHECKIN else "reply"
    if body.deliver_now and kind != "reply":
        raise ApiError(422, "invalid", "deliver_now applies to replies only",
                       field="deliver_now")
    try:
        periods = request.app[CHECKIN_PERIODS]
        guess = periods.guess(rid, datetime.now(UTC)) if kind == "checkin" else None
        async with begin_submission(request.app[STORE].pool, rid, identity.user_id,
                                    period_guess=guess) as sub:
            periods.learn(sub.context)
            stored, created = await _accept(request, sub, identity, env, raw, kind, key,
                                            deliver_now=body.deliver_now)
    except NotFound:
        raise ApiError(404, "not_found", "no such relationship") from None
    except Conflict as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    if created:
        # Its event is committed: this process's relay publishes it (polling, and
        # the other replicas' relays, remain the fallback).
        request.app[RELAY].wake()
    payload = message_json(stored, include_envelope=False)  # the caller has it
    payload.update(stored.terms or {})
    return web.json_response(payload, status=201 if created else 200)


async def _accept(request: web.Request, sub: Submission, identity: Identity, env: Envelope,
                  raw: bytes, kind: str, key: str | None, *,
                  deliver_now: bool) -> tuple[StoredMessage, bool]:
    """Check the envelope against the relationship and store it, inside ``sub``."""
    rel = sub.context.relationship
    if rel.status != "active":
        raise ApiError(409, "relationship_ended", "this relationship has ended")
    now = datetime.now(UTC)
    try:
        check_envelope(env, relationship=rel, sender_id=identity.user_id, role=identity.role,
                       devices=sub.context.devices, now=now)
    except EnvelopeRejected as exc:
        raise ApiError(exc.status, exc.code, exc.message, field="envelope") from None
    message = NewMessage(
        id=env.message_id, relationship=rel, kind=kind, sender_id=identity.user_id,
        sender_device_id=env.sender_device_id, urgent=env.urgent, sent_at=sent_at_of(env),
        envelope=raw,
    )
    schedule, agreement = sub.context.schedule, sub.context.agreement
    crisis_default = request.app[SETTINGS].crisis_resources

    def decide(used: int) -> Terms:
        if message.kind == "checkin":
            told = expectation_for_checkin(schedule, agreement, now, used=used,
                                           urgent=message.urgent,
                                           practice_crisis_text=crisis_default)
            return Terms(beyond_agreement=not told.within_agreement, reply_by=told.reply_by,
                         told={"expectation": told.to_json()})
        release = reply_release_time(schedule, now, deliver_now=deliver_now)
        held = release > now
        # Not held: visible from the commit's own clock (None), so that a clock
        # read a moment after the transaction began cannot hold it by accident.
        return Terms(deliver_now=deliver_now, visible_at=release if held else None,
                     told={"release_at": release.isoformat(), "held": held})

    request_hash = hashlib.sha256(rel.id.bytes + raw + bytes([deliver_now])).digest()
    return await sub.store(message, idempotency_key=key, request_hash=request_hash,
                           correlation_id=identity.request_id, decide=decide,
                           period_start=period_start(agreement, schedule, now))


async def list_messages(request: web.Request) -> web.Response:
    rel = await member_relationship(request)
    limit = query_int(request, "limit", 50, low=1, high=200)
    after = query_int(request, "cursor", 0, low=0, high=2**62)
    messages, held = await _store(request).list_messages(
        rel.id, viewer_id=identity_of(request).user_id, after=after, limit=limit,
        now=datetime.now(UTC))
    last = messages[-1].delivery_seq if messages else None
    next_cursor = str(last) if len(messages) == limit and last is not None else None
    return web.json_response({"items": [message_json(m) for m in messages],
                              "next_cursor": next_cursor,
                              "held": [message_json(m) for m in held]})


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/invites", create_invite)
    app.router.add_post("/internal/invites/redeem", redeem_invite)
    app.router.add_get("/v1/relationships", list_relationships)
    app.router.add_get("/v1/relationships/{relationship_id}", get_relationship)
    app.router.add_get("/v1/relationships/{relationship_id}/devices", relationship_devices)
    app.router.add_get("/v1/relationships/{relationship_id}/devices/history",
                       relationship_device_history)
    app.router.add_put("/v1/devices/{device_id}", publish_device)
    app.router.add_post("/v1/relationships/{relationship_id}/messages", post_message)
    app.router.add_get("/v1/relationships/{relationship_id}/messages", list_messages)
