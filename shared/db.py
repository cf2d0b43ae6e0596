"""asyncpg pool creation and numbered plain-SQL migrations.

Each service owns one schema. Its migrations are files ``NNNN_name.sql`` in the
service's ``migrations/`` folder, applied in order, each in its own transaction,
and recorded in ``<schema>.schema_migrations``. A transaction-level advisory lock
serialises concurrent runners (several services starting at once), so running
twice, or twice at the same time, applies each file exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources

import asyncpg

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# One lock for all schemas: migrations are rare and short, and a single lock
# also orders cross-schema set-up (CREATE SCHEMA) between services.
_MIGRATION_LOCK = 0x1D7E_0001

SERVICE_SCHEMAS = ("gateway", "messaging", "notifier")


class MigrationError(RuntimeError):
    """A migration file is misnamed, changed after it was applied, or failed."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


async def _init_connection(conn: asyncpg.Connection) -> None:
    # JSON columns round-trip as Python objects.
    import json

    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                              schema="pg_catalog")


async def _reset_connection(conn: asyncpg.Connection) -> None:
    # The services keep no session state (no LISTEN, prepared names, SET, temp
    # tables) on pooled connections, so the only thing to undo when a connection
    # comes back is a transaction left open by an error. asyncpg's default reset
    # runs a multi-statement query on every release; half of that was measured
    # as pure overhead on the check-in path (docs/performance.md).
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def uuid_literal(value: uuid.UUID) -> str:
    """``value`` as an SQL string literal, for statements sent without parameters
    (a UUID's text is only hex digits and dashes; anything else is refused)."""
    if not isinstance(value, uuid.UUID):
        raise TypeError(f"expected a UUID, got {type(value).__name__}")
    return f"'{value}'"


@contextlib.asynccontextmanager
async def transaction_opened_with(conn: asyncpg.Connection, prelude: str) -> AsyncIterator[str]:
    """A transaction whose ``BEGIN`` travels with ``prelude`` in one round trip.

    ``prelude`` is one or more statements *without parameters* (a simple query:
    take a lock whose key is spliced in with :func:`uuid_literal`, say); their
    rows are discarded, and the status of the last one (``"INSERT 0 1"``, say)
    is what the context manager gives. Commits on a clean exit, rolls back
    otherwise, like ``conn.transaction()``, which would spend a round trip on
    ``BEGIN`` alone.
    """
    try:
        status: str = await conn.execute(f"BEGIN; {prelude}")
        yield status
    except BaseException:
        if not conn.is_closed() and conn.is_in_transaction():
            # A broken connection cannot roll back; the pool discards it, and the
            # server ends the transaction with the session.
            with contextlib.suppress(Exception):
                await conn.execute("ROLLBACK")
        raise
    status = await conn.execute("COMMIT")
    if status != "COMMIT":
        # COMMIT of a transaction that failed inside answers ROLLBACK, not an error.
        raise asyncpg.InterfaceError(f"the transaction did not commit ({status})")


async def connect(dsn: str, *, timeout: float = 10.0) -> asyncpg.Connection:
    """``asyncpg.connect`` that a cancellation does not cut off mid-handshake.

    Cancelled while it negotiates (it first asks the server for TLS), asyncpg
    leaves behind a future with an exception nobody retrieves, which asyncio
    logs as an error: a service stopped right after it started printed one.
    Here the attempt is left to end on its own (at most ``timeout``) and its
    connection, if it makes one, is closed; the cancellation goes on after at
    most ``ORPHAN_WAIT_SECONDS``, so a stop is not held up by a slow server."""
    attempt = asyncio.ensure_future(asyncpg.connect(dsn, timeout=timeout))
    try:
        return await asyncio.shield(attempt)
    except asyncio.CancelledError:
        attempt.add_done_callback(_discard_attempt)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({attempt}, timeout=ORPHAN_WAIT_SECONDS)
        raise


# How long a cancelled connect() waits for its attempt before letting go of it.
ORPHAN_WAIT_SECONDS = 1.0


def _discard_attempt(attempt: asyncio.Future[asyncpg.Connection]) -> None:
    if attempt.cancelled():
        return
    if attempt.exception() is None:  # retrieves a failure, so asyncio does not log it
        attempt.result().terminate()


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10,
                      command_timeout: float = 10.0) -> asyncpg.Pool:
    """A pool whose connections decode jsonb and time out commands."""
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, command_timeout=command_timeout,
        # Connecting (also when the pool replaces a broken connection) gives up
        # after 5 s, so a request never hangs on a database that is down.
        init=_init_connection, reset=_reset_connection, timeout=5.0,
    )
    assert pool is not None
    return pool


def load_migrations(schema: str) -> list[Migration]:
    """The migrations shipped with service ``schema``, in order."""
    if schema not in SERVICE_SCHEMAS:
        raise MigrationError(f"unknown schema {schema!r}")
    folder = resources.files(f"services.{schema}").joinpath("migrations")
    found: list[Migration] = []
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _MIGRATION_NAME.match(entry.name)
        if not match:
            raise MigrationError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration numbers in {schema}")
    return found


async def migrate_schema(conn: asyncpg.Connection, schema: str,
                         migrations: list[Migration] | None = None) -> list[str]:
    """Apply pending migrations of ``schema``; returns the names applied."""
    migrations = load_migrations(schema) if migrations is None else migrations
    applied: list[str] = []
    for migration in migrations:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.execute(
                f'CREATE TABLE IF NOT EXISTS "{schema}".schema_migrations ('
                " version integer PRIMARY KEY, name text NOT NULL,"
                " checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            row = await conn.fetchrow(
                f'SELECT checksum FROM "{schema}".schema_migrations WHERE version = $1',
                migration.version,
            )
            if row is not None:
                if row["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"{schema}/{migration.name} changed after it was applied"
                    )
                continue
            await conn.execute(f'SET LOCAL search_path TO "{schema}", public')
            try:
                await conn.execute(migration.sql)
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"{schema}/{migration.name} failed: {exc}") from exc
            await conn.execute(
                f'INSERT INTO "{schema}".schema_migrations (version, name, checksum)'
                " VALUES ($1, $2, $3)",
                migration.version, migration.name, migration.checksum,
            )
            applied.append(f"{schema}/{migration.name}")
    return applied


async def migrate_all(dsn: str, schemas: tuple[str, ...] = SERVICE_SCHEMAS) -> list[str]:
    """Apply every service's pending migrations against ``dsn``."""
    conn: asyncpg.Connection = await asyncpg.connect(dsn, timeout=10.0)
    try:
        applied: list[str] = []
        for schema in schemas:
            applied += await migrate_schema(conn, schema)
        return applied
    finally:
        await conn.close()


async def check_database(pool: asyncpg.Pool) -> None:
    """Raise if the database cannot answer a trivial query quickly."""
    async with pool.acquire(timeout=2.0) as conn:
        await conn.fetchval("SELECT 1", timeout=2.0)
