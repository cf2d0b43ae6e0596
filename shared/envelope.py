"""Wire format v1 of end-to-end encrypted envelopes: encoding, parsing and signatures.

This is the server-safe half of the protocol (docs/protocol.md): it encodes and
strictly parses envelopes and verifies Ed25519 signatures, but holds no private
key and never decrypts. The device side (sealing, opening) lives in `client.crypto`.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

KIND_CHECKIN: Final = 1
KIND_REPLY: Final = 2
KINDS: Final = frozenset({KIND_CHECKIN, KIND_REPLY})

SUITE_MLKEM768_X25519: Final = 1
SUITE_X25519: Final = 2
SUITES: Final = frozenset({SUITE_MLKEM768_X25519, SUITE_X25519})

FLAG_URGENT: Final = 1
KNOWN_FLAGS: Final = FLAG_URGENT

MAX_RECIPIENTS: Final = 64
MAX_ENVELOPE_BYTES: Final = 160_000

MAGIC: Final = b"ILD"
VERSION: Final = 1

# ML-KEM-768 encapsulation key (1184) || X25519 public key (32); see docs/protocol.md.
HPKE_PUBLIC_KEY_LENGTHS: Final = {SUITE_MLKEM768_X25519: 1184 + 32, SUITE_X25519: 32}
# HPKE single-shot output: enc || AES-256-GCM(32-byte content key) with its 16-byte tag.
# enc is 1120 bytes for ML-KEM-768+X25519 (1088 + 32) and 32 bytes for DHKEM(X25519).
WRAPPED_KEY_LENGTHS: Final = {SUITE_MLKEM768_X25519: 1120 + 48, SUITE_X25519: 32 + 48}

CONTENT_KEY_LENGTH: Final = 32
NONCE_LENGTH: Final = 12
TAG_LENGTH: Final = 16
KEY_ID_LENGTH: Final = 8
SIGNATURE_LENGTH: Final = 64
SIGNING_PUBLIC_KEY_LENGTH: Final = 32
PADDING_BUCKETS: Final = tuple(1 << n for n in range(8, 17))  # 256 .. 65536

WRAP_INFO_CONTEXT: Final = b"interlude/v1/wrap"
ENVELOPE_SIGNATURE_CONTEXT: Final = b"interlude/v1/envelope"
DEVICE_SIGNATURE_CONTEXT: Final = b"interlude/v1/device"

CORE_HEADER_LENGTH: Final = 79
_CORE = struct.Struct(">3sBBBB16s16s16s16sQ")
_RECIPIENT_FIXED = 16 + 16 + KEY_ID_LENGTH + 2
_U64_MAX = (1 << 64) - 1
assert _CORE.size == CORE_HEADER_LENGTH


class EnvelopeError(ValueError):
    """An envelope (or one of its parts) is malformed."""


@dataclass(frozen=True, slots=True)
class Recipient:
    """One device an envelope's content key is wrapped for."""

    user_id: uuid.UUID
    device_id: uuid.UUID
    key_id: bytes
    wrapped: bytes

    def __post_init__(self) -> None:
        if len(self.key_id) != KEY_ID_LENGTH:
            raise EnvelopeError(f"key id must be {KEY_ID_LENGTH} bytes, got {len(self.key_id)}")
        if len(self.wrapped) > 0xFFFF:
            raise EnvelopeError(f"wrapped key too long ({len(self.wrapped)} bytes)")

    @property
    def sort_key(self) -> bytes:
        return self.user_id.bytes + self.device_id.bytes

    def to_bytes(self) -> bytes:
        return (
            self.sort_key
            + self.key_id
            + struct.pack(">H", len(self.wrapped))
            + self.wrapped
        )


@dataclass(frozen=True, slots=True)
class Envelope:
    """A structurally valid v1 envelope. Construction validates every field."""

    suite: int
    kind: int
    flags: int
    message_id: uuid.UUID
    relationship_id: uuid.UUID
    sender_user_id: uuid.UUID
    sender_device_id: uuid.UUID
    sent_at_ms: int
    recipients: tuple[Recipient, ...]
    nonce: bytes
    ciphertext: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _check_core_fields(self.suite, self.kind, self.flags, self.sent_at_ms)
        _check_recipients(self.suite, self.recipients)
        if len(self.nonce) != NONCE_LENGTH:
            raise EnvelopeError(f"nonce must be {NONCE_LENGTH} bytes, got {len(self.nonce)}")
        if len(self.ciphertext) - TAG_LENGTH not in PADDING_BUCKETS:
            raise EnvelopeError(
                f"ciphertext length {len(self.ciphertext)} is not a padding bucket + {TAG_LENGTH}"
            )
        if len(self.signature) != SIGNATURE_LENGTH:
            raise EnvelopeError(
                f"signature must be {SIGNATURE_LENGTH} bytes, got {len(self.signature)}"
            )
        size = self.encoded_length
        if size > MAX_ENVELOPE_BYTES:
            raise EnvelopeError(f"envelope too large ({size} > {MAX_ENVELOPE_BYTES} bytes)")

    @property
    def urgent(self) -> bool:
        return bool(self.flags & FLAG_URGENT)

    @property
    def encoded_length(self) -> int:
        recipients = sum(_RECIPIENT_FIXED + len(r.wrapped) for r in self.recipients)
        return (
            CORE_HEADER_LENGTH + 2 + recipients
            + NONCE_LENGTH + 4 + len(self.ciphertext) + SIGNATURE_LENGTH
        )

    def core_header(self) -> bytes:
        """The 79-byte core header: magic, version, suite, kind, flags, ids, time."""
        return encode_core_header(
            suite=self.suite,
            kind=self.kind,
            flags=self.flags,
            message_id=self.message_id,
            relationship_id=self.relationship_id,
            sender_user_id=self.sender_user_id,
            sender_device_id=self.sender_device_id,
            sent_at_ms=self.sent_at_ms,
        )

    def header(self) -> bytes:
        """Core header, recipient count and recipients: the AAD of the content AEAD."""
        return encode_header(self.core_header(), self.recipients)

    def body(self) -> bytes:
        """nonce || u32 ciphertext length || ciphertext."""
        return encode_body(self.nonce, self.ciphertext)

    def signed_bytes(self) -> bytes:
        """The exact bytes the sender device signs."""
        return ENVELOPE_SIGNATURE_CONTEXT + self.header() + self.body()

    def to_bytes(self) -> bytes:
        """The full wire encoding: header || body || signature."""
        return self.header() + self.body() + self.signature


