"""Envelope wire format (shared.envelope) and sealing/opening (client.crypto)."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import struct
import uuid

import pytest
from cryptography.hazmat.primitives.hpke import KEM
from hypothesis import given
from hypothesis import strategies as st

from client.crypto import (
    BUCKETS,
    DecryptError,
    DeviceKeys,
    RecipientKey,
    open_envelope,
    pad,
    safety_number,
    seal,
    unpad,
)
from shared.envelope import (
    FLAG_URGENT,
    HPKE_PUBLIC_KEY_LENGTHS,
    KIND_CHECKIN,
    KIND_REPLY,
    MAX_ENVELOPE_BYTES,
    MAX_RECIPIENTS,
    SUITE_MLKEM768_X25519,
    SUITE_X25519,
    WRAPPED_KEY_LENGTHS,
    Envelope,
    EnvelopeError,
    Recipient,
    device_signed_bytes,
    encode_body,
    encode_header,
    key_id_for,
    parse_envelope,
    verify_device_record,
    verify_envelope_signature,
)

SUITES = [SUITE_MLKEM768_X25519, SUITE_X25519]


@dataclasses.dataclass
class Device:
    user_id: uuid.UUID
    device_id: uuid.UUID
    keys: DeviceKeys

    @property
    def recipient(self) -> RecipientKey:
        keys = self.keys
        return RecipientKey(self.user_id, self.device_id, keys.suite, keys.hpke_public_key)

    def open(self, env: Envelope, signer: Device) -> str:
        return open_envelope(
            env,
            user_id=self.user_id,
            device_id=self.device_id,
            keys=self.keys,
            sender_signing_public_key=signer.keys.signing_public_key,
        )


def make_device(suite: int, user_id: uuid.UUID | None = None) -> Device:
    return Device(user_id or uuid.uuid4(), uuid.uuid4(), DeviceKeys.generate(suite))


def make_envelope(
    sender: Device, recipients: list[Device], text: str = "hello", **overrides: object
) -> Envelope:
    kwargs: dict[str, object] = {
        "text": text,
        "kind": KIND_CHECKIN,
        "flags": 0,
        "message_id": uuid.uuid4(),
        "relationship_id": uuid.uuid4(),
        "sender_user_id": sender.user_id,
        "sender_device_id": sender.device_id,
        "sender_keys": sender.keys,
        "recipients": [d.recipient for d in recipients],
        "sent_at_ms": 1_767_225_600_000,
    }
    kwargs.update(overrides)
    return seal(**kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=SUITES, ids=["mlkem768x25519", "x25519"])
def trio(request: pytest.FixtureRequest) -> tuple[Device, Device, Device]:
    """Sender's phone, sender's laptop, and the therapist's desktop, all in one suite."""
    suite: int = request.param
    phone = make_device(suite)
    laptop = make_device(suite, phone.user_id)
    therapist = make_device(suite)
    return phone, laptop, therapist


# --- round trips -------------------------------------------------------------------------


def test_round_trip_to_every_recipient_including_own_devices(
    trio: tuple[Device, Device, Device],
) -> None:
    phone, laptop, therapist = trio
    other = make_device(phone.keys.suite, therapist.user_id)
    text = "Slept badly. Tried the exercise — it helped. 🌱" * 3
    env = make_envelope(phone, [therapist, other, laptop, phone], text, flags=FLAG_URGENT)

    parsed = parse_envelope(env.to_bytes())
    assert parsed == env
    assert parsed.urgent
    assert len(parsed.recipients) == 4
    for device in (phone, laptop, therapist, other):
        assert device.open(parsed, signer=phone) == text


def test_recipients_are_sorted_whatever_the_input_order(
    trio: tuple[Device, Device, Device],
) -> None:
    phone, laptop, therapist = trio
    env = make_envelope(phone, [therapist, laptop, phone])
    keys = [r.user_id.bytes + r.device_id.bytes for r in env.recipients]
    assert keys == sorted(keys)


def test_reply_with_empty_text_round_trips(trio: tuple[Device, Device, Device]) -> None:
    phone, _, therapist = trio
    env = make_envelope(therapist, [phone, therapist], "", kind=KIND_REPLY)
    assert not env.urgent
    assert len(env.ciphertext) == 256 + 16
    assert phone.open(parse_envelope(env.to_bytes()), signer=therapist) == ""


