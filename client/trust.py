"""Trust on first use: pinning the device keys of the people one talks to.

The server's key directory is not trusted. Every device record must carry its
own valid self-signature, and the first keys seen for a person are pinned in
the keystore. A key that later appears and is not pinned (a new device, a
reinstalled one, or a server trying to listen in) stops sending until the user
has compared safety numbers and run `interlude-client trust`.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from client.api import Device
from client.crypto import RecipientKey, safety_number
from client.session import Peer, PinnedKey, State
from shared.envelope import key_id_for, verify_device_record

PROG = "interlude-client"


class TrustError(Exception):
    """Sending would trust keys the user has not accepted: exit 3."""


class UnsignedDevice(TrustError):
    """The server sent a device record that is not self-signed by its key."""


@dataclass(frozen=True, slots=True)
class VerifiedDevice:
    """A device record whose self-signature checked out, with its keys decoded."""

    user_id: uuid.UUID
    device_id: uuid.UUID
    suite: int
    hpke_public_key: bytes
    signing_public_key: bytes
    pin: PinnedKey

    def recipient(self) -> RecipientKey:
        return RecipientKey(self.user_id, self.device_id, self.suite, self.hpke_public_key)


def verify_device(device: Device) -> VerifiedDevice | None:
    """The decoded record if its self-signature is valid, else None."""
    try:
        hpke = base64.b64decode(device.hpke_public_key, validate=True)
        signing = base64.b64decode(device.signing_public_key, validate=True)
        signature = base64.b64decode(device.signature, validate=True)
    except (binascii.Error, ValueError):
        return None
    if not verify_device_record(device.user_id, device.device_id, device.suite, hpke, signing,
                                signature):
        return None
    if key_id_for(hpke).hex() != device.key_id.lower():
        return None
    pin = PinnedKey(str(device.device_id), device.signing_public_key, device.key_id.lower())
    return VerifiedDevice(device.user_id, device.device_id, device.suite, hpke, signing, pin)


def verify_devices(devices: Iterable[Device]) -> list[VerifiedDevice]:
    """Every record verified; raises UnsignedDevice on the first bad one."""
    verified = []
    for device in devices:
        checked = verify_device(device)
        if checked is None:
            raise UnsignedDevice(
                f"the server sent a device record for user {device.user_id} (device "
                f"{device.device_id}) that is not validly self-signed; refusing to use it")
        verified.append(checked)
    return verified


def own_pin(state: State) -> PinnedKey:
    """This device's own key, as the pin a published record of it would give."""
    return PinnedKey(str(state.device_id),
                     base64.b64encode(state.keys.signing_public_key).decode("ascii"),
                     state.keys.key_id.hex())


@dataclass(frozen=True, slots=True)
class PinReport:
    first_seen: tuple[uuid.UUID, ...]  # people whose keys were pinned just now
    changed: tuple[uuid.UUID, ...]  # people with current keys that are not pinned

    @property
    def state_changed(self) -> bool:
        return bool(self.first_seen)


def check_pins(state: State, devices: Sequence[VerifiedDevice],
               emails: dict[uuid.UUID, str]) -> PinReport:
    """Pin the keys of people seen for the first time; report people whose keys changed.

    Mutates `state.pins` for first-seen people only. The user's own other devices
    are pinned like a peer's, so a device the server adds to one's own account
    is noticed too; this device's own key is always trusted.
    """
    mine = own_pin(state)
    current: dict[uuid.UUID, set[PinnedKey]] = {}
    for device in devices:
        current.setdefault(device.user_id, set()).add(device.pin)
    first_seen, changed = [], []
    for user_id, keys in sorted(current.items()):
        trusted_extra = {mine} if user_id == state.user.id else set()
        peer = state.pins.get(user_id)
        if peer is None:
            state.pins[user_id] = Peer(emails.get(user_id, ""), keys | trusted_extra)
            first_seen.append(user_id)
        elif not keys <= peer.keys | trusted_extra:
            changed.append(user_id)
    return PinReport(tuple(first_seen), tuple(changed))


def accept_keys(state: State, user_id: uuid.UUID, devices: Sequence[VerifiedDevice],
                email: str) -> int:
    """Add `user_id`'s current keys to its pins (`trust`); return how many were new."""
    keys = {d.pin for d in devices if d.user_id == user_id}
    peer = state.pins.setdefault(user_id, Peer(email))
    new = len(keys - peer.keys)
    peer.keys |= keys
    if email:
        peer.email = email
    return new


def is_pinned(state: State, user_id: uuid.UUID, device_id: uuid.UUID,
              signing_public_key: bytes) -> bool:
    """True if this (device, signing key) of `user_id` is pinned or is this device."""
    encoded = base64.b64encode(signing_public_key).decode("ascii")
    if user_id == state.user.id and device_id == state.device_id:
        return encoded == own_pin(state).signing_public_key
    peer = state.pins.get(user_id)
    return peer is not None and any(
        k.device_id == str(device_id) and k.signing_public_key == encoded for k in peer.keys)


def change_warning(email: str) -> str:
    """The loud, several-line warning printed when a person's keys changed."""
    bar = "!" * 72
    return "\n".join([
        bar,
        f"WARNING: the keys of {email} have changed since you last trusted them.",
        "WARNING: they may have a new or reinstalled device -- or someone (even the",
        "WARNING: server) may be trying to read your messages.",
        "WARNING: nothing was sent. Compare safety numbers in person",
        f"WARNING: (`{PROG} fingerprint {email}`), and only if they match run",
        f"WARNING:     {PROG} trust {email}",
        bar,
    ])


def safety_number_for(me: uuid.UUID, peer: uuid.UUID,
                      devices: Sequence[VerifiedDevice]) -> str:
    """The safety number of the current keys of `me` and `peer`."""
    mine = [d.signing_public_key for d in devices if d.user_id == me]
    theirs = [d.signing_public_key for d in devices if d.user_id == peer]
    if not mine or not theirs:
        missing = "you have" if not mine else "the other person has"
        raise TrustError(f"no safety number yet: {missing} no published device keys")
    return safety_number(me, mine, peer, theirs)
