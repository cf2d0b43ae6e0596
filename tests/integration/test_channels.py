"""Email and webhook channels end to end: gateway -> notifier, a local SMTP server
(aiosmtpd) and local webhook receivers, on the real Postgres and RabbitMQ.

The helpers here (SMTP server, webhook receiver with its own Standard Webhooks
verifier, a stack whose notifier has SMTP) are also used by test_deliveries.py.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import hashlib
import hmac
import json
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiosmtpd.controller import Controller

from services.gateway.app import create_app as gateway_app
from services.gateway.store import GatewayStore
from services.gateway.typedefs import STORE
from services.messaging.app import create_app as messaging_app
from services.notifier.app import create_app as notifier_app
from services.notifier.delivery import RetryPolicy
from tests.support.stack import Person, Stack, eventually

if TYPE_CHECKING:
    from tests.conftest import TestEnv

pytestmark = pytest.mark.integration

CANARY = "CANARY-7f3a-the-content-nobody-outside-may-see"
THERAPIST_NAME = "Dr Henrietta Quillfeather"
CLIENT_NAME = "Bartholomew Zanzibar"
PRACTICE = "Sunrise Willow Practice"
PUBLIC_URL = "https://app.interlude.test"
QUICK_RETRY = RetryPolicy(base_seconds=0.2, factor=2.0, max_attempts=8)


# --- a local SMTP server -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Mailbox:
    """What the SMTP server received, parsed."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.raw: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.content if isinstance(envelope.content, bytes) else \
            envelope.content.encode()
        self.raw.append(content)
        message = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append(message)
        return "250 OK"

    def to(self, address: str, subject: str | None = None) -> list[EmailMessage]:
        return [m for m in self.messages if m["To"] == address
                and (subject is None or m["Subject"] == subject)]


@contextmanager
def smtp_server() -> Iterator[tuple[Mailbox, int]]:
    mailbox = Mailbox()
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield mailbox, port
    finally:
        controller.stop()


def smtp_env(port: int) -> dict[str, str]:
    return {"INTERLUDE_SMTP_HOST": "127.0.0.1", "INTERLUDE_SMTP_PORT": str(port),
            "INTERLUDE_SMTP_SECURITY": "none", "INTERLUDE_SMTP_FROM": "alerts@interlude.test",
            "INTERLUDE_SMTP_TIMEOUT": "5", "INTERLUDE_PUBLIC_URL": PUBLIC_URL}


# --- a webhook receiver that checks signatures as the specification says ------------


def verify_signature(secret: str, headers: Mapping[str, str], body: bytes, *,
                     tolerance: int = 300) -> bool:
    """Standard Webhooks verification, written from the specification."""
    msg_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    if not msg_id or not timestamp.isdigit() or abs(time.time() - int(timestamp)) > tolerance:
        return False
    key = base64.b64decode(secret.split("_", 1)[1])
    signed = msg_id.encode() + b"." + timestamp.encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
    for candidate in headers.get("webhook-signature", "").split(" "):
        version, _, signature = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(signature.encode(), expected):
            return True
    return False


@dataclass
class Hit:
    headers: dict[str, str]
    body: bytes
    at: float
    verified: bool | None
    status: int = 0


@dataclass
class Receiver:
    """An endpoint that records every request. It answers 500 to the first ``fail``
    requests (to all if ``always_fail``), never answers if ``hang``, 401 to a bad
    signature (when it knows the secret) and 204 otherwise."""

    secret: str = ""
    fail: int = 0
    always_fail: bool = False
    hang: bool = False
    hits: list[Hit] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        hit = Hit(dict(request.headers), body, time.monotonic(),
                  verify_signature(self.secret, request.headers, body) if self.secret else None)
        self.hits.append(hit)
        if self.hang:
            await asyncio.sleep(60)
        if self.always_fail or len(self.hits) <= self.fail:
            hit.status = 500
        elif hit.verified is False:
            hit.status = 401
        else:
            hit.status = 204
        return web.Response(status=hit.status)

    def accepted(self) -> list[Hit]:
        """The requests answered 2xx (so with a valid signature, when the secret is known)."""
        return [h for h in self.hits if 200 <= h.status < 300]