def test_envelope_layout_matches_the_spec(trio: tuple[Device, Device, Device]) -> None:
    phone, _, therapist = trio
    env = make_envelope(phone, [phone, therapist])
    raw = env.to_bytes()
    core = env.core_header()
    assert len(core) == 79
    assert core[:7] == b"ILD\x01" + bytes([phone.keys.suite, KIND_CHECKIN, 0])
    assert core[7:23] == env.message_id.bytes
    assert core[71:79] == struct.pack(">Q", env.sent_at_ms)
    assert raw == env.header() + env.body() + env.signature
    assert env.header()[79:81] == b"\x00\x02"
    assert env.body()[:12] == env.nonce
    assert env.body()[12:16] == struct.pack(">I", len(env.ciphertext))
    assert env.signed_bytes() == b"interlude/v1/envelope" + env.header() + env.body()
    for r in env.recipients:
        assert len(r.wrapped) == WRAPPED_KEY_LENGTHS[env.suite]


# --- tampering, wrong recipient, wrong signer --------------------------------------------


def test_every_flipped_bit_position_is_rejected(trio: tuple[Device, Device, Device]) -> None:
    phone, _, therapist = trio
    raw = make_envelope(phone, [therapist], "short").to_bytes()
    assert therapist.open(parse_envelope(raw), signer=phone) == "short"

    rejected_by_parser = rejected_by_open = 0
    for index in range(len(raw)):
        tampered = bytearray(raw)
        tampered[index] ^= 1 << (index % 8)
        try:
            env = parse_envelope(bytes(tampered))
        except EnvelopeError:
            rejected_by_parser += 1
            continue
        with pytest.raises(DecryptError):
            therapist.open(env, signer=phone)
        rejected_by_open += 1
    assert rejected_by_parser + rejected_by_open == len(raw)
    assert rejected_by_open > len(raw) // 2


def test_resigned_header_changes_break_decryption(trio: tuple[Device, Device, Device]) -> None:
    """A sender who re-signs a modified envelope still cannot move ciphertexts around."""
    phone, laptop, therapist = trio
    env = make_envelope(phone, [phone, laptop, therapist])

    def resigned(**changes: object) -> Envelope:
        changed = dataclasses.replace(env, **changes)  # type: ignore[arg-type]
        return dataclasses.replace(changed, signature=phone.keys.sign(changed.signed_bytes()))

    swapped = list(env.recipients)
    swapped[0], swapped[1] = (
        dataclasses.replace(swapped[0], wrapped=swapped[1].wrapped),
        dataclasses.replace(swapped[1], wrapped=swapped[0].wrapped),
    )
    for forged in (
        resigned(kind=KIND_REPLY),
        resigned(flags=FLAG_URGENT),
        resigned(sent_at_ms=env.sent_at_ms + 1),
        resigned(message_id=uuid.uuid4()),
        resigned(recipients=tuple(swapped)),
        resigned(recipients=env.recipients[:2]),  # drop the therapist: AAD changes
    ):
        assert verify_envelope_signature(forged, phone.keys.signing_public_key)
        with pytest.raises(DecryptError):
            phone.open(forged, signer=phone)


def test_device_not_among_recipients_is_rejected(trio: tuple[Device, Device, Device]) -> None:
    phone, laptop, therapist = trio
    env = make_envelope(phone, [phone, therapist])
    with pytest.raises(DecryptError, match="not addressed to this device"):
        laptop.open(env, signer=phone)
    stranger = make_device(phone.keys.suite)
    with pytest.raises(DecryptError):
        stranger.open(env, signer=phone)


def test_right_ids_with_other_keys_are_rejected(trio: tuple[Device, Device, Device]) -> None:
    phone, _, therapist = trio
    env = make_envelope(phone, [phone, therapist])
    rotated = Device(therapist.user_id, therapist.device_id, DeviceKeys.generate(phone.keys.suite))
    with pytest.raises(DecryptError, match="different key"):
        rotated.open(env, signer=phone)
    other_suite = ({SUITE_X25519, SUITE_MLKEM768_X25519} - {phone.keys.suite}).pop()
    wrong_suite = Device(therapist.user_id, therapist.device_id, DeviceKeys.generate(other_suite))
    with pytest.raises(DecryptError):
        wrong_suite.open(env, signer=phone)


def test_wrong_signer_is_rejected(trio: tuple[Device, Device, Device]) -> None:
    phone, laptop, therapist = trio
    env = make_envelope(phone, [phone, laptop, therapist])
    assert not verify_envelope_signature(env, laptop.keys.signing_public_key)
    with pytest.raises(DecryptError, match="signature"):
        therapist.open(env, signer=laptop)
    with pytest.raises(DecryptError, match="signature"):
        open_envelope(
            env,
            user_id=therapist.user_id,
            device_id=therapist.device_id,
            keys=therapist.keys,
            sender_signing_public_key=b"\x00" * 31,
        )


