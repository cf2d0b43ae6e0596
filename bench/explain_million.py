"""``make explain``: the check-in path's read queries stay index scans at a million rows.

Loads a million messages (random envelopes of 2-3 kB) and a million
notifications into a scratch database migrated with the real migrations, then
runs ``EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)`` on

* ``MessagingStore.list_messages`` (a relationship's messages, keyset by seq), and
* ``NotifierStore.feed`` (a user's notifications, newest first, keyset by
  (created_at, id); also the unread-only variant),

each with a custom and a generic plan (asyncpg prepares statements, so after a
few runs Postgres may choose a generic one). It fails if any plan has a Seq Scan
on a big table, prints each plan's node types and timings, and drops the
database. The stores keep their SQL inline in their methods (there are no
exported constants), so the SQL is captured by calling the real store methods
against a recording pool: what is explained is exactly what the services run.

    python -m bench.explain_million [--rows 1000000] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench.resources import DB_PREFIX, PG_BASE, create_database, drop_database
from services.messaging.store import MessagingStore
from services.notifier.store import FeedPosition, NotifierStore
from shared.db import migrate_all

BIG_TABLES = {"messages", "notifications", "inbox"}
SLOW_PAGE_BLOCKS = 1000


class RecordingPool:
    """Stands in for an asyncpg pool and connection: records SQL, returns no rows."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        self.calls.append((sql, args))
        return []

    fetchrow = fetchval = execute = fetch

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[RecordingPool]:
        yield self


async def captured(call: Any) -> tuple[str, tuple[Any, ...]]:
    pool = RecordingPool()
    await call(pool)
    (sql, args), = pool.calls
    return sql, args


