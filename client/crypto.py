"""Device keys, sealing and opening of v1 envelopes, padding and safety numbers.

The wire format and everything the server may check live in `shared.envelope`;
this module adds what needs private keys. See docs/protocol.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hpke import (
    AEAD,
    KDF,
    KEM,
    MLKEM768X25519PrivateKey,
    MLKEM768X25519PublicKey,
    Suite,
)

from shared.envelope import (
    CONTENT_KEY_LENGTH,
    HPKE_PUBLIC_KEY_LENGTHS,
    MAX_RECIPIENTS,
    NONCE_LENGTH,
    PADDING_BUCKETS,
    SUITE_MLKEM768_X25519,
    SUITE_X25519,
    SUITES,
    Envelope,
    Recipient,
    device_signed_bytes,
    encode_core_header,
    encode_header,
    key_id_for,
    verify_envelope_signature,
    wrap_info,
)

BUCKETS = PADDING_BUCKETS
MAX_TEXT_BYTES = BUCKETS[-1] - 4

_MLKEM768_SEED_LENGTH = 64
_MLKEM768_PUBLIC_LENGTH = 1184
_X25519_LENGTH = 32
_ED25519_SEED_LENGTH = 32
# Private HPKE material as stored: ML-KEM-768 seed (d || z) || X25519 scalar, or the scalar.
HPKE_PRIVATE_KEY_LENGTHS = {
    SUITE_MLKEM768_X25519: _MLKEM768_SEED_LENGTH + _X25519_LENGTH,
    SUITE_X25519: _X25519_LENGTH,
}
_HPKE_SUITES = {
    SUITE_MLKEM768_X25519: Suite(KEM.MLKEM768_X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM),
    SUITE_X25519: Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM),
}

SAFETY_NUMBER_CONTEXT = b"interlude/v1/safety-number"
SAFETY_NUMBER_ITERATIONS = 5200

_HpkePrivate = X25519PrivateKey | MLKEM768X25519PrivateKey
_HpkePublic = X25519PublicKey | MLKEM768X25519PublicKey
WrapFunction = Callable[[int, bytes, bytes, bytes], bytes]
"""(suite, recipient HPKE public key, content key, info) -> wrapped content key."""


class DecryptError(Exception):
    """An envelope could not be opened: wrong recipient, wrong signer or tampered bytes."""


class RecipientKey(NamedTuple):
    """A device to wrap the content key for, as published in the key directory."""

    user_id: uuid.UUID
    device_id: uuid.UUID
    suite: int
    hpke_public_key: bytes


def _hpke_private_from_bytes(suite: int, material: bytes) -> _HpkePrivate:
    if suite == SUITE_X25519:
        return X25519PrivateKey.from_private_bytes(material)
    return MLKEM768X25519PrivateKey(
        MLKEM768PrivateKey.from_seed_bytes(material[:_MLKEM768_SEED_LENGTH]),
        X25519PrivateKey.from_private_bytes(material[_MLKEM768_SEED_LENGTH:]),
    )


def _hpke_public_bytes_from_private(suite: int, material: bytes) -> bytes:
    # pyca's hybrid key objects expose no bytes, so derive them from the components.
    if suite == SUITE_X25519:
        return X25519PrivateKey.from_private_bytes(material).public_key().public_bytes_raw()
    mlkem = MLKEM768PrivateKey.from_seed_bytes(material[:_MLKEM768_SEED_LENGTH])
    x25519 = X25519PrivateKey.from_private_bytes(material[_MLKEM768_SEED_LENGTH:])
    return mlkem.public_key().public_bytes_raw() + x25519.public_key().public_bytes_raw()


def hpke_public_key_from_bytes(suite: int, data: bytes) -> _HpkePublic:
    """Decode a published HPKE public key (see docs/protocol.md for the encoding)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite 0x{suite:02x}")
    if len(data) != HPKE_PUBLIC_KEY_LENGTHS[suite]:
        raise ValueError(
            f"HPKE public key is {len(data)} bytes, suite 0x{suite:02x} "
            f"needs {HPKE_PUBLIC_KEY_LENGTHS[suite]}"
        )
    if suite == SUITE_X25519:
        return X25519PublicKey.from_public_bytes(data)
    return MLKEM768X25519PublicKey(
        MLKEM768PublicKey.from_public_bytes(data[:_MLKEM768_PUBLIC_LENGTH]),
        X25519PublicKey.from_public_bytes(data[_MLKEM768_PUBLIC_LENGTH:]),
    )


