"""The three services as real processes in production mode, and the baseline server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

SERVICES = ("messaging", "notifier", "gateway")
STOP_GRACE_SECONDS = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid


def start(name: str, argv: list[str], env: dict[str, str], port: int, log_dir: Path) -> Proc:
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{name}.log", "wb") as log:
        # Own session: a Ctrl-C on the terminal reaches only the bench, which then
        # stops these in order instead of all of them dying at once.
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return Proc(name, process, port)


def start_services(env: dict[str, str], log_dir: Path) -> dict[str, Proc]:
    ports = {"gateway": int(env["INTERLUDE_GATEWAY_PORT"]),
             "messaging": int(env["INTERLUDE_MESSAGING_PORT"]),
             "notifier": int(env["INTERLUDE_NOTIFIER_PORT"])}
    procs: dict[str, Proc] = {}
    for name in SERVICES:
        procs[name] = start(name, [sys.executable, "-m", f"services.{name}"], env,
                            ports[name], log_dir)
    return procs


def start_baseline(database_url: str, port: int, log_dir: Path) -> Proc:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return start("baseline", [sys.executable, "-m", "bench.baseline_server", "--port", str(port),
                              "--dsn", database_url], env, port, log_dir)


def wait_ready(procs: list[Proc], timeout: float = 60.0) -> None:
    """Until every process answers 200 on /readyz (or raise, naming the laggards)."""
    deadline = time.monotonic() + timeout
    waiting = list(procs)
    while waiting and time.monotonic() < deadline:
        for proc in list(waiting):
            if proc.process.poll() is not None:
                raise RuntimeError(f"{proc.name} exited with {proc.process.returncode} at start"
                                   f" (see its log)")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{proc.port}/readyz",
                                            timeout=2) as response:
                    if response.status == 200:
                        waiting.remove(proc)
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(0.2)
    if waiting:
        raise RuntimeError("not ready in time: " + ", ".join(p.name for p in waiting))


def stop(procs: list[Proc]) -> list[str]:
    """SIGTERM every process, wait, SIGKILL the ones still running; returns problems."""
    problems: list[str] = []
    for proc in procs:
        if proc.process.poll() is None:
            proc.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for proc in procs:
        try:
            proc.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            problems.append(f"{proc.name} (pid {proc.pid}) ignored SIGTERM; killed")
            proc.process.kill()
            proc.process.wait(timeout=5)
    return problems


def vm_hwm_mb(pid: int) -> float:
    """Peak resident set size of ``pid`` since start or the last :func:`reset_hwm`."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def reset_hwm(pid: int) -> bool:
    """Start a new peak-RSS window for ``pid`` (Linux clear_refs 5); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class RssSampler:
    """Samples the RSS of some processes every ``interval`` s, in a thread."""

    procs: dict[str, Proc]
    interval: float = 0.25
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        handles = {n: psutil.Process(p.pid) for n, p in self.procs.items()}
        t0 = time.monotonic()

        def loop() -> None:
            while not self._stop.wait(self.interval):
                row: dict[str, float] = {}
                for name, handle in handles.items():
                    try:
                        row[name] = handle.memory_info().rss / 2**20
                    except psutil.Error:
                        continue
                self.samples.append((time.monotonic() - t0, row))

        self._thread = threading.Thread(target=loop, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def peak(self, name: str) -> float:
        return max((row.get(name, 0.0) for _, row in self.samples), default=0.0)


def _cpu_seconds(exclude_pids: set[int], own_database: str) -> dict[int, tuple[str, float]]:
    seen: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
        info = proc.info
        if info["pid"] in exclude_pids or info["cpu_times"] is None:
            continue
        cmdline = " ".join(info["cmdline"] or [])
        # Our own Postgres backends are part of the load; RabbitMQ cannot be split up.
        if own_database in cmdline or info["name"] in ("beam.smp", "epmd"):
            continue
        times = info["cpu_times"]
        seen[info["pid"]] = (cmdline[:80] or info["name"], times.user + times.system)
    return seen


@dataclass
class ForeignLoad:
    """CPU used by processes that are not this bench's during a phase (a shared machine)."""

    own_database: str
    exclude: set[int] = field(default_factory=set)
    _before: dict[int, tuple[str, float]] = field(default_factory=dict)
    _t0: float = 0.0

    def start(self, pids: list[int]) -> None:
        me = psutil.Process()
        self.exclude = {me.pid, *pids, *(c.pid for c in me.children(recursive=True))}
        self._before = _cpu_seconds(self.exclude, self.own_database)
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, object]:
        after = _cpu_seconds(self.exclude, self.own_database)
        elapsed = max(0.001, time.monotonic() - self._t0)
        used: list[tuple[float, str]] = []
        for pid, (name, seconds) in after.items():
            before = self._before.get(pid, (name, 0.0))[1]
            if seconds - before > 0:
                used.append((seconds - before, name))
        used.sort(reverse=True)
        total = sum(s for s, _ in used)
        return {"cores": round(total / elapsed, 2),
                "top": [f"{s / elapsed:.2f} {n}" for s, n in used[:3] if s / elapsed >= 0.05]}
