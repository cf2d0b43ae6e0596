"""Webhook channels: the URL rules, the payload, Standard Webhooks signing, the POST.

Signing follows the Standard Webhooks specification: headers ``webhook-id`` (the
delivery id, the same on every retry, for the receiver's de-duplication),
``webhook-timestamp`` (integer Unix seconds of this attempt) and
``webhook-signature`` = ``v1,`` + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}"))
where ``key`` is the base64-decoded part of the ``whsec_`` secret. The body
carries ids, the kind, times and a digest's counts: never names or content.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import aiohttp.abc
import aiohttp.resolver

from services.notifier.secret_box import SecretBox, SecretUnreadable, secret_bytes
from services.notifier.senders import DIGEST_COUNTS, Claimed, DeliveryFailed

EVENT_TYPE = "notification.created"
MAX_URL_LENGTH = 2048
USER_AGENT = "Interlude-Webhooks/1"


class BadWebhookUrl(ValueError):
    """The URL may not be used as a webhook endpoint; the message says why."""


def check_url(url: str, *, production: bool) -> tuple[str, str]:
    """``(url, host key)`` for an acceptable endpoint, else :class:`BadWebhookUrl`.

    http(s) only (https only in production), a host, no user:password in the
    URL (it would be shown back and logged by proxies). In production an
    address on the server's own networks (loopback, private, link-local) is
    refused, so a webhook cannot be aimed at the internal services.
    """
    url = url.strip()
    if len(url) > MAX_URL_LENGTH:
        raise BadWebhookUrl(f"must be at most {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise BadWebhookUrl("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise BadWebhookUrl("is not a valid URL") from None
    allowed = ("https",) if production else ("https", "http")
    if parts.scheme not in allowed:
        raise BadWebhookUrl("must be an https URL" if production else "must be an http(s) URL")
    host = (parts.hostname or "").lower()
    if not host:
        raise BadWebhookUrl("must name a host")
    if parts.username is not None or parts.password is not None:
        raise BadWebhookUrl("must not carry a user name or password")
    if parts.fragment:
        raise BadWebhookUrl("must not have a #fragment")
    if production and _internal_host(host):
        raise BadWebhookUrl("must not point at a loopback, private or link-local address")
    default_port = 443 if parts.scheme == "https" else 80
    return url, f"{host}:{port or default_port}"


def _internal_host(host: str) -> bool:
    if host == "localhost" or host.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        # A single-label name ("messaging", "postgres") resolves on a private network.
        return "." not in host
    return not address.is_global


class PublicOnlyResolver(aiohttp.abc.AbstractResolver):
    """Resolves names like the default resolver, then drops every address that is
    not globally routable. Checking the URL's text is not enough: a public name
    can resolve to 10.x or 127.x (or be re-pointed there after the check), and
    shorthand like ``127.1`` is an address too. Checked at connect time, for every
    delivery, so a webhook can never reach the service's own network."""

    def __init__(self) -> None:
        self._inner = aiohttp.resolver.DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET
                      ) -> list[aiohttp.abc.ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        public = [r for r in results if ipaddress.ip_address(r["host"]).is_global]
        if not public:
            raise OSError(f"{host} does not resolve to a public address")
        return public

    async def close(self) -> None:
        await self._inner.close()


def payload(delivery: Claimed) -> bytes:
    """The JSON body for ``delivery``: the same bytes on every retry."""
    created_at = delivery.created_at.isoformat()
    data: dict[str, Any] = {
        "notification_id": str(delivery.notification_id),
        "kind": delivery.kind,
        "created_at": created_at,
    }
    if delivery.kind == "digest" and delivery.details:
        data["counts"] = {k: int(delivery.details[k]) for k in DIGEST_COUNTS
                          if isinstance(delivery.details.get(k), int)}
    body = {"type": EVENT_TYPE, "timestamp": created_at, "data": data}
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one request."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


class WebhookSender:
    """POSTs signed payloads; one attempt per call, within ``timeout`` seconds.

    Redirects are not followed (a signed request goes where its owner said, and
    nowhere else); any answer but 2xx is a failure to retry.
    """

    def __init__(self, session: aiohttp.ClientSession, box: SecretBox, *, timeout: float,
                 now: Callable[[], float] = time.time) -> None:
        self._session = session
        self._box = box
        self._timeout = timeout
        self._now = now

    @property
    def max_seconds(self) -> float:
        return self._timeout

    async def send(self, delivery: Claimed) -> None:
        if delivery.url is None or delivery.secret_sealed is None:
            raise DeliveryFailed("the channel has no endpoint", permanent=True)
        try:
            secret = self._box.open(delivery.channel_id, delivery.secret_sealed)
        except SecretUnreadable:
            raise DeliveryFailed("the signing secret cannot be read (the server key changed);"
                                 " rotate the secret") from None
        body = payload(delivery)
        msg_id = str(delivery.id)
        timestamp = int(self._now())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, msg_id, timestamp, body),
        }
        try:
            async with self._session.post(
                delivery.url, data=body, headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            ) as response:
                status = response.status
        except TimeoutError:
            raise DeliveryFailed(f"no answer within {self._timeout:g}s") from None
        except aiohttp.ClientError as exc:
            # The class name only: aiohttp's messages repeat the URL.
            raise DeliveryFailed(f"connection failed ({exc.__class__.__name__})") from None
        if not 200 <= status < 300:
            raise DeliveryFailed(f"HTTP {status}")
