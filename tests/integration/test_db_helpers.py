"""shared.db's one-round-trip transaction against the real Postgres."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from shared.db import transaction_opened_with, uuid_literal

pytestmark = pytest.mark.integration


async def test_commits_on_a_clean_exit_with_the_prelude_applied(db_pool: asyncpg.Pool) -> None:
    key = uuid.uuid4()
    lock = f"SELECT pg_advisory_xact_lock(hashtext({uuid_literal(key)}))"
    async with db_pool.acquire() as conn:
        await conn.execute("CREATE TEMP TABLE t (v int)")
        async with transaction_opened_with(conn, lock):
            assert conn.is_in_transaction()
            # The prelude's lock is held: the same key, asked the usual way, is ours.
            held = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                " AND objid = (hashtext($1)::bigint & 4294967295)::oid"
                " AND pid = pg_backend_pid()", str(key))
            assert held == 1
            await conn.execute("INSERT INTO t VALUES (1)")
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT count(*) FROM t") == 1
        assert await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                                   " AND pid = pg_backend_pid()") == 0
        await conn.execute("DROP TABLE t")


async def test_rolls_back_on_an_error_inside(db_pool: asyncpg.Pool) -> None:
    async with db_pool.acquire() as conn:
        await conn.execute("CREATE TEMP TABLE t (v int)")
        async def failing() -> None:
            async with transaction_opened_with(conn, "SELECT 1"):
                await conn.execute("INSERT INTO t VALUES (1)")
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            await failing()
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT count(*) FROM t") == 0
        await conn.execute("DROP TABLE t")


async def test_a_failing_prelude_leaves_no_transaction_open(db_pool: asyncpg.Pool) -> None:
    async with db_pool.acquire() as conn:
        with pytest.raises(asyncpg.PostgresError):
            async with transaction_opened_with(conn, "SELECT 1/0"):
                pytest.fail("the body must not run")
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT 1") == 1


async def test_a_swallowed_statement_error_does_not_pass_as_committed(
        db_pool: asyncpg.Pool) -> None:
    async with db_pool.acquire() as conn:
        await conn.execute("CREATE TEMP TABLE t (v int)")
        async def swallowing() -> None:
            async with transaction_opened_with(conn, "SELECT 1"):
                await conn.execute("INSERT INTO t VALUES (1)")
                with pytest.raises(asyncpg.PostgresError):
                    await conn.execute("SELECT 1/0")

        with pytest.raises(asyncpg.InterfaceError, match="did not commit"):
            await swallowing()
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT count(*) FROM t") == 0
        await conn.execute("DROP TABLE t")


def test_uuid_literal_takes_only_uuids() -> None:
    value = uuid.uuid4()
    assert uuid_literal(value) == f"'{value}'"
    with pytest.raises(TypeError):
        uuid_literal("'; DROP TABLE x; --")  # type: ignore[arg-type]