def test_forged_signature_by_recipient_is_rejected(trio: tuple[Device, Device, Device]) -> None:
    phone, _, therapist = trio
    env = make_envelope(phone, [phone, therapist])
    forged = dataclasses.replace(env, signature=therapist.keys.sign(env.signed_bytes()))
    with pytest.raises(DecryptError):
        phone.open(forged, signer=phone)


# --- seal refuses bad input --------------------------------------------------------------


def test_seal_refuses_recipients_in_another_suite() -> None:
    sender = make_device(SUITE_MLKEM768_X25519)
    legacy = make_device(SUITE_X25519)
    with pytest.raises(ValueError, match="suite"):
        make_envelope(sender, [sender, legacy])


def test_seal_refuses_duplicate_and_too_many_recipients() -> None:
    sender = make_device(SUITE_X25519)
    with pytest.raises(EnvelopeError, match="duplicate recipient"):
        make_envelope(sender, [sender, sender])
    many = [make_device(SUITE_X25519) for _ in range(MAX_RECIPIENTS + 1)]
    with pytest.raises(ValueError, match="recipients"):
        make_envelope(sender, many)
    with pytest.raises(ValueError, match="recipients"):
        make_envelope(sender, [])


def test_seal_refuses_bad_kind_flags_and_long_text() -> None:
    sender = make_device(SUITE_X25519)
    with pytest.raises(EnvelopeError, match="unknown kind 0x03"):
        make_envelope(sender, [sender], kind=3)
    with pytest.raises(EnvelopeError, match="unknown flag bits 0x02"):
        make_envelope(sender, [sender], flags=2)
    with pytest.raises(ValueError, match="too long"):
        make_envelope(sender, [sender], "x" * (BUCKETS[-1] - 3))


def test_largest_envelope_fits_the_size_limit() -> None:
    sender = make_device(SUITE_MLKEM768_X25519)
    devices = [sender] + [make_device(SUITE_MLKEM768_X25519) for _ in range(MAX_RECIPIENTS - 1)]
    env = make_envelope(sender, devices, "x" * (BUCKETS[-1] - 4))
    raw = env.to_bytes()
    assert len(raw) == 143_153 <= MAX_ENVELOPE_BYTES
    assert devices[-1].open(parse_envelope(raw), signer=sender) == "x" * (BUCKETS[-1] - 4)


# --- parse_envelope rejects malformed input -----------------------------------------------


@pytest.fixture(scope="module")
def small() -> tuple[Envelope, Device, Device]:
    sender = make_device(SUITE_X25519)
    other = make_device(SUITE_X25519)
    return make_envelope(sender, [sender, other], "hi"), sender, other


def _patched(raw: bytes, offset: int, value: bytes) -> bytes:
    return raw[:offset] + value + raw[offset + len(value) :]


def test_parse_rejects_every_truncation(small: tuple[Envelope, Device, Device]) -> None:
    raw = small[0].to_bytes()
    for length in range(len(raw)):
        with pytest.raises(EnvelopeError):
            parse_envelope(raw[:length])
    with pytest.raises(EnvelopeError, match="truncated envelope: signature"):
        parse_envelope(raw[:-1])


def test_parse_rejects_trailing_bytes(small: tuple[Envelope, Device, Device]) -> None:
    with pytest.raises(EnvelopeError, match="1 trailing bytes"):
        parse_envelope(small[0].to_bytes() + b"\x00")


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0, b"ILE", "bad magic"),
        (3, b"\x02", "unsupported version 0x02"),
        (4, b"\x07", "unknown suite 0x07"),
        (4, b"\x00", "unknown suite 0x00"),
        (5, b"\x03", "unknown kind 0x03"),
        (6, b"\x81", "unknown flag bits 0x80"),
        (79, b"\x00\x00", "recipient count 0 out of range"),
        (79, b"\x00\x41", "recipient count 65 out of range"),
    ],
)
def test_parse_rejects_bad_fields(
    small: tuple[Envelope, Device, Device], offset: int, value: bytes, message: str
) -> None:
    with pytest.raises(EnvelopeError, match=message):
        parse_envelope(_patched(small[0].to_bytes(), offset, value))