def _check_core_fields(suite: int, kind: int, flags: int, sent_at_ms: int) -> None:
    if suite not in SUITES:
        raise EnvelopeError(f"unknown suite 0x{suite:02x}")
    if kind not in KINDS:
        raise EnvelopeError(f"unknown kind 0x{kind:02x}")
    if not 0 <= flags <= 0xFF or flags & ~KNOWN_FLAGS:
        raise EnvelopeError(f"unknown flag bits 0x{flags & ~KNOWN_FLAGS:02x}")
    if not 0 <= sent_at_ms <= _U64_MAX:
        raise EnvelopeError(f"sent_at_ms {sent_at_ms} does not fit in u64")


def _check_recipients(suite: int, recipients: tuple[Recipient, ...]) -> None:
    if not 1 <= len(recipients) <= MAX_RECIPIENTS:
        raise EnvelopeError(
            f"recipient count {len(recipients)} out of range 1..{MAX_RECIPIENTS}"
        )
    expected = WRAPPED_KEY_LENGTHS[suite]
    previous = b""
    for recipient in recipients:
        key = recipient.sort_key
        if key == previous:
            raise EnvelopeError(f"duplicate recipient {recipient.user_id}/{recipient.device_id}")
        if key < previous:
            raise EnvelopeError("recipient list not sorted")
        previous = key
        if len(recipient.wrapped) != expected:
            raise EnvelopeError(
                f"wrapped key is {len(recipient.wrapped)} bytes, suite 0x{suite:02x} "
                f"needs {expected}"
            )


def encode_core_header(
    *,
    suite: int,
    kind: int,
    flags: int,
    message_id: uuid.UUID,
    relationship_id: uuid.UUID,
    sender_user_id: uuid.UUID,
    sender_device_id: uuid.UUID,
    sent_at_ms: int,
) -> bytes:
    """Encode the 79-byte core header (validating suite, kind, flags and time)."""
    _check_core_fields(suite, kind, flags, sent_at_ms)
    return _CORE.pack(
        MAGIC,
        VERSION,
        suite,
        kind,
        flags,
        message_id.bytes,
        relationship_id.bytes,
        sender_user_id.bytes,
        sender_device_id.bytes,
        sent_at_ms,
    )


def encode_header(core_header: bytes, recipients: tuple[Recipient, ...]) -> bytes:
    """Encode core header || u16 recipient count || recipients (already sorted)."""
    return (
        core_header
        + struct.pack(">H", len(recipients))
        + b"".join(r.to_bytes() for r in recipients)
    )


def encode_body(nonce: bytes, ciphertext: bytes) -> bytes:
    """Encode nonce || u32 ciphertext length || ciphertext."""
    return nonce + struct.pack(">I", len(ciphertext)) + ciphertext


def wrap_info(core_header: bytes, user_id: uuid.UUID, device_id: uuid.UUID, key_id: bytes) -> bytes:
    """The HPKE `info` that binds a wrapped content key to its envelope and recipient."""
    return WRAP_INFO_CONTEXT + core_header + user_id.bytes + device_id.bytes + key_id


