"""Webhook signing secrets at rest: sealed with AES-256-GCM under a key derived
(HKDF-SHA256) from ``INTERLUDE_INTERNAL_KEY``.

A webhook secret must be recoverable (it signs every request), so it cannot be
hashed. Sealing keeps a database dump or backup from yielding it; the channel id
is bound as associated data, so a sealed secret copied to another row does not
open. Changing ``INTERLUDE_INTERNAL_KEY`` makes the sealed secrets unreadable:
their deliveries fail until each owner rotates the secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import uuid

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
SECRET_BYTES = 32
_VERSION = b"\x01"
_NONCE_BYTES = 12


class SecretUnreadable(Exception):
    """A sealed secret does not open under the current key (the key changed)."""


def _derive(master: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)


def new_secret() -> str:
    """A fresh Standard Webhooks secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(SECRET_BYTES)).decode("ascii")


def secret_bytes(secret: str) -> bytes:
    """The key bytes of a ``whsec_`` secret (what the HMAC is keyed with)."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("not a whsec_ secret")
    return base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)


class SecretBox:
    """Seals and opens webhook secrets, and hashes verification codes, with keys
    derived from the service's internal key (one per purpose)."""

    def __init__(self, internal_key: bytes) -> None:
        self._aead = AESGCM(_derive(internal_key, b"interlude/notifier/webhook-secret/v1"))
        self._code_key = _derive(internal_key, b"interlude/notifier/verification-code/v1")

    def seal(self, channel_id: uuid.UUID, secret: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, secret.encode(), channel_id.bytes)

    def open(self, channel_id: uuid.UUID, sealed: bytes) -> str:
        if sealed[:1] != _VERSION:
            raise SecretUnreadable("unknown sealed-secret version")
        nonce, ciphertext = sealed[1:1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES:]
        try:
            return self._aead.decrypt(nonce, ciphertext, channel_id.bytes).decode()
        except InvalidTag:
            raise SecretUnreadable("the secret was sealed under another key") from None

    def code_hash(self, channel_id: uuid.UUID, code: str) -> bytes:
        """A keyed hash of a verification code: a dumped table does not give the
        (short) codes away to a brute-force search."""
        return hmac.new(self._code_key, channel_id.bytes + code.strip().encode(),
                        hashlib.sha256).digest()
