"""``interlude``: the operator's command (migrate, serve, admin)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from services.runner import SERVICES, load_or_exit, run_service

if TYPE_CHECKING:
    from services.notifier.deliveries_store import Delivery

PROG = "interlude"


def _fail(message: str, code: int = 1) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def cmd_migrate(_: argparse.Namespace) -> int:
    import asyncpg

    from shared.db import MigrationError, migrate_all

    settings = load_or_exit(PROG)
    try:
        applied = asyncio.run(migrate_all(settings.database_url))
    except (MigrationError, OSError, asyncpg.PostgresError) as exc:
        return _fail(f"migration failed: {exc}")
    for name in applied:
        print(f"applied {name}")
    print(f"database is up to date ({len(applied)} migration(s) applied)")
    try:
        asyncio.run(_declare_broker_topology(settings.amqp_url))
    except Exception as exc:  # any broker failure: one clear line, non-zero exit
        return _fail(f"broker set-up failed: {exc.__class__.__name__}: {exc}")
    print("broker is set up (exchanges and the notifier's durable queue)")
    return 0


async def _declare_broker_topology(amqp_url: str) -> None:
    """Declare the exchanges and the notifier's durable queue before any service runs.

    Without it, events published before the notifier's first start would be routed
    only to the gateways' transient stream queues: confirmed, marked sent, and
    never alerted. With the durable queue in place they wait there.
    """
    from services.notifier.consumer import BINDINGS, QUEUE, RETIRED_BINDINGS
    from shared.amqp import connect, declare_consumer_queue

    async with asyncio.timeout(15):
        connection = await connect(amqp_url)
        try:
            await declare_consumer_queue(await connection.channel(), QUEUE, BINDINGS,
                                         retired=RETIRED_BINDINGS)
        finally:
            await connection.close()


def cmd_serve(args: argparse.Namespace) -> int:
    if args.service == "all":
        from services.supervisor import supervise

        load_or_exit(PROG)  # refuse bad settings before starting anything
        return supervise()
    run_service(args.service)


async def _create_therapist(email: str, name: str) -> tuple[str, str]:
    from services.gateway.store import GatewayStore
    from shared.db import create_pool

    settings = load_or_exit(PROG)
    pool = await create_pool(settings.database_url, max_size=1)
    try:
        account, code = await GatewayStore(pool).create_therapist(email, name, datetime.now(UTC))
    finally:
        await pool.close()
    return str(account.id), code


def cmd_create_therapist(args: argparse.Namespace) -> int:
    import asyncpg
    from pydantic import ValidationError

    from services.gateway.accounts import Email, Name
    from services.gateway.store import EmailTaken

    try:
        from pydantic import TypeAdapter

        email = TypeAdapter(Email).validate_python(args.email)
        name = TypeAdapter(Name).validate_python(args.name)
    except ValidationError as exc:
        return _fail(f"invalid input: {exc.errors()[0]['msg']}", 2)
    try:
        account_id, code = asyncio.run(_create_therapist(email, name))
    except EmailTaken:
        return _fail(f"an account with email {email} already exists")
    except (OSError, asyncpg.PostgresError) as exc:
        return _fail(f"database error: {exc.__class__.__name__}: {exc}")
    print(f"created therapist {name} <{email}> (account {account_id}), awaiting enrollment")
    print("give them this one-time enrollment code (valid 14 days):")
    print(code)
    return 0


async def _deliveries(states: list[str], limit: int) -> list[tuple[Delivery, str]]:
    from services.notifier.deliveries_store import DeliveryStore
    from shared.db import create_pool

    settings = load_or_exit(PROG)
    pool = await create_pool(settings.database_url, max_size=1)
    try:
        rows = await DeliveryStore(pool).for_operator(states=states, limit=limit)
    finally:
        await pool.close()
    return rows


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if value else "-"


def cmd_deliveries(args: argparse.Namespace) -> int:
    import asyncpg

    from services.notifier.deliveries_store import UNDELIVERED

    states = sorted(set(args.state or []) | (set(UNDELIVERED) if args.failed else set()))
    if not states:
        states = list(UNDELIVERED)
    try:
        rows = asyncio.run(_deliveries(states, args.limit))
    except (OSError, asyncpg.PostgresError) as exc:
        return _fail(f"database error: {exc.__class__.__name__}: {exc}")
    if not rows:
        print(f"no deliveries in state {', '.join(states)}")
        return 0
    header = ("DELIVERY", "USER", "CHANNEL", "TYPE", "STATE", "ATTEMPTS", "UPDATED",
              "NEXT ATTEMPT", "LAST ERROR")
    table: list[tuple[str, ...]] = [header]
    for delivery, channel_type in rows:
        table.append((str(delivery.id), str(delivery.user_id), str(delivery.channel_id),
                      channel_type, delivery.state, str(delivery.attempts),
                      _when(delivery.updated_at), _when(delivery.next_attempt_at),
                      (delivery.last_error or "-")[:60]))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
    print(f"{len(rows)} deliver{'y' if len(rows) == 1 else 'ies'}"
          f"{' (limit reached)' if len(rows) == args.limit else ''}")
    return 0


def _positive(raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {raw!r}")
    return int(raw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run and administer Interlude's services. Settings come "
        "from INTERLUDE_* environment variables (see docs/configuration.md).")
    sub = parser.add_subparsers(dest="command", required=True)

    migrate = sub.add_parser(
        "migrate", help="apply pending database migrations and declare the broker's durable "
        "exchanges and queues (idempotent)")
    migrate.set_defaults(func=cmd_migrate)

    serve = sub.add_parser("serve", help="run one service, or all three supervised")
    serve.add_argument("service", choices=[*SERVICES, "all"])
    serve.set_defaults(func=cmd_serve)

    admin = sub.add_parser("admin", help="operator tasks")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    therapist = admin_sub.add_parser(
        "create-therapist", help="create a therapist account awaiting enrollment; prints a "
        "one-time enrollment code as the last line")
    therapist.add_argument("--email", required=True)
    therapist.add_argument("--name", required=True)
    therapist.set_defaults(func=cmd_create_therapist)

    deliveries = admin_sub.add_parser(
        "deliveries", help="list alert deliveries to email and webhook channels (default: the"
        " failed and dead ones)",
        description="Print a table of notification deliveries across all users, most recently"
        " changed first. A 'failed' delivery is being retried with backoff; a 'dead' one was"
        " given up (attempts used up, refused for good, or its channel removed). Shows ids,"
        " states and errors only, never addresses, URLs or content.")
    deliveries.add_argument("--failed", action="store_true",
                            help="deliveries that failed: state failed or dead (the default)")
    deliveries.add_argument("--state", action="append",
                            choices=["pending", "failed", "sent", "dead"],
                            help="deliveries in this state (repeatable; adds to --failed)")
    deliveries.add_argument("--limit", type=_positive, default=100,
                            help="print at most this many (default 100)")
    deliveries.set_defaults(func=cmd_deliveries)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        # Operator commands speak in their own one-line errors; libraries (aiormq
        # logs every failed connect) stay quiet. `serve` configures its own logging.
        logging.getLogger().addHandler(logging.NullHandler())
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
