"""The three services in this process, on real Postgres and RabbitMQ, for tests."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from client.crypto import DeviceKeys, seal
from services.gateway.app import create_app as gateway_app
from services.messaging.app import create_app as messaging_app
from services.notifier.app import create_app as notifier_app
from shared.envelope import KIND_CHECKIN, KIND_REPLY

if TYPE_CHECKING:
    from tests.conftest import TestEnv

T = TypeVar("T")
PASSWORD = "a long enough passphrase"


async def eventually(check: Callable[[], Awaitable[T]], *, timeout: float = 10.0) -> T:
    """The first truthy result of ``check``, polled until ``timeout`` (then TimeoutError)."""
    async with asyncio.timeout(timeout):
        while True:
            result = await check()
            if result:
                return result
            await asyncio.sleep(0.05)


@dataclass
class Person:
    user_id: uuid.UUID
    email: str
    role: str
    access_token: str
    refresh_token: str
    keys: DeviceKeys = field(default_factory=DeviceKeys.generate)
    device_id: uuid.UUID = field(default_factory=uuid.uuid4)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


@dataclass
class Stack:
    base: str
    http: aiohttp.ClientSession
    apps: dict[str, web.Application]

    async def call(self, method: str, path: str, who: Person | None = None,
                   **kwargs: Any) -> tuple[int, Any]:
        headers = {**(who.auth if who else {}), **kwargs.pop("headers", {})}
        async with self.http.request(method, self.base + path, headers=headers,
                                     **kwargs) as response:
            body = await response.read()
            data = None
            if body:
                data = await response.json(content_type=None)
            return response.status, data

    async def enroll(self, code: str, email: str, name: str = "Someone") -> Person:
        status, data = await self.call("POST", "/v1/enroll", json={
            "code": code, "email": email, "password": PASSWORD, "display_name": name})
        assert status == 201, data
        return Person(uuid.UUID(data["user"]["id"]), email, data["user"]["role"],
                      data["access_token"], data["refresh_token"])

    async def publish_keys(self, person: Person) -> None:
        keys = person.keys
        status, data = await self.call("PUT", f"/v1/devices/{person.device_id}", person, json={
            "suite": keys.suite,
            "hpke_public_key": base64.b64encode(keys.hpke_public_key).decode(),
            "signing_public_key": base64.b64encode(keys.signing_public_key).decode(),
            "signature": base64.b64encode(
                keys.sign_device_record(person.user_id, person.device_id)).decode(),
        })
        assert status in (200, 201), data

    async def envelope(self, sender: Person, relationship_id: uuid.UUID, text: str, *,
                       message_id: uuid.UUID | None = None, flags: int = 0) -> bytes:
        status, devices = await self.call(
            "GET", f"/v1/relationships/{relationship_id}/devices", sender)
        assert status == 200, devices
        recipients = [(uuid.UUID(d["user_id"]), uuid.UUID(d["device_id"]), d["suite"],
                       base64.b64decode(d["hpke_public_key"])) for d in devices["items"]]
        env = seal(text=text, kind=KIND_CHECKIN if sender.role == "client" else KIND_REPLY,
                   flags=flags, message_id=message_id or uuid.uuid4(),
                   relationship_id=relationship_id, sender_user_id=sender.user_id,
                   sender_device_id=sender.device_id, sender_keys=sender.keys,
                   recipients=recipients, sent_at_ms=int(time.time() * 1000))
        return env.to_bytes()

    async def post(self, sender: Person, relationship_id: uuid.UUID, envelope: bytes,
                   idempotency_key: str | None = None) -> tuple[int, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return await self.call("POST", f"/v1/relationships/{relationship_id}/messages", sender,
                               json={"envelope": base64.b64encode(envelope).decode()},
                               headers=headers)


@asynccontextmanager
async def running_stack(test_env: TestEnv, *, require_ready: bool = True
                        ) -> AsyncIterator[Stack]:
    """Messaging, notifier and gateway apps on free ports, ready unless told otherwise."""
    messaging = TestServer(messaging_app(test_env.settings()))
    notifier = TestServer(notifier_app(test_env.settings()))
    await messaging.start_server()
    await notifier.start_server()
    gateway_settings = test_env.settings(
        INTERLUDE_MESSAGING_URL=str(messaging.make_url("")).rstrip("/"),
        INTERLUDE_NOTIFIER_URL=str(notifier.make_url("")).rstrip("/"))
    gateway = TestServer(gateway_app(gateway_settings))
    await gateway.start_server()
    try:
        # A request that hangs fails where it hangs, well before the test's timeout.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            stack = Stack(str(gateway.make_url("")).rstrip("/"), http,
                          {"gateway": gateway.app, "messaging": messaging.app,
                           "notifier": notifier.app})

            async def ready() -> bool:
                status, _ = await stack.call("GET", "/readyz")
                return status == 200

            if require_ready:
                await eventually(ready, timeout=20)
            yield stack
    finally:
        await gateway.close()
        await notifier.close()
        await messaging.close()