class DeviceKeys:
    """A device's private keys: an HPKE key pair for receiving and Ed25519 for signing."""

    __slots__ = ("_hpke", "_hpke_material", "_hpke_public", "_signing", "_suite")

    def __init__(self, suite: int, hpke_private: bytes, signing_private: bytes) -> None:
        """Prefer `generate`, `from_bytes` or `from_dict`."""
        if suite not in SUITES:
            raise ValueError(f"unknown suite 0x{suite:02x}")
        if len(hpke_private) != HPKE_PRIVATE_KEY_LENGTHS[suite]:
            raise ValueError(
                f"HPKE private key is {len(hpke_private)} bytes, suite 0x{suite:02x} "
                f"needs {HPKE_PRIVATE_KEY_LENGTHS[suite]}"
            )
        if len(signing_private) != _ED25519_SEED_LENGTH:
            raise ValueError(f"signing private key must be {_ED25519_SEED_LENGTH} bytes")
        self._suite = suite
        self._hpke_material = bytes(hpke_private)
        self._hpke = _hpke_private_from_bytes(suite, self._hpke_material)
        self._hpke_public = _hpke_public_bytes_from_private(suite, self._hpke_material)
        self._signing = Ed25519PrivateKey.from_private_bytes(signing_private)

    @classmethod
    def generate(cls, suite: int = SUITE_MLKEM768_X25519) -> DeviceKeys:
        """Fresh random keys for a new device."""
        if suite not in SUITES:
            raise ValueError(f"unknown suite 0x{suite:02x}")
        return cls(suite, os.urandom(HPKE_PRIVATE_KEY_LENGTHS[suite]), os.urandom(32))

    @classmethod
    def from_bytes(cls, data: bytes) -> DeviceKeys:
        """Inverse of `to_bytes`: suite u8 || Ed25519 seed (32) || HPKE private material."""
        if not data:
            raise ValueError("empty device key material")
        suite = data[0]
        if suite not in SUITES:
            raise ValueError(f"unknown suite 0x{suite:02x}")
        expected = 1 + _ED25519_SEED_LENGTH + HPKE_PRIVATE_KEY_LENGTHS[suite]
        if len(data) != expected:
            raise ValueError(f"device key material is {len(data)} bytes, needs {expected}")
        return cls(suite, data[1 + _ED25519_SEED_LENGTH :], data[1 : 1 + _ED25519_SEED_LENGTH])

    def to_bytes(self) -> bytes:
        """Private material; only ever store it inside a keystore."""
        return bytes([self._suite]) + self._signing_seed() + self._hpke_material

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceKeys:
        """Inverse of `to_dict`."""
        try:
            suite = data["suite"]
            hpke_private = base64.b64decode(data["hpke_private"], validate=True)
            signing_private = base64.b64decode(data["signing_private"], validate=True)
        except (KeyError, TypeError, binascii.Error) as exc:
            raise ValueError(f"malformed device keys: {exc!r}") from exc
        if not isinstance(suite, int) or isinstance(suite, bool):
            raise ValueError("malformed device keys: suite is not an integer")
        return cls(suite, hpke_private, signing_private)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready private material (base64) for the keystore."""
        return {
            "suite": self._suite,
            "hpke_private": base64.b64encode(self._hpke_material).decode("ascii"),
            "signing_private": base64.b64encode(self._signing_seed()).decode("ascii"),
        }

    def _signing_seed(self) -> bytes:
        return self._signing.private_bytes_raw()

    @property
    def suite(self) -> int:
        return self._suite

    @property
    def hpke_public_key(self) -> bytes:
        return self._hpke_public

    @property
    def signing_public_key(self) -> bytes:
        return self._signing.public_key().public_bytes_raw()

    @property
    def key_id(self) -> bytes:
        return key_id_for(self._hpke_public)

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature over `message` with this device's signing key."""
        return self._signing.sign(message)

    def sign_device_record(self, user_id: uuid.UUID, device_id: uuid.UUID) -> bytes:
        """Self-signature of this device's public keys for the key directory."""
        return self.sign(
            device_signed_bytes(
                user_id, device_id, self._suite, self._hpke_public, self.signing_public_key
            )
        )

    def unwrap(self, wrapped: bytes, info: bytes) -> bytes:
        """HPKE-open a wrapped content key; raises cryptography's InvalidTag on failure."""
        return _HPKE_SUITES[self._suite].decrypt(wrapped, self._hpke, info=info)

    def __repr__(self) -> str:
        return f"DeviceKeys(suite={self._suite}, key_id={self.key_id.hex()})"


