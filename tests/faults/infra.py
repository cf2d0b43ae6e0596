"""A Postgres cluster and a RabbitMQ node of the drills' own.

Fault drills stop and restart the database and the broker. They never touch the
machine's shared Postgres and RabbitMQ: each run creates its own cluster and
node on free ports, breaks only those, and removes them at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

PG_VERSION = sorted(os.listdir("/etc/postgresql"))[-1] if os.path.isdir("/etc/postgresql") else "15"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    result = subprocess.run(list(args), env=env, capture_output=True, text=True,
                            timeout=timeout, check=False, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stdout}\n{result.stderr}")
    return result.stdout


def wait_port(port: int, up: bool, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            if up:
                return
        except OSError:
            if not up:
                return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} did not go {'up' if up else 'down'} in {timeout} s")


@dataclass
class DrillPostgres:
    name: str
    port: int

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @classmethod
    def create(cls) -> DrillPostgres:
        pg = cls(f"interlude-drill-{uuid.uuid4().hex[:8]}", free_port())
        _run("pg_createcluster", "--port", str(pg.port), PG_VERSION, pg.name, "--",
             "--auth=trust")
        pg.start()
        return pg

    def _ctl(self, action: str) -> None:
        _run("pg_ctlcluster", "--skip-systemctl-redirect", PG_VERSION, self.name, action)

    def start(self) -> None:
        self._ctl("start")
        wait_port(self.port, up=True)

    def stop(self) -> None:
        self._ctl("stop")
        wait_port(self.port, up=False)

    def drop(self) -> None:
        _run("pg_dropcluster", "--stop", PG_VERSION, self.name)


@dataclass
class DrillRabbit:
    node: str
    port: int
    base: Path
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @classmethod
    def create(cls) -> DrillRabbit:
        base = Path(tempfile.mkdtemp(prefix="interlude-drill-mq-"))
        port = free_port()
        node = f"interlude-drill-{uuid.uuid4().hex[:8]}@localhost"
        (base / "plugins").write_text("[].\n")
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{port}\n")
        env = {**os.environ,
               "RABBITMQ_NODENAME": node, "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
               "RABBITMQ_DIST_PORT": str(free_port()),
               "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
               "RABBITMQ_LOG_BASE": str(base / "log"),
               "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "plugins"),
               "RABBITMQ_PID_FILE": str(base / "pid")}
        shutil.chown(base, "rabbitmq", "rabbitmq")
        for child in base.iterdir():
            shutil.chown(child, "rabbitmq", "rabbitmq")
        mq = cls(node, port, base, env)
        _run("rabbitmq-server", "-detached", env=env)
        mq._await_app()
        return mq

    def ctl(self, *args: str) -> str:
        return _run("rabbitmqctl", "-n", self.node, *args)

    def _await_app(self) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                self.ctl("await_startup", "--timeout", "10")
                break
            except RuntimeError:
                time.sleep(1)
        wait_port(self.port, up=True, timeout=30)

    def stop_app(self) -> None:
        self.ctl("stop_app")
        wait_port(self.port, up=False)

    def start_app(self) -> None:
        self.ctl("start_app")
        self._await_app()

    def destroy(self) -> None:
        try:
            self.ctl("stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
