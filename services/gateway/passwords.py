"""Password hashing with Argon2id.

Parameters are RFC 9106's "low memory" profile (64 MiB, 3 passes, 4 lanes),
above OWASP's recommended minimum for Argon2id (19 MiB, 2 passes, 1 lane).
Hashing runs in a worker thread so it never stalls the event loop.
"""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from argon2.profiles import RFC_9106_LOW_MEMORY

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024

_hasher = PasswordHasher.from_parameters(RFC_9106_LOW_MEMORY)
# Verified against when the account does not exist, so that "no such email"
# takes as long as "wrong password" and does not reveal who has an account.
_DUMMY_HASH = _hasher.hash("interlude-timing-equaliser")


# Each hash holds 64 MiB while it runs: at most this many at once keeps the
# gateway's memory bounded however many people sign in together.
MAX_CONCURRENT_HASHES = 2
_slots: asyncio.Semaphore | None = None


def _semaphore() -> asyncio.Semaphore:
    global _slots  # one per process, made lazily inside the running loop
    if _slots is None:
        _slots = asyncio.Semaphore(MAX_CONCURRENT_HASHES)
    return _slots


async def hash_password(password: str) -> str:
    async with _semaphore():
        return await asyncio.to_thread(_hasher.hash, password)


def _verify(stored: str | None, password: str) -> bool:
    try:
        return _hasher.verify(stored or _DUMMY_HASH, password) and stored is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


async def verify_password(stored: str | None, password: str) -> bool:
    """True if ``password`` matches ``stored``; ``None`` (no account) is always False."""
    async with _semaphore():
        return await asyncio.to_thread(_verify, stored, password)
