"""The published test vectors (tests/vectors/envelope_v1.json) reproduce byte for byte."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from client.crypto import DeviceKeys, open_envelope, pad, safety_number, seal
from shared.envelope import (
    key_id_for,
    parse_envelope,
    verify_device_record,
    verify_envelope_signature,
    wrap_info,
)

VECTORS = json.loads(
    (Path(__file__).parent.parent / "vectors" / "envelope_v1.json").read_text(encoding="utf-8")
)
DEVICES: dict[str, dict[str, Any]] = VECTORS["devices"]
ENVELOPES: list[dict[str, Any]] = VECTORS["envelopes"]


def keys_of(name: str) -> DeviceKeys:
    device = DEVICES[name]
    return DeviceKeys(
        device["suite"],
        bytes.fromhex(device["hpke_private"]),
        bytes.fromhex(device["signing_private"]),
    )


@pytest.mark.parametrize("name", sorted(DEVICES))
def test_device_public_keys_and_record(name: str) -> None:
    device = DEVICES[name]
    keys = keys_of(name)
    assert keys.hpke_public_key.hex() == device["hpke_public_key"]
    assert keys.signing_public_key.hex() == device["signing_public_key"]
    assert keys.key_id.hex() == device["key_id"]
    assert key_id_for(bytes.fromhex(device["hpke_public_key"])).hex() == device["key_id"]
    user_id, device_id = uuid.UUID(device["user_id"]), uuid.UUID(device["device_id"])
    assert keys.sign_device_record(user_id, device_id).hex() == device["device_record_signature"]
    assert verify_device_record(
        user_id,
        device_id,
        device["suite"],
        keys.hpke_public_key,
        keys.signing_public_key,
        bytes.fromhex(device["device_record_signature"]),
    )


@pytest.fixture(params=ENVELOPES, ids=[v["name"] for v in ENVELOPES])
def vector(request: pytest.FixtureRequest) -> dict[str, Any]:
    value: dict[str, Any] = request.param
    return value


def test_recorded_wraps_decrypt_to_the_content_key(vector: dict[str, Any]) -> None:
    core_header = bytes.fromhex(vector["core_header"])
    for recipient in vector["recipients"]:
        keys = keys_of(recipient["device"])
        info = wrap_info(
            core_header,
            uuid.UUID(recipient["user_id"]),
            uuid.UUID(recipient["device_id"]),
            bytes.fromhex(recipient["key_id"]),
        )
        assert info.hex() == recipient["info"]
        assert keys.unwrap(bytes.fromhex(recipient["wrapped"]), info).hex() == vector["content_key"]


def test_seal_reproduces_the_envelope_byte_for_byte(vector: dict[str, Any]) -> None:
    wraps = {bytes.fromhex(r["key_id"]): r for r in vector["recipients"]}

    def recorded_wrap(suite: int, public_key: bytes, content_key: bytes, info: bytes) -> bytes:
        recipient = wraps[key_id_for(public_key)]
        assert suite == vector["suite"]
        assert content_key.hex() == vector["content_key"]
        assert info.hex() == recipient["info"]
        return bytes.fromhex(recipient["wrapped"])

    # Recipients go in reversed so that seal's sorting is exercised too.
    recipients = [
        (
            uuid.UUID(r["user_id"]),
            uuid.UUID(r["device_id"]),
            vector["suite"],
            bytes.fromhex(DEVICES[r["device"]]["hpke_public_key"]),
        )
        for r in reversed(vector["recipients"])
    ]
    env = seal(
        text=vector["text"],
        kind=vector["kind"],
        flags=vector["flags"],
        message_id=uuid.UUID(vector["message_id"]),
        relationship_id=uuid.UUID(vector["relationship_id"]),
        sender_user_id=uuid.UUID(vector["sender_user_id"]),
        sender_device_id=uuid.UUID(vector["sender_device_id"]),
        sender_keys=keys_of(vector["sender"]),
        recipients=recipients,
        sent_at_ms=vector["sent_at_ms"],
        _content_key=bytes.fromhex(vector["content_key"]),
        _nonce=bytes.fromhex(vector["nonce"]),
        _wrap=recorded_wrap,
    )
    assert pad(vector["text"].encode("utf-8")).hex() == vector["padded_plaintext"]
    assert env.core_header().hex() == vector["core_header"]
    assert env.header().hex() == vector["header"]
    assert env.ciphertext.hex() == vector["ciphertext"]
    assert env.body().hex() == vector["body"]
    assert env.signature.hex() == vector["signature"]
    assert env.to_bytes().hex() == vector["envelope"]


def test_recorded_envelope_parses_verifies_and_opens(vector: dict[str, Any]) -> None:
    env = parse_envelope(bytes.fromhex(vector["envelope"]))
    sender_key = bytes.fromhex(DEVICES[vector["sender"]]["signing_public_key"])
    assert verify_envelope_signature(env, sender_key)
    assert [r.key_id.hex() for r in env.recipients] == [r["key_id"] for r in vector["recipients"]]
    for recipient in vector["recipients"]:
        text = open_envelope(
            env,
            user_id=uuid.UUID(recipient["user_id"]),
            device_id=uuid.UUID(recipient["device_id"]),
            keys=keys_of(recipient["device"]),
            sender_signing_public_key=sender_key,
        )
        assert text == vector["text"]


def test_safety_number_vector() -> None:
    sn = VECTORS["safety_number"]
    keys_a = [bytes.fromhex(k) for k in sn["signing_keys_a"]]
    keys_b = [bytes.fromhex(k) for k in sn["signing_keys_b"]]
    user_a, user_b = uuid.UUID(sn["user_a"]), uuid.UUID(sn["user_b"])
    assert safety_number(user_a, keys_a, user_b, keys_b) == sn["result"]
    assert safety_number(user_b, keys_b, user_a, keys_a) == sn["result"]