def pad(text: bytes) -> bytes:
    """u32 length || text || zeros, up to the smallest bucket that fits."""
    needed = 4 + len(text)
    for bucket in BUCKETS:
        if needed <= bucket:
            return struct.pack(">I", len(text)) + text + bytes(bucket - needed)
    raise ValueError(f"text too long: {len(text)} bytes, at most {MAX_TEXT_BYTES}")


def unpad(padded: bytes) -> bytes:
    """Inverse of `pad`; accepts only the exact, canonical padding `pad` produces."""
    if len(padded) not in BUCKETS:
        raise ValueError(f"bad padding: {len(padded)} bytes is not a bucket size")
    (length,) = struct.unpack(">I", padded[:4])
    if length > len(padded) - 4:
        raise ValueError(f"bad padding: declared length {length} exceeds the bucket")
    if len(pad(b"\0" * length)) != len(padded):
        raise ValueError("bad padding: not the smallest bucket for its length")
    if any(padded[4 + length :]):
        raise ValueError("bad padding: non-zero padding bytes")
    return padded[4 : 4 + length]


def _hpke_wrap(suite: int, hpke_public_key: bytes, content_key: bytes, info: bytes) -> bytes:
    public = hpke_public_key_from_bytes(suite, hpke_public_key)
    return _HPKE_SUITES[suite].encrypt(content_key, public, info=info)


def seal(
    *,
    text: str,
    kind: int,
    flags: int,
    message_id: uuid.UUID,
    relationship_id: uuid.UUID,
    sender_user_id: uuid.UUID,
    sender_device_id: uuid.UUID,
    sender_keys: DeviceKeys,
    recipients: Sequence[RecipientKey | tuple[uuid.UUID, uuid.UUID, int, bytes]],
    sent_at_ms: int,
    _content_key: bytes | None = None,
    _nonce: bytes | None = None,
    _wrap: WrapFunction | None = None,
) -> Envelope:
    """Encrypt `text` once and wrap its key for every recipient device; sign the result.

    The envelope's suite is the sender's suite and every recipient must use it.
    Include the sender's own devices in `recipients` to read one's own history.
    Parameters starting with `_` exist only to reproduce test vectors.
    """
    suite = sender_keys.suite
    padded = pad(text.encode("utf-8"))
    content_key = os.urandom(CONTENT_KEY_LENGTH) if _content_key is None else _content_key
    nonce = os.urandom(NONCE_LENGTH) if _nonce is None else _nonce
    if len(content_key) != CONTENT_KEY_LENGTH or len(nonce) != NONCE_LENGTH:
        raise ValueError("content key must be 32 bytes and nonce 12 bytes")
    if not 1 <= len(recipients) <= MAX_RECIPIENTS:
        raise ValueError(f"need 1..{MAX_RECIPIENTS} recipients, got {len(recipients)}")
    wrap = _hpke_wrap if _wrap is None else _wrap

    core = encode_core_header(
        suite=suite,
        kind=kind,
        flags=flags,
        message_id=message_id,
        relationship_id=relationship_id,
        sender_user_id=sender_user_id,
        sender_device_id=sender_device_id,
        sent_at_ms=sent_at_ms,
    )
    entries = []
    for user_id, device_id, recipient_suite, public_key in sorted(
        (RecipientKey(*r) for r in recipients), key=lambda r: r.user_id.bytes + r.device_id.bytes
    ):
        if recipient_suite != suite:
            raise ValueError(
                f"recipient {user_id}/{device_id} uses suite 0x{recipient_suite:02x}, "
                f"the envelope uses 0x{suite:02x}"
            )
        key_id = key_id_for(public_key)
        info = wrap_info(core, user_id, device_id, key_id)
        wrapped = wrap(suite, public_key, content_key, info)
        entries.append(Recipient(user_id, device_id, key_id, wrapped))
    recipient_tuple = tuple(entries)  # Envelope rejects duplicates below

    ciphertext = AESGCM(content_key).encrypt(nonce, padded, encode_header(core, recipient_tuple))
    unsigned = Envelope(
        suite=suite,
        kind=kind,
        flags=flags,
        message_id=message_id,
        relationship_id=relationship_id,
        sender_user_id=sender_user_id,
        sender_device_id=sender_device_id,
        sent_at_ms=sent_at_ms,
        recipients=recipient_tuple,
        nonce=nonce,
        ciphertext=ciphertext,
        signature=bytes(64),
    )
    return replace(unsigned, signature=sender_keys.sign(unsigned.signed_bytes()))


