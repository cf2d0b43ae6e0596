"""What the server checks of an envelope before accepting it.

The server never decrypts. It checks that the envelope is well formed, is what
the route says (kind, relationship, sender), is signed by the sender's
registered device, and that its content key is wrapped for exactly the current
devices of both people in the relationship (so no one's device is silently
left unable to read it).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from services.messaging.store import Device, Relationship
from shared.envelope import KIND_CHECKIN, KIND_REPLY, Envelope, verify_envelope_signature

# A sender's clock may be off; beyond this the envelope's time is not believable.
MAX_CLOCK_SKEW = timedelta(minutes=10)


class EnvelopeRejected(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def kind_for_role(role: str) -> int:
    return KIND_CHECKIN if role == "client" else KIND_REPLY


def sent_at_of(env: Envelope) -> datetime:
    return datetime.fromtimestamp(env.sent_at_ms / 1000, UTC)


def check_envelope(env: Envelope, *, relationship: Relationship, sender_id: uuid.UUID,
                   role: str, devices: list[Device], now: datetime) -> None:
    """Raise :class:`EnvelopeRejected` unless the envelope may be stored."""
    expected_kind = kind_for_role(role)
    if env.kind != expected_kind:
        wanted = "check-ins" if expected_kind == KIND_CHECKIN else "replies"
        raise EnvelopeRejected(422, "wrong_kind", f"a {role} can only send {wanted}")
    if env.relationship_id != relationship.id:
        raise EnvelopeRejected(422, "invalid_envelope",
                               "envelope is addressed to another relationship")
    if env.sender_user_id != sender_id:
        raise EnvelopeRejected(422, "invalid_envelope", "envelope names another sender")
    if abs(sent_at_of(env) - now) > MAX_CLOCK_SKEW:
        raise EnvelopeRejected(422, "invalid_envelope",
                               "envelope time is more than 10 minutes off; check your clock")
    sender_device = next((d for d in devices if d.user_id == sender_id
                          and d.device_id == env.sender_device_id), None)
    if sender_device is None:
        raise EnvelopeRejected(422, "unknown_device",
                               "the sending device has not published its keys")
    if not verify_envelope_signature(env, sender_device.signing_public_key):
        raise EnvelopeRejected(422, "bad_signature",
                               "envelope signature does not verify with the sender's device key")
    owners = {d.user_id for d in devices}
    if relationship.therapist_id not in owners or relationship.client_id not in owners:
        # Wrapped only for the sender, it would be stored and alerted but never readable.
        raise EnvelopeRejected(409, "peer_has_no_devices",
                               "the other person has not set up a device yet; nothing can be "
                               "sent to them until they have")
    expected = {(d.user_id, d.device_id, d.key_id) for d in devices}
    actual = {(r.user_id, r.device_id, r.key_id) for r in env.recipients}
    if expected != actual:
        raise EnvelopeRejected(
            409, "stale_keys",
            "envelope is not wrapped for exactly the current devices of both people; "
            "fetch the relationship's device keys and seal again",
        )
    if any(d.suite != env.suite for d in devices):
        raise EnvelopeRejected(422, "suite_mismatch",
                               "a recipient device uses another cipher suite")
