"""All SQL of the gateway: accounts, enrollment codes, sessions and tokens.

Tokens and codes are random strings given to the user once; only their SHA-256
is stored. Stores raise domain errors; routes turn them into HTTP.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from services.gateway.token_cache import TokenCache
from shared import codes

ACCESS_TOKEN_LIFETIME = timedelta(minutes=15)
REFRESH_TOKEN_LIFETIME = timedelta(days=30)
THERAPIST_CODE_LIFETIME = timedelta(days=14)


class GatewayError(Exception):
    pass


class EmailTaken(GatewayError):
    pass


class InvalidCode(GatewayError):
    pass


class CodeUsed(GatewayError):
    pass


class EmailMismatch(GatewayError):
    pass


class InvalidToken(GatewayError):
    pass


class TokenReused(GatewayError):
    """A rotated refresh token came back: the session is revoked."""


@dataclass(frozen=True, slots=True)
class Account:
    id: uuid.UUID
    email: str
    display_name: str
    role: str
    status: str
    password_hash: str | None


@dataclass(frozen=True, slots=True)
class Tokens:
    session_id: uuid.UUID
    access_token: str
    refresh_token: str
    access_expires_at: datetime


@dataclass(frozen=True, slots=True)
class Caller:
    account: Account
    session_id: uuid.UUID


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def code_hash(code: str) -> bytes:
    return codes.hash_code(code, "enroll")


def _account(row: asyncpg.Record) -> Account:
    return Account(row["id"], row["email"], row["display_name"], row["role"], row["status"],
                   row["password_hash"])


async def _issue_tokens(conn: asyncpg.Connection, session_id: uuid.UUID,
                        now: datetime) -> Tokens:
    access = "ila_" + secrets.token_urlsafe(32)
    refresh = "ilr_" + secrets.token_urlsafe(32)
    access_expires = now + ACCESS_TOKEN_LIFETIME
    await conn.execute(
        "INSERT INTO gateway.access_tokens (token_hash, session_id, expires_at)"
        " VALUES ($1, $2, $3)", token_hash(access), session_id, access_expires)
    await conn.execute(
        "INSERT INTO gateway.refresh_tokens (token_hash, session_id, expires_at)"
        " VALUES ($1, $2, $3)", token_hash(refresh), session_id, now + REFRESH_TOKEN_LIFETIME)
    return Tokens(session_id, access, refresh, access_expires)


async def _new_session(conn: asyncpg.Connection, account_id: uuid.UUID,
                       now: datetime) -> Tokens:
    session_id = uuid.uuid4()
    await conn.execute("INSERT INTO gateway.sessions (id, account_id) VALUES ($1, $2)",
                       session_id, account_id)
    return await _issue_tokens(conn, session_id, now)


class GatewayStore:
    def __init__(self, pool: asyncpg.Pool, *, token_cache_seconds: float = 0.0) -> None:
        self.pool = pool
        self._tokens: TokenCache[Caller] = TokenCache(token_cache_seconds)

    async def create_therapist(self, email: str, display_name: str,
                               now: datetime) -> tuple[Account, str]:
        """A therapist account awaiting enrollment, and its one-time code."""
        code = codes.new_code()
        account_id = uuid.uuid4()
        async with self.pool.acquire() as conn, conn.transaction():
            try:
                row = await conn.fetchrow(
                    "INSERT INTO gateway.accounts (id, email, display_name, role, status)"
                    " VALUES ($1, $2, $3, 'therapist', 'pending') RETURNING *",
                    account_id, email, display_name)
            except asyncpg.UniqueViolationError:
                raise EmailTaken(email) from None
            await conn.execute(
                "INSERT INTO gateway.enrollment_codes (code_hash, account_id, expires_at)"
                " VALUES ($1, $2, $3)", code_hash(code), account_id,
                now + THERAPIST_CODE_LIFETIME)
        assert row is not None
        return _account(row), code

    async def email_in_use(self, email: str) -> bool:
        return bool(await self.pool.fetchval(
            "SELECT 1 FROM gateway.accounts WHERE lower(email) = lower($1)", email))

    async def account_exists(self, account_id: uuid.UUID) -> bool:
        return bool(await self.pool.fetchval(
            "SELECT 1 FROM gateway.accounts WHERE id = $1", account_id))

    async def has_therapist_code(self, code: str) -> bool:
        return bool(await self.pool.fetchval(
            "SELECT 1 FROM gateway.enrollment_codes WHERE code_hash = $1", code_hash(code)))

    async def enroll_therapist(self, code: str, email: str, display_name: str,
                               password_hash: str, now: datetime) -> tuple[Account, Tokens]:
        """Activate a pending therapist; all or nothing, so a crash leaves the code usable."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT c.used_at, c.expires_at, a.* FROM gateway.enrollment_codes c"
                " JOIN gateway.accounts a ON a.id = c.account_id"
                " WHERE c.code_hash = $1 FOR UPDATE", code_hash(code))
            if row is None or row["expires_at"] <= now:
                raise InvalidCode()
            if row["used_at"] is not None or row["status"] != "pending":
                raise CodeUsed()
            if row["email"].lower() != email.lower():
                raise EmailMismatch()
            updated = await conn.fetchrow(
                "UPDATE gateway.accounts SET status = 'active', password_hash = $2,"
                " display_name = $3, enrolled_at = $4 WHERE id = $1 RETURNING *",
                row["id"], password_hash, display_name, now)
            await conn.execute("UPDATE gateway.enrollment_codes SET used_at = $2"
                               " WHERE code_hash = $1", code_hash(code), now)
            tokens = await _new_session(conn, row["id"], now)
        assert updated is not None
        return _account(updated), tokens

    async def create_client(self, account_id: uuid.UUID, email: str, display_name: str,
                            password_hash: str, now: datetime) -> tuple[Account, Tokens]:
        async with self.pool.acquire() as conn, conn.transaction():
            try:
                row = await conn.fetchrow(
                    "INSERT INTO gateway.accounts (id, email, display_name, role, status,"
                    " password_hash, enrolled_at) VALUES ($1, $2, $3, 'client', 'active', $4, $5)"
                    " RETURNING *", account_id, email, display_name, password_hash, now)
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == "accounts_pkey":
                    raise CodeUsed() from None
                raise EmailTaken(email) from None
            assert row is not None
            tokens = await _new_session(conn, account_id, now)
        return _account(row), tokens

    async def account_by_email(self, email: str) -> Account | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM gateway.accounts WHERE lower(email) = lower($1)", email)
        return None if row is None else _account(row)

    async def accounts_by_id(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, Account]:
        rows = await self.pool.fetch("SELECT * FROM gateway.accounts WHERE id = ANY($1::uuid[])",
                                     ids)
        return {r["id"]: _account(r) for r in rows}

    async def start_session(self, account_id: uuid.UUID, now: datetime) -> Tokens:
        async with self.pool.acquire() as conn, conn.transaction():
            return await _new_session(conn, account_id, now)

    async def caller_for_access_token(self, token: str, now: datetime, *,
                                      fresh: bool = False) -> Caller:
        """Who holds ``token``; InvalidToken if it is unknown, expired or revoked.

        A token verified in the last few seconds is answered from memory
        (services/gateway/token_cache.py) unless ``fresh`` asks for the database.
        """
        digest = token_hash(token)
        if not fresh:
            cached = self._tokens.get(digest, now)
            if cached is not None:
                return cached
        epoch = self._tokens.epoch
        row = await self.pool.fetchrow(
            "SELECT a.*, s.id AS session_id, t.expires_at AS token_expires_at"
            " FROM gateway.access_tokens t"
            " JOIN gateway.sessions s ON s.id = t.session_id"
            " JOIN gateway.accounts a ON a.id = s.account_id"
            " WHERE t.token_hash = $1 AND t.expires_at > $2 AND s.revoked_at IS NULL"
            " AND a.status = 'active'", digest, now)
        if row is None:
            raise InvalidToken()
        caller = Caller(_account(row), row["session_id"])
        self._tokens.remember(digest, caller, caller.session_id, now=now,
                              expires_at=row["token_expires_at"], epoch=epoch)
        return caller

    async def refresh(self, refresh_token: str, now: datetime) -> tuple[Account, Tokens]:
        """Rotate a refresh token. Reuse of a rotated one revokes the whole session."""
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                row = await conn.fetchrow(
                    "SELECT r.session_id, r.expires_at, r.used_at, s.revoked_at, a.*"
                    " FROM gateway.refresh_tokens r"
                    " JOIN gateway.sessions s ON s.id = r.session_id"
                    " JOIN gateway.accounts a ON a.id = s.account_id"
                    " WHERE r.token_hash = $1 FOR UPDATE OF r, s", token_hash(refresh_token))
                if row is None or row["revoked_at"] is not None or row["expires_at"] <= now \
                        or row["status"] != "active":
                    raise InvalidToken()
                if row["used_at"] is None:
                    await conn.execute("UPDATE gateway.refresh_tokens SET used_at = $2"
                                       " WHERE token_hash = $1", token_hash(refresh_token), now)
                    tokens = await _issue_tokens(conn, row["session_id"], now)
                    return _account(row), tokens
            # Reuse: revoke in its own committed transaction (on the connection
            # already held: a second one could starve the pool), then refuse.
            try:
                await _revoke(conn, row["session_id"], "refresh token reused", now)
            finally:
                self._tokens.forget_session(row["session_id"])
            raise TokenReused()

    async def revoke_session(self, session_id: uuid.UUID, reason: str, now: datetime) -> None:
        try:
            async with self.pool.acquire() as conn:
                await _revoke(conn, session_id, reason, now)
        finally:
            # Also when the outcome is unknown: a cached token must not outlive
            # a revocation that may have committed.
            self._tokens.forget_session(session_id)


async def _revoke(conn: asyncpg.Connection, session_id: uuid.UUID, reason: str,
                  now: datetime) -> None:
    async with conn.transaction():
        await conn.execute(
            "UPDATE gateway.sessions SET revoked_at = $2, revoked_reason = $3"
            " WHERE id = $1 AND revoked_at IS NULL", session_id, now, reason)
        await conn.execute("DELETE FROM gateway.access_tokens WHERE session_id = $1",
                           session_id)
