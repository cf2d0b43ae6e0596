"""The baseline: the least a server can do for a check-in, in one process.

aiohttp + asyncpg, no authentication, no checks, no broker: it decodes the
same JSON body Interlude's gateway receives and stores the envelope and one
event row in one transaction. Interlude's throughput is quoted as a ratio to
this server's on the same machine under the same load.

    python -m bench.baseline_server --port 8090 --dsn postgresql://.../db
"""

from __future__ import annotations

import argparse
import base64
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
from aiohttp import web

POOL: web.AppKey[asyncpg.Pool] = web.AppKey("pool", asyncpg.Pool)
SCHEMA = """
CREATE SCHEMA IF NOT EXISTS bench_baseline;
CREATE TABLE IF NOT EXISTS bench_baseline.messages (
    id              uuid PRIMARY KEY,
    relationship_id uuid NOT NULL,
    envelope        bytea NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS bench_baseline.outbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     uuid NOT NULL UNIQUE,
    payload      jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
"""


async def post_message(request: web.Request) -> web.Response:
    relationship_id = uuid.UUID(request.match_info["relationship_id"])
    body = await request.json()
    envelope = base64.b64decode(body["envelope"], validate=True)
    message_id, event_id = uuid.uuid4(), uuid.uuid4()
    event = {"event_id": str(event_id), "type": "checkin.submitted",
             "occurred_at": datetime.now(UTC).isoformat(),
             "data": {"message_id": str(message_id), "relationship_id": str(relationship_id)}}
    async with request.app[POOL].acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO bench_baseline.messages (id, relationship_id, envelope)"
            " VALUES ($1, $2, $3)", message_id, relationship_id, envelope)
        await conn.execute(
            "INSERT INTO bench_baseline.outbox (event_id, payload) VALUES ($1, $2::jsonb)",
            event_id, json.dumps(event))
    return web.json_response({"id": str(message_id)}, status=201)


async def ready(_: web.Request) -> web.Response:
    return web.json_response({"status": "ready"})


def create_app(dsn: str) -> web.Application:
    async def database(app: web.Application) -> AsyncIterator[None]:
        # The same pool size as each Interlude service.
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=10)
        assert pool is not None
        async with pool.acquire() as conn:
            await conn.execute(SCHEMA)
        app[POOL] = pool
        yield
        await pool.close()

    app = web.Application(client_max_size=256 * 1024)
    app.cleanup_ctx.append(database)
    app.router.add_post("/v1/relationships/{relationship_id}/messages", post_message)
    app.router.add_get("/readyz", ready)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dsn", required=True)
    args = parser.parse_args()
    web.run_app(create_app(args.dsn), host="127.0.0.1", port=args.port, print=None,
                access_log=None, shutdown_timeout=5)


if __name__ == "__main__":
    main()
