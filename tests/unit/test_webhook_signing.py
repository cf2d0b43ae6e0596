"""Webhook channels without a network: signing, payloads, URL rules, sealed secrets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime

import pytest

from services.notifier.secret_box import SecretBox, SecretUnreadable, new_secret, secret_bytes
from services.notifier.senders import Claimed
from services.notifier.webhooks import BadWebhookUrl, check_url, payload, sign

KEY = b"k" * 40


def claimed(kind: str = "checkin.received", details: dict[str, object] | None = None) -> Claimed:
    return Claimed(
        id=uuid.uuid4(), lease_id=uuid.uuid4(), attempts=1, user_id=uuid.uuid4(),
        channel_id=uuid.uuid4(), channel_type="webhook", channel_removed=False, address=None,
        url="https://example.org/hook", host="example.org:443", secret_sealed=b"",
        notification_id=uuid.uuid4(), kind=kind,
        created_at=datetime(2030, 1, 7, 9, 0, tzinfo=UTC), details=details)


def test_signature_matches_the_standard_webhooks_vector() -> None:
    # The example of the Standard Webhooks specification's reference libraries.
    assert sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330, b'{"test": 2432232314}') == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signature_is_hmac_sha256_over_id_timestamp_and_body() -> None:
    secret = new_secret()
    body = b'{"a":1}'
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = base64.b64encode(
        hmac.new(key, b"msg_1.1700000000." + body, hashlib.sha256).digest()).decode()
    assert sign(secret, "msg_1", 1700000000, body) == f"v1,{expected}"
    assert sign(secret, "msg_1", 1700000000, body + b" ") != f"v1,{expected}"


def test_new_secrets_are_whsec_with_32_random_bytes() -> None:
    first, second = new_secret(), new_secret()
    assert first.startswith("whsec_")
    assert len(secret_bytes(first)) == 32
    assert first != second
    with pytest.raises(ValueError, match="whsec_"):
        secret_bytes("not-a-secret")


def test_payload_carries_ids_kind_and_times_only() -> None:
    item = claimed()
    body = json.loads(payload(item))
    assert body == {"type": "notification.created", "timestamp": "2030-01-07T09:00:00+00:00",
                    "data": {"notification_id": str(item.notification_id),
                             "kind": "checkin.received",
                             "created_at": "2030-01-07T09:00:00+00:00"}}
    assert payload(item) == payload(item)  # the same bytes on every retry


def test_a_digest_payload_carries_its_counts_and_nothing_else() -> None:
    item = claimed("digest", {"checkins": 3, "clients": 2, "beyond_agreement": 0, "urgent": 1,
                              "note": "never shown"})
    data = json.loads(payload(item))["data"]
    assert data["counts"] == {"checkins": 3, "clients": 2, "beyond_agreement": 0, "urgent": 1}
    assert "never shown" not in payload(item).decode()


@pytest.mark.parametrize(("url", "host"), [
    ("https://hooks.example.org/x?y=1", "hooks.example.org:443"),
    ("https://hooks.example.org:8443/x", "hooks.example.org:8443"),
    ("http://127.0.0.1:9000/hook", "127.0.0.1:9000"),
])
def test_development_accepts_http_and_https(url: str, host: str) -> None:
    assert check_url(url, production=False) == (url, host)


@pytest.mark.parametrize("url", [
    "ftp://example.org/x", "example.org/hook", "https://", "https://user:pw@example.org/",
    "https://example.org/#frag", "https://exa mple.org/", "https://example.org:99999/",
    "https://example.org/" + "x" * 2100,
])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(BadWebhookUrl):
        check_url(url, production=False)


@pytest.mark.parametrize("url", [
    "http://hooks.example.org/x",          # production wants https
    "https://127.0.0.1/x", "https://10.1.2.3/x", "https://[::1]/x", "https://169.254.169.254/",
    "https://localhost/x", "https://messaging:8081/v1/x", "https://db.internal/x",
])
def test_production_refuses_http_and_internal_addresses(url: str) -> None:
    with pytest.raises(BadWebhookUrl):
        check_url(url, production=True)
    assert check_url("https://hooks.example.org/x", production=True)


def test_sealed_secrets_open_only_for_their_channel_and_key() -> None:
    box = SecretBox(KEY)
    channel = uuid.uuid4()
    secret = new_secret()
    sealed = box.seal(channel, secret)
    assert secret.encode() not in sealed
    assert box.open(channel, sealed) == secret
    with pytest.raises(SecretUnreadable):
        box.open(uuid.uuid4(), sealed)          # copied to another channel
    with pytest.raises(SecretUnreadable):
        SecretBox(b"o" * 40).open(channel, sealed)  # the server key changed
    assert box.seal(channel, secret) != sealed  # a fresh nonce each time


def test_code_hashes_are_keyed_and_bound_to_the_channel() -> None:
    box = SecretBox(KEY)
    channel = uuid.uuid4()
    assert box.code_hash(channel, "123456") == box.code_hash(channel, " 123456 ")
    assert box.code_hash(channel, "123456") != box.code_hash(uuid.uuid4(), "123456")
    assert box.code_hash(channel, "123456") != SecretBox(b"o" * 40).code_hash(channel, "123456")


async def test_production_resolver_refuses_every_non_public_address() -> None:
    from services.notifier.webhooks import PublicOnlyResolver

    resolver = PublicOnlyResolver()
    try:
        for host in ("127.1", "localhost", "10.1", "0x7f.1"):
            with pytest.raises(OSError, match="public address"):
                await resolver.resolve(host, 443)

        class Mixed:
            async def resolve(self, host: str, port: int, family: object) -> list[dict]:
                return [{"host": "10.0.0.5", "port": port}, {"host": "93.184.215.14",
                                                            "port": port}]

            async def close(self) -> None:
                pass

        resolver._inner = Mixed()  # type: ignore[assignment]
        assert [r["host"] for r in await resolver.resolve("example.org", 443)] == [
            "93.184.215.14"]
    finally:
        await resolver.close()
