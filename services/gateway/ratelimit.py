"""A small in-memory limiter for credential guessing (login, enrollment, refresh).

Counts failures per key in a sliding window. It lives in one gateway process;
several replicas each enforce their own window, which still bounds guessing
to a small multiple of the limit.
"""

from __future__ import annotations

import time
from collections import deque


class FailureLimiter:
    def __init__(self, max_failures: int, window_seconds: float, max_keys: int = 100_000) -> None:
        self.max_failures = max_failures
        self.window = window_seconds
        self.max_keys = max_keys
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        entries = self._failures.get(key)
        if entries is None:
            return deque()
        while entries and entries[0] <= now - self.window:
            entries.popleft()
        if not entries:
            del self._failures[key]
        return entries

    def retry_after(self, key: str, now: float | None = None) -> int:
        """Seconds until ``key`` may try again; 0 if it may now."""
        now = time.monotonic() if now is None else now
        entries = self._recent(key, now)
        if len(entries) < self.max_failures:
            return 0
        return max(1, int(entries[0] + self.window - now) + 1)

    def failed(self, key: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if key not in self._failures and len(self._failures) >= self.max_keys:
            # Forget the oldest key rather than grow without bound.
            self._failures.pop(next(iter(self._failures)))
        self._recent(key, now)
        self._failures.setdefault(key, deque()).append(now)

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)
