"""The SQL of delivery channels: add, verify, rotate, change, remove, list.

The store never sees a code or a secret in clear: routes pass the keyed hash of
a verification code and the sealed webhook secret (see
:mod:`services.notifier.secret_box`). Removing a channel scrubs its address,
URL and secret and ends its undelivered deliveries as dead, in one transaction,
so nothing owed to it vanishes without a record.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

MAX_CHANNELS_PER_USER = 10
MAX_CODE_ATTEMPTS = 5
# Verification emails a user may set off per hour: each new email channel sends
# one to an address of the user's choosing, so this keeps Interlude from being a
# way to mail strangers.
MAX_NEW_ADDRESSES_PER_HOUR = 5

_COLUMNS = "id, user_id, type, address, url, kinds, verified_at, created_at, updated_at"


class ChannelNotFound(LookupError):
    """No such live channel of this user."""


class ChannelExists(Exception):
    """The user already has a channel to this address or URL."""


class TooManyChannels(Exception):
    """The user has as many channels as allowed."""


class NotAnEmailChannel(Exception):
    """Codes belong to email channels only."""


class NotAWebhookChannel(Exception):
    """Secrets belong to webhook channels only."""


class CodeWrong(Exception):
    """The code does not match; ``attempts_left`` more tries before a new code is needed."""

    def __init__(self, attempts_left: int) -> None:
        super().__init__(f"{attempts_left} attempts left")
        self.attempts_left = attempts_left


class CodeExpired(Exception):
    """The code's time is up; ask for a new one."""


class TooManyAttempts(Exception):
    """Too many wrong codes; ask for a new one."""


