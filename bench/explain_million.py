"""``make explain``: the check-in path's read queries stay index scans at a million rows.

Loads a million messages (random envelopes of 2-3 kB) and a million
notifications into a scratch database migrated with the real migrations, then
runs ``EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)`` on

* every statement of ``MessagingStore.list_messages`` (a relationship's
  messages in delivery order, keyset by ``delivery_seq``): the check for held
  replies that are due, the page, and the viewer's own held replies; also the
  UPDATE that releases due replies, which runs only when one is due (explained
  inside a transaction that is rolled back), and
* ``NotifierStore.feed`` (a user's notifications, newest first, keyset by
  (created_at, id); also the unread-only variant),

each with a custom and a generic plan (asyncpg prepares statements, so after a
few runs Postgres may choose a generic one). Every loaded message has its
``delivery_seq`` (in seq order), and the busiest relationship also holds a few
replies still held for office hours (``delivery_seq`` NULL, ``visible_at`` in
the future), as in production. It fails if any plan has a Seq Scan on a big
table, warns when one statement touches more than 1 000 blocks, prints each
plan's node types and timings and a summary, and drops the database. The stores
keep their SQL inline in their methods (there are no exported constants), so the
SQL is captured by calling the real store methods against a recording pool:
what is explained is exactly what the services run.

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
from services.notifier.feed_store import FeedPosition
from services.notifier.store import NotifierStore
from shared.db import migrate_all

BIG_TABLES = {"messages", "notifications", "inbox"}
SLOW_PAGE_BLOCKS = 1000
HELD_REPLIES = 5  # replies held for office hours in the busiest relationship
PAGE = 50

Call = tuple[str, tuple[Any, ...]]


class RecordingPool:
    """Stands in for an asyncpg pool and connection: records SQL, returns no rows.

    ``fetchval`` answers ``scalar``: falsy by default, so ``list_messages`` finds no
    held reply due and skips its UPDATE; truthy to make it run the UPDATE too.
    """

    def __init__(self, scalar: Any = None) -> None:
        self.calls: list[Call] = []
        self.scalar = scalar

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        self.calls.append((sql, args))
        return []

    async def fetchrow(self, sql: str, *args: Any) -> None:
        self.calls.append((sql, args))
        return None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        self.calls.append((sql, args))
        return self.scalar

    async def execute(self, sql: str, *args: Any) -> str:
        self.calls.append((sql, args))
        return "SELECT 0"

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[RecordingPool]:
        yield self

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield


async def captured(call: Any, scalar: Any = None) -> list[Call]:
    """Every statement ``call(pool)`` runs, in order."""
    pool = RecordingPool(scalar)
    await call(pool)
    if not pool.calls:
        raise RuntimeError("the store method ran no SQL")
    return pool.calls


def statement_kind(sql: str) -> str:
    """A short name for one of list_messages' statements (they carry no comment)."""
    if "SELECT EXISTS" in sql:
        return "due check"
    if sql.startswith("UPDATE"):
        return "release due"
    if "delivery_seq > $2" in sql:
        return "page"
    if "delivery_seq IS NULL AND sender_id" in sql:
        return "held list"
    if "pg_advisory_xact_lock" in sql:
        return "lock"
    raise RuntimeError(f"list_messages ran a statement this script does not know: {sql}")


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
        # Messages in time order: seq and delivery_seq both follow created_at (all
        # of them delivered, none held), set explicitly so the order cannot depend
        # on the join's row order; ~30 % replies; envelopes of 2-3 kB of random
        # bytes, so TOAST cannot compress them away.
        await conn.execute(
            "INSERT INTO messaging.messages (id, seq, delivery_seq, relationship_id, kind,"
            " sender_id, sender_device_id, sent_at, envelope, envelope_sha256, created_at,"
            " visible_at)"
            " OVERRIDING SYSTEM VALUE"
            " SELECT gen_random_uuid(), g + 1, g + 1, r.id, k.kind,"
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
    # The sequences carry on after the loaded rows, as if the services had made them.
    await conn.execute("SELECT setval(pg_get_serial_sequence('messaging.messages', 'seq'),"
                       " $1)", rows)
    await conn.execute("SELECT setval('messaging.delivery_seq', $1)", rows)
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
    # A few replies the busiest relationship's therapist wrote outside office hours:
    # held (no delivery_seq) until visible_at, hours from now. Their alerts are held
    # too, so they have no notification yet.
    await conn.execute(
        "INSERT INTO messaging.messages (id, relationship_id, kind, sender_id,"
        " sender_device_id, sent_at, envelope, envelope_sha256, created_at, visible_at,"
        " delivery_seq)"
        " SELECT gen_random_uuid(), r.id, 'reply', r.therapist_id, gen_random_uuid(),"
        "  now() - make_interval(mins => 10 * h), e.env, digest(e.env, 'sha256'),"
        "  now() - make_interval(mins => 10 * h), now() + make_interval(hours => 10 + h),"
        "  NULL"
        " FROM generate_series(1, $1) h"
        " JOIN t_rel r ON r.n = 0"
        " CROSS JOIN LATERAL (SELECT gen_random_bytes(1024) || gen_random_bytes(1024)"
        "   || gen_random_bytes(256 + h) AS env) e", HELD_REPLIES)
    progress("held replies")
    await conn.execute("VACUUM ANALYZE messaging.messages")
    await conn.execute("VACUUM ANALYZE notifier.notifications")
    await conn.execute("VACUUM ANALYZE notifier.inbox")
    await conn.execute("ANALYZE messaging.relationships")
    progress("vacuum analyze")
    sample = await conn.fetchrow(
        "SELECT r.id, r.therapist_id, r.client_id FROM t_rel r WHERE r.n = 1")
    heavy = await conn.fetchrow("SELECT id, therapist_id, client_id FROM t_rel WHERE n = 0")
    middle_delivery_seq = await conn.fetchval(
        "SELECT delivery_seq FROM messaging.messages WHERE relationship_id = $1"
        " AND delivery_seq IS NOT NULL ORDER BY delivery_seq OFFSET $2 LIMIT 1",
        heavy["id"], busy // 2)
    # A moment at which every held reply is due, for the UPDATE that releases them.
    all_due_at = await conn.fetchval(
        "SELECT max(visible_at) + interval '1 minute' FROM messaging.messages"
        " WHERE relationship_id = $1 AND delivery_seq IS NULL", heavy["id"])
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
        "held_replies": await conn.fetchval(
            "SELECT count(*) FROM messaging.messages WHERE delivery_seq IS NULL"),
        "delivery_seq_out_of_seq_order": await conn.fetchval(
            "SELECT count(*) FROM (SELECT delivery_seq, lag(delivery_seq) OVER (ORDER BY seq)"
            " AS prev FROM messaging.messages WHERE delivery_seq IS NOT NULL) d"
            " WHERE delivery_seq < prev"),
        "middle_delivery_seq": middle_delivery_seq,
        "busiest_user_notifications": await conn.fetchval(
            "SELECT count(*) FROM notifier.notifications WHERE user_id = $1", busiest_user),
        "messages_size": await conn.fetchval(
            "SELECT pg_size_pretty(pg_total_relation_size('messaging.messages'))"),
    }
    return {"sample": sample, "heavy": heavy, "middle_delivery_seq": middle_delivery_seq,
            "all_due_at": all_due_at,
            "busiest_user": busiest_user, "feed_position": FeedPosition(mid["created_at"],
                                                                       mid["id"]),
            "counts": counts}


Query = tuple[str, str, tuple[Any, ...]]


async def queries(data: dict[str, Any]) -> list[Query]:
    now = datetime.now(UTC)
    out: list[Query] = []
    sample, heavy = data["sample"], data["heavy"]
    for label, rel, viewer, after in (
        # The client reads: the held list is the client's own held replies (none).
        ("list_messages: a typical relationship, first page", sample,
         sample["client_id"], 0),
        # The therapist reads: the held list is the replies they wrote after hours.
        ("list_messages: the busiest relationship, a page mid-way", heavy,
         heavy["therapist_id"], data["middle_delivery_seq"]),
    ):
        calls = await captured(lambda pool, rel=rel, viewer=viewer, after=after: MessagingStore(
            pool).list_messages(rel["id"], viewer_id=viewer, after=after, limit=PAGE,
                                now=now))
        # No held reply is due (the recording pool's EXISTS answers falsy), so this
        # is the read every request makes: due check, page, held list.
        kinds = [statement_kind(sql) for sql, _ in calls]
        if kinds != ["due check", "page", "held list"]:
            raise RuntimeError(f"list_messages ran {kinds}; update this script")
        out += [(f"{label}: {kind}", sql, params)
                for kind, (sql, params) in zip(kinds, calls, strict=True)]
    # When a held reply is due, list_messages first gives it its place in the
    # delivery order: explained at a moment when all the held replies are due.
    calls = await captured(lambda pool: MessagingStore(pool).list_messages(
        heavy["id"], viewer_id=heavy["therapist_id"], after=data["middle_delivery_seq"],
        limit=PAGE, now=data["all_due_at"]), scalar=True)
    (sql, params), = [(sql, params) for sql, params in calls
                      if statement_kind(sql) == "release due"]
    out.append((f"list_messages: the busiest relationship, {HELD_REPLIES} held replies due:"
                " release due", sql, params))
    user = data["busiest_user"]
    for label, feed_after, unread in (
        ("feed: the busiest user, first page", None, False),
        ("feed: the busiest user, a page mid-way", data["feed_position"], False),
        ("feed: the busiest user, unread only", None, True),
    ):
        calls = await captured(lambda pool, after=feed_after, unread=unread: NotifierStore(
            pool).feed(user, limit=PAGE, after=after, unread_only=unread))
        (sql, params), = calls
        out.append((label, sql, params))
    return out


def walk(node: dict[str, Any], depth: int = 0) -> list[tuple[int, dict[str, Any]]]:
    found = [(depth, node)]
    for child in node.get("Plans", []):
        found += walk(child, depth + 1)
    return found


def blocks(node: dict[str, Any]) -> int:
    return int(node.get("Shared Hit Blocks", 0)) + int(node.get("Shared Read Blocks", 0))


async def explain(conn: asyncpg.Connection, label: str, sql: str, args: tuple[Any, ...],
                  mode: str) -> tuple[list[str], dict[str, Any]]:
    """Explain one statement in one plan mode; (problems, a summary row)."""
    name = "q_" + uuid.uuid4().hex[:8]
    writes = sql.lstrip().upper().startswith(("UPDATE", "INSERT", "DELETE"))
    await conn.execute(f"SET plan_cache_mode = {mode}")
    await conn.execute(f"PREPARE {name} AS {sql}")
    try:
        if writes:  # EXPLAIN ANALYZE runs it: undo what it did
            await conn.execute("BEGIN")
        try:
            raw = await conn.fetchval(
                f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE {name}"
                f"({', '.join(literal(a) for a in args)})")
        finally:
            if writes:
                await conn.execute("ROLLBACK")
    finally:
        await conn.execute(f"DEALLOCATE {name}")
    plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]
    problems = []
    short_mode = mode.replace("force_", "").replace("_plan", "")
    print(f"\n{label}  [{short_mode} plan]")
    scans = []
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
        if node["Node Type"] not in ("Limit", "Result", "ModifyTable", "LockRows"):
            scans.append(f"{node['Node Type']}{' ' + index if index else ''}")
        if node["Node Type"] == "Seq Scan" and relation in BIG_TABLES:
            problems.append(f"{label} ({short_mode}): Seq Scan on {relation}")
    print(f"  planning {plan['Planning Time']:.3f} ms, execution {plan['Execution Time']:.3f} ms")
    touched = blocks(plan["Plan"])
    if touched > SLOW_PAGE_BLOCKS:
        # Not a Seq Scan, but one statement of a page of 50 should not touch
        # thousands of blocks.
        print(f"  WARNING: {touched} blocks for one page (a sort over the whole range?)")
    return problems, {"label": label, "mode": short_mode, "plan": " > ".join(scans),
                      "rows": plan["Plan"].get("Actual Rows"), "blocks": touched,
                      "ms": float(plan["Execution Time"])}


async def main_async(args: argparse.Namespace, database: str) -> int:
    dsn = f"{PG_BASE}/{database}"
    await migrate_all(dsn)
    conn = await asyncpg.connect(dsn, timeout=10)
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads,
                              schema="pg_catalog")
    t0 = time.monotonic()

    def progress(step: str) -> None:
        print(f"explain: loaded {step} ({time.monotonic() - t0:.0f} s)", file=sys.stderr)

    summary: list[dict[str, Any]] = []
    try:
        data = await load(conn, args.rows, progress)
        print("data set:", json.dumps(data["counts"]))
        problems: list[str] = []
        for label, sql, params in await queries(data):
            for mode in ("force_custom_plan", "force_generic_plan"):
                found, row = await explain(conn, label, sql, params, mode)
                problems += found
                summary.append(row)
    finally:
        await conn.close()
    print("\nsummary (blocks = shared hit + read; time = execution, first run is cold):")
    for row in summary:
        flag = "  WARNING" if row["blocks"] > SLOW_PAGE_BLOCKS else ""
        print(f"  {row['label']} [{row['mode']}]: {row['plan']}; rows={row['rows']}"
              f" blocks={row['blocks']} {row['ms']:.3f} ms{flag}")
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
