"""One-time codes (enrollment, invites): easy to read aloud, stored only as hashes."""

from __future__ import annotations

import hashlib
import secrets

# No 0/O or 1/I: codes are read from a screen and typed by hand.
ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
LENGTH = 20  # 100 bits


def new_code() -> str:
    """A fresh code: 20 characters in groups of four, e.g. ``K7QF-...``."""
    raw = "".join(secrets.choice(ALPHABET) for _ in range(LENGTH))
    return "-".join(raw[i:i + 4] for i in range(0, LENGTH, 4))


def hash_code(code: str, purpose: str) -> bytes:
    """The stored form of ``code``; case, spaces and dashes do not matter."""
    normalized = code.strip().upper().replace("-", "").replace(" ", "")
    return hashlib.sha256(f"interlude/{purpose}/".encode() + normalized.encode()).digest()