class CodeSentRecently(Exception):
    """A code went out moments ago; ``retry_after`` seconds until another may."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"retry after {retry_after}s")
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Channel:
    id: uuid.UUID
    user_id: uuid.UUID
    type: str
    address: str | None
    url: str | None
    kinds: tuple[str, ...]
    verified_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_record(cls, record: Any) -> Channel:
        values = {k: record[k] for k in cls.__slots__}
        values["kinds"] = tuple(values["kinds"])
        return cls(**values)


def _unique_violation(exc: asyncpg.UniqueViolationError) -> bool:
    return exc.constraint_name in ("channels_address_key", "channels_url_key")


class ChannelStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def list(self, user_id: uuid.UUID) -> list[Channel]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"/* list_channels */ SELECT {_COLUMNS} FROM notifier.channels"
                " WHERE user_id = $1 AND deleted_at IS NULL ORDER BY created_at, id", user_id)
        return [Channel.from_record(r) for r in rows]

    async def get(self, user_id: uuid.UUID, channel_id: uuid.UUID) -> Channel:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                f"/* get_channel */ SELECT {_COLUMNS} FROM notifier.channels"
                " WHERE id = $1 AND user_id = $2 AND deleted_at IS NULL", channel_id, user_id)
        if row is None:
            raise ChannelNotFound(str(channel_id))
        return Channel.from_record(row)

    @staticmethod
    async def _lock_user(conn: asyncpg.Connection, user_id: uuid.UUID) -> None:
        # One user's channels are added one at a time, so the counts below hold.
        await conn.execute("/* add_channel */ SELECT pg_advisory_xact_lock(hashtext($1))",
                           f"notifier.channels/{user_id}")

    async def _insert(self, conn: asyncpg.Connection, user_id: uuid.UUID, sql: str,
                      *args: Any) -> Channel:
        await self._lock_user(conn, user_id)
        count = await conn.fetchval(
            "/* add_channel */ SELECT count(*) FROM notifier.channels"
            " WHERE user_id = $1 AND deleted_at IS NULL", user_id)
        if count >= MAX_CHANNELS_PER_USER:
            raise TooManyChannels
        try:
            row = await conn.fetchrow(sql, *args)
        except asyncpg.UniqueViolationError as exc:
            if _unique_violation(exc):
                raise ChannelExists from None
            raise
        return Channel.from_record(row)

    async def add_email(self, channel_id: uuid.UUID, user_id: uuid.UUID, address: str,
                        kinds: Sequence[str], code_hash: bytes, code_ttl_seconds: int,
                        host: str) -> Channel:
        """A new, unverified email channel awaiting the code whose hash is ``code_hash``."""
        async with self._pool.acquire() as conn, conn.transaction():
            await self._lock_user(conn, user_id)
            # Removed channels count too (their code_sent_at stays).
            recent = await conn.fetchval(
                "/* add_email */ SELECT count(*) FROM notifier.channels WHERE user_id = $1"
                " AND type = 'email' AND code_sent_at > now() - interval '1 hour'", user_id)
            if recent >= MAX_NEW_ADDRESSES_PER_HOUR:
                raise CodeSentRecently(15 * 60)
            return await self._insert(
                conn, user_id,
                "/* add_email */ INSERT INTO notifier.channels"
                " (id, user_id, type, address, host, kinds, code_hash, code_expires_at,"
                "  code_sent_at) VALUES ($1, $2, 'email', $3, $7, $4, $5,"
                f"  now() + $6 * interval '1 second', now()) RETURNING {_COLUMNS}",
                channel_id, user_id, address, list(kinds), code_hash, code_ttl_seconds, host)

    async def add_webhook(self, channel_id: uuid.UUID, user_id: uuid.UUID, url: str, host: str,
                          kinds: Sequence[str], secret_sealed: bytes) -> Channel:
        """A new webhook channel; usable at once (its owner holds the secret)."""
        async with self._pool.acquire() as conn, conn.transaction():
            return await self._insert(
                conn, user_id,
                "/* add_webhook */ INSERT INTO notifier.channels"
                " (id, user_id, type, url, host, kinds, secret_sealed, verified_at)"
                f" VALUES ($1, $2, 'webhook', $3, $4, $5, $6, now()) RETURNING {_COLUMNS}",
                channel_id, user_id, url, host, list(kinds), secret_sealed)

    async def _locked(self, conn: asyncpg.Connection, user_id: uuid.UUID,
                      channel_id: uuid.UUID) -> asyncpg.Record:
        row = await conn.fetchrow(
            "/* lock_channel */ SELECT *, now() AS db_now FROM notifier.channels"
            " WHERE id = $1 AND user_id = $2 AND deleted_at IS NULL FOR UPDATE",
            channel_id, user_id)
        if row is None:
            raise ChannelNotFound(str(channel_id))
        return row

    async def verify(self, user_id: uuid.UUID, channel_id: uuid.UUID,
                     code_hash: bytes) -> Channel:
        """Mark the email channel verified if ``code_hash`` matches its code (idempotent)."""
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                row = await self._locked(conn, user_id, channel_id)
                if row["type"] != "email":
                    raise NotAnEmailChannel
                if row["verified_at"] is not None:
                    return Channel.from_record(row)
                if row["code_attempts"] >= MAX_CODE_ATTEMPTS or row["code_hash"] is None:
                    raise TooManyAttempts
                if row["code_expires_at"] <= row["db_now"]:
                    raise CodeExpired
                if hmac.compare_digest(row["code_hash"], code_hash):
                    verified = await conn.fetchrow(
                        "/* verify_channel */ UPDATE notifier.channels SET verified_at = now(),"
                        " code_hash = NULL, code_expires_at = NULL, updated_at = now()"
                        f" WHERE id = $1 RETURNING {_COLUMNS}", channel_id)
                    return Channel.from_record(verified)
                attempts = await conn.fetchval(
                    "/* verify_channel */ UPDATE notifier.channels"
                    " SET code_attempts = code_attempts + 1 WHERE id = $1"
                    " RETURNING code_attempts", channel_id)
            # Committed: the wrong guess counts even though the call fails.
            raise CodeWrong(MAX_CODE_ATTEMPTS - attempts)

    async def new_code(self, user_id: uuid.UUID, channel_id: uuid.UUID, code_hash: bytes,
                       code_ttl_seconds: int, min_interval_seconds: int) -> Channel:
        """Replace an unverified email channel's code (resets the attempts)."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await self._locked(conn, user_id, channel_id)
            if row["type"] != "email":
                raise NotAnEmailChannel
            if row["verified_at"] is not None:
                return Channel.from_record(row)
            since = (row["db_now"] - row["code_sent_at"]).total_seconds() \
                if row["code_sent_at"] else None
            if since is not None and since < min_interval_seconds:
                raise CodeSentRecently(int(min_interval_seconds - since) + 1)
            updated = await conn.fetchrow(
                "/* new_code */ UPDATE notifier.channels SET code_hash = $2,"
                " code_expires_at = now() + $3 * interval '1 second', code_sent_at = now(),"
                f" code_attempts = 0, updated_at = now() WHERE id = $1 RETURNING {_COLUMNS}",
                channel_id, code_hash, code_ttl_seconds)
            return Channel.from_record(updated)

    async def rotate_secret(self, user_id: uuid.UUID, channel_id: uuid.UUID,
                            secret_sealed: bytes) -> Channel:
        """Replace a webhook channel's secret; the next request is signed with it."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await self._locked(conn, user_id, channel_id)
            if row["type"] != "webhook":
                raise NotAWebhookChannel
            updated = await conn.fetchrow(
                "/* rotate_secret */ UPDATE notifier.channels SET secret_sealed = $2,"
                f" updated_at = now() WHERE id = $1 RETURNING {_COLUMNS}",
                channel_id, secret_sealed)
            return Channel.from_record(updated)

    async def set_kinds(self, user_id: uuid.UUID, channel_id: uuid.UUID,
                        kinds: Sequence[str]) -> Channel:
        """Which kinds of notification go to the channel from now on."""
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "/* set_kinds */ UPDATE notifier.channels SET kinds = $3, updated_at = now()"
                " WHERE id = $1 AND user_id = $2 AND deleted_at IS NULL"
                f" RETURNING {_COLUMNS}", channel_id, user_id, list(kinds))
        if row is None:
            raise ChannelNotFound(str(channel_id))
        return Channel.from_record(row)

    async def remove(self, user_id: uuid.UUID, channel_id: uuid.UUID) -> int:
        """Remove the channel: scrub it, and end its undelivered deliveries as dead
        (returns how many). Its sent and dead deliveries keep their record."""
        async with self._pool.acquire() as conn, conn.transaction():
            await self._locked(conn, user_id, channel_id)
            await conn.execute(
                "/* remove_channel */ UPDATE notifier.channels SET deleted_at = now(),"
                " address = NULL, url = NULL, host = NULL, secret_sealed = NULL,"
                " code_hash = NULL, code_expires_at = NULL, updated_at = now() WHERE id = $1",
                channel_id)
            status = await conn.execute(
                "/* remove_channel */ UPDATE notifier.deliveries SET state = 'dead',"
                " next_attempt_at = NULL, lease_id = NULL, updated_at = now(),"
                " last_error = 'the channel was removed before delivery'"
                " WHERE channel_id = $1 AND state IN ('pending', 'failed')", channel_id)
        return int(status.rsplit(" ", 1)[-1])
