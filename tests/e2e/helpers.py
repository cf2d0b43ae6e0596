"""What the end-to-end tests share: the service processes, people and their CLI.

The ``stack`` fixture (conftest.py) starts the three real services as processes
on free ports, against this run's fresh database and vhost; ``Cli`` runs the real
``interlude-client`` as a subprocess for one person's home.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import TestEnv

BIN = Path(sys.executable).parent
CLIENT = str(BIN / "interlude-client")
OPERATOR = str(BIN / "interlude")
SERVICES = ("messaging", "notifier", "gateway")
READY_TIMEOUT = 30.0
CALL_TIMEOUT = 60.0
POLL_TIMEOUT = 15.0
STOP_TIMEOUT = 20.0

T = TypeVar("T")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Stack:
    gateway_url: str
    env: dict[str, str]
    logs: list[Path]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - our own URL
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def run_stack(test_env: TestEnv, log_dir: Path) -> Iterator[Stack]:
    """Start the services, wait until each is ready, and stop them (SIGTERM) afterwards;
    a service that does not stop cleanly fails the test."""
    ports = {name: _free_port() for name in SERVICES}
    env = {**os.environ, **test_env.env(
        INTERLUDE_GATEWAY_PORT=str(ports["gateway"]),
        INTERLUDE_MESSAGING_PORT=str(ports["messaging"]),
        INTERLUDE_NOTIFIER_PORT=str(ports["notifier"]),
        INTERLUDE_MESSAGING_URL=f"http://127.0.0.1:{ports['messaging']}",
        INTERLUDE_NOTIFIER_URL=f"http://127.0.0.1:{ports['notifier']}",
    )}
    processes: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        for name in SERVICES:
            log_path = log_dir / f"{name}.log"
            logs.append(log_path)
            with log_path.open("wb") as log:
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", f"services.{name}"], env=env,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + READY_TIMEOUT
        for name, process in zip(SERVICES, processes, strict=True):
            url = f"http://127.0.0.1:{ports[name]}/readyz"
            while not _ready(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    output = (log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                    pytest.fail(f"{name} did not become ready (exit {process.poll()}):\n{output}")
                time.sleep(0.2)
        yield Stack(f"http://127.0.0.1:{ports['gateway']}", env, logs)
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        unclean = []
        for name, process in zip(SERVICES, processes, strict=False):
            try:
                code = process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
                code = None
            if code != 0:
                unclean.append(f"{name} (exit {code})")
        if unclean:
            pytest.fail(f"services did not stop cleanly on SIGTERM: {', '.join(unclean)}")


@dataclass
class Person:
    home: Path
    email: str
    name: str
    password: str
    passphrase: str

    @classmethod
    def new(cls, base: Path, role: str, name: str) -> Person:
        run_id = uuid.uuid4().hex[:10]
        return cls(base / f"{role}-{run_id}", f"{role}-{run_id}@example.org", name,
                   f"{role}-pw-{uuid.uuid4().hex}", f"{role}-pp-{uuid.uuid4().hex}")


class Cli:
    """``interlude-client`` as a subprocess; ``tz`` sets the process's local zone (TZ)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def run(self, person: Person, *args: str, ok: bool = True,
            tz: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INTERLUDE_")}
        env.update(INTERLUDE_PASSPHRASE=person.passphrase, INTERLUDE_PASSWORD=person.password)
        if tz is not None:
            env["TZ"] = tz
        result = subprocess.run(
            [CLIENT, "--server", self.stack.gateway_url, "--home", str(person.home), *args],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=CALL_TIMEOUT, check=False)
        if ok:
            assert result.returncode == 0, (
                f"interlude-client {' '.join(args[:2])} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}")
        return result

    def json(self, person: Person, *args: str) -> Any:
        return json.loads(self.run(person, *args, "--json").stdout)


def poll(what: str, fetch: Callable[[], T], done: Callable[[T], bool],
         timeout: float = POLL_TIMEOUT) -> T:
    """Fetch until ``done``; fail naming ``what`` and the last value after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}; last: {value!r}")
        time.sleep(0.5)


def create_therapist(stack: Stack, email: str, name: str) -> str:
    """The operator's one-time enrollment code for a new therapist."""
    result = subprocess.run(
        [OPERATOR, "admin", "create-therapist", "--email", email, "--name", name],
        env=stack.env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=CALL_TIMEOUT, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def enroll_pair(cli: Cli, base: Path) -> tuple[Person, Person]:
    """A therapist and one client of theirs, both enrolled, the relationship active."""
    therapist = Person.new(base, "dr", "Dr Ada Byron")
    client = Person.new(base, "client", "Sam Client")
    code = create_therapist(cli.stack, therapist.email, therapist.name)
    cli.run(therapist, "enroll", "--code", code, "--email", therapist.email,
            "--name", therapist.name)
    invite_code = cli.run(therapist, "invite").stdout.strip().splitlines()[-1]
    cli.run(client, "enroll", "--code", invite_code, "--email", client.email,
            "--name", client.name)
    return therapist, client
