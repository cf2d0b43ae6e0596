"""The people of a bench run, made through the real HTTP API, and their envelopes.

Therapists are created as the operator does (``GatewayStore.create_therapist``,
what ``interlude admin create-therapist`` calls); everything after that is HTTP:
enrollment, invites, publishing device keys. Envelopes are sealed with the real
client crypto before the timed phases, in worker processes, so that the load
generator only sends bytes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg

from client.crypto import DeviceKeys, seal
from services.gateway.store import GatewayStore
from shared.envelope import KIND_CHECKIN

PASSWORD = "bench-password-long-enough"  # noqa: S105 - scratch accounts, dropped after
# A few realistic check-in lengths; padding buckets make most envelopes ~2.9 kB.
TEXTS = (
    "Slept better this week. The breathing exercise helped on Tuesday.",
    "Hard day at work again; I noticed the old pattern of skipping lunch and "
    "then feeling shaky by four. I wrote it down like we said. " * 2,
    "Short one: I went for the walk. Felt okay after. " * 6,
)


@dataclass
class Person:
    user_id: uuid.UUID
    role: str
    token: str
    keys: DeviceKeys = field(default_factory=DeviceKeys.generate)
    device_id: uuid.UUID = field(default_factory=uuid.uuid4)


@dataclass
class Pair:
    """A client, their therapist and the relationship between them."""

    client: Person
    therapist: Person
    relationship_id: uuid.UUID

    @property
    def path(self) -> str:
        return f"/v1/relationships/{self.relationship_id}/messages"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.client.token}",
                "Content-Type": "application/json"}


class SetupError(RuntimeError):
    pass


async def _call(http: aiohttp.ClientSession, base: str, method: str, path: str,
                token: str | None = None, body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, base + path, json=body, headers=headers) as response:
        data = await response.json(content_type=None) if response.content_length != 0 else None
        return response.status, data


def _expect(status: int, data: Any, wanted: tuple[int, ...], what: str) -> Any:
    if status not in wanted:
        raise SetupError(f"{what}: HTTP {status} {json.dumps(data)[:300]}")
    return data


async def _publish_keys(http: aiohttp.ClientSession, base: str, person: Person) -> None:
    keys = person.keys
    status, data = await _call(http, base, "PUT", f"/v1/devices/{person.device_id}",
                               person.token, {
        "suite": keys.suite,
        "hpke_public_key": base64.b64encode(keys.hpke_public_key).decode(),
        "signing_public_key": base64.b64encode(keys.signing_public_key).decode(),
        "signature": base64.b64encode(
            keys.sign_device_record(person.user_id, person.device_id)).decode(),
    })
    _expect(status, data, (200, 201), "publish device keys")


async def _enroll(http: aiohttp.ClientSession, base: str, code: str, email: str,
                  name: str) -> tuple[Person, Any]:
    status, data = await _call(http, base, "POST", "/v1/enroll", body={
        "code": code, "email": email, "password": PASSWORD, "display_name": name})
    _expect(status, data, (201,), f"enroll {email}")
    person = Person(uuid.UUID(data["user"]["id"]), data["user"]["role"], data["access_token"])
    await _publish_keys(http, base, person)
    return person, data


async def make_people(base: str, database_url: str, *, therapists: int, clients: int,
                      concurrency: int, progress: Callable[[], None]) -> list[Pair]:
    """``therapists`` therapists with ``clients`` clients spread over them, keys published."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    assert pool is not None
    try:
        store = GatewayStore(pool)
        codes = [(await store.create_therapist(f"therapist{i}@bench.example", f"Therapist {i}",
                                               datetime.now(UTC)))[1] for i in range(therapists)]
    finally:
        await pool.close()
    gate = asyncio.Semaphore(concurrency)  # each enrollment is one Argon2id hash
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:

        async def therapist(i: int) -> Person:
            async with gate:
                person, _ = await _enroll(http, base, codes[i], f"therapist{i}@bench.example",
                                          f"Therapist {i}")
                progress()
                return person

        staff = await asyncio.gather(*(therapist(i) for i in range(therapists)))

        async def client(i: int) -> Pair:
            async with gate:
                lead = staff[i % therapists]
                status, invite = await _call(http, base, "POST", "/v1/invites", lead.token)
                _expect(status, invite, (201,), "invite")
                person, data = await _enroll(http, base, invite["code"],
                                             f"client{i}@bench.example", f"Client {i}")
                progress()
                return Pair(person, lead, uuid.UUID(data["relationship_id"]))

        return list(await asyncio.gather(*(client(i) for i in range(clients))))


def _seal_batch(key_material: bytes, user_id: uuid.UUID, device_id: uuid.UUID,
                relationship_id: uuid.UUID,
                recipients: list[tuple[uuid.UUID, uuid.UUID, int, bytes]],
                count: int, offset: int) -> list[bytes]:
    keys = DeviceKeys.from_bytes(key_material)
    bodies = []
    for n in range(count):
        envelope = seal(text=TEXTS[(offset + n) % len(TEXTS)], kind=KIND_CHECKIN, flags=0,
                        message_id=uuid.uuid4(), relationship_id=relationship_id,
                        sender_user_id=user_id, sender_device_id=device_id, sender_keys=keys,
                        recipients=recipients, sent_at_ms=int(time.time() * 1000))
        bodies.append(json.dumps(
            {"envelope": base64.b64encode(envelope.to_bytes()).decode()}).encode())
    return bodies


def seal_envelopes(pairs: list[Pair], per_client: int, workers: int,
                   progress: Callable[[int], None]) -> list[list[bytes]]:
    """``per_client`` ready-to-send request bodies per pair, each a fresh check-in."""
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = []
        for i, pair in enumerate(pairs):
            people = (pair.client, pair.therapist)
            recipients = [(p.user_id, p.device_id, p.keys.suite, p.keys.hpke_public_key)
                          for p in people]
            futures.append(pool.submit(_seal_batch, pair.client.keys.to_bytes(),
                                       pair.client.user_id, pair.client.device_id,
                                       pair.relationship_id, recipients, per_client, i))
        results = []
        for future in futures:
            results.append(future.result(timeout=300))
            progress(per_client)
        return results