def test_parse_rejects_suite_whose_wrap_size_does_not_match(
    small: tuple[Envelope, Device, Device],
) -> None:
    raw = _patched(small[0].to_bytes(), 4, bytes([SUITE_MLKEM768_X25519]))
    with pytest.raises(EnvelopeError, match="wrapped key is 80 bytes"):
        parse_envelope(raw)


def _reassemble(env: Envelope, recipients: tuple[Recipient, ...], ciphertext: bytes) -> bytes:
    return (
        encode_header(env.core_header(), recipients)
        + encode_body(env.nonce, ciphertext)
        + env.signature
    )


def test_parse_rejects_unsorted_and_duplicate_recipients(
    small: tuple[Envelope, Device, Device],
) -> None:
    env = small[0]
    first, second = env.recipients
    with pytest.raises(EnvelopeError, match="recipient list not sorted"):
        parse_envelope(_reassemble(env, (second, first), env.ciphertext))
    with pytest.raises(EnvelopeError, match="duplicate recipient"):
        parse_envelope(_reassemble(env, (first, first), env.ciphertext))


@pytest.mark.parametrize("ct_len", [0, 16, 255 + 16, 257 + 16, 300, 65536 + 32])
def test_parse_rejects_ciphertext_not_a_bucket(
    small: tuple[Envelope, Device, Device], ct_len: int
) -> None:
    env = small[0]
    raw = _reassemble(env, env.recipients, bytes(ct_len))
    with pytest.raises(EnvelopeError, match=f"ciphertext length {ct_len} is not a padding bucket"):
        parse_envelope(raw)


def test_parse_rejects_oversized_input() -> None:
    with pytest.raises(EnvelopeError, match="too large"):
        parse_envelope(b"ILD\x01" + bytes(MAX_ENVELOPE_BYTES))


def test_envelope_constructor_validates(small: tuple[Envelope, Device, Device]) -> None:
    env = small[0]
    with pytest.raises(EnvelopeError, match="nonce"):
        dataclasses.replace(env, nonce=b"\x00" * 11)
    with pytest.raises(EnvelopeError, match="signature"):
        dataclasses.replace(env, signature=b"\x00" * 63)
    with pytest.raises(EnvelopeError, match="key id"):
        Recipient(env.sender_user_id, env.sender_device_id, b"\x00" * 7, b"")


# --- keys, key ids, device records --------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES)
def test_device_keys_serialise_and_measure(suite: int) -> None:
    keys = DeviceKeys.generate(suite)
    assert len(keys.hpke_public_key) == HPKE_PUBLIC_KEY_LENGTHS[suite]
    assert len(keys.signing_public_key) == 32
    assert keys.key_id == hashlib.sha256(keys.hpke_public_key).digest()[:8]
    assert keys.key_id == key_id_for(keys.hpke_public_key)
    for copy in (DeviceKeys.from_dict(keys.to_dict()), DeviceKeys.from_bytes(keys.to_bytes())):
        assert copy.suite == suite
        assert copy.hpke_public_key == keys.hpke_public_key
        assert copy.signing_public_key == keys.signing_public_key
    assert keys.to_dict()["hpke_private"] not in repr(keys)


def test_device_keys_reject_malformed_material() -> None:
    good = DeviceKeys.generate(SUITE_X25519).to_dict()
    with pytest.raises(ValueError, match="malformed"):
        DeviceKeys.from_dict({**good, "hpke_private": "not base64!"})
    with pytest.raises(ValueError, match="malformed"):
        DeviceKeys.from_dict({"suite": 2})
    with pytest.raises(ValueError, match="unknown suite"):
        DeviceKeys.from_dict({**good, "suite": 9})
    with pytest.raises(ValueError, match="needs"):
        DeviceKeys.from_bytes(DeviceKeys.generate(SUITE_X25519).to_bytes()[:-1])


def test_wrap_lengths_match_pyca() -> None:
    assert WRAPPED_KEY_LENGTHS[SUITE_MLKEM768_X25519] == KEM.MLKEM768_X25519.enc_length() + 48
    assert WRAPPED_KEY_LENGTHS[SUITE_X25519] == KEM.X25519.enc_length() + 48


