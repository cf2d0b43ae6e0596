"""A small file of device secrets, sealed under the user's passphrase.

Argon2id stretches the passphrase; AES-256-GCM seals the JSON payload with the
file header as associated data. Format: docs/protocol.md, "Keystore file".
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import struct
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

MAGIC: Final = b"ILDK"
VERSION: Final = 1
KDF_ARGON2ID: Final = 1
AEAD_AES_256_GCM: Final = 1

SALT_LENGTH: Final = 16
NONCE_LENGTH: Final = 12
CHECK_LENGTH: Final = 32
CHECKSUM_LENGTH: Final = 32
TAG_LENGTH: Final = 16

# magic, version, kdf, memory KiB, iterations, lanes, salt, aead, nonce, passphrase check
_HEADER = struct.Struct(">4sBBIII16sB12s32s")
HEADER_LENGTH: Final = _HEADER.size

# Refuse absurd costs from a corrupt file before allocating gigabytes.
_MAX_MEMORY_KIB = 4 * 1024 * 1024
_MAX_ITERATIONS = 64
_MAX_LANES = 64


class KeystoreError(Exception):
    """The keystore is missing, corrupt, tampered with or of an unknown format."""


class WrongPassphrase(KeystoreError):
    """The passphrase does not open this keystore."""


@dataclass(frozen=True, slots=True)
class KdfParams:
    """Argon2id cost. The default follows OWASP's 64 MiB / 3 passes / 4 lanes."""

    memory_cost_kib: int = 64 * 1024
    iterations: int = 3
    lanes: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.lanes <= _MAX_LANES:
            raise ValueError(f"lanes must be 1..{_MAX_LANES}, got {self.lanes}")
        if not 1 <= self.iterations <= _MAX_ITERATIONS:
            raise ValueError(f"iterations must be 1..{_MAX_ITERATIONS}, got {self.iterations}")
        if not 8 * self.lanes <= self.memory_cost_kib <= _MAX_MEMORY_KIB:
            raise ValueError(
                f"memory_cost_kib must be {8 * self.lanes}..{_MAX_MEMORY_KIB}, "
                f"got {self.memory_cost_kib}"
            )


DEFAULT_KDF_PARAMS: Final = KdfParams()


def _derive(passphrase: str, salt: bytes, params: KdfParams) -> tuple[bytes, bytes]:
    """(AEAD key, passphrase check) from one 64-byte Argon2id output."""
    # NFC so the same passphrase typed on different platforms gives the same bytes.
    secret = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    output = Argon2id(
        salt=salt,
        length=64,
        iterations=params.iterations,
        lanes=params.lanes,
        memory_cost=params.memory_cost_kib,
    ).derive(secret)
    return output[:32], output[32:]


def save_keystore(
    path: Path,
    passphrase: str,
    data: dict[str, Any],
    *,
    kdf_params: KdfParams = DEFAULT_KDF_PARAMS,
) -> None:
    """Seal `data` (JSON-serialisable) under `passphrase` and atomically write it, mode 0600.

    A fresh salt and nonce are drawn on every save.
    """
    if not passphrase:
        raise ValueError("refusing to save a keystore with an empty passphrase")
    payload = json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")
    salt = os.urandom(SALT_LENGTH)
    nonce = os.urandom(NONCE_LENGTH)
    key, check = _derive(passphrase, salt, kdf_params)
    header = _HEADER.pack(
        MAGIC,
        VERSION,
        KDF_ARGON2ID,
        kdf_params.memory_cost_kib,
        kdf_params.iterations,
        kdf_params.lanes,
        salt,
        AEAD_AES_256_GCM,
        nonce,
        check,
    )
    sealed = header + AESGCM(key).encrypt(nonce, payload, header)
    _atomic_write(Path(path), sealed + hashlib.sha256(sealed).digest())


def _atomic_write(path: Path, content: bytes) -> None:
    directory = path.parent
    # mkstemp creates the file 0600 and exclusively, so no other user ever sees it.
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            os.fchmod(tmp.fileno(), 0o600)
            tmp.write(content)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    # Make the rename itself durable.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_keystore(path: Path, passphrase: str) -> dict[str, Any]:
    """Open the keystore at `path`.

    Raises WrongPassphrase if the passphrase is wrong, KeystoreError if the file
    is missing, corrupt, tampered with or of an unknown format.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KeystoreError(f"cannot read keystore {path}: {exc.strerror}") from exc

    if len(raw) < HEADER_LENGTH + TAG_LENGTH + CHECKSUM_LENGTH or raw[:4] != MAGIC:
        raise KeystoreError(f"{path} is not an Interlude keystore")
    sealed, checksum = raw[:-CHECKSUM_LENGTH], raw[-CHECKSUM_LENGTH:]
    if not hmac.compare_digest(hashlib.sha256(sealed).digest(), checksum):
        raise KeystoreError(f"keystore {path} is corrupt (checksum mismatch)")
    header = sealed[:HEADER_LENGTH]
    (_, version, kdf, memory_kib, iterations, lanes, salt, aead, nonce, check) = (
        _HEADER.unpack(header)
    )
    if version != VERSION:
        raise KeystoreError(f"keystore {path} has unsupported version {version}")
    if kdf != KDF_ARGON2ID or aead != AEAD_AES_256_GCM:
        raise KeystoreError(f"keystore {path} uses unknown algorithms (kdf {kdf}, aead {aead})")
    try:
        params = KdfParams(memory_cost_kib=memory_kib, iterations=iterations, lanes=lanes)
    except ValueError as exc:
        raise KeystoreError(f"keystore {path} has invalid KDF parameters: {exc}") from exc

    key, expected_check = _derive(passphrase, salt, params)
    if not hmac.compare_digest(check, expected_check):
        raise WrongPassphrase(f"wrong passphrase for keystore {path}")
    try:
        payload = AESGCM(key).decrypt(nonce, sealed[HEADER_LENGTH:], header)
    except InvalidTag as exc:
        raise KeystoreError(f"keystore {path} failed authentication (tampered?)") from exc
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise KeystoreError(f"keystore {path} holds malformed JSON") from exc
    if not isinstance(data, dict):
        raise KeystoreError(f"keystore {path} does not hold a JSON object")
    return data
