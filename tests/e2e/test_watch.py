"""End to end: ``interlude-client watch`` follows the live stream of the real gateway.

The therapist watches in a background process while their client sends
check-ins; the watch prints the stream's frames as JSON lines and stops after
``--count`` of them. A later watch resumes after the last notification the
earlier one showed (kept in the keystore), so check-ins sent meanwhile are not
missed. Every watch here is bounded by ``--timeout``.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from client.session import LocalStore
from tests.e2e.helpers import CLIENT, Cli, Person, Stack, enroll_pair, poll

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

WATCH_TIMEOUT = 30
CONNECT_WAIT = 20.0


class Watch:
    """``interlude-client watch`` as a background process, its stderr read as it comes."""

    def __init__(self, stack: Stack, person: Person, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INTERLUDE_")}
        env.update(INTERLUDE_PASSPHRASE=person.passphrase, INTERLUDE_PASSWORD=person.password)
        self.process = subprocess.Popen(
            [CLIENT, "--server", stack.gateway_url, "--home", str(person.home), "watch",
             *args],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        self.err_lines: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        self._out: list[str] = []
        # One reader per pipe, and nothing else reads them: a communicate() here
        # would race the stderr reader for the last line.
        self._reader = threading.Thread(target=self._read_err, daemon=True)
        self._reader.start()
        self._out_reader = threading.Thread(target=self._read_out, daemon=True)
        self._out_reader.start()

    def _read_err(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.err_lines.put(line)

    def _read_out(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._out.append(line)

    def wait_for_err(self, needle: str, timeout: float = CONNECT_WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not any(needle in line for line in self.err):
            left = deadline - time.monotonic()
            if left <= 0 or (self.process.poll() is not None and self.err_lines.empty()):
                self.stop()
                pytest.fail(f"watch never said {needle!r}; stderr: {''.join(self.err)}")
            try:
                self.err.append(self.err_lines.get(timeout=min(left, 0.5)))
            except queue.Empty:
                continue

    def finish(self, timeout: float = WATCH_TIMEOUT + 15) -> tuple[int, str, str]:
        """Wait for the process to end by itself: (exit code, stdout, stderr)."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"watch did not end within {timeout} s; stderr: {''.join(self.err)}")
        self._close_pipes()
        while not self.err_lines.empty():
            self.err.append(self.err_lines.get())
        return self.process.returncode, "".join(self._out), "".join(self.err)

    def _close_pipes(self) -> None:
        """After the process ended: let the readers reach the end, then close."""
        self._reader.join(5)
        self._out_reader.join(5)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._close_pipes()


def _frames(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _checkin_notifications(cli: Cli, therapist: Person) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = cli.json(therapist, "notifications")
    return [n for n in items if n["kind"] == "checkin.received"]


def test_watch_prints_events_and_resumes_what_it_missed(stack: Stack, tmp_path: Path) -> None:
    cli = Cli(stack)
    therapist, client = enroll_pair(cli, tmp_path)

    watch = Watch(stack, therapist, "--json", "--count", "2", "--timeout", str(WATCH_TIMEOUT))
    try:
        watch.wait_for_err("connected")
        # The watch does not hold the home's lock: the same home's commands still run.
        cli.run(therapist, "notifications")
        sent = cli.json(client, "send", "how are you?")
        code, out, err = watch.finish()
    finally:
        watch.stop()
    assert code == 0, err
    frames = _frames(out)
    assert sorted(f["type"] for f in frames) == ["message", "notification"], frames
    message = next(f for f in frames if f["type"] == "message")
    assert (message["kind"], message["message_id"]) == ("checkin", sent["id"])
    notification = next(f for f in frames if f["type"] == "notification")["notification"]
    assert (notification["kind"], notification["message_id"]) == ("checkin.received",
                                                                  sent["id"])
    assert "Traceback" not in err
    state = LocalStore(therapist.home).load(therapist.passphrase)
    assert state.last_notification_id == notification["id"]

    # Two check-ins while nobody watches; the next watch starts after the last one seen.
    missed = [cli.json(client, "send", f"check-in {n}")["id"] for n in (2, 3)]
    poll("both notifications", lambda: _checkin_notifications(cli, therapist),
         lambda items: len(items) == 3)
    result = cli.run(therapist, "watch", "--json", "--count", "2", "--timeout",
                     str(WATCH_TIMEOUT))
    frames = _frames(result.stdout)
    assert [f["type"] for f in frames] == ["notification", "notification"], frames
    assert [f["notification"]["message_id"] for f in frames] == missed  # oldest first
    # (The "resumed" frame follows the backlog; --count 2 stops before it.)
    assert LocalStore(therapist.home).load(therapist.passphrase).last_notification_id == \
        frames[-1]["notification"]["id"]


def test_watch_in_words_and_ctrl_c(stack: Stack, tmp_path: Path) -> None:
    cli = Cli(stack)
    therapist, client = enroll_pair(cli, tmp_path)

    watch = Watch(stack, client, "--count", "3", "--timeout", str(WATCH_TIMEOUT))
    try:
        watch.wait_for_err("connected")
        cli.run(client, "send", "a quiet word")
        cli.run(therapist, "reply", "thank you")
        code, out, err = watch.finish()
    finally:
        watch.stop()
    assert code == 0, err
    assert "a quiet word" not in out  # never content
    assert "thank you" not in out
    lines = out.splitlines()
    assert len(lines) == 3, out
    assert any("message: you sent a check-in to Dr Ada Byron" in line for line in lines), out
    assert any("message: new reply from Dr Ada Byron; `interlude-client inbox` shows it"
               in line for line in lines), out
    assert any("notification: new reply from Dr Ada Byron" in line for line in lines), out

    # Ctrl-C is how a watch without bounds ends: cleanly, exit 0.
    watch = Watch(stack, client, "--timeout", str(WATCH_TIMEOUT))
    try:
        watch.wait_for_err("connected")
        watch.process.send_signal(signal.SIGINT)
        code, out, err = watch.finish(timeout=15)
    finally:
        watch.stop()
    assert (code, out) == (0, ""), err
    assert "Traceback" not in err


def test_a_session_ended_elsewhere_ends_the_watch(stack: Stack, tmp_path: Path) -> None:
    cli = Cli(stack)
    therapist, _ = enroll_pair(cli, tmp_path)
    watch = Watch(stack, therapist, "--timeout", "100")
    try:
        watch.wait_for_err("connected")
        cli.run(therapist, "logout")
        # The gateway re-checks a socket's token every 30 s and closes it with 4401.
        code, _, err = watch.finish(timeout=110)
    finally:
        watch.stop()
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interlude-client: "), err
    assert "login" in last, err
    assert "Traceback" not in err