def literal(value: Any) -> str:
    """A SQL literal for the parameter types these queries take."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, uuid.UUID):
        return f"'{value}'::uuid"
    if isinstance(value, datetime):
        return f"'{value.isoformat()}'::timestamptz"
    raise TypeError(f"no literal for {type(value).__name__}")


async def load(conn: asyncpg.Connection, rows: int, progress: Any) -> dict[str, Any]:
    """A practice-sized data set: rows/50 relationships, one of them very busy."""
    relationships = max(10, rows // 50)
    therapists = max(2, relationships // 20)
    await conn.execute("SET synchronous_commit = off")
    await conn.execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
    await conn.execute(
        "CREATE TEMP TABLE t_people AS SELECT g AS n, gen_random_uuid() AS id"
        " FROM generate_series(0, $1) g", therapists + relationships)
    await conn.execute(
        "INSERT INTO messaging.relationships (id, therapist_id, client_id, created_at)"
        " SELECT gen_random_uuid(), t.id, c.id, now() - interval '400 days'"
        " FROM generate_series(0, $1 - 1) g"
        " JOIN t_people t ON t.n = g % $2"
        " JOIN t_people c ON c.n = $2 + g", relationships, therapists)
    await conn.execute(
        "CREATE TEMP TABLE t_rel AS SELECT row_number() OVER (ORDER BY id) - 1 AS n, *"
        " FROM messaging.relationships")
    await conn.execute("CREATE INDEX ON t_rel (n)")
    progress("relationships")
    busy = rows // 100  # one relationship holds 1 % of all messages
    chunk = 100_000
    start = datetime.now(UTC) - timedelta(days=365)
    step = timedelta(days=365) / rows
    for first in range(0, rows, chunk):
        last = min(rows, first + chunk)
        # Messages in time order (seq follows created_at); ~30 % replies; envelopes
        # of 2-3 kB of random bytes, so TOAST cannot compress them away.
        await conn.execute(
            "INSERT INTO messaging.messages (id, relationship_id, kind, sender_id,"
            " sender_device_id, sent_at, envelope, envelope_sha256, created_at, visible_at)"
            " SELECT gen_random_uuid(), r.id, k.kind,"
            "  CASE k.kind WHEN 'checkin' THEN r.client_id ELSE r.therapist_id END,"
            "  gen_random_uuid(), t, e.env, digest(e.env, 'sha256'), t, t"
            " FROM generate_series($1::int, $2::int - 1) g"
            " CROSS JOIN LATERAL (SELECT $3::timestamptz + $4::interval * g AS t,"
            "   CASE WHEN g % 10 < 3 THEN 'reply' ELSE 'checkin' END AS kind,"
            "   CASE WHEN g % 100 = 0 AND g / 100 < $5 THEN 0"
            "        ELSE 1 + (hashint4(g) & 2147483647) % ($6 - 1) END AS rn) k"
            " JOIN t_rel r ON r.n = k.rn"
            " CROSS JOIN LATERAL (SELECT gen_random_bytes(1024) || gen_random_bytes(1024)"
            "   || gen_random_bytes(256 + (g % 700)) AS env) e",
            first, last, start, step, busy, relationships)
        progress(f"messages {last:,}")
    await conn.execute(
        "INSERT INTO notifier.inbox (event_id, event_type, received_at)"
        " SELECT gen_random_uuid(), 'checkin.submitted', created_at"
        " FROM messaging.messages")
    progress("inbox")
    # One notification per message: the therapist for a check-in, the client for a reply.
    await conn.execute(
        "INSERT INTO notifier.notifications (id, user_id, kind, relationship_id, message_id,"
        " actor_id, event_id, created_at, read_at)"
        " SELECT gen_random_uuid(),"
        "  CASE m.kind WHEN 'checkin' THEN r.therapist_id ELSE r.client_id END,"
        "  CASE m.kind WHEN 'checkin' THEN 'checkin.received' ELSE 'reply.received' END,"
        "  m.relationship_id, m.id, m.sender_id, i.event_id, m.created_at,"
        "  CASE WHEN m.created_at < now() - interval '7 days' THEN m.created_at END"
        " FROM (SELECT *, row_number() OVER (ORDER BY seq) AS n FROM messaging.messages) m"
        " JOIN messaging.relationships r ON r.id = m.relationship_id"
        " JOIN (SELECT event_id, row_number() OVER (ORDER BY received_at, event_id) AS n"
        "       FROM notifier.inbox) i ON i.n = m.n")
    progress("notifications")
    await conn.execute("VACUUM ANALYZE messaging.messages")
    await conn.execute("VACUUM ANALYZE notifier.notifications")
    await conn.execute("VACUUM ANALYZE notifier.inbox")
    await conn.execute("ANALYZE messaging.relationships")
    progress("vacuum analyze")
    sample = await conn.fetchrow(
        "SELECT r.id, r.therapist_id, r.client_id FROM t_rel r WHERE r.n = 1")
    heavy = await conn.fetchrow("SELECT id, therapist_id, client_id FROM t_rel WHERE n = 0")
    middle_seq = await conn.fetchval(
        "SELECT seq FROM messaging.messages WHERE relationship_id = $1 ORDER BY seq"
        " OFFSET $2 LIMIT 1", heavy["id"], busy // 2)
    busiest_user = await conn.fetchval(
        "SELECT user_id FROM notifier.notifications GROUP BY user_id"
        " ORDER BY count(*) DESC LIMIT 1")
    mid = await conn.fetchrow(
        "SELECT created_at, id FROM notifier.notifications WHERE user_id = $1"
        " ORDER BY created_at DESC, id DESC OFFSET 200 LIMIT 1", busiest_user)
    counts = {
        "messages": await conn.fetchval("SELECT count(*) FROM messaging.messages"),
        "notifications": await conn.fetchval("SELECT count(*) FROM notifier.notifications"),
        "relationships": relationships,
        "busy_relationship_messages": await conn.fetchval(
            "SELECT count(*) FROM messaging.messages WHERE relationship_id = $1", heavy["id"]),
        "busiest_user_notifications": await conn.fetchval(
            "SELECT count(*) FROM notifier.notifications WHERE user_id = $1", busiest_user),
        "messages_size": await conn.fetchval(
            "SELECT pg_size_pretty(pg_total_relation_size('messaging.messages'))"),
    }
    return {"sample": sample, "heavy": heavy, "middle_seq": middle_seq,
            "busiest_user": busiest_user, "feed_position": FeedPosition(mid["created_at"],
                                                                       mid["id"]),
            "counts": counts}


async def queries(data: dict[str, Any]) -> list[tuple[str, str, tuple[Any, ...]]]:
    now = datetime.now(UTC)
    out = []
    for label, rel, after in (
        ("list_messages: a typical relationship, first page", data["sample"], 0),
        ("list_messages: the busiest relationship, a page mid-way", data["heavy"],
         data["middle_seq"]),
    ):
        sql, args = await captured(lambda pool, rel=rel, after=after: MessagingStore(
            pool).list_messages(rel["id"], viewer_id=rel["client_id"], after_seq=after,
                                limit=50, now=now))
        out.append((label, sql, args))
    user = data["busiest_user"]
    for label, after, unread in (
        ("feed: the busiest user, first page", None, False),
        ("feed: the busiest user, a page mid-way", data["feed_position"], False),
        ("feed: the busiest user, unread only", None, True),
    ):
        sql, args = await captured(lambda pool, after=after, unread=unread: NotifierStore(
            pool).feed(user, limit=50, after=after, unread_only=unread))
        out.append((label, sql, args))
    return out


def walk(node: dict[str, Any], depth: int = 0) -> list[tuple[int, dict[str, Any]]]:
    found = [(depth, node)]
    for child in node.get("Plans", []):
        found += walk(child, depth + 1)
    return found


async def explain(conn: asyncpg.Connection, label: str, sql: str, args: tuple[Any, ...],
                  mode: str) -> tuple[list[str], float]:
    name = "q_" + uuid.uuid4().hex[:8]
    await conn.execute(f"SET plan_cache_mode = {mode}")
    await conn.execute(f"PREPARE {name} AS {sql}")
    try:
        raw = await conn.fetchval(
            f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE {name}"
            f"({', '.join(literal(a) for a in args)})")
    finally:
        await conn.execute(f"DEALLOCATE {name}")
    plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]
    problems = []
    print(f"\n{label}  [{mode.replace('force_', '').replace('_plan', '')} plan]")
    for depth, node in walk(plan["Plan"]):
        relation = node.get("Relation Name")
        index = node.get("Index Name")
        where = f" on {node.get('Schema', '')}{'.' if node.get('Schema') else ''}{relation}" \
            if relation else ""
        via = f" using {index}" if index else ""
        print(f"  {'  ' * depth}{node['Node Type']}{where}{via}"
              f"  rows={node.get('Actual Rows')} loops={node.get('Actual Loops')}"
              f" time={node.get('Actual Total Time')} ms"
              f" buffers={node.get('Shared Hit Blocks', 0)}+{node.get('Shared Read Blocks', 0)}")
        if node["Node Type"] == "Seq Scan" and relation in BIG_TABLES:
            problems.append(f"{label} ({mode}): Seq Scan on {relation}")
    print(f"  planning {plan['Planning Time']:.3f} ms, execution {plan['Execution Time']:.3f} ms")
    top = plan["Plan"]
    touched = top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0)
    if touched > SLOW_PAGE_BLOCKS:
        # Not a Seq Scan, but a page of 50 should not touch thousands of blocks.
        print(f"  WARNING: {touched} blocks for one page (a sort over the whole range?)")
    return problems, float(plan["Execution Time"])


async def main_async(args: argparse.Namespace, database: str) -> int:
    dsn = f"{PG_BASE}/{database}"
    await migrate_all(dsn)
    conn = await asyncpg.connect(dsn, timeout=10)
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                              schema="pg_catalog")
    t0 = time.monotonic()

    def progress(step: str) -> None:
        print(f"explain: loaded {step} ({time.monotonic() - t0:.0f} s)", file=sys.stderr)

    try:
        data = await load(conn, args.rows, progress)
        print("data set:", json.dumps(data["counts"]))
        problems: list[str] = []
        for label, sql, params in await queries(data):
            for mode in ("force_custom_plan", "force_generic_plan"):
                found, _ = await explain(conn, label, sql, params, mode)
                problems += found
    finally:
        await conn.close()
    if problems:
        print("\nFAIL: " + "; ".join(problems))
        return 1
    print(f"\nOK: no Seq Scan on {', '.join(sorted(BIG_TABLES))} in any plan"
          f" ({time.monotonic() - t0:.0f} s)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keep", action="store_true", help="do not drop the database")
    args = parser.parse_args()
    database = f"{DB_PREFIX}explain_{uuid.uuid4().hex[:8]}"
    create_database(database)
    code = 1
    try:
        code = asyncio.run(main_async(args, database))
    except KeyboardInterrupt:
        code = 130
    finally:
        if args.keep:
            print(f"explain: kept database {database}", file=sys.stderr)
        else:
            drop_database(database)
            print(f"explain: dropped database {database}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