@asynccontextmanager
async def receiver(**options: Any) -> AsyncIterator[Receiver]:
    endpoint = Receiver(**options)
    app = web.Application()
    app.router.add_post("/hook", endpoint.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    endpoint.url = str(server.make_url("/hook"))
    try:
        yield endpoint
    finally:
        await server.close()


# --- the three services, the notifier with SMTP ---------------------------------------


@asynccontextmanager
async def channel_stack(test_env: TestEnv, *, smtp_port: int | None = None,
                        retry: RetryPolicy = QUICK_RETRY, **env: str) -> AsyncIterator[Stack]:
    extra = {"INTERLUDE_CRISIS_RESOURCES": f"Call the {PRACTICE} line or 112", **env}
    if smtp_port is not None:
        extra.update(smtp_env(smtp_port))
    messaging = TestServer(messaging_app(test_env.settings(**extra)))
    notifier = TestServer(notifier_app(test_env.settings(**extra), retry=retry))
    await messaging.start_server()
    await notifier.start_server()
    gateway = TestServer(gateway_app(test_env.settings(
        INTERLUDE_MESSAGING_URL=str(messaging.make_url("")).rstrip("/"),
        INTERLUDE_NOTIFIER_URL=str(notifier.make_url("")).rstrip("/"), **extra)))
    await gateway.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            stack = Stack(str(gateway.make_url("")).rstrip("/"), http,
                          {"gateway": gateway.app, "messaging": messaging.app,
                           "notifier": notifier.app})

            async def ready() -> bool:
                status, _ = await stack.call("GET", "/readyz")
                return status == 200

            await eventually(ready, timeout=20)
            yield stack
    finally:
        await gateway.close()
        await notifier.close()
        await messaging.close()


def unique_email(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}@example.org"


async def named_pair(stack: Stack) -> tuple[Person, Person, uuid.UUID]:
    """A therapist and a client with distinctive names and keys, and their relationship."""
    store: GatewayStore = stack.apps["gateway"][STORE]
    t_email = unique_email("therapist")
    _, code = await store.create_therapist(t_email, THERAPIST_NAME, datetime.now(UTC))
    therapist = await stack.enroll(code, t_email, THERAPIST_NAME)
    status, invite = await stack.call("POST", "/v1/invites", therapist)
    assert status == 201, invite
    client = await stack.enroll(invite["code"], unique_email("client"), CLIENT_NAME)
    await stack.publish_keys(therapist)
    await stack.publish_keys(client)
    status, rels = await stack.call("GET", "/v1/relationships", client)
    assert status == 200
    return therapist, client, uuid.UUID(rels["items"][0]["id"])


async def checkin(stack: Stack, client: Person, relationship: uuid.UUID, text: str) -> None:
    status, data = await stack.post(client, relationship,
                                    await stack.envelope(client, relationship, text))
    assert status == 201, data


def forbidden_texts(*people: Person) -> list[str]:
    """What no channel payload may contain."""
    names = [CANARY, THERAPIST_NAME, CLIENT_NAME, PRACTICE, "Quillfeather", "Zanzibar"]
    return names + [p.email for p in people] + [str(p.user_id) for p in people]


def assert_private(blob: str | bytes, *people: Person) -> None:
    text = blob.decode(errors="replace") if isinstance(blob, bytes) else blob
    for forbidden in forbidden_texts(*people):
        assert forbidden.lower() not in text.lower(), f"{forbidden!r} leaked"


# --- email --------------------------------------------------------------------------


async def test_email_channel_is_verified_by_code_and_then_gets_one_private_alert(
        test_env: TestEnv) -> None:
    with smtp_server() as (mailbox, port):
        async with channel_stack(test_env, smtp_port=port) as stack:
            therapist, client, relationship = await named_pair(stack)
            inbox = unique_email("inbox")
            status, created = await stack.call("POST", "/v1/channels", therapist,
                                               json={"type": "email", "address": inbox})
            assert status == 201, created
            channel = created["channel"]
            assert created["code_sent"] is True
            assert channel["verified"] is False
            assert channel["address"] == inbox
            assert channel["kinds"] == ["checkin.received", "digest", "reminder.reply_due"]

            [verification] = await eventually(lambda: _async(mailbox.to(inbox)))
            code_match = re.search(r"\b(\d{6})\b", verification.get_content())
            assert code_match is not None
            assert "http" not in verification.get_content()
            assert_private(mailbox.raw[-1], therapist, client)

            # Unverified: a check-in reaches the feed but no email goes out.
            await checkin(stack, client, relationship, CANARY)

            async def in_feed() -> bool:
                status, feed = await stack.call("GET", "/v1/notifications", therapist)
                return status == 200 and len(feed["items"]) == 1

            await eventually(in_feed)
            await asyncio.sleep(0.5)
            assert len(mailbox.to(inbox)) == 1
            status, deliveries = await stack.call("GET", "/v1/deliveries", therapist)
            assert (status, deliveries["items"]) == (200, [])

            path = f"/v1/channels/{channel['id']}/verify"
            wrong = "000000" if code_match.group(1) != "000000" else "111111"
            status, error = await stack.call("POST", path, therapist, json={"code": wrong})
            assert (status, error["error"]["field"]) == (422, "code")
            status, verified = await stack.call("POST", path, therapist,
                                                json={"code": code_match.group(1)})
            assert status == 200, verified
            assert verified["channel"]["verified"] is True

            await checkin(stack, client, relationship, CANARY + " again")
            alerts = await eventually(lambda: _async(
                mailbox.to(inbox, "You have something new in Interlude")))
            await asyncio.sleep(0.5)
            assert len(mailbox.to(inbox, "You have something new in Interlude")) == 1
            [alert] = alerts
            assert PUBLIC_URL in alert.get_content()
            assert alert["From"] == "alerts@interlude.test"
            for raw in mailbox.raw:
                assert_private(raw, therapist, client)

            status, sent = await stack.call("GET", "/v1/deliveries?state=sent", therapist)
            assert status == 200
            [delivery] = sent["items"]
            assert delivery["channel_id"] == channel["id"]
            assert delivery["attempts"] == 1


async def test_email_channels_need_an_smtp_relay(test_env: TestEnv) -> None:
    async with channel_stack(test_env) as stack:
        therapist, _, _ = await named_pair(stack)
        status, error = await stack.call("POST", "/v1/channels", therapist,
                                         json={"type": "email", "address": "a@example.org"})
        assert (status, error["error"]["field"]) == (422, "type")


async def _async(value: Any) -> Any:
    return value


# --- webhooks -----------------------------------------------------------------------


async def test_webhook_is_signed_private_and_follows_a_rotated_secret(
        test_env: TestEnv) -> None:
    async with receiver() as endpoint, channel_stack(test_env) as stack:
        therapist, client, relationship = await named_pair(stack)
        status, created = await stack.call("POST", "/v1/channels", therapist,
                                           json={"type": "webhook", "url": endpoint.url})
        assert status == 201, created
        secret = created["secret"]
        assert secret.startswith("whsec_")
        endpoint.secret = secret
        channel = created["channel"]
        assert (channel["url"], channel["verified"]) == (endpoint.url, True)

        status, listed = await stack.call("GET", "/v1/channels", therapist)
        assert status == 200
        assert [c["id"] for c in listed["items"]] == [channel["id"]]
        assert secret not in json.dumps(listed)

        await checkin(stack, client, relationship, CANARY)
        [hit] = await eventually(lambda: _async(endpoint.accepted()))
        body = json.loads(hit.body)
        assert body["type"] == "notification.created"
        assert set(body["data"]) == {"notification_id", "kind", "created_at"}
        assert body["data"]["kind"] == "checkin.received"
        status, feed = await stack.call("GET", "/v1/notifications", therapist)
        assert body["data"]["notification_id"] == feed["items"][0]["id"]

        # A receiver's verifier refuses a tampered body, or another secret.
        assert not verify_signature(secret, hit.headers, hit.body.replace(b"checkin", b"checkout"))
        assert not verify_signature(secret, hit.headers, hit.body + b" ")
        status, other = await stack.call("POST", "/v1/channels", client,
                                         json={"type": "webhook", "url": endpoint.url + "?c"})
        assert status == 201
        assert not verify_signature(other["secret"], hit.headers, hit.body)

        status, rotated = await stack.call(
            "POST", f"/v1/channels/{channel['id']}/rotate-secret", therapist)
        assert status == 200, rotated
        new_secret = rotated["secret"]
        assert new_secret != secret
        endpoint.secret = new_secret
        await checkin(stack, client, relationship, CANARY + " two")
        await eventually(lambda: _async(len(endpoint.accepted()) == 2))
        latest = endpoint.accepted()[-1]
        assert verify_signature(new_secret, latest.headers, latest.body)
        assert not verify_signature(secret, latest.headers, latest.body)
        assert latest.headers["webhook-id"] != hit.headers["webhook-id"]

        for sent in endpoint.hits:
            assert_private(sent.body, therapist, client)
            assert_private(json.dumps(sent.headers), therapist, client)


# --- the API's rules ------------------------------------------------------------------


async def test_channels_are_validated_private_to_their_owner_and_removable(
        test_env: TestEnv) -> None:
    async with channel_stack(test_env) as stack:
        therapist, client, _ = await named_pair(stack)
        for body, field_name in [
            ({"type": "sms", "address": "x"}, "type"),
            ({"address": "x"}, "type"),
            ({"type": "webhook", "url": "ftp://example.org/x"}, "url"),
            ({"type": "webhook", "url": "https://user:pw@example.org/x"}, "url"),
            ({"type": "webhook", "url": "https://example.org/x", "kinds": ["everything"]},
             "kinds.0"),
            ({"type": "webhook", "url": "https://example.org/x", "extra": 1}, "extra"),
            ({"type": "email", "address": "not-an-address"}, "address"),
        ]:
            status, error = await stack.call("POST", "/v1/channels", therapist, json=body)
            assert status == 422, (body, error)
            assert error["error"]["field"] == field_name, (body, error)

        status, created = await stack.call("POST", "/v1/channels", therapist, json={
            "type": "webhook", "url": "https://hooks.example.org/a", "kinds": ["digest"]})
        assert status == 201
        channel_id = created["channel"]["id"]
        status, _ = await stack.call("POST", "/v1/channels", therapist, json={
            "type": "webhook", "url": "https://hooks.example.org/a"})
        assert status == 409

        # Someone else's channel does not exist for them.
        for method, suffix, body in [("PUT", "", {"kinds": []}), ("DELETE", "", None),
                                     ("POST", "/rotate-secret", None),
                                     ("POST", "/verify", {"code": "123456"})]:
            status, _ = await stack.call(method, f"/v1/channels/{channel_id}{suffix}", client,
                                         json=body)
            assert status == 404, (method, suffix)
        status, listed = await stack.call("GET", "/v1/channels", client)
        assert listed["items"] == []

        status, updated = await stack.call("PUT", f"/v1/channels/{channel_id}", therapist,
                                           json={"kinds": ["checkin.received", "digest",
                                                           "digest"]})
        assert status == 200
        assert updated["channel"]["kinds"] == ["checkin.received", "digest"]
        status, error = await stack.call("PUT", f"/v1/channels/{channel_id}", therapist,
                                         json={"kinds": "digest"})
        assert (status, error["error"]["field"]) == (422, "kinds")
        status, error = await stack.call("POST", f"/v1/channels/{channel_id}/verify", therapist,
                                         json={"code": "123456"})
        assert status == 409
        status, error = await stack.call("GET", "/v1/deliveries?state=lost", therapist)
        assert (status, error["error"]["field"]) == (422, "state")

        status, _ = await stack.call("DELETE", f"/v1/channels/{channel_id}", therapist)
        assert status == 204
        status, listed = await stack.call("GET", "/v1/channels", therapist)
        assert listed["items"] == []
        status, _ = await stack.call("DELETE", f"/v1/channels/{channel_id}", therapist)
        assert status == 404