def key_id_for(hpke_public_key: bytes) -> bytes:
    """Key id of an HPKE public key: the first 8 bytes of its SHA-256."""
    return hashlib.sha256(hpke_public_key).digest()[:KEY_ID_LENGTH]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.offset = 0

    def take(self, n: int, what: str) -> bytes:
        end = self.offset + n
        if end > len(self._data):
            raise EnvelopeError(
                f"truncated envelope: {what} needs {n} bytes at offset {self.offset}, "
                f"only {len(self._data) - self.offset} left"
            )
        chunk = self._data[self.offset : end]
        self.offset = end
        return chunk

    def u16(self, what: str) -> int:
        value: int = struct.unpack(">H", self.take(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = struct.unpack(">I", self.take(4, what))[0]
        return value

    @property
    def remaining(self) -> int:
        return len(self._data) - self.offset


def parse_envelope(data: bytes) -> Envelope:
    """Strictly decode a v1 envelope; raise EnvelopeError naming the first problem found.

    This checks structure only. It does not verify the signature
    (see `verify_envelope_signature`) and cannot check the ciphertext.
    """
    if len(data) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError(f"envelope too large ({len(data)} > {MAX_ENVELOPE_BYTES} bytes)")
    reader = _Reader(bytes(data))
    (magic, version, suite, kind, flags, message_id, relationship_id, sender_user_id,
     sender_device_id, sent_at_ms) = _CORE.unpack(reader.take(CORE_HEADER_LENGTH, "core header"))
    if magic != MAGIC:
        raise EnvelopeError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise EnvelopeError(f"unsupported version 0x{version:02x}")
    _check_core_fields(suite, kind, flags, sent_at_ms)

    count = reader.u16("recipient count")
    if not 1 <= count <= MAX_RECIPIENTS:
        raise EnvelopeError(f"recipient count {count} out of range 1..{MAX_RECIPIENTS}")
    recipients = []
    for i in range(count):
        user_id = uuid.UUID(bytes=reader.take(16, f"recipient {i} user id"))
        device_id = uuid.UUID(bytes=reader.take(16, f"recipient {i} device id"))
        key_id = reader.take(KEY_ID_LENGTH, f"recipient {i} key id")
        wrapped_len = reader.u16(f"recipient {i} wrapped length")
        wrapped = reader.take(wrapped_len, f"recipient {i} wrapped key")
        recipients.append(Recipient(user_id, device_id, key_id, wrapped))

    nonce = reader.take(NONCE_LENGTH, "nonce")
    ct_len = reader.u32("ciphertext length")
    if ct_len - TAG_LENGTH not in PADDING_BUCKETS:
        raise EnvelopeError(f"ciphertext length {ct_len} is not a padding bucket + {TAG_LENGTH}")
    ciphertext = reader.take(ct_len, "ciphertext")
    signature = reader.take(SIGNATURE_LENGTH, "signature")
    if reader.remaining:
        raise EnvelopeError(f"{reader.remaining} trailing bytes after signature")

    return Envelope(
        suite=suite,
        kind=kind,
        flags=flags,
        message_id=uuid.UUID(bytes=message_id),
        relationship_id=uuid.UUID(bytes=relationship_id),
        sender_user_id=uuid.UUID(bytes=sender_user_id),
        sender_device_id=uuid.UUID(bytes=sender_device_id),
        sent_at_ms=sent_at_ms,
        recipients=tuple(recipients),
        nonce=nonce,
        ciphertext=ciphertext,
        signature=signature,
    )


def _ed25519_verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    if len(public_key) != SIGNING_PUBLIC_KEY_LENGTH or len(signature) != SIGNATURE_LENGTH:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def verify_envelope_signature(env: Envelope, signing_public_key: bytes) -> bool:
    """True if `env` carries a valid Ed25519 signature by the raw 32-byte public key."""
    return _ed25519_verify(signing_public_key, env.signature, env.signed_bytes())


def device_signed_bytes(
    user_id: uuid.UUID,
    device_id: uuid.UUID,
    suite: int,
    hpke_public_key: bytes,
    signing_public_key: bytes,
) -> bytes:
    """The bytes a device signs to vouch for its own public keys.

    Raises ValueError if the suite is unknown or a key has the wrong length.
    """
    if suite not in SUITES:
        raise ValueError(f"unknown suite 0x{suite:02x}")
    if len(hpke_public_key) != HPKE_PUBLIC_KEY_LENGTHS[suite]:
        raise ValueError(
            f"HPKE public key is {len(hpke_public_key)} bytes, suite 0x{suite:02x} "
            f"needs {HPKE_PUBLIC_KEY_LENGTHS[suite]}"
        )
    if len(signing_public_key) != SIGNING_PUBLIC_KEY_LENGTH:
        raise ValueError(
            f"signing public key is {len(signing_public_key)} bytes, "
            f"needs {SIGNING_PUBLIC_KEY_LENGTH}"
        )
    return (
        DEVICE_SIGNATURE_CONTEXT
        + user_id.bytes
        + device_id.bytes
        + struct.pack(">BH", suite, len(hpke_public_key))
        + hpke_public_key
        + signing_public_key
    )


def verify_device_record(
    user_id: uuid.UUID,
    device_id: uuid.UUID,
    suite: int,
    hpke_public_key: bytes,
    signing_public_key: bytes,
    signature: bytes,
) -> bool:
    """True if the record is well formed and self-signed by `signing_public_key`.

    Malformed records (unknown suite, wrong key lengths) also return False.
    """
    try:
        message = device_signed_bytes(
            user_id, device_id, suite, hpke_public_key, signing_public_key
        )
    except ValueError:
        return False
    return _ed25519_verify(signing_public_key, signature, message)