def open_envelope(
    env: Envelope,
    *,
    user_id: uuid.UUID,
    device_id: uuid.UUID,
    keys: DeviceKeys,
    sender_signing_public_key: bytes,
) -> str:
    """Verify, unwrap and decrypt an envelope addressed to this device; return its text.

    `sender_signing_public_key` must be the pinned key of (env.sender_user_id,
    env.sender_device_id). Every failure raises DecryptError.
    """
    if not verify_envelope_signature(env, sender_signing_public_key):
        raise DecryptError("cannot open envelope: signature does not verify for the sender's key")
    mine = [r for r in env.recipients if r.user_id == user_id and r.device_id == device_id]
    if not mine:
        raise DecryptError("cannot open envelope: not addressed to this device")
    entry = mine[0]
    if env.suite != keys.suite or entry.key_id != keys.key_id:
        raise DecryptError("cannot open envelope: sealed to a different key of this device")
    info = wrap_info(env.core_header(), entry.user_id, entry.device_id, entry.key_id)
    try:
        content_key = keys.unwrap(entry.wrapped, info)
        if len(content_key) != CONTENT_KEY_LENGTH:
            raise ValueError("wrapped content key has the wrong length")
        padded = AESGCM(content_key).decrypt(env.nonce, env.ciphertext, env.header())
        return unpad(padded).decode("utf-8")
    except (InvalidTag, ValueError) as exc:
        # UnicodeDecodeError is a ValueError too.
        raise DecryptError("cannot open envelope: decryption failed") from exc


def _fingerprint_digits(user_id: uuid.UUID, signing_keys: Sequence[bytes]) -> str:
    keys = sorted(set(signing_keys))
    if not keys:
        raise ValueError(f"no signing keys for user {user_id}")
    if any(len(k) != 32 for k in keys):
        raise ValueError("signing keys must be 32-byte Ed25519 public keys")
    material = struct.pack(">H", len(keys)) + b"".join(keys)
    digest = hashlib.sha512(SAFETY_NUMBER_CONTEXT + user_id.bytes + material).digest()
    for _ in range(SAFETY_NUMBER_ITERATIONS - 1):
        digest = hashlib.sha512(digest + material).digest()
    chunks = (int.from_bytes(digest[i : i + 5], "big") % 100_000 for i in range(0, 30, 5))
    return "".join(f"{chunk:05d}" for chunk in chunks)


def safety_number(
    user_a: uuid.UUID,
    signing_keys_a: Sequence[bytes],
    user_b: uuid.UUID,
    signing_keys_b: Sequence[bytes],
) -> str:
    """60 digits in 12 groups of 5 that two users compare in person.

    Each side gets 30 digits from an iterated SHA-512 over its user id and its
    sorted set of device signing keys; the two halves are ordered numerically so
    both users see the same number. Algorithm: docs/protocol.md, "Safety numbers".
    """
    halves = sorted((_fingerprint_digits(user_a, signing_keys_a),
                     _fingerprint_digits(user_b, signing_keys_b)))
    digits = "".join(halves)
    return " ".join(digits[i : i + 5] for i in range(0, 60, 5))
