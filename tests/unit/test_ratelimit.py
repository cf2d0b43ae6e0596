from __future__ import annotations

from services.gateway.ratelimit import FailureLimiter


def test_failures_beyond_the_limit_wait_until_the_window_passes() -> None:
    limiter = FailureLimiter(max_failures=3, window_seconds=60)
    for t in (0.0, 1.0, 2.0):
        assert limiter.retry_after("k", now=t) == 0
        limiter.failed("k", now=t)
    assert limiter.retry_after("k", now=3.0) == 58
    assert limiter.retry_after("other", now=3.0) == 0
    assert limiter.retry_after("k", now=60.5) == 0


def test_success_forgets_failures_and_keys_are_bounded() -> None:
    limiter = FailureLimiter(max_failures=1, window_seconds=60, max_keys=2)
    limiter.failed("a", now=0.0)
    limiter.succeeded("a")
    assert limiter.retry_after("a", now=1.0) == 0
    for key in ("x", "y", "z"):
        limiter.failed(key, now=0.0)
    assert len(limiter._failures) == 2
