"""The operator's `interlude` command, run as a real process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator

import aio_pika
import asyncpg
import pytest

from tests.conftest import ADMIN_DSN, AMQP_BASE, PG_BASE, TestEnv

pytestmark = pytest.mark.integration
INTERLUDE = [sys.executable, "-m", "services.cli"]


def run(args: list[str], env: dict[str, str],
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*INTERLUDE, *args], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)


@pytest.fixture
def scratch_db() -> Iterator[str]:
    """An empty database of its own, for migration tests."""
    name = f"interlude_migrate_{uuid.uuid4().hex[:8]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(ADMIN_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_BASE}/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def scratch_vhost() -> Iterator[str]:
    """An empty RabbitMQ vhost of its own: the broker set-up must create the queue."""
    vhost = f"interlude-migrate-{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "add_vhost", vhost], check=True, capture_output=True,
                   timeout=60)
    try:
        subprocess.run(["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*",
                        ".*"], check=True, capture_output=True, timeout=60)
        yield f"{AMQP_BASE}/{vhost}"
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], check=True, capture_output=True,
                       timeout=60)


def test_migrate_is_idempotent_and_safe_to_run_concurrently(scratch_db: str,
                                                            scratch_vhost: str) -> None:
    env = {"INTERLUDE_DATABASE_URL": scratch_db, "INTERLUDE_AMQP_URL": scratch_vhost}
    procs = [subprocess.Popen([*INTERLUDE, "migrate"], env={**os.environ, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL) for _ in range(3)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    applied = sum(line.startswith("applied ") for out, _ in outputs for line in out.splitlines())
    again = run(["migrate"], env)
    assert again.returncode == 0
    assert "(0 migration(s) applied)" in again.stdout

    async def versions() -> list[tuple[str, int]]:
        conn = await asyncpg.connect(scratch_db)
        try:
            rows = []
            for schema in ("gateway", "messaging", "notifier"):
                rows += [(schema, r["version"]) for r in await conn.fetch(
                    f"SELECT version FROM {schema}.schema_migrations")]
            return rows
        finally:
            await conn.close()

    recorded = asyncio.run(versions())
    assert len(recorded) == len(set(recorded)) == applied

    async def notifier_queue_is_durable() -> bool:
        connection = await aio_pika.connect(scratch_vhost)
        try:
            channel = await connection.channel()
            # A passive declare fails (channel closed, NOT_FOUND) if the queue is missing.
            queue = await channel.declare_queue("notifier.events", passive=True)
            return queue.name == "notifier.events"
        finally:
            await connection.close()

    # The durable queue exists before any notifier ran, so no event can miss it.
    assert asyncio.run(notifier_queue_is_durable())
    assert "broker is set up" in again.stdout


def test_migrate_says_so_when_the_broker_is_unreachable(scratch_db: str) -> None:
    result = run(["migrate"], {"INTERLUDE_DATABASE_URL": scratch_db,
                               "INTERLUDE_AMQP_URL": "amqp://guest:guest@127.0.0.1:9/"})
    assert result.returncode == 1
    assert result.stderr.startswith("interlude: broker set-up failed:")
    assert result.stderr.strip().count("\n") == 0
    assert "Traceback" not in result.stderr


def test_create_therapist_prints_the_code_last_and_refuses_duplicates(
        test_env: TestEnv) -> None:
    email = f"dr-{uuid.uuid4().hex[:8]}@example.org"
    first = run(["admin", "create-therapist", "--email", email, "--name", "Dr A"],
                test_env.env())
    assert first.returncode == 0, first.stderr
    code = first.stdout.strip().splitlines()[-1]
    assert len(code.replace("-", "")) == 20
    again = run(["admin", "create-therapist", "--email", email.upper(), "--name", "Dr A"],
                test_env.env())
    assert again.returncode == 1
    assert again.stderr.strip().count("\n") == 0
    assert "already exists" in again.stderr
    bad = run(["admin", "create-therapist", "--email", "nope", "--name", "Dr A"],
              test_env.env())
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr


def test_bad_settings_stop_a_service_with_one_line(test_env: TestEnv) -> None:
    result = run(["serve", "gateway"], test_env.env(INTERLUDE_GATEWAY_PORT="eighty"))
    assert result.returncode == 2
    assert result.stderr.strip() == ("interlude gateway: configuration error: "
                                     "INTERLUDE_GATEWAY_PORT must be a port number, got 'eighty'")


def test_a_port_in_use_stops_a_service_with_one_line(test_env: TestEnv) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run(["serve", "messaging"], test_env.env(INTERLUDE_MESSAGING_PORT=str(port)))
    assert result.returncode == 1
    assert result.stderr.strip() == (f"interlude messaging: cannot listen on 127.0.0.1:{port}:"
                                     " Address already in use")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
            return int(response.status)
    except OSError:
        return 0


def test_serve_all_runs_three_ready_services_and_stops_on_sigterm(test_env: TestEnv) -> None:
    ports = {name: _free_port() for name in ("GATEWAY", "MESSAGING", "NOTIFIER")}
    env = test_env.env(**{f"INTERLUDE_{n}_PORT": str(p) for n, p in ports.items()},
                       INTERLUDE_MESSAGING_URL=f"http://127.0.0.1:{ports['MESSAGING']}",
                       INTERLUDE_NOTIFIER_URL=f"http://127.0.0.1:{ports['NOTIFIER']}")
    proc = subprocess.Popen([*INTERLUDE, "serve", "all"], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        urls = [f"http://127.0.0.1:{p}/readyz" for p in ports.values()]
        while time.monotonic() < deadline and any(_status(u) != 200 for u in urls):
            time.sleep(0.2)
        assert all(_status(u) == 200 for u in urls)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert b"stopped" in err
        assert all(_status(u) == 0 for u in urls)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
