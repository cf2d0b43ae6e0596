"""Passphrase-sealed keystore file (client.keystore)."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from pathlib import Path
from typing import Any

import pytest

from client.crypto import DeviceKeys
from client.keystore import (
    DEFAULT_KDF_PARAMS,
    HEADER_LENGTH,
    KdfParams,
    KeystoreError,
    WrongPassphrase,
    load_keystore,
    save_keystore,
)

# Cheap Argon2id so the suite stays fast; the format records whatever was used.
FAST = KdfParams(memory_cost_kib=64, iterations=1, lanes=1)
PASSPHRASE = "correct horse battery staple"


@pytest.fixture
def data() -> dict[str, Any]:
    return {"device": DeviceKeys.generate().to_dict(), "note": "ünïcode ok", "n": [1, 2, 3]}


@pytest.fixture
def store(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "device.keystore"
    save_keystore(path, PASSPHRASE, data, kdf_params=FAST)
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_round_trip(store: Path, data: dict[str, Any]) -> None:
    loaded = load_keystore(store, PASSPHRASE)
    assert loaded == data
    keys = DeviceKeys.from_dict(loaded["device"])
    assert keys.hpke_public_key == DeviceKeys.from_dict(data["device"]).hpke_public_key


def test_round_trip_with_default_cost(tmp_path: Path) -> None:
    path = tmp_path / "ks"
    save_keystore(path, PASSPHRASE, {"a": 1})
    assert load_keystore(path, PASSPHRASE) == {"a": 1}
    memory, iterations, lanes = struct.unpack(">III", path.read_bytes()[6:18])
    assert (memory, iterations, lanes) == (64 * 1024, 3, 4)


def test_default_cost_is_at_least_owasp() -> None:
    # OWASP: Argon2id with m >= 19 MiB, t >= 2, p = 1 (or an equivalent trade-off).
    assert DEFAULT_KDF_PARAMS.memory_cost_kib >= 19 * 1024
    assert DEFAULT_KDF_PARAMS.iterations >= 2


def test_file_mode_is_0600_even_when_replacing_a_looser_file(
    tmp_path: Path, data: dict[str, Any]
) -> None:
    path = tmp_path / "ks"
    path.write_bytes(b"old")
    path.chmod(0o644)
    save_keystore(path, PASSPHRASE, data, kdf_params=FAST)
    assert mode(path) == 0o600
    assert os.listdir(tmp_path) == ["ks"]  # no temp file left behind


def test_each_save_uses_fresh_salt_and_nonce(tmp_path: Path, data: dict[str, Any]) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    save_keystore(first, PASSPHRASE, data, kdf_params=FAST)
    save_keystore(second, PASSPHRASE, data, kdf_params=FAST)
    a, b = first.read_bytes(), second.read_bytes()
    assert a[18:34] != b[18:34]  # salt
    assert a[35:47] != b[35:47]  # nonce
    assert load_keystore(first, PASSPHRASE) == load_keystore(second, PASSPHRASE)


def test_wrong_passphrase(store: Path) -> None:
    with pytest.raises(WrongPassphrase, match=f"wrong passphrase for keystore {store}"):
        load_keystore(store, PASSPHRASE + "!")
    with pytest.raises(WrongPassphrase):
        load_keystore(store, "")


def test_passphrase_is_unicode_normalised(tmp_path: Path) -> None:
    path = tmp_path / "ks"
    save_keystore(path, "cafe\u0301", {"a": 1}, kdf_params=FAST)  # decomposed é
    assert load_keystore(path, "caf\u00e9") == {"a": 1}  # composed é


def test_every_flipped_byte_is_a_keystore_error_not_wrong_passphrase(store: Path) -> None:
    raw = store.read_bytes()
    for index in range(len(raw)):
        tampered = bytearray(raw)
        tampered[index] ^= 0x01
        store.write_bytes(bytes(tampered))
        with pytest.raises(KeystoreError) as info:
            load_keystore(store, PASSPHRASE)
        assert type(info.value) is KeystoreError, index


def test_tampered_ciphertext_with_fixed_checksum_fails_authentication(store: Path) -> None:
    raw = bytearray(store.read_bytes()[:-32])
    raw[HEADER_LENGTH + 3] ^= 0x01
    store.write_bytes(bytes(raw) + hashlib.sha256(raw).digest())
    with pytest.raises(KeystoreError, match="failed authentication") as info:
        load_keystore(store, PASSPHRASE)
    assert type(info.value) is KeystoreError


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not an Interlude keystore"),
        (b'{"device": "plain json"}', "not an Interlude keystore"),
        (b"ILDK" + bytes(200), "corrupt"),
    ],
)
def test_garbage_files_are_rejected(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "ks"
    path.write_bytes(content)
    with pytest.raises(KeystoreError, match=message):
        load_keystore(path, PASSPHRASE)


def _rewrite_header(store: Path, offset: int, value: bytes) -> None:
    sealed = store.read_bytes()[:-32]
    sealed = sealed[:offset] + value + sealed[offset + len(value) :]
    store.write_bytes(sealed + hashlib.sha256(sealed).digest())


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (4, b"\x02", "unsupported version 2"),
        (5, b"\x02", "unknown algorithms"),
        (34, b"\x02", "unknown algorithms"),
        (6, struct.pack(">I", 2**31), "invalid KDF parameters"),
        (14, struct.pack(">I", 0), "invalid KDF parameters"),
    ],
)
def test_unknown_format_is_rejected(store: Path, offset: int, value: bytes, message: str) -> None:
    _rewrite_header(store, offset, value)
    with pytest.raises(KeystoreError, match=message):
        load_keystore(store, PASSPHRASE)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeystoreError, match="cannot read keystore"):
        load_keystore(tmp_path / "absent", PASSPHRASE)


def test_refuses_empty_passphrase_and_weird_params(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty passphrase"):
        save_keystore(tmp_path / "ks", "", {}, kdf_params=FAST)
    with pytest.raises(ValueError, match="memory_cost_kib"):
        KdfParams(memory_cost_kib=4, iterations=1, lanes=1)
    assert not (tmp_path / "ks").exists()
