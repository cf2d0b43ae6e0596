"""A short-lived memory of verified access tokens, so that a burst of requests
does not look the same token up in Postgres every time.

Only the token's SHA-256 is kept, never the token. An entry lives at most
``ttl`` seconds and never past the token's own expiry. A session revoked by this
process (logout, refresh-token reuse) is forgotten at once, and a lookup that
was already running when a revocation happened is not remembered, so in a
single gateway a revoked token stops working immediately. With several gateway
replicas, one that did not do the revoking may accept the token for up to
``ttl`` more seconds: that is the trade-off ``INTERLUDE_TOKEN_CACHE_SECONDS``
sets (0 turns the cache off). See docs/performance.md.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Generic, TypeVar

MAX_ENTRIES = 4096

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Entry(Generic[T]):
    value: T
    session_id: uuid.UUID
    valid_until: datetime


class TokenCache(Generic[T]):
    def __init__(self, ttl_seconds: float, *, max_entries: int = MAX_ENTRIES) -> None:
        self._ttl = timedelta(seconds=ttl_seconds)
        self._max = max_entries
        self._entries: dict[bytes, _Entry[T]] = {}
        self._epoch = 0  # bumped by every revocation

    @property
    def enabled(self) -> bool:
        return self._ttl > timedelta(0)

    @property
    def epoch(self) -> int:
        """Read before a lookup; hand to :meth:`remember` after it."""
        return self._epoch

    def get(self, token_hash: bytes, now: datetime) -> T | None:
        entry = self._entries.get(token_hash)
        if entry is None:
            return None
        if now >= entry.valid_until:
            del self._entries[token_hash]
            return None
        return entry.value

    def remember(self, token_hash: bytes, value: T, session_id: uuid.UUID, *,
                 now: datetime, expires_at: datetime, epoch: int) -> None:
        """Keep a verified token, unless a revocation happened since ``epoch``."""
        if not self.enabled or epoch != self._epoch:
            return
        self._entries.pop(token_hash, None)
        while len(self._entries) >= self._max:
            del self._entries[next(iter(self._entries))]  # the oldest
        self._entries[token_hash] = _Entry(value, session_id,
                                           min(now + self._ttl, expires_at))

    def forget_session(self, session_id: uuid.UUID) -> None:
        """Forget every token of a revoked session (and any lookup in flight)."""
        self._epoch += 1
        for key in [k for k, e in self._entries.items() if e.session_id == session_id]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
