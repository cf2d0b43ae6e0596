"""The real services as processes on the drills' own Postgres and RabbitMQ, and a
load of real check-ins against them, with everything counted at the end."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from client.crypto import DeviceKeys, seal
from services.gateway.store import GatewayStore
from shared.envelope import KIND_CHECKIN
from tests.faults.infra import free_port

SERVICES = ("messaging", "notifier", "gateway")
PASSWORD = "a long enough drill password"
INTERNAL_KEY = "drill-internal-key-" + "z" * 32


class Services:
    """The three services as child processes; each can be killed and restarted."""

    def __init__(self, database_url: str, amqp_url: str, log_dir: Path) -> None:
        self.ports = {name: free_port() for name in SERVICES}
        self.env = {**os.environ,
                    "INTERLUDE_ENV": "development",
                    "INTERLUDE_DATABASE_URL": database_url,
                    "INTERLUDE_AMQP_URL": amqp_url,
                    "INTERLUDE_INTERNAL_KEY": INTERNAL_KEY,
                    "INTERLUDE_LOG_FORMAT": "json",
                    "INTERLUDE_OUTBOX_POLL_SECONDS": "0.5",
                    "INTERLUDE_MESSAGING_URL": f"http://127.0.0.1:{self.ports['messaging']}",
                    "INTERLUDE_NOTIFIER_URL": f"http://127.0.0.1:{self.ports['notifier']}",
                    **{f"INTERLUDE_{n.upper()}_PORT": str(p) for n, p in self.ports.items()}}
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: Counter[str] = Counter()

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    def url(self, service: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}{path}"

    def start(self, service: str) -> None:
        self.starts[service] += 1
        log = (self.log_dir / f"{service}.{self.starts[service]}.log").open("wb")
        self.procs[service] = subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"], env=self.env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def start_all(self) -> None:
        for service in SERVICES:
            self.start(service)
        self.wait_ready()

    def ready(self, service: str) -> bool:
        return self.readiness(service) == "ready"

    def readiness(self, service: str) -> str:
        """"ready", or what the service's /readyz says is wrong."""
        try:
            with urllib.request.urlopen(self.url(service, "/readyz"), timeout=2) as r:  # noqa: S310
                return "ready" if r.status == 200 else r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.read().decode(errors="replace")
        except OSError as exc:
            return f"unreachable: {exc}"

    def wait_ready(self, services: tuple[str, ...] = SERVICES, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for service in services:
            while not self.ready(service):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{service} not ready after {timeout} s: "
                                       f"{self.readiness(service)}")
                time.sleep(0.2)

    def kill(self, service: str) -> None:
        proc = self.procs[service]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def terminate(self, service: str, timeout: float = 30) -> int:
        proc = self.procs[service]
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=timeout)

    def stop_all(self) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for service, proc in self.procs.items():
            try:
                codes[service] = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[service] = proc.wait(timeout=10)
        return codes

    def log_tail(self, service: str, chars: int = 3000) -> str:
        path = self.log_dir / f"{service}.{self.starts[service]}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))


@dataclass
class Pair:
    relationship_id: uuid.UUID
    client_id: uuid.UUID
    client_token: str
    client_device: uuid.UUID
    client_keys: DeviceKeys
    recipients: list[tuple[uuid.UUID, uuid.UUID, int, bytes]] = field(default_factory=list)


async def _call(http: aiohttp.ClientSession, base: str, method: str, path: str,
                token: str | None = None, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, base + path, headers=headers, **kwargs) as response:
        data = await response.json(content_type=None)
        assert response.status < 300, (method, path, response.status, data)
        return data


async def _publish_keys(http: aiohttp.ClientSession, base: str, token: str, user_id: uuid.UUID,
                        keys: DeviceKeys, device_id: uuid.UUID) -> None:
    await _call(http, base, "PUT", f"/v1/devices/{device_id}", token, json={
        "suite": keys.suite,
        "hpke_public_key": base64.b64encode(keys.hpke_public_key).decode(),
        "signing_public_key": base64.b64encode(keys.signing_public_key).decode(),
        "signature": base64.b64encode(keys.sign_device_record(user_id, device_id)).decode()})