@pytest.mark.parametrize("suite", SUITES)
def test_device_record_signature(suite: int) -> None:
    keys = DeviceKeys.generate(suite)
    user_id, device_id = uuid.uuid4(), uuid.uuid4()
    sig = keys.sign_device_record(user_id, device_id)
    args = (user_id, device_id, suite, keys.hpke_public_key, keys.signing_public_key)
    assert verify_device_record(*args, sig)
    signed = device_signed_bytes(*args)
    assert signed.startswith(b"interlude/v1/device" + user_id.bytes + device_id.bytes)
    assert signed[51:54] == bytes([suite]) + struct.pack(">H", HPKE_PUBLIC_KEY_LENGTHS[suite])

    other = DeviceKeys.generate(suite)
    assert not verify_device_record(uuid.uuid4(), device_id, suite, *args[3:], sig)
    assert not verify_device_record(user_id, device_id, suite, other.hpke_public_key,
                                    keys.signing_public_key, sig)
    assert not verify_device_record(*args, other.sign_device_record(user_id, device_id))
    assert not verify_device_record(*args, sig[:-1])
    assert not verify_device_record(user_id, device_id, 9, *args[3:], sig)
    assert not verify_device_record(user_id, device_id, suite, keys.hpke_public_key[:-1],
                                    keys.signing_public_key, sig)
    with pytest.raises(ValueError, match="HPKE public key is"):
        device_signed_bytes(user_id, device_id, suite, b"\x00", keys.signing_public_key)


# --- padding -----------------------------------------------------------------------------


def test_buckets_are_powers_of_two_from_256_to_65536() -> None:
    assert tuple(2**n for n in range(8, 17)) == BUCKETS


@pytest.mark.parametrize(
    ("length", "bucket"),
    [(0, 256), (252, 256), (253, 512), (508, 512), (509, 1024), (65532, 65536)],
)
def test_pad_picks_smallest_bucket(length: int, bucket: int) -> None:
    padded = pad(b"a" * length)
    assert len(padded) == bucket
    assert padded[:4] == struct.pack(">I", length)
    assert unpad(padded) == b"a" * length


def test_pad_refuses_text_beyond_the_largest_bucket() -> None:
    with pytest.raises(ValueError, match="too long"):
        pad(b"a" * 65533)


@pytest.mark.parametrize(
    ("padded", "message"),
    [
        (b"", "not a bucket size"),
        (pad(b"abc")[:-1], "not a bucket size"),
        (struct.pack(">I", 253) + bytes(252), "exceeds the bucket"),
        (struct.pack(">I", 10) + bytes(508), "not the smallest bucket"),
        (pad(b"abc")[:-1] + b"\x01", "non-zero padding"),
        (pad(b"abc")[:7] + b"\x80" + pad(b"abc")[8:], "non-zero padding"),
    ],
)
def test_unpad_rejects_bad_padding(padded: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        unpad(padded)


@given(st.binary(max_size=5000))
def test_pad_unpad_round_trip_property(text: bytes) -> None:
    padded = pad(text)
    assert len(padded) in BUCKETS
    assert len(padded) == min(b for b in BUCKETS if b >= len(text) + 4)
    assert unpad(padded) == text


@given(st.binary(min_size=256, max_size=256))
def test_unpad_never_accepts_noncanonical_property(padded: bytes) -> None:
    try:
        text = unpad(padded)
    except ValueError:
        return
    assert pad(text) == padded


# --- safety numbers ----------------------------------------------------------------------


def test_safety_number_format_symmetry_and_sensitivity() -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    a_keys = [DeviceKeys.generate(SUITE_X25519).signing_public_key for _ in range(2)]
    b_keys = [DeviceKeys.generate(SUITE_X25519).signing_public_key]
    number = safety_number(alice, a_keys, bob, b_keys)
    assert re.fullmatch(r"\d{5}( \d{5}){11}", number)
    assert safety_number(bob, b_keys, alice, a_keys) == number
    assert safety_number(alice, a_keys[::-1], bob, b_keys) == number

    new_key = DeviceKeys.generate(SUITE_X25519).signing_public_key
    variants = {
        safety_number(alice, [a_keys[0], new_key], bob, b_keys),
        safety_number(alice, a_keys, bob, [new_key]),
        safety_number(alice, [*a_keys, new_key], bob, b_keys),
        safety_number(alice, a_keys[:1], bob, b_keys),
        safety_number(uuid.uuid4(), a_keys, bob, b_keys),
    }
    assert number not in variants
    assert len(variants) == 5


def test_safety_number_refuses_bad_keys() -> None:
    with pytest.raises(ValueError, match="no signing keys"):
        safety_number(uuid.uuid4(), [], uuid.uuid4(), [b"\x00" * 32])
    with pytest.raises(ValueError, match="32-byte"):
        safety_number(uuid.uuid4(), [b"\x00" * 31], uuid.uuid4(), [b"\x00" * 32])
