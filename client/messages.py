"""Sending and reading end-to-end encrypted messages of one relationship.

Sealing and opening happen here, on the device; the server only ever sees the
envelope. Nothing in this module logs or prints message text.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from client.api import (
    ApiError,
    GatewayClient,
    Message,
    PostedMessage,
    Relationship,
    ServerUnreachable,
)
from client.crypto import DecryptError, open_envelope, seal
from client.session import State
from client.trust import (
    TrustError,
    VerifiedDevice,
    change_warning,
    check_pins,
    is_pinned,
    verify_device,
    verify_devices,
)
from shared.envelope import (
    FLAG_URGENT,
    KIND_CHECKIN,
    EnvelopeError,
    parse_envelope,
    verify_envelope_signature,
)

# Retries of one POST after a network error or a 503, with the same Idempotency-Key.
POST_ATTEMPTS = 3
RETRY_DELAY_SECONDS = 1.0

Warn = Callable[[str], None]


class KeysChanged(TrustError):
    """A person's current keys are not all pinned; the user must run `trust`."""

    def __init__(self, emails: list[str]) -> None:
        super().__init__("refusing to send until the changed keys are trusted: "
                         + ", ".join(emails))
        self.emails = emails


def emails_of(rel: Relationship) -> dict[uuid.UUID, str]:
    return {p.id: p.email for p in (rel.therapist, rel.client) if p is not None}


async def current_devices(api: GatewayClient, state: State, rel: Relationship, *,
                          warn: Warn, strict: bool) -> list[VerifiedDevice]:
    """The relationship's verified current devices, with first-seen keys pinned.

    With `strict`, a changed key raises KeysChanged (after warning); without it the
    warning is all (reading is always allowed, sending is not).
    """
    devices = verify_devices(await api.devices(rel.id))
    emails = emails_of(rel)
    report = check_pins(state, devices, emails)
    for user_id in report.changed:
        warn(change_warning(emails.get(user_id, str(user_id))))
    if strict and report.changed:
        raise KeysChanged([emails.get(u, str(u)) for u in report.changed])
    return devices


@dataclass(frozen=True, slots=True)
class Sent:
    message_id: uuid.UUID
    created: bool
    recipients: int
    posted: PostedMessage  # the server's answer: expectation, release time


async def _post(api: GatewayClient, rel_id: uuid.UUID, envelope_b64: str, key: str, *,
                deliver_now: bool) -> PostedMessage:
    for attempt in range(1, POST_ATTEMPTS + 1):
        try:
            return await api.post_message(rel_id, envelope_b64, idempotency_key=key,
                                          deliver_now=deliver_now)
        except ServerUnreachable:
            if attempt == POST_ATTEMPTS:
                raise
        except ApiError as exc:
            if exc.status != 503 or attempt == POST_ATTEMPTS:
                raise
        await asyncio.sleep(RETRY_DELAY_SECONDS * attempt)
    raise AssertionError("unreachable")


async def send_message(api: GatewayClient, state: State, rel: Relationship, text: str, *,
                       kind: int, urgent: bool, warn: Warn,
                       deliver_now: bool = False) -> Sent:
    """Seal `text` for every current device of both people and post it.

    A network error retries the same envelope under the same Idempotency-Key, so
    the server stores it once. On 409 stale_keys the devices are fetched, checked
    against the pins and the text sealed again, once. ``deliver_now`` (replies) asks
    the server not to hold the reply until the therapist's office hours open.
    """
    for round_ in (1, 2):
        devices = await current_devices(api, state, rel, warn=warn, strict=True)
        message_id = uuid.uuid4()
        try:
            envelope = seal(
                text=text, kind=kind, flags=FLAG_URGENT if urgent else 0,
                message_id=message_id, relationship_id=rel.id, sender_user_id=state.user.id,
                sender_device_id=state.device_id, sender_keys=state.keys,
                recipients=[d.recipient() for d in devices], sent_at_ms=int(time.time() * 1000))
        except ValueError as exc:
            raise ApiError(422, "cannot_seal", f"cannot encrypt for these devices: {exc}"
                           ) from None
        encoded = base64.b64encode(envelope.to_bytes()).decode("ascii")
        try:
            posted = await _post(api, rel.id, encoded, str(uuid.uuid4()),
                                 deliver_now=deliver_now)
        except ApiError as exc:
            if exc.code == "stale_keys" and round_ == 1:
                continue
            raise
        return Sent(posted.message.id, posted.created, len(devices), posted)
    raise AssertionError("unreachable")


