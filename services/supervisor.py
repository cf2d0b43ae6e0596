"""``interlude serve all``: the three services as supervised child processes.

Each service runs as ``python -m services.<name>``. A child that dies is
restarted with backoff; SIGINT or SIGTERM is passed on to every child, which
then drains its requests and stops; the supervisor waits for them (and kills
any still running after a grace period).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

GRACE_SECONDS = 20.0
MAX_BACKOFF = 30.0
ORDER = ("messaging", "notifier", "gateway")


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", f"services.{self.name}"], env=os.environ.copy())
        self.started_at = time.monotonic()
        print(f"interlude: started {self.name} (pid {self.process.pid})", file=sys.stderr)


def _say(message: str) -> None:
    print(f"interlude: {message}", file=sys.stderr, flush=True)


def supervise(names: tuple[str, ...] = ORDER) -> int:
    children = [Child(n) for n in names]
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    for child in children:
        child.start()

    while not stopping:
        time.sleep(0.2)
        now = time.monotonic()
        for child in children:
            proc = child.process
            if proc is not None and proc.poll() is not None:
                code = proc.returncode
                child.process = None
                if code == 2:
                    # A configuration error: restarting cannot help.
                    _say(f"{child.name} refused its configuration; stopping")
                    stopping = True
                    break
                # A child that ran a while gets a fresh backoff.
                if now - child.started_at > 60:
                    child.restarts = 0
                delay = min(MAX_BACKOFF, 0.5 * 2 ** child.restarts)
                child.restarts += 1
                child.next_start = now + delay
                _say(f"{child.name} exited with {code}; restarting in {delay:.1f} s")
            elif proc is None and now >= child.next_start:
                child.start()

    _say("stopping services")
    for child in children:
        if child.process is not None and child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    failed = False
    for child in children:
        if child.process is None:
            continue
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _say(f"{child.name} did not stop in time; killing it")
            child.process.kill()
            child.process.wait()
            failed = True
    _say("stopped")
    return 1 if failed else 0
