"""Accounts and access through the real gateway, messaging and notifier."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.gateway.app import create_app
from services.gateway.store import GatewayStore, InvalidToken
from services.gateway.typedefs import POOL, SETTINGS, STORE
from shared.internal_auth import Identity, sign_headers
from tests.conftest import TEST_INTERNAL_KEY, TestEnv
from tests.integration.conftest import new_pair, therapist_code, unique_email
from tests.support.stack import PASSWORD, Stack

pytestmark = pytest.mark.integration


async def test_therapist_enrolls_once_with_matching_email(stack: Stack) -> None:
    email = unique_email("t")
    code = await therapist_code(stack, email)
    status, data = await stack.call("POST", "/v1/enroll", json={
        "code": code, "email": "someone-else@example.org", "password": PASSWORD,
        "display_name": "Dr X"})
    assert status == 422
    assert data["error"]["field"] == "email"
    therapist = await stack.enroll(code, email.upper(), "Dr X")
    assert therapist.role == "therapist"
    status, data = await stack.call("POST", "/v1/enroll", json={
        "code": code, "email": email, "password": PASSWORD, "display_name": "Dr X"})
    assert status == 409
    assert data["error"]["code"] == "code_used"


async def test_bad_input_gets_json_errors_naming_the_field(stack: Stack) -> None:
    base = {"code": "AAAA-BBBB", "email": unique_email("c"), "password": PASSWORD,
            "display_name": "C"}
    cases = [
        ({**base, "password": "too short"}, 422, "password"),
        ({**base, "email": "not-an-email"}, 422, "email"),
        ({**base, "display_name": 5}, 422, "display_name"),
        ({**base, "extra": True}, 422, "extra"),
        ({k: v for k, v in base.items() if k != "code"}, 422, "code"),
    ]
    for body, expected, field in cases:
        status, data = await stack.call("POST", "/v1/enroll", json=body)
        assert status == expected, (body, data)
        assert data["error"]["field"] == field
    status, data = await stack.call("POST", "/v1/enroll", data=b"{not json",
                                    headers={"Content-Type": "application/json"})
    assert status == 400
    assert data["error"]["code"] == "bad_request"
    status, data = await stack.call("POST", "/v1/enroll", data=b"x" * (300 * 1024),
                                    headers={"Content-Type": "application/json"})
    assert status == 413
    assert data["error"]["code"] == "payload_too_large"
    status, data = await stack.call("POST", "/v1/enroll", json=base)
    assert status == 400
    assert data["error"]["code"] == "invalid_code"


async def test_every_other_route_needs_a_valid_token(stack: Stack) -> None:
    for method, path in [("GET", "/v1/me"), ("GET", "/v1/relationships"),
                         ("POST", "/v1/invites"), ("GET", "/v1/notifications")]:
        status, data = await stack.call(method, path)
        assert status == 401
        assert data["error"]["code"] == "unauthorized"
        status, data = await stack.call(method, path,
                                        headers={"Authorization": "Bearer ila_forged"})
        assert status == 401


async def test_login_refresh_rotation_and_reuse_revokes_session(stack: Stack) -> None:
    therapist, _, _ = await new_pair(stack)
    status, data = await stack.call("POST", "/v1/auth/login",
                                    json={"email": therapist.email, "password": "wrong password!"})
    assert status == 401
    assert data["error"]["code"] == "invalid_credentials"
    status, session = await stack.call("POST", "/v1/auth/login",
                                       json={"email": therapist.email, "password": PASSWORD})
    assert status == 200
    assert session["user"]["role"] == "therapist"
    first_refresh = session["refresh_token"]
    status, rotated = await stack.call("POST", "/v1/auth/refresh",
                                       json={"refresh_token": first_refresh})
    assert status == 200
    assert rotated["refresh_token"] != first_refresh
    headers = {"Authorization": f"Bearer {rotated['access_token']}"}
    assert (await stack.call("GET", "/v1/me", headers=headers))[0] == 200
    # The old refresh token comes back: someone copied it. The whole session ends.
    status, data = await stack.call("POST", "/v1/auth/refresh",
                                    json={"refresh_token": first_refresh})
    assert status == 401
    assert data["error"]["code"] == "session_revoked"
    assert (await stack.call("GET", "/v1/me", headers=headers))[0] == 401
    status, _ = await stack.call("POST", "/v1/auth/refresh",
                                 json={"refresh_token": rotated["refresh_token"]})
    assert status == 401


async def test_logout_ends_the_session(stack: Stack) -> None:
    therapist, _, _ = await new_pair(stack)
    assert (await stack.call("GET", "/v1/me", therapist))[0] == 200
    assert (await stack.call("POST", "/v1/auth/logout", therapist))[0] == 204
    assert (await stack.call("GET", "/v1/me", therapist))[0] == 401
    status, _ = await stack.call("POST", "/v1/auth/refresh",
                                 json={"refresh_token": therapist.refresh_token})
    assert status == 401


async def test_token_memory_is_bounded_by_its_window_and_the_token_expiry(
        stack: Stack) -> None:
    """What another gateway replica would see: a session revoked behind this
    store's back is refused once the short window has passed, at once when asked
    fresh (as the stream's periodic re-check does), and never past expiry."""
    therapist, _, _ = await new_pair(stack)
    token = therapist.access_token
    pool = stack.apps["gateway"][POOL]
    store = GatewayStore(pool, token_cache_seconds=1)
    now = datetime.now(UTC)
    session_id = (await store.caller_for_access_token(token, now)).session_id
    await pool.execute("UPDATE gateway.sessions SET revoked_at = now() WHERE id = $1",
                       session_id)
    # Within the window the remembered answer stands ...
    assert (await store.caller_for_access_token(token, now)).session_id == session_id
    # ... but not for a fresh check, nor once the window has passed.
    with pytest.raises(InvalidToken):
        await store.caller_for_access_token(token, now, fresh=True)
    with pytest.raises(InvalidToken):
        await store.caller_for_access_token(token, now + timedelta(seconds=1.5))
    # A long window still ends with the token.
    await pool.execute("UPDATE gateway.sessions SET revoked_at = NULL WHERE id = $1",
                       session_id)
    await pool.execute("UPDATE gateway.access_tokens SET expires_at = $2 WHERE session_id = $1",
                       session_id, now + timedelta(seconds=2))
    store = GatewayStore(pool, token_cache_seconds=60)
    await store.caller_for_access_token(token, now)
    assert (await store.caller_for_access_token(token, now + timedelta(seconds=1.9))
            ).session_id == session_id
    with pytest.raises(InvalidToken):
        await store.caller_for_access_token(token, now + timedelta(seconds=2))


async def test_repeated_login_failures_are_rate_limited(stack: Stack) -> None:
    email = unique_email("nobody")
    statuses = []
    for _ in range(11):
        status, data = await stack.call("POST", "/v1/auth/login",
                                        json={"email": email, "password": "wrong password!"})
        statuses.append(status)
    assert statuses[:10] == [401] * 10
    assert statuses[10] == 429
    assert data["error"]["code"] == "rate_limited"


async def test_secrets_are_stored_only_as_hashes(stack: Stack) -> None:
    therapist, client, _ = await new_pair(stack)
    pool = stack.apps["gateway"][POOL]
    async with pool.acquire() as conn:
        rows = []
        for table in ("accounts", "sessions", "access_tokens", "refresh_tokens",
                      "enrollment_codes"):
            rows += await conn.fetch(f"SELECT * FROM gateway.{table}")
        dump = "\n".join(str(tuple(r)) for r in rows)
        hashes = await conn.fetch("SELECT password_hash FROM gateway.accounts WHERE id = ANY($1)",
                                  [therapist.user_id, client.user_id])
    for secret in (PASSWORD, therapist.access_token, therapist.refresh_token,
                   client.access_token, client.refresh_token):
        assert secret not in dump
    for row in hashes:
        # Argon2id at RFC 9106's low-memory profile, above OWASP's minimum (19 MiB, t=2).
        assert row["password_hash"].startswith("$argon2id$v=19$m=65536,t=3,p=4$")


async def test_client_enrollment_survives_a_crash_after_the_invite_was_redeemed(
        stack: Stack) -> None:
    t_email = unique_email("t")
    therapist = await stack.enroll(await therapist_code(stack, t_email), t_email)
    status, invite = await stack.call("POST", "/v1/invites", therapist)
    assert status == 201
    # The gateway redeemed the invite, then died before creating the account.
    body = b'{"code": "%s"}' % invite["code"].encode()
    identity = Identity(uuid.UUID(int=0), "system", "test-crash")
    headers = sign_headers(TEST_INTERNAL_KEY.encode(), method="POST",
                           path_qs="/internal/invites/redeem", identity=identity, body=body)
    url = stack.apps["gateway"][SETTINGS].messaging_url + "/internal/invites/redeem"
    async with stack.http.post(url, data=body, headers={
            **headers, "Content-Type": "application/json"}) as response:
        assert response.status == 200
        first = await response.json()
    # The code still works, and leads to the same relationship.
    client = await stack.enroll(invite["code"], unique_email("c"))
    assert str(client.user_id) == first["client_id"]
    status, rels = await stack.call("GET", "/v1/relationships", client)
    assert [r["id"] for r in rels["items"]] == [first["relationship_id"]]
    assert rels["items"][0]["therapist"]["email"] == t_email


async def test_internal_services_refuse_unsigned_or_stale_calls(stack: Stack) -> None:
    settings = stack.apps["gateway"][SETTINGS]
    identity = Identity(uuid.uuid4(), "therapist", "test")
    for base in (settings.messaging_url, settings.notifier_url):
        path = "/v1/relationships" if base == settings.messaging_url else "/v1/notifications"
        async with stack.http.get(base + path) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "unauthorized"
        stale = sign_headers(TEST_INTERNAL_KEY.encode(), method="GET", path_qs=path,
                             identity=identity, body=b"", now=time.time() - 120)
        async with stack.http.get(base + path, headers=stale) as response:
            assert response.status == 401
        wrong_key = sign_headers(b"k" * 40, method="GET", path_qs=path, identity=identity,
                                 body=b"")
        async with stack.http.get(base + path, headers=wrong_key) as response:
            assert response.status == 401
        good = sign_headers(TEST_INTERNAL_KEY.encode(), method="GET", path_qs=path,
                            identity=identity, body=b"")
        async with stack.http.get(base + path, headers=good) as response:
            assert response.status == 200


async def test_gateway_answers_503_when_an_internal_service_is_down(
        test_env: TestEnv) -> None:
    settings = test_env.settings(INTERLUDE_MESSAGING_URL="http://127.0.0.1:9",
                                 INTERLUDE_NOTIFIER_URL="http://127.0.0.1:9")
    async with TestClient(TestServer(create_app(settings))) as client:
        email = unique_email("t")
        _, code = await client.app[STORE].create_therapist(email, "Dr", datetime.now(UTC))
        response = await client.post("/v1/enroll", json={
            "code": code, "email": email, "password": PASSWORD, "display_name": "Dr"})
        token = (await response.json())["access_token"]
        response = await client.get("/v1/relationships",
                                    headers={"Authorization": f"Bearer {token}"})
        assert response.status == 503
        assert response.headers["Retry-After"]
        assert (await response.json())["error"]["code"] == "unavailable"
        response = await client.get("/readyz")
        assert response.status == 503
        assert set((await response.json())["problems"]) == {"messaging", "notifier"}


async def test_behind_a_trusted_proxy_the_limit_is_per_client_address(
        test_env: TestEnv) -> None:
    settings = test_env.settings(INTERLUDE_TRUSTED_PROXY_HOPS="1",
                                 INTERLUDE_MESSAGING_URL="http://127.0.0.1:9",
                                 INTERLUDE_NOTIFIER_URL="http://127.0.0.1:9")
    async with TestClient(TestServer(create_app(settings))) as client:
        async def login(address: str, spoofed: str = "") -> int:
            chain = f"{spoofed}, {address}" if spoofed else address
            response = await client.post(
                "/v1/auth/login", headers={"X-Forwarded-For": chain},
                json={"email": unique_email("x"), "password": "wrong password!"})
            return response.status

        assert [await login("203.0.113.7") for _ in range(10)] == [401] * 10
        assert await login("203.0.113.7") == 429
        # Another client behind the same proxy is not locked out, and a client
        # cannot escape its limit by writing its own X-Forwarded-For entries.
        assert await login("198.51.100.2") == 401
        assert await login("203.0.113.7", spoofed="192.0.2.99") == 429
