"""Scratch resources a bench run makes and must remove: a database, a RabbitMQ
user and vhost. Every name starts with ``interlude_bench_`` / ``interlude-bench-``
so that ``make bench-clean`` can find what a killed run left behind.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
from dataclasses import dataclass, field

import asyncpg

ADMIN_DSN = os.environ.get("INTERLUDE_BENCH_ADMIN_DSN", "postgresql://root@127.0.0.1:5432/postgres")
PG_BASE = ADMIN_DSN.rsplit("/", 1)[0]
AMQP_HOST = os.environ.get("INTERLUDE_BENCH_AMQP_HOST", "127.0.0.1:5672")
DB_PREFIX = "interlude_bench_"
AMQP_PREFIX = "interlude-bench-"


def rabbitmqctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", "-q", *args], check=check, capture_output=True,
                          text=True, timeout=60)


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_database(name: str) -> str:
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    return f"{PG_BASE}/{name}"


def drop_database(name: str) -> None:
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@dataclass
class Scratch:
    """One run's database, AMQP user and vhost; :meth:`remove` undoes whatever was made."""

    suffix: str = field(default_factory=lambda: secrets.token_hex(4))
    made: list[str] = field(default_factory=list)
    amqp_password: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    @property
    def database(self) -> str:
        return f"{DB_PREFIX}{self.suffix}"

    @property
    def amqp_user(self) -> str:
        return f"{AMQP_PREFIX}{self.suffix}"

    @property
    def vhost(self) -> str:
        return f"{AMQP_PREFIX}{self.suffix}"

    @property
    def database_url(self) -> str:
        return f"{PG_BASE}/{self.database}"

    @property
    def amqp_url(self) -> str:
        return f"amqp://{self.amqp_user}:{self.amqp_password}@{AMQP_HOST}/{self.vhost}"

    def create(self) -> None:
        create_database(self.database)
        self.made.append("database")
        # Recorded before the call: a half-made user or vhost is removed too.
        self.made.append("user")
        rabbitmqctl("add_user", self.amqp_user, self.amqp_password)
        self.made.append("vhost")
        rabbitmqctl("add_vhost", self.vhost)
        rabbitmqctl("set_permissions", "-p", self.vhost, self.amqp_user, ".*", ".*", ".*")

    def remove(self) -> list[str]:
        """Remove what was made; returns the problems (empty when all went)."""
        problems: list[str] = []
        if "vhost" in self.made:
            done = rabbitmqctl("delete_vhost", self.vhost, check=False)
            if done.returncode != 0 and "not_found" not in done.stderr + done.stdout:
                problems.append(f"vhost {self.vhost}: {done.stderr.strip()[:200]}")
        if "user" in self.made:
            done = rabbitmqctl("delete_user", self.amqp_user, check=False)
            if done.returncode != 0 and "not exist" not in done.stderr + done.stdout:
                problems.append(f"user {self.amqp_user}: {done.stderr.strip()[:200]}")
        if "database" in self.made:
            try:
                drop_database(self.database)
            except (OSError, asyncpg.PostgresError) as exc:
                problems.append(f"database {self.database}: {exc}")
        self.made.clear()
        return problems
