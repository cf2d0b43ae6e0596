"""``make bench-clean``: remove what a killed bench run left behind.

Drops every database named ``interlude_bench_*`` and deletes every RabbitMQ
vhost and user named ``interlude-bench-*``. Run it only when no bench is
running: it cannot tell a live run's resources from a dead one's.
"""

from __future__ import annotations

import asyncio

import asyncpg

from bench.resources import ADMIN_DSN, AMQP_PREFIX, DB_PREFIX, drop_database, rabbitmqctl


async def _databases() -> list[str]:
    conn = await asyncpg.connect(ADMIN_DSN, timeout=10)
    try:
        rows = await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE $1",
                                DB_PREFIX.replace("_", r"\_") + "%")
    finally:
        await conn.close()
    return [r["datname"] for r in rows]


def main() -> None:
    for name in asyncio.run(_databases()):
        drop_database(name)
        print(f"dropped database {name}")
    for kind in ("vhost", "user"):
        listing = rabbitmqctl(f"list_{kind}s", "--no-table-headers", "name").stdout
        for name in (line.strip() for line in listing.splitlines()):
            if name.startswith(AMQP_PREFIX):
                rabbitmqctl(f"delete_{kind}", name)
                print(f"deleted {kind} {name}")


if __name__ == "__main__":
    main()
