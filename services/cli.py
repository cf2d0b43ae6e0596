"""``interlude``: the operator's command (migrate, serve, admin)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime

from services.runner import SERVICES, load_or_exit, run_service

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
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run and administer Interlude's services. Settings come "
        "from INTERLUDE_* environment variables (see docs/configuration.md).")
    sub = parser.add_subparsers(dest="command", required=True)

    migrate = sub.add_parser("migrate", help="apply pending database migrations (idempotent)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
