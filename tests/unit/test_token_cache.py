"""The gateway's memory of verified tokens: bounded in time, size and by revocation."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from services.gateway.token_cache import TokenCache

NOW = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
LATER = NOW + timedelta(hours=1)


def test_an_entry_lives_at_most_ttl_and_never_past_the_token_expiry() -> None:
    cache: TokenCache[str] = TokenCache(5)
    session = uuid.uuid4()
    cache.remember(b"a", "alice", session, now=NOW, expires_at=LATER, epoch=cache.epoch)
    cache.remember(b"b", "bob", session, now=NOW, expires_at=NOW + timedelta(seconds=2),
                   epoch=cache.epoch)
    assert cache.get(b"a", NOW + timedelta(seconds=4.9)) == "alice"
    assert cache.get(b"a", NOW + timedelta(seconds=5)) is None
    assert cache.get(b"b", NOW + timedelta(seconds=1.9)) == "bob"
    assert cache.get(b"b", NOW + timedelta(seconds=2)) is None
    assert len(cache) == 0  # expired entries are dropped when met


def test_revoking_a_session_forgets_its_tokens_only() -> None:
    cache: TokenCache[str] = TokenCache(5)
    mine, other = uuid.uuid4(), uuid.uuid4()
    for key, session in ((b"1", mine), (b"2", mine), (b"3", other)):
        cache.remember(key, key.decode(), session, now=NOW, expires_at=LATER,
                       epoch=cache.epoch)
    cache.forget_session(mine)
    assert cache.get(b"1", NOW) is None
    assert cache.get(b"2", NOW) is None
    assert cache.get(b"3", NOW) == "3"


def test_a_lookup_in_flight_during_a_revocation_is_not_remembered() -> None:
    cache: TokenCache[str] = TokenCache(5)
    session = uuid.uuid4()
    epoch = cache.epoch                 # the lookup starts ...
    cache.forget_session(session)       # ... the session is revoked meanwhile ...
    cache.remember(b"t", "stale", session, now=NOW, expires_at=LATER, epoch=epoch)
    assert cache.get(b"t", NOW) is None  # ... and its answer is not kept


def test_size_is_bounded_oldest_first() -> None:
    cache: TokenCache[int] = TokenCache(5, max_entries=3)
    session = uuid.uuid4()
    for i in range(5):
        cache.remember(bytes([i]), i, session, now=NOW, expires_at=LATER, epoch=cache.epoch)
    assert len(cache) == 3
    assert cache.get(bytes([0]), NOW) is None
    assert cache.get(bytes([1]), NOW) is None
    assert [cache.get(bytes([i]), NOW) for i in (2, 3, 4)] == [2, 3, 4]


def test_zero_seconds_turns_it_off() -> None:
    cache: TokenCache[str] = TokenCache(0)
    assert not cache.enabled
    cache.remember(b"a", "alice", uuid.uuid4(), now=NOW, expires_at=LATER, epoch=cache.epoch)
    assert cache.get(b"a", NOW) is None