async def make_pairs(services: Services, database_url: str, count: int) -> list[Pair]:
    """``count`` therapist–client pairs, enrolled through the real API, keys published."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    assert pool is not None
    pairs = []
    try:
        async with aiohttp.ClientSession() as http:
            base = services.gateway
            for _ in range(count):
                email = f"dr-{uuid.uuid4().hex[:10]}@example.org"
                _, code = await GatewayStore(pool).create_therapist(email, "Dr Drill",
                                                                    datetime.now(UTC))
                therapist = await _call(http, base, "POST", "/v1/enroll", json={
                    "code": code, "email": email, "password": PASSWORD, "display_name": "Dr"})
                t_keys, t_device = DeviceKeys.generate(), uuid.uuid4()
                t_id = uuid.UUID(therapist["user"]["id"])
                await _publish_keys(http, base, therapist["access_token"], t_id, t_keys, t_device)
                invite = await _call(http, base, "POST", "/v1/invites",
                                     therapist["access_token"])
                client = await _call(http, base, "POST", "/v1/enroll", json={
                    "code": invite["code"], "email": f"c-{uuid.uuid4().hex[:10]}@example.org",
                    "password": PASSWORD, "display_name": "Client"})
                c_keys, c_device = DeviceKeys.generate(), uuid.uuid4()
                c_id = uuid.UUID(client["user"]["id"])
                await _publish_keys(http, base, client["access_token"], c_id, c_keys, c_device)
                pair = Pair(uuid.UUID(client["relationship_id"]), c_id, client["access_token"],
                            c_device, c_keys)
                pair.recipients = [(t_id, t_device, t_keys.suite, t_keys.hpke_public_key),
                                   (c_id, c_device, c_keys.suite, c_keys.hpke_public_key)]
                pairs.append(pair)
    finally:
        await pool.close()
    return pairs


@dataclass
class Prepared:
    pair: Pair
    message_id: uuid.UUID
    body: bytes


def prepare(pairs: list[Pair], total: int) -> list[Prepared]:
    """Sealed check-ins, made before the clock starts so crypto is not what is driven."""
    out = []
    now_ms = int(time.time() * 1000)
    for i in range(total):
        pair = pairs[i % len(pairs)]
        message_id = uuid.uuid4()
        env = seal(text=f"drill check-in {i}", kind=KIND_CHECKIN, flags=0, message_id=message_id,
                   relationship_id=pair.relationship_id, sender_user_id=pair.client_id,
                   sender_device_id=pair.client_device, sender_keys=pair.client_keys,
                   recipients=pair.recipients, sent_at_ms=now_ms)
        body = json.dumps({"envelope": base64.b64encode(env.to_bytes()).decode()}).encode()
        out.append(Prepared(pair, message_id, body))
    return out


@dataclass
class Outcome:
    accepted: set[uuid.UUID] = field(default_factory=set)
    statuses: Counter[int] = field(default_factory=Counter)
    resets: int = 0          # a connection broken before an answer came
    refused: int = 0         # could not connect at all (nothing was sent)
    # A failed attempt (a reset, or a 502/503, e.g. from the gateway's hop to a
    # stopping service) whose request had in fact been stored: its retry was
    # answered 200, a replay. The server accepted it and the answer was lost.
    answers_lost: int = 0
    slowest: float = 0.0

    def unfinished(self, items: list[Prepared]) -> bool:
        """True while some of ``items`` is not accepted yet: a drill checks it as
        its fault begins, to prove the fault hit the stream, not its aftermath."""
        return len(self.accepted) < len(items)


async def drive(base: str, items: list[Prepared], *, concurrency: int = 16,
                retry_for: float = 60.0, deadline: float = 240.0,
                fresh_connections: bool = False, rate: float | None = None,
                outcome: Outcome | None = None) -> Outcome:
    """Post every check-in, retrying 503s and connection failures with the same
    Idempotency-Key for up to ``retry_for`` seconds each; count what happened
    (into ``outcome`` if given, so a drill can watch it while the stream runs).

    With ``rate``, check-in *i* is first sent no earlier than *i* / ``rate``
    seconds after the start: the stream then lasts at least ``len(items) /
    rate`` seconds however fast the machine is, so a fault a drill injects after
    a fixed delay surely lands in the middle of it."""
    outcome = Outcome() if outcome is None else outcome
    queue: asyncio.Queue[tuple[int, Prepared]] = asyncio.Queue()
    for index, item in enumerate(items):
        queue.put_nowait((index, item))
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=fresh_connections)
    timeout = aiohttp.ClientTimeout(total=30)
    start = time.monotonic()

    async def worker(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            index, item = queue.get_nowait()
            if rate is not None:
                await asyncio.sleep(max(0.0, start + index / rate - time.monotonic()))
            key = str(item.message_id)
            give_up = time.monotonic() + retry_for
            failed_before = False
            while time.monotonic() < give_up:
                started = time.monotonic()
                try:
                    async with http.post(
                            f"{base}/v1/relationships/{item.pair.relationship_id}/messages",
                            data=item.body, headers={
                                "Authorization": f"Bearer {item.pair.client_token}",
                                "Content-Type": "application/json",
                                "Idempotency-Key": key}) as response:
                        await response.read()
                        outcome.statuses[response.status] += 1
                        outcome.slowest = max(outcome.slowest, time.monotonic() - started)
                        if response.status < 300:
                            outcome.accepted.add(item.message_id)
                            if failed_before and response.status == 200:
                                outcome.answers_lost += 1
                            break
                        assert response.status in (502, 503), (
                            response.status, await response.text())
                        if response.status == 503:
                            # An outage is said as such: when to retry, and why, in JSON.
                            assert response.headers.get("Retry-After", "").isdigit(), (
                                dict(response.headers))
                            assert (await response.json())["error"]["code"] == "unavailable"
                        failed_before = True
                except aiohttp.ClientConnectorError:
                    outcome.refused += 1
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                        aiohttp.ClientPayloadError, TimeoutError):
                    outcome.resets += 1
                    failed_before = True
                await asyncio.sleep(0.2)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        async with asyncio.timeout(deadline):
            await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return outcome


async def count_effects(database_url: str, ids: set[uuid.UUID]) -> dict[str, Any]:
    """How many times each accepted check-in was stored, announced and alerted."""
    conn = await asyncpg.connect(database_url)
    try:
        id_list = list(ids)
        stored = await conn.fetch(
            "SELECT id, count(*) AS n FROM messaging.messages WHERE id = ANY($1::uuid[])"
            " GROUP BY id", id_list)
        events = await conn.fetch(
            "SELECT (payload->'data'->>'message_id')::uuid AS id, count(*) AS n,"
            " count(published_at) AS published FROM messaging.outbox"
            " WHERE routing_key = 'checkin.submitted'"
            " AND (payload->'data'->>'message_id')::uuid = ANY($1::uuid[]) GROUP BY 1", id_list)
        alerts = await conn.fetch(
            "SELECT message_id AS id, count(*) AS n FROM notifier.notifications"
            " WHERE kind = 'checkin.received' AND message_id = ANY($1::uuid[]) GROUP BY 1",
            id_list)
        held = await conn.fetchval(
            "SELECT count(*) FROM notifier.held_alerts WHERE message_id = ANY($1::uuid[])",
            id_list)
    finally:
        await conn.close()
    return {
        "stored": {r["id"]: r["n"] for r in stored},
        "events": {r["id"]: r["n"] for r in events},
        "published": sum(r["published"] for r in events),
        "alerts": {r["id"]: r["n"] for r in alerts},
        "held": held,
    }


async def wait_for_exactly_once(database_url: str, ids: set[uuid.UUID],
                                timeout: float = 120) -> dict[str, Any]:
    """Wait until every accepted check-in is stored, published and alerted; then
    check that each happened exactly once."""
    deadline = time.monotonic() + timeout
    while True:
        effects = await count_effects(database_url, ids)
        if len(effects["alerts"]) == len(ids) and effects["published"] >= len(ids):
            break
        if time.monotonic() > deadline:
            missing = len(ids) - len(effects["alerts"])
            raise AssertionError(f"{missing} of {len(ids)} accepted check-ins have no alert "
                                 f"after {timeout} s; published {effects['published']}")
        await asyncio.sleep(0.5)
    assert set(effects["stored"]) == ids
    assert all(n == 1 for n in effects["stored"].values()), "a check-in stored twice"
    assert all(n == 1 for n in effects["events"].values()), "an event written twice"
    assert all(n == 1 for n in effects["alerts"].values()), "a check-in alerted twice"
    return effects