def _iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


class Signers:
    """Every signing key each device of a relationship ever published (verified)."""

    def __init__(self, history: list[VerifiedDevice]) -> None:
        self._keys: dict[tuple[uuid.UUID, uuid.UUID], list[bytes]] = {}
        for device in history:
            self._keys.setdefault((device.user_id, device.device_id), []).append(
                device.signing_public_key)

    def keys_of(self, user_id: uuid.UUID, device_id: uuid.UUID) -> list[bytes]:
        return self._keys.get((user_id, device_id), [])


async def load_signers(api: GatewayClient, rel: Relationship) -> Signers:
    # A bad record in the history is skipped: only messages it signed fail to verify.
    history = [verify_device(d) for d in await api.device_history(rel.id)]
    return Signers([d for d in history if d is not None])


def open_message(state: State, rel: Relationship, message: Message,
                 signers: Signers) -> dict[str, Any]:
    """One inbox entry: the decrypted message, or an error entry without text."""
    sender = rel.person(message.sender_id)
    entry: dict[str, Any] = {
        "id": str(message.id), "relationship_id": str(rel.id), "kind": message.kind,
        "from": sender.email if sender else None,
        "from_name": sender.display_name if sender else None,
        "sent_at": message.sent_at, "urgent": message.urgent,
    }
    try:
        env = parse_envelope(base64.b64decode(message.envelope or "", validate=True))
    except (binascii.Error, ValueError, EnvelopeError) as exc:
        return {**entry, "error": f"malformed envelope: {exc}"}
    if (env.message_id, env.relationship_id, env.sender_user_id, env.sender_device_id) != (
            message.id, rel.id, message.sender_id, message.sender_device_id):
        return {**entry, "error": "the server's description does not match the signed envelope"}
    if sender is None:
        return {**entry, "error": "sent by someone outside this relationship"}
    key = next((k for k in signers.keys_of(env.sender_user_id, env.sender_device_id)
                if verify_envelope_signature(env, k)), None)
    if key is None:
        return {**entry, "error": "signature does not verify with any published key of the "
                                  "sender's device"}
    try:
        text = open_envelope(env, user_id=state.user.id, device_id=state.device_id,
                             keys=state.keys, sender_signing_public_key=key)
    except DecryptError as exc:
        return {**entry, "error": str(exc)}
    # What the sender signed wins over what the server says.
    return {**entry, "kind": "checkin" if env.kind == KIND_CHECKIN else "reply",
            "sent_at": _iso_ms(env.sent_at_ms), "urgent": env.urgent, "text": text,
            "key_trusted": is_pinned(state, env.sender_user_id, env.sender_device_id, key)}


async def read_inbox(api: GatewayClient, state: State, rels: list[Relationship], *,
                     warn: Warn) -> list[dict[str, Any]]:
    """Every message of `rels`, oldest first, each decrypted or an error entry."""
    entries: list[tuple[str, int, dict[str, Any]]] = []
    for rel in rels:
        try:
            await current_devices(api, state, rel, warn=warn, strict=False)
        except TrustError as exc:
            warn(f"WARNING: {exc}")
        signers = await load_signers(api, rel)
        async for message in api.messages(rel.id):
            entries.append((message.created_at, message.seq,
                            open_message(state, rel, message, signers)))
    entries.sort(key=lambda e: (e[0], e[1]))
    return [e[2] for e in entries]
