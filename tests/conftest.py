"""Fixtures shared by every test.

Integration and end-to-end tests own their data: each pytest run creates a
fresh database and a fresh RabbitMQ vhost with unique names, migrates the
database, and drops both at the end. Nothing they did not make is touched.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import asyncpg
import hypothesis  # noqa: F401  (see below)
import pytest

from shared.db import migrate_all
from shared.settings import Settings, load_settings

# hypothesis is imported here, at collection. Otherwise, when no selected test
# uses it, its pytest plugin imports it for the end-of-run summary, pytest
# rewrites (parses) its modules then, and CPython 3.11 intermittently fails that
# parse with "SystemError: AST constructor recursion depth mismatch"
# (python/cpython#106905), turning a green run red (seen in 2 of 3 runs of the
# notifier tests; 0 of 4 with this import).

ADMIN_DSN = os.environ.get("INTERLUDE_TEST_ADMIN_DSN", "postgresql://root@127.0.0.1:5432/root")
PG_BASE = ADMIN_DSN.rsplit("/", 1)[0]
AMQP_BASE = os.environ.get("INTERLUDE_TEST_AMQP_BASE", "amqp://guest:guest@127.0.0.1:5672")
TEST_INTERNAL_KEY = "test-internal-key-" + "x" * 32


@dataclass(frozen=True)
class TestEnv:
    __test__ = False  # a fixture value, not a test class

    database_url: str
    amqp_url: str
    vhost: str
    database: str

    def env(self, **extra: str) -> dict[str, str]:
        """Environment variables for a service process or settings object."""
        values = {
            "INTERLUDE_ENV": "development",
            "INTERLUDE_DATABASE_URL": self.database_url,
            "INTERLUDE_AMQP_URL": self.amqp_url,
            "INTERLUDE_INTERNAL_KEY": TEST_INTERNAL_KEY,
            "INTERLUDE_LOG_FORMAT": "json",
            "INTERLUDE_OUTBOX_POLL_SECONDS": "0.5",
        }
        values.update(extra)
        return values

    def settings(self, **extra: str) -> Settings:
        return load_settings(self.env(**extra))


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


async def create_database(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def drop_database(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def test_env() -> Iterator[TestEnv]:
    """A fresh, migrated database and a fresh vhost for this test run."""
    suffix = secrets.token_hex(4)
    database = f"interlude_test_{suffix}"
    vhost = f"interlude-test-{suffix}"
    asyncio.run(create_database(database))
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        env = TestEnv(database_url=f"{PG_BASE}/{database}", amqp_url=f"{AMQP_BASE}/{vhost}",
                      vhost=vhost, database=database)
        asyncio.run(migrate_all(env.database_url))
        yield env
    finally:
        _rabbitmqctl("delete_vhost", vhost)
        asyncio.run(drop_database(database))


@pytest.fixture
async def db_pool(test_env: TestEnv) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(test_env.database_url, min_size=1, max_size=4)
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()
