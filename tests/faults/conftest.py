"""Fault drills: their own Postgres cluster and RabbitMQ node, real service processes."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from shared.db import migrate_all
from tests.faults.infra import DrillPostgres, DrillRabbit
from tests.faults.system import Services


@dataclass
class Drill:
    pg: DrillPostgres
    mq: DrillRabbit
    database_url: str
    services: Services


@pytest.fixture(scope="session")
def drill_infra() -> Iterator[tuple[DrillPostgres, DrillRabbit]]:
    pg = DrillPostgres.create()
    try:
        mq = DrillRabbit.create()
        try:
            yield pg, mq
        finally:
            mq.destroy()
    finally:
        pg.drop()


async def _fresh_database(admin_dsn: str, base: str) -> str:
    name = f"drill_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = f"{base}/{name}"
    await migrate_all(url)
    return url


@pytest.fixture
def drill(drill_infra: tuple[DrillPostgres, DrillRabbit], tmp_path: Path) -> Iterator[Drill]:
    """A fresh database, the broker node up, and the three services running."""
    pg, mq = drill_infra
    mq.ctl("start_app")  # a drill that failed half-way may have left it stopped
    database_url = asyncio.run(_fresh_database(pg.dsn, pg.dsn.rsplit("/", 1)[0]))
    services = Services(database_url, mq.url, tmp_path)
    services.start_all()
    try:
        yield Drill(pg, mq, database_url, services)
    finally:
        services.stop_all()
        # Queues are the drill node's own; clear them for the next drill.
        for queue in ("notifier.events", "notifier.events.dead"):
            with contextlib.suppress(RuntimeError):
                mq.ctl("delete_queue", queue)
