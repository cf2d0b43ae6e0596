"""The client SDK and CLI without the real services.

A small fake gateway (aiohttp, in a thread, because `main` runs its own event
loop) stands in for the server: it keeps device records and messages in memory
and checks envelopes the way messaging does (self-signed devices, stale keys).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import ClientTimeout, web

from client import cli, cli_boundaries, cli_channels, cli_watch, explain, messages, stream
from client.api import ApiError, Device, GatewayClient, ServerUnreachable
from client.crypto import DeviceKeys
from client.session import LocalStore, PinnedKey, State
from client.terms import Agreement, Availability, Expectation
from client.trust import (
    UnsignedDevice,
    VerifiedDevice,
    accept_keys,
    check_pins,
    verify_device,
    verify_devices,
)
from shared.envelope import KIND_CHECKIN, key_id_for, parse_envelope
from tests.support.threaded import serve_in_thread

PASSPHRASE = "unit-test-passphrase"
PASSWORD = "unit-test-password-123"


# -- a fake gateway ----------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@dataclass
class FakeGateway:
    therapist_id: uuid.UUID = field(default_factory=uuid.uuid4)
    client_id: uuid.UUID = field(default_factory=uuid.uuid4)
    relationship_id: uuid.UUID = field(default_factory=uuid.uuid4)
    therapist_device: uuid.UUID = field(default_factory=uuid.uuid4)
    devices: dict[tuple[uuid.UUID, uuid.UUID], dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    posts: list[tuple[str | None, bytes]] = field(default_factory=list)
    answers: list[web.Response] = field(default_factory=list)  # next POST /messages answers
    fail_publish: bool = False
    expectation: dict[str, Any] | None = None  # added to a check-in's answer when set
    availability: dict[str, Any] | None = None  # GET .../availability; 404 when None
    feed: list[dict[str, Any]] | None = None  # GET /v1/notifications; a 502 page when None
    seen: list[str] = field(default_factory=list)  # "METHOD /path" of every request
    channels: list[dict[str, Any]] = field(default_factory=list)
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    bodies: list[tuple[str, Any]] = field(default_factory=list)  # channel requests, with body
    # One script per stream connection, after "ready": frames to send, ("close", code),
    # ("sleep", seconds); a connection without a script stays open, silent.
    stream_scripts: list[list[Any]] = field(default_factory=list)
    streams: list[dict[str, Any]] = field(default_factory=list)  # per connection: after, auth
    access_token: str = "access-1"
    refresh_token: str = "refresh-1"
    url: str = ""

    def __post_init__(self) -> None:
        self.therapist_keys = DeviceKeys.generate()
        self.publish(self.therapist_id, self.therapist_device, self.therapist_keys)

    def user(self, user_id: uuid.UUID) -> dict[str, str]:
        if user_id == self.therapist_id:
            return {"id": str(user_id), "email": "dr@example.org", "display_name": "Dr T",
                    "role": "therapist"}
        return {"id": str(user_id), "email": "sam@example.org", "display_name": "Sam",
                "role": "client"}

    def publish(self, user_id: uuid.UUID, device_id: uuid.UUID, keys: DeviceKeys, *,
                signature: bytes | None = None) -> None:
        version = sum(1 for d in self.history if d["device_id"] == str(device_id)) + 1
        record = {"user_id": str(user_id), "device_id": str(device_id), "version": version,
                  "suite": keys.suite, "hpke_public_key": _b64(keys.hpke_public_key),
                  "signing_public_key": _b64(keys.signing_public_key),
                  "signature": _b64(signature or keys.sign_device_record(user_id, device_id)),
                  "key_id": keys.key_id.hex(), "updated_at": "2025-01-01T00:00:00+00:00"}
        self.devices[(user_id, device_id)] = record
        self.history.append(record)

    def session(self) -> dict[str, Any]:
        return {"user": self.user(self.client_id), "access_token": self.access_token,
                "refresh_token": self.refresh_token, "token_type": "Bearer", "expires_in": 900}

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.access_token}"

    def app(self) -> web.Application:
        routes = web.RouteTableDef()

        @web.middleware
        async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
            self.seen.append(f"{request.method} {request.path}")
            if request.path not in ("/v1/enroll", "/v1/auth/refresh", "/v1/stream") \
                    and not self._authorized(request):
                return _error(401, "unauthorized", "access token is invalid or expired")
            response: web.StreamResponse = await handler(request)
            return response

        @routes.post("/v1/enroll")
        async def enroll(request: web.Request) -> web.Response:
            body = await request.json()
            if body["code"] != "GOOD-CODE":
                return _error(400, "invalid_code", "this enrollment code is not valid")
            return web.json_response({**self.session(),
                                      "relationship_id": str(self.relationship_id)}, status=201)

        @routes.post("/v1/auth/refresh")
        async def refresh(request: web.Request) -> web.Response:
            body = await request.json()
            if body["refresh_token"] != self.refresh_token:
                return _error(401, "session_revoked", "this refresh token was already used")
            self.access_token = f"access-{uuid.uuid4()}"
            self.refresh_token = f"refresh-{uuid.uuid4()}"
            return web.json_response(self.session())

        @routes.put("/v1/devices/{device_id}")
        async def publish(request: web.Request) -> web.Response:
            if self.fail_publish:
                return _error(503, "unavailable", "the messaging service is unavailable")
            body = await request.json()
            device_id = uuid.UUID(request.match_info["device_id"])
            record = {"user_id": str(self.client_id), "device_id": str(device_id),
                      "version": 1, **body,
                      "key_id": key_id_for(base64.b64decode(body["hpke_public_key"])).hex(),
                      "updated_at": "2025-01-01T00:00:00+00:00"}
            self.devices[(self.client_id, device_id)] = record
            self.history.append(record)
            return web.json_response({**record, "changed": True}, status=201)

        @routes.get("/v1/relationships")
        async def relationships(request: web.Request) -> web.Response:
            return web.json_response({"items": [{
                "id": str(self.relationship_id), "therapist_id": str(self.therapist_id),
                "client_id": str(self.client_id), "status": "active",
                "created_at": "2025-01-01T00:00:00+00:00",
                "therapist": self.user(self.therapist_id), "client": self.user(self.client_id)}]})

        @routes.get("/v1/relationships/{rid}/devices")
        async def devices(request: web.Request) -> web.Response:
            return web.json_response({"items": list(self.devices.values())})

        @routes.get("/v1/relationships/{rid}/devices/history")
        async def history(request: web.Request) -> web.Response:
            return web.json_response({"items": self.history})

        @routes.post("/v1/relationships/{rid}/messages")
        async def post_message(request: web.Request) -> web.Response:
            raw = base64.b64decode((await request.json())["envelope"])
            self.posts.append((request.headers.get("Idempotency-Key"), raw))
            if self.answers:
                return self.answers.pop(0)
            env = parse_envelope(raw)
            expected = {(uuid.UUID(d["user_id"]), uuid.UUID(d["device_id"]), d["key_id"])
                        for d in self.devices.values()}
            if {(r.user_id, r.device_id, r.key_id.hex()) for r in env.recipients} != expected:
                return _error(409, "stale_keys", "fetch the devices and seal again")
            message = {"id": str(env.message_id), "seq": len(self.messages) + 1,
                       "relationship_id": str(self.relationship_id), "kind": "checkin",
                       "sender_id": str(env.sender_user_id),
                       "sender_device_id": str(env.sender_device_id), "urgent": env.urgent,
                       "sent_at": "2025-01-01T00:00:00+00:00",
                       "created_at": f"2025-01-01T00:00:{len(self.messages):02d}+00:00",
                       "envelope": _b64(raw)}
            self.messages.append(message)
            answer = {k: v for k, v in message.items() if k != "envelope"}
            if self.expectation is not None:
                answer["expectation"] = self.expectation
            return web.json_response(answer, status=201)

        @routes.get("/v1/relationships/{rid}/availability")
        async def availability(request: web.Request) -> web.Response:
            if self.availability is None:
                return _error(404, "not_found", "no such relationship")
            return web.json_response(self.availability)

        @routes.get("/v1/relationships/{rid}/messages")
        async def list_messages(request: web.Request) -> web.Response:
            return web.json_response({"items": self.messages, "next_cursor": None})

        @routes.get("/v1/notifications")
        async def notifications(request: web.Request) -> web.Response:
            if self.feed is not None:
                return web.json_response({"items": self.feed, "next_cursor": None})
            return web.Response(status=502, text="<html>bad gateway</html>")

        self._channel_routes(routes)
        self._stream_route(routes)
        app = web.Application(middlewares=[auth])
        app.add_routes(routes)
        return app

    def channel(self, kind: str, target: str, *, verified: bool = False,
                kinds: list[str] | None = None) -> dict[str, Any]:
        """Add a channel as the server would hold it."""
        channel = {"id": str(uuid.uuid4()), "type": kind,
                   ("address" if kind == "email" else "url"): target,
                   "verified": verified if kind == "email" else True,
                   "kinds": kinds or ["reply.received"],
                   "created_at": "2026-12-16T09:00:00+00:00"}
        self.channels.append(channel)
        return channel

    def _channel_routes(self, routes: web.RouteTableDef) -> None:
        def find(request: web.Request) -> dict[str, Any] | None:
            wanted = request.match_info["cid"]
            return next((c for c in self.channels if c["id"] == wanted), None)

        async def note(request: web.Request) -> Any:
            body = await request.json() if request.can_read_body else None
            self.bodies.append((f"{request.method} {request.path_qs}", body))
            return body

        @routes.get("/v1/channels")
        async def channels(request: web.Request) -> web.Response:
            return web.json_response({"items": self.channels})

        @routes.post("/v1/channels")
        async def add(request: web.Request) -> web.Response:
            body = await note(request)
            target = body.get("address") or body.get("url")
            channel = self.channel(body["type"], target, kinds=body.get("kinds"))
            if body["type"] == "email":
                return web.json_response({"channel": channel, "code_sent": True}, status=201)
            return web.json_response({"channel": channel, "secret": "whsec_c2VjcmV0LWZha2U="},
                                     status=201)

        @routes.post("/v1/channels/{cid}/verify")
        async def verify(request: web.Request) -> web.Response:
            body = await note(request)
            channel = find(request)
            if channel is None:
                return _error(404, "not_found", "no such channel")
            if body["code"] == "111111":
                return _error(410, "code_expired", "the code has expired; ask for a new one")
            if body["code"] != "123456":
                return _error(422, "invalid", "field 'code': wrong code (4 attempts left)")
            channel["verified"] = True
            return web.json_response({"channel": channel})

        @routes.post("/v1/channels/{cid}/resend-code")
        async def resend(request: web.Request) -> web.Response:
            await note(request)
            return web.json_response({"channel": find(request), "code_sent": True})

        @routes.post("/v1/channels/{cid}/rotate-secret")
        async def rotate(request: web.Request) -> web.Response:
            await note(request)
            return web.json_response({"channel": find(request),
                                      "secret": "whsec_cm90YXRlZA=="})

        @routes.put("/v1/channels/{cid}")
        async def kinds(request: web.Request) -> web.Response:
            body = await note(request)
            channel = find(request)
            assert channel is not None
            channel["kinds"] = body["kinds"]
            return web.json_response({"channel": channel})

        @routes.delete("/v1/channels/{cid}")
        async def remove(request: web.Request) -> web.Response:
            await note(request)
            self.channels = [c for c in self.channels if c["id"] != request.match_info["cid"]]
            return web.Response(status=204)

        @routes.get("/v1/deliveries")
        async def deliveries(request: web.Request) -> web.Response:
            await note(request)
            states = request.query.get("state", "").split(",")
            return web.json_response({"items": [d for d in self.deliveries
                                                 if d["state"] in states or states == [""]]})

    def _stream_route(self, routes: web.RouteTableDef) -> None:
        @routes.get("/v1/stream")
        async def stream(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            first = await ws.receive(timeout=5)
            auth = json.loads(first.data)
            self.streams.append({"after": request.query.get("after"), "auth": auth,
                                 "query": dict(request.query)})
            script = self.stream_scripts.pop(0) if self.stream_scripts else []
            if script[:1] == [("close", 4401)] or auth.get("access_token") != self.access_token:
                await ws.close(code=4401, message=b"unauthorized")
                return ws
            await ws.send_json({"type": "ready", "user_id": str(self.client_id),
                                "role": "client", "heartbeat_seconds": 20})
            for step in script:
                if isinstance(step, dict):
                    await ws.send_json(step)
                elif step[0] == "close":
                    await ws.close(code=step[1], message=b"scripted close")
                    return ws
                else:
                    await asyncio.sleep(step[1])
            async for _ in ws:
                pass
            return ws


@pytest.fixture
def fake() -> Iterator[FakeGateway]:
    gateway = FakeGateway()
    with serve_in_thread(gateway.app()) as url:
        gateway.url = url
        yield gateway


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("INTERLUDE_PASSPHRASE", PASSPHRASE)
    monkeypatch.setenv("INTERLUDE_PASSWORD", PASSWORD)
    monkeypatch.delenv("INTERLUDE_SERVER", raising=False)
    monkeypatch.setattr(messages, "RETRY_DELAY_SECONDS", 0.01)
    return tmp_path / "home"


def run(home: Path, fake: FakeGateway, *args: str) -> int:
    return cli.main(["--server", fake.url, "--home", str(home), *args])


def enroll(home: Path, fake: FakeGateway) -> None:
    assert run(home, fake, "enroll", "--code", "GOOD-CODE", "--email", "sam@example.org",
               "--name", "Sam") == 0


def load(home: Path) -> State:
    return LocalStore(home).load(PASSPHRASE)


# -- argument parsing -----------------------------------------------------------------

COMMANDS = ["enroll", "login", "logout", "whoami", "relationships", "invite", "send", "reply",
            "inbox", "notifications", "fingerprint", "trust", "channels", "watch"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: interlude-client {command}" in capsys.readouterr().out


def test_parsing_of_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERLUDE_CLIENT_HOME", "/tmp/somewhere")
    parser = cli.build_parser()
    args = parser.parse_args(["send", "--urgent", "--to", "dr@example.org", "hello"])
    assert (args.func, args.urgent, args.to, args.text) == (cli.cmd_send, True,
                                                           "dr@example.org", "hello")
    assert args.home == Path("/tmp/somewhere")
    assert args.server is None
    args = parser.parse_args(["--server", "http://gw:1", "reply", "--to", "x@y.z", "-"])
    assert (args.server, args.text) == ("http://gw:1", "-")
    args = parser.parse_args(["enroll", "--code", "C", "--email", "e@x.org", "--name", "N"])
    assert args.suite == "mlkem768-x25519"
    args = parser.parse_args(["notifications", "--json", "--unread", "--mark-read"])
    assert (args.json, args.unread, args.mark_read, args.limit) == (True, True, True, 50)


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["send"], ["enroll", "--code", "C"],
                                  ["trust"]])
def test_bad_usage_exits_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(argv)
    assert exit_.value.code == 2


def test_server_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = cli.build_parser()
    monkeypatch.delenv("INTERLUDE_SERVER", raising=False)
    assert cli._server(parser.parse_args(["whoami"]), None) == "http://127.0.0.1:8080"
    monkeypatch.setenv("INTERLUDE_SERVER", "http://env:1/")
    assert cli._server(parser.parse_args(["whoami"]), None) == "http://env:1"
    assert cli._server(parser.parse_args(["--server", "http://flag:2", "whoami"]),
                       None) == "http://flag:2"


def test_message_text_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli.read_text("hello\n") == "hello"
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin\nsecond line\n"))
    assert cli.read_text("-") == "from stdin\nsecond line"
    with pytest.raises(cli.UsageError, match="empty"):
        cli.read_text("  \n")
    with pytest.raises(cli.UsageError, match="too long"):
        cli.read_text("x" * 70_000)


# -- pinning -----------------------------------------------------------------------------

def _state(user_id: uuid.UUID) -> State:
    user = cli.User(user_id, "me@example.org", "Me", "client")
    return State(server="http://x", user=user, device_id=uuid.uuid4(),
                 keys=DeviceKeys.generate(2))


def _device(user_id: uuid.UUID, keys: DeviceKeys, device_id: uuid.UUID | None = None
            ) -> VerifiedDevice:
    device_id = device_id or uuid.uuid4()
    checked = verify_device(Device(
        user_id, device_id, 1, keys.suite, _b64(keys.hpke_public_key),
        _b64(keys.signing_public_key), _b64(keys.sign_device_record(user_id, device_id)),
        keys.key_id.hex(), "2025-01-01T00:00:00+00:00"))
    assert checked is not None
    return checked


def test_first_seen_keys_are_pinned_and_a_change_is_reported() -> None:
    me, peer = uuid.uuid4(), uuid.uuid4()
    state = _state(me)
    mine = _device(me, state.keys, state.device_id)
    theirs = _device(peer, DeviceKeys.generate(2))
    report = check_pins(state, [mine, theirs], {peer: "dr@example.org"})
    assert set(report.first_seen) == {me, peer}
    assert report.changed == ()
    assert state.pins[peer].email == "dr@example.org"
    assert state.pins[peer].keys == {theirs.pin}

    assert check_pins(state, [mine, theirs], {}).changed == ()  # nothing new

    rotated = _device(peer, DeviceKeys.generate(2), theirs.device_id)
    assert check_pins(state, [mine, rotated], {}).changed == (peer,)
    second = _device(peer, DeviceKeys.generate(2))
    assert check_pins(state, [mine, theirs, second], {}).changed == (peer,)
    # A removed device is no reason to warn.
    assert check_pins(state, [mine], {}).changed == ()

    assert accept_keys(state, peer, [mine, rotated], "dr@example.org") == 1
    assert check_pins(state, [mine, rotated], {}).changed == ()
    assert theirs.pin in state.pins[peer].keys  # old keys stay trusted for old messages


def test_a_new_device_on_my_own_account_is_reported() -> None:
    me = uuid.uuid4()
    state = _state(me)
    mine = _device(me, state.keys, state.device_id)
    assert check_pins(state, [mine], {}).first_seen == (me,)
    assert check_pins(state, [mine, _device(me, DeviceKeys.generate(2))], {}).changed == (me,)


def test_a_record_that_is_not_self_signed_is_refused() -> None:
    user_id, device_id, keys = uuid.uuid4(), uuid.uuid4(), DeviceKeys.generate(2)
    forged = Device(user_id, device_id, 1, 2, _b64(keys.hpke_public_key),
                    _b64(DeviceKeys.generate(2).signing_public_key),
                    _b64(keys.sign_device_record(user_id, device_id)), keys.key_id.hex(), "")
    assert verify_device(forged) is None
    with pytest.raises(UnsignedDevice, match="not validly self-signed"):
        verify_devices([forged])
    wrong_key_id = Device(user_id, device_id, 1, 2, _b64(keys.hpke_public_key),
                          _b64(keys.signing_public_key),
                          _b64(keys.sign_device_record(user_id, device_id)), "00" * 8, "")
    assert verify_device(wrong_key_id) is None


def test_pins_survive_the_keystore(tmp_path: Path) -> None:
    state = _state(uuid.uuid4())
    peer = uuid.uuid4()
    accept_keys(state, peer, [_device(peer, DeviceKeys.generate(2))], "dr@example.org")
    store = LocalStore(tmp_path / "h")
    store.create(state, PASSPHRASE)
    loaded = store.load(PASSPHRASE)
    assert loaded.pins[peer].keys == state.pins[peer].keys
    assert all(isinstance(k, PinnedKey) for k in loaded.pins[peer].keys)
    assert loaded.keys.to_dict() == state.keys.to_dict()
    assert (tmp_path / "h").stat().st_mode & 0o777 == 0o700
    assert store.path.stat().st_mode & 0o777 == 0o600


# -- the CLI against the fake gateway ------------------------------------------------------

def test_enroll_send_and_read(fake: FakeGateway, home: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    enroll(home, fake)
    state = load(home)
    assert state.keys_published
    assert state.access_token == fake.access_token
    assert run(home, fake, "send", "--urgent", "my secret worry") == 0
    out = capsys.readouterr()
    assert "my secret worry" not in out.out + out.err
    assert "encrypted for 2 devices" in out.out
    key, raw = fake.posts[-1]
    env = parse_envelope(raw)
    assert key is not None
    assert env.kind == KIND_CHECKIN
    assert env.urgent
    assert {r.device_id for r in env.recipients} == {state.device_id, fake.therapist_device}

    assert run(home, fake, "inbox", "--json") == 0
    entries = json.loads(capsys.readouterr().out)
    assert entries == [{
        "id": str(env.message_id), "relationship_id": str(fake.relationship_id),
        "kind": "checkin", "from": "sam@example.org", "from_name": "Sam",
        "text": "my secret worry", "sent_at": entries[0]["sent_at"], "urgent": True,
        "key_trusted": True}]


def test_enroll_refuses_an_existing_keystore(fake: FakeGateway, home: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    enroll(home, fake)
    capsys.readouterr()
    assert run(home, fake, "enroll", "--code", "GOOD-CODE", "--email", "sam@example.org",
               "--name", "Sam") == 2
    assert "already enrolled here" in capsys.readouterr().err


def test_changed_therapist_keys_refuse_sending_until_trusted(
        fake: FakeGateway, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    enroll(home, fake)
    assert run(home, fake, "send", "first") == 0
    fake.publish(fake.therapist_id, fake.therapist_device, DeviceKeys.generate())
    posts = len(fake.posts)
    capsys.readouterr()

    assert run(home, fake, "send", "second") == 3
    err = capsys.readouterr().err
    assert "WARNING: the keys of dr@example.org have changed" in err
    assert "interlude-client trust dr@example.org" in err
    assert len(fake.posts) == posts  # nothing was sent

    assert run(home, fake, "fingerprint") == 0  # still shows the number (and warns)
    assert run(home, fake, "trust", "dr@example.org") == 0
    out = capsys.readouterr().out
    assert "1 key(s) newly accepted" in out
    assert run(home, fake, "send", "second") == 0


def test_unsigned_device_record_refuses_sending(fake: FakeGateway, home: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    enroll(home, fake)
    keys = DeviceKeys.generate()
    fake.publish(fake.therapist_id, uuid.uuid4(), keys, signature=bytes(64))
    capsys.readouterr()
    assert run(home, fake, "send", "hello") == 3
    assert "not validly self-signed" in capsys.readouterr().err


def test_stale_keys_reseal_once(fake: FakeGateway, home: Path) -> None:
    enroll(home, fake)
    fake.answers.append(_error(409, "stale_keys", "seal again"))
    assert run(home, fake, "send", "hello") == 0
    assert len(fake.posts) == 2
    assert fake.posts[0][0] != fake.posts[1][0]  # a new envelope gets a new key
    fake.answers.extend([_error(409, "stale_keys", "x"), _error(409, "stale_keys", "x")])
    assert run(home, fake, "send", "hello") == 1


def test_retry_after_503_reuses_the_idempotency_key(fake: FakeGateway, home: Path) -> None:
    enroll(home, fake)
    fake.answers.append(_error(503, "unavailable", "try again"))
    assert run(home, fake, "send", "hello") == 0
    (key1, raw1), (key2, raw2) = fake.posts
    assert key1 == key2
    assert raw1 == raw2


def test_inbox_shows_a_broken_message_as_an_error(fake: FakeGateway, home: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    enroll(home, fake)
    assert run(home, fake, "send", "one") == 0
    assert run(home, fake, "send", "two") == 0
    tampered = bytearray(base64.b64decode(fake.messages[0]["envelope"]))
    tampered[-70] ^= 1  # inside the ciphertext: the signature no longer verifies
    fake.messages[0]["envelope"] = _b64(bytes(tampered))
    fake.messages.append({**fake.messages[1], "id": str(uuid.uuid4())})  # server lies
    capsys.readouterr()
    assert run(home, fake, "inbox", "--json") == 0
    entries = json.loads(capsys.readouterr().out)
    assert "signature does not verify" in entries[0]["error"]
    assert "text" not in entries[0]
    assert entries[1]["text"] == "two"
    assert "does not match" in entries[2]["error"]
    assert run(home, fake, "inbox") == 0
    assert "[cannot be shown:" in capsys.readouterr().out


def test_failed_publication_is_retried_by_the_next_command(
        fake: FakeGateway, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake.fail_publish = True
    assert run(home, fake, "enroll", "--code", "GOOD-CODE", "--email", "sam@example.org",
               "--name", "Sam") == 1
    assert "next command retries" in capsys.readouterr().err
    assert not load(home).keys_published
    fake.fail_publish = False
    assert run(home, fake, "relationships") == 0
    assert load(home).keys_published
    assert (fake.client_id, load(home).device_id) in fake.devices


def test_expired_access_token_is_refreshed_and_persisted(fake: FakeGateway, home: Path) -> None:
    enroll(home, fake)
    fake.access_token = "rotated-by-server"  # the stored one no longer works
    assert run(home, fake, "relationships") == 0
    state = load(home)
    assert state.access_token == fake.access_token != "rotated-by-server"
    assert state.refresh_token == fake.refresh_token


def test_a_spent_refresh_token_is_reported(fake: FakeGateway, home: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    enroll(home, fake)
    fake.access_token, fake.refresh_token = "other", "other"
    capsys.readouterr()
    assert run(home, fake, "relationships") == 1
    err = capsys.readouterr().err
    assert "interlude-client: this refresh token was already used" in err
    assert "login --email" in err


# -- error mapping ---------------------------------------------------------------------------

def test_api_error_is_built_from_the_json_body(fake: FakeGateway, home: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert run(home, fake, "enroll", "--code", "BAD-CODE", "--email", "sam@example.org",
               "--name", "Sam") == 1
    assert capsys.readouterr().err == "interlude-client: this enrollment code is not valid\n"
    assert not (home / "keystore.json").exists()


def test_non_json_error_body(fake: FakeGateway, home: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    enroll(home, fake)
    capsys.readouterr()
    assert run(home, fake, "notifications") == 1
    assert "the server answered HTTP 502" in capsys.readouterr().err


async def test_api_error_fields(fake: FakeGateway) -> None:
    async with GatewayClient(fake.url) as api:
        with pytest.raises(ApiError) as caught:
            await api.enroll(code="NOPE", email="a@b.org", password="x" * 12, display_name="A")
    assert (caught.value.status, caught.value.code) == (400, "invalid_code")
    assert caught.value.message == "this enrollment code is not valid"


async def test_unreachable_server_names_the_url(unused_tcp_port: int) -> None:
    url = f"http://127.0.0.1:{unused_tcp_port}"
    async with GatewayClient(url) as api:
        with pytest.raises(ServerUnreachable, match=f"cannot reach the Interlude server at {url}"):
            await api.login(email="a@b.org", password="x")


async def test_slow_server_times_out() -> None:
    release = asyncio.Event()

    async def slow(_: web.Request) -> web.Response:
        await asyncio.wait_for(release.wait(), 5)
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/v1/me", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        async with GatewayClient(f"http://{host}:{port}", access_token="t",
                                 timeout=ClientTimeout(total=0.2)) as api:
            with pytest.raises(ServerUnreachable, match="did not answer in time"):
                await api.me()
    finally:
        release.set()
        await runner.cleanup()


def test_unreachable_server_exits_1(home: Path, capsys: pytest.CaptureFixture[str],
                                    unused_tcp_port: int) -> None:
    url = f"http://127.0.0.1:{unused_tcp_port}"
    assert cli.main(["--server", url, "--home", str(home), "login", "--email",
                     "sam@example.org"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"interlude-client: cannot reach the Interlude server at {url}")
    assert "Traceback" not in err


def test_wrong_passphrase_exits_2(fake: FakeGateway, home: Path,
                                  monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    enroll(home, fake)
    capsys.readouterr()
    monkeypatch.setenv("INTERLUDE_PASSPHRASE", "not the passphrase")
    assert run(home, fake, "inbox") == 2
    assert capsys.readouterr().err == (
        f"interlude-client: wrong passphrase for keystore {home / 'keystore.json'}\n")


def test_not_enrolled_exits_2(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--home", str(home), "inbox"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("interlude-client: not enrolled here")
    assert err.endswith("run enroll or login\n")


def test_no_terminal_and_no_passphrase_exits_2(fake: FakeGateway, home: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("INTERLUDE_PASSPHRASE")
    monkeypatch.setattr("client.session._have_terminal", lambda: False)
    assert run(home, fake, "enroll", "--code", "GOOD-CODE", "--email", "sam@example.org",
               "--name", "Sam") == 2
    assert capsys.readouterr().err == (
        "interlude-client: no terminal to ask for the keystore passphrase; "
        "set INTERLUDE_PASSPHRASE\n")


async def test_token_callback_sees_rotated_tokens(fake: FakeGateway) -> None:
    seen: list[tuple[str, str]] = []

    async def keep(access: str, refresh: str) -> None:
        seen.append((access, refresh))

    async with GatewayClient(fake.url, access_token="stale", refresh_token=fake.refresh_token,
                             on_tokens=keep) as api:
        rels = await api.relationships()
    assert [r.id for r in rels] == [fake.relationship_id]
    assert seen == [(fake.access_token, fake.refresh_token)]


async def test_messages_follow_cursors() -> None:
    pages = {"": (["a", "b"], "2"), "2": (["c"], None)}

    async def handler(request: web.Request) -> web.Response:
        ids, cursor = pages[request.query.get("cursor", "")]
        return web.json_response({"items": [{
            "id": str(uuid.uuid5(uuid.NAMESPACE_DNS, i)), "seq": n, "relationship_id":
            str(uuid.UUID(int=1)), "kind": "checkin", "sender_id": str(uuid.UUID(int=2)),
            "sender_device_id": str(uuid.UUID(int=3)), "urgent": False, "sent_at": "t",
            "created_at": "t", "envelope": "e"} for n, i in enumerate(ids)],
            "next_cursor": cursor})

    app = web.Application()
    app.router.add_get("/v1/relationships/{rid}/messages", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        async with GatewayClient(f"http://{host}:{port}", access_token="t") as api:
            got = [m.id async for m in api.messages(uuid.UUID(int=1))]
    finally:
        await runner.cleanup()
    assert got == [uuid.uuid5(uuid.NAMESPACE_DNS, i) for i in "abc"]


# -- boundaries: options ------------------------------------------------------------------

BOUNDARY_COMMANDS = [["hours"], ["hours", "set"], ["hours", "show"], ["away"],
                     ["away", "add"], ["away", "list"], ["away", "remove"], ["agreement"],
                     ["agreement", "show"], ["agreement", "set"]]


@pytest.mark.parametrize("command", BOUNDARY_COMMANDS, ids=" ".join)
def test_every_boundary_command_has_help(command: list[str],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args([*command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: interlude-client {' '.join(command)}" in capsys.readouterr().out


def _changes(*argv: str) -> dict[str, Any]:
    return cli_boundaries.agreement_changes(
        cli.build_parser().parse_args(["agreement", "set", *argv]))


def test_agreement_set_options_become_the_put_body() -> None:
    assert _changes("--client", "sam@example.org", "--checkins", "5", "--per", "day",
                    "--reply-within", "2 business days", "--urgent", "urgent-anytime",
                    "--quiet", " 21:00-08:00 ", "--client-tz", "Europe/Berlin",
                    "--crisis", "Call Ana.") == {
        "checkins_allowed": 5, "checkin_period": "day",
        "reply_window": {"amount": 2, "unit": "business_days"},
        "urgent_policy": "urgent-anytime",
        "client_quiet_hours": {"spec": "21:00-08:00", "tz": "Europe/Berlin"},
        "crisis_resources": "Call Ana."}
    # Only what is given changes; "unlimited" and the defaults are explicit nulls.
    assert _changes("--checkins", "unlimited", "--no-quiet", "--crisis-default") == {
        "checkins_allowed": None, "client_quiet_hours": None, "crisis_resources": None}
    assert _changes("--reply-within", "8 office hours") == {
        "reply_window": {"amount": 8, "unit": "office_hours"}}
    assert _changes("--reply-within", "1 Business Day") == {
        "reply_window": {"amount": 1, "unit": "business_days"}}
    assert _changes("--checkins", "0") == {"checkins_allowed": 0}
    args = cli.build_parser().parse_args(["agreement", "show", "--to", "sam@example.org"])
    assert (args.func, args.client) == (cli_boundaries.cmd_agreement_show, "sam@example.org")


@pytest.mark.parametrize("argv", [
    ["--checkins", "many"], ["--checkins", "1001"], ["--per", "month"],
    ["--reply-within", "2 days"], ["--reply-within", "soon"], ["--urgent", "always"],
    ["--quiet", "21:00-08:00", "--no-quiet"], ["--crisis", "x", "--crisis-default"],
])
def test_bad_agreement_options_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["agreement", "set", *argv])
    assert exit_.value.code == 2


@pytest.mark.parametrize(("argv", "message"), [
    ([], "nothing to change"),
    (["--quiet", "21:00-08:00"], "--quiet needs --client-tz"),
    (["--client-tz", "Europe/Berlin"], "--client-tz goes with --quiet"),
    (["--quiet", "21:00-25:00", "--client-tz", "UTC"], "invalid quiet hours: bad time"),
    (["--quiet", "21:00-08:00", "--client-tz", "Nowhere/City"], "unknown time zone"),
    (["--crisis", "  "], "--crisis needs a text"),
])
def test_agreement_changes_that_make_no_sense(argv: list[str], message: str) -> None:
    with pytest.raises(cli.UsageError, match=message):
        _changes(*argv)


def test_parsing_of_hours_away_send_and_reply_options() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["hours", "set", "Mon-Thu 09:00-12:00,14:00-17:00; Fri 09:00-13:00",
                              "--tz", "Europe/Berlin"])
    assert (args.func, args.spec, args.tz, args.json) == (
        cli_boundaries.cmd_hours_set, "Mon-Thu 09:00-12:00,14:00-17:00; Fri 09:00-13:00",
        "Europe/Berlin", False)
    args = parser.parse_args(["away", "add", "2026-12-24", "2027-01-02", "--note",
                              "Winter break"])
    assert (args.first_day, args.last_day, args.note) == ("2026-12-24", "2027-01-02",
                                                          "Winter break")
    assert parser.parse_args(["away", "add", "2026-12-24"]).last_day is None
    assert parser.parse_args(["away", "remove", "abc"]).id == "abc"
    args = parser.parse_args(["reply", "--now", "--json", "--to", "sam@example.org", "hi"])
    assert (args.now, args.json) == (True, True)
    assert parser.parse_args(["send", "--json", "--urgent", "hi"]).json is True
    for argv in (["away", "add", "24.12.2026"], ["hours", "set", "Mon 09:00-12:00"],
                 ["hours"], ["agreement"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


# -- boundaries: what people are told ------------------------------------------------------

TOKYO = ZoneInfo("Asia/Tokyo")


def _expectation(**fields: Any) -> Expectation:
    data: dict[str, Any] = {
        "alert": "later", "alert_at": "2026-12-16T09:00:00+00:00", "reason": "outside_hours",
        "reply_by": "2026-12-23T17:00:00+00:00", "used": 1, "allowed": 3, "period": "week",
        "within_agreement": True, "urgent": False, "crisis_resources": "Call 112.",
        "summary": "..."}
    data.update(fields)
    return Expectation.from_json(data)


def test_expectation_in_the_clients_zone_naming_the_therapists() -> None:
    lines = explain.expectation_lines(_expectation(), local=TOKYO, therapist_tz="Europe/London")
    assert lines == [
        "Your therapist will be alerted at Wed 16 Dec 2026, 18:00 JST (09:00 GMT, your "
        "therapist's time, Europe/London), when their office hours next open.",
        "Expect a reply by Thu 24 Dec 2026, 02:00 JST (Wed 23 Dec, 17:00 GMT, your "
        "therapist's time, Europe/London).",
        "Check-in 1 of 3 agreed this week: within the agreement."]
    # The same offset needs no second zone.
    same = explain.expectation_lines(_expectation(), local=ZoneInfo("UTC"),
                                     therapist_tz="Europe/London")
    assert same[0].startswith("Your therapist will be alerted at Wed 16 Dec 2026, 09:00 UTC,")


def test_expectation_now_never_beyond_and_unlimited() -> None:
    now = explain.expectation_lines(_expectation(alert="now", reason="in_hours", allowed=None,
                                                 crisis_resources=None), local=TOKYO)
    assert now[0] == "Your therapist is being alerted now."
    assert now[-1] == "Check-in 1 this week; your agreement sets no limit."
    urgent = explain.expectation_lines(_expectation(alert="now", reason="urgent", urgent=True),
                                       local=TOKYO)
    assert urgent[0] == "Your therapist is being alerted now (urgent)."
    never = explain.expectation_lines(_expectation(alert="never", alert_at=None,
                                                   reason="no_office_hours", reply_by=None))
    assert never[0].startswith("No one will be alerted:")
    assert "There is no reply-by time while your therapist has no office hours ahead." in never
    beyond = explain.expectation_lines(_expectation(
        reason="beyond_agreement", used=4, within_agreement=False, urgent=True), local=TOKYO)
    assert beyond[0] == ("Your therapist will be alerted at Wed 16 Dec 2026, 18:00 JST, in "
                         "their next digest.")
    assert "Marking it urgent does not alert your therapist sooner under your agreement." \
        in beyond
    assert beyond[-1] == ("Check-in 4 of 3 agreed this week: beyond the agreement. It is still "
                          "accepted and stored; its alert waits for the next digest.")


def test_crisis_box_stands_out_and_keeps_every_word() -> None:
    text = ("If you are in danger or cannot keep yourself safe, call your local emergency "
            "number now.\nIn the EU dial 112; in the US call or text 988.")
    box = explain.crisis_box(text, width=40)
    assert box[0] == box[-1] == "+" + "-" * 38 + "+"
    assert all(len(line) == 40 and line.startswith("| ") for line in box[1:-1])
    assert box[1] == "| IF YOU CANNOT WAIT" + " " * 18 + " |"
    assert " ".join(" ".join(line[2:-2].split()) for line in box[3:-1]) == " ".join(
        text.split())


def test_digest_and_reminder_notifications_in_words() -> None:
    assert explain.digest_text({"checkins": 3, "clients": 2, "beyond_agreement": 1,
                                "urgent": 0}) == (
        "3 new check-ins from 2 clients, 1 beyond the agreement")
    assert explain.digest_text({"checkins": 1, "clients": 1, "beyond_agreement": 0,
                                "urgent": 1}) == "1 new check-in from 1 client, 1 urgent"
    assert explain.notification_text("digest", None, {"checkins": 2, "clients": 1}) == (
        "digest: 2 new check-ins from 1 client")
    assert explain.notification_text(
        "reminder.reply_due", "Sam", {"reply_by": "2026-12-16T09:00:00+00:00"},
        local=TOKYO) == "reminder: a reply to Sam is due by Wed 16 Dec 2026, 18:00 JST"
    assert explain.notification_text("checkin.received", "Sam", None) == (
        "new check-in from Sam")
    assert explain.notification_text("reply.received", None, None) == "new reply from someone"


def _availability(**fields: Any) -> Availability:
    data: dict[str, Any] = {
        "set": True, "tz": "Europe/Berlin", "spec": "Mon-Fri 09:00-17:00", "windows": [],
        "absences": [{"id": "a1", "first_day": "2026-12-24", "last_day": "2027-01-02",
                      "note": "Winter break"}],
        "open_now": False, "next_open": "2026-12-16T08:00:00+00:00", "version": 2}
    data.update(fields)
    return Availability.from_json(data)


def test_office_hours_as_therapist_and_client_read_them() -> None:
    unset = _availability(set=False, tz=None, spec=None, absences=[], open_now=True,
                          next_open=None)
    assert explain.availability_lines(unset, mine=False) == [
        "No office hours set: alerts reach your therapist at any time."]
    assert explain.availability_lines(unset, mine=True)[0] == (
        "No office hours set: alerts reach you at any time.")
    closed = explain.availability_lines(_availability(), mine=False, local=TOKYO)
    assert closed == [
        "Office hours (Europe/Berlin): Mon-Fri 09:00-17:00",
        "Open now: no. Next opening: Wed 16 Dec 2026, 17:00 JST (09:00 CET, your therapist's "
        "time, Europe/Berlin).",
        "Absences:", "  2026-12-24 to 2027-01-02  Winter break"]
    mine = explain.availability_lines(_availability(open_now=True), mine=True)
    assert mine[1:] == ["Open now: yes.", "Absences:",
                        "  2026-12-24 to 2027-01-02  Winter break  (id a1)"]
    empty = explain.availability_lines(_availability(spec="", absences=[]), mine=False)
    assert empty == ["Office hours: none (Europe/Berlin). Your therapist is not alerted to "
                     "check-ins until they set hours again.", "Absences: none."]


def test_agreement_in_words() -> None:
    agreement = Agreement.from_json({
        "relationship_id": "r", "version": 4, "checkins_allowed": None,
        "checkin_period": "day", "reply_window": {"amount": 1, "unit": "business_days"},
        "urgent_policy": "urgent-anytime",
        "client_quiet_hours": {"tz": "Europe/Berlin", "start": "21:00", "end": "08:00"},
        "crisis_resources": None, "crisis_resources_effective": "Call 112."})
    assert explain.agreement_lines(agreement, peer="Sam <sam@example.org>") == [
        "Agreement with Sam <sam@example.org> (version 4)",
        "  check-ins:        no limit (counted per day)",
        "  reply within:     1 business day",
        "  urgent:           urgent-anytime: an urgent check-in alerts at once, even outside "
        "office hours",
        "  quiet hours:      21:00-08:00 Europe/Berlin (reply alerts to the client wait until "
        "they end)",
        "  crisis resources (the practice's default):",
        "    Call 112."]


def test_reply_held_or_delivered() -> None:
    assert explain.reply_lines(held=True, release_at="2026-12-16T08:00:00+00:00",
                               deliver_now=False, client="Sam", local=TOKYO) == [
        "Held: you are outside your office hours, so Sam receives it at Wed 16 Dec 2026, "
        "17:00 JST, when your hours next open.",
        "To deliver a reply at once, send it with --now."]
    assert explain.reply_lines(held=False, release_at="x", deliver_now=True, client="Sam") == [
        "Delivered now, as asked: Sam can read it at once."]


# -- boundaries: the CLI against the fake gateway -----------------------------------------------

@pytest.fixture
def in_tokyo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This machine's local zone is Asia/Tokyo for the test."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("in_tokyo")
def test_send_tells_when_the_therapist_is_alerted(fake: FakeGateway, home: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    enroll(home, fake)
    fake.expectation = {
        "alert": "later", "alert_at": "2026-12-16T09:00:00+00:00", "reason": "outside_hours",
        "reply_by": None, "used": 2, "allowed": 3, "period": "week", "within_agreement": True,
        "urgent": False, "crisis_resources": "Call your crisis line.", "summary": "..."}
    fake.availability = {**_availability(tz="UTC").raw}
    capsys.readouterr()
    assert run(home, fake, "send", "a worry") == 0
    out = capsys.readouterr().out
    assert "Your therapist will be alerted at Wed 16 Dec 2026, 18:00 JST (09:00 UTC, your " \
           "therapist's time, UTC)" in out
    assert "Check-in 2 of 3 agreed this week: within the agreement." in out
    assert "| IF YOU CANNOT WAIT" in out
    assert "| Call your crisis line." in out

    assert run(home, fake, "send", "--json", "another") == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["expectation"] == fake.expectation
    assert answer["kind"] == "checkin"

    fake.expectation = {**fake.expectation, "alert": "now", "crisis_resources": None}
    assert run(home, fake, "send", "third") == 0
    out = capsys.readouterr().out
    assert "Your therapist is being alerted now." in out
    assert "IF YOU CANNOT WAIT" not in out


def test_a_bad_schedule_is_one_line_and_nothing_is_sent(fake: FakeGateway, home: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    enroll(home, fake)
    capsys.readouterr()
    before = len(fake.seen)
    assert run(home, fake, "hours", "set", "Mon-Thu 09:00-12:00; Fri 9-13", "--tz",
               "Europe/Berlin") == 2
    assert capsys.readouterr().err == (
        "interlude-client: invalid office hours: bad window '9-13' in \"Fri 9-13\", "
        "expected HH:MM-HH:MM\n")
    assert run(home, fake, "hours", "set", "Mon 09:00-12:00", "--tz", "Europe/Berlinn") == 2
    assert capsys.readouterr().err == (
        "interlude-client: invalid office hours: unknown time zone 'Europe/Berlinn'\n")
    assert run(home, fake, "away", "add", "2027-01-02", "2026-12-24") == 2
    assert "before the first day" in capsys.readouterr().err
    assert fake.seen[before:] == []


def test_a_client_is_told_to_ask_their_therapist(fake: FakeGateway, home: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    enroll(home, fake)
    capsys.readouterr()
    assert run(home, fake, "hours", "set", "Mon 09:00-12:00", "--tz", "UTC") == 2
    assert capsys.readouterr().err == (
        "interlude-client: only a therapist sets office hours; see "
        "`interlude-client hours show`\n")
    fake.availability = _availability(set=False, tz=None, spec=None, absences=[]).raw
    assert run(home, fake, "hours", "show") == 0
    assert capsys.readouterr().out == (
        "No office hours set: alerts reach your therapist at any time.\n")


def test_notifications_show_digests_and_reminders(fake: FakeGateway, home: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    enroll(home, fake)
    rel, msg, actor = str(fake.relationship_id), str(uuid.uuid4()), str(fake.client_id)
    fake.feed = [
        {"id": str(uuid.uuid4()), "kind": "digest", "relationship_id": None,
         "message_id": None, "actor_id": None, "actor_name": None,
         "created_at": "2026-12-16T09:00:00+00:00", "read_at": None,
         "details": {"checkins": 3, "clients": 2, "beyond_agreement": 1, "urgent": 0}},
        {"id": str(uuid.uuid4()), "kind": "reminder.reply_due", "relationship_id": rel,
         "message_id": msg, "actor_id": actor, "actor_name": "Sam",
         "created_at": "2026-12-16T08:00:00+00:00", "read_at": "2026-12-16T08:30:00+00:00",
         "details": {"reply_by": "2026-12-17T17:00:00+00:00"}},
        {"id": str(uuid.uuid4()), "kind": "checkin.received", "relationship_id": rel,
         "message_id": msg, "actor_id": actor, "actor_name": "Sam",
         "created_at": "2026-12-15T08:00:00+00:00", "read_at": None, "details": None},
    ]
    capsys.readouterr()
    assert run(home, fake, "notifications") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("* ")
    assert lines[0].endswith("digest: 3 new check-ins from 2 clients, 1 beyond the agreement")
    assert lines[1].startswith("  ")
    assert "reminder: a reply to Sam is due by " in lines[1]
    assert lines[1].endswith(f"(relationship {rel}, message {msg})")
    assert "new check-in from Sam" in lines[2]
    assert run(home, fake, "notifications", "--json") == 0
    items = json.loads(capsys.readouterr().out)
    assert [i["details"] for i in items] == [n["details"] for n in fake.feed]


# -- channels ---------------------------------------------------------------------------------

def test_parsing_of_channel_commands() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["channels", "add", "webhook", "https://h.example/hook", "--kinds",
                              "digest, checkin.received,digest"])
    assert (args.func, args.url, args.kinds) == (cli_channels.cmd_add_webhook,
                                                 "https://h.example/hook",
                                                 ["digest", "checkin.received"])
    args = parser.parse_args(["channels", "add", "email", "me@example.org"])
    assert (args.func, args.address, args.kinds) == (cli_channels.cmd_add_email,
                                                     "me@example.org", None)
    args = parser.parse_args(["channels", "verify", "123 456"])
    assert (args.func, args.code, args.channel) == (cli_channels.cmd_verify, "123 456", None)
    args = parser.parse_args(["channels", "kinds", "abc", "reply.received"])
    assert (args.channel, args.kinds) == ("abc", ["reply.received"])
    assert parser.parse_args(["channels", "kinds", "abc", "None"]).kinds == []  # paused
    args = parser.parse_args(["channels", "deliveries", "--failed"])
    assert (args.failed, args.state, args.limit) == (True, None, 50)
    assert parser.parse_args(["channels", "deliveries", "--state", "sent,pending"]).state == [
        "sent", "pending"]
    for argv in (["channels"], ["channels", "add"], ["channels", "add", "sms", "x"],
                 ["channels", "add", "email", "a@b.c", "--kinds", "checkin.recieved"],
                 ["channels", "kinds", "abc", ","], ["channels", "deliveries", "--failed",
                                                      "--state", "dead"],
                 ["channels", "deliveries", "--state", "lost"], ["channels", "remove"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_adding_a_webhook_shows_its_secret_once_and_keeps_it_nowhere(
        fake: FakeGateway, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    enroll(home, fake)
    capsys.readouterr()
    assert run(home, fake, "channels", "add", "webhook", "https://hooks.example/in",
               "--kinds", "reply.received") == 0
    out = capsys.readouterr().out
    secret = "whsec_c2VjcmV0LWZha2U="
    assert out.count(secret) == 1
    assert "store it now; it will not be shown again" in out
    assert "Standard Webhooks" in out
    assert "webhook-signature" in out
    assert fake.bodies[-1] == ("POST /v1/channels", {"type": "webhook",
                                                     "url": "https://hooks.example/in",
                                                     "kinds": ["reply.received"]})
    assert secret not in json.dumps(load(home).to_json())
    assert secret not in (home / "keystore.json").read_bytes().decode("latin-1")

    assert run(home, fake, "channels", "list") == 0
    out = capsys.readouterr().out
    assert secret not in out
    assert "webhook  https://hooks.example/in  [signed webhook]  kinds: reply.received" in out

    channel_id = fake.channels[0]["id"]
    assert run(home, fake, "channels", "rotate-secret", channel_id[:8]) == 0
    out = capsys.readouterr().out
    assert "whsec_cm90YXRlZA==" in out
    assert "the old one stops working now" in out
    assert fake.bodies[-1][0] == f"POST /v1/channels/{channel_id}/rotate-secret"


def test_a_client_is_warned_about_kinds_they_never_receive(
        fake: FakeGateway, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    enroll(home, fake)
    capsys.readouterr()
    assert run(home, fake, "channels", "add", "webhook", "http://127.0.0.1:9/h", "--kinds",
               "digest,reply.received") == 0
    assert "a client never receives digest" in capsys.readouterr().err


def test_verify_picks_the_only_unverified_email_channel(
        fake: FakeGateway, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    enroll(home, fake)
    capsys.readouterr()
    assert run(home, fake, "channels", "verify", "123456") == 2
    assert "no email channel is waiting for a code" in capsys.readouterr().err

    assert run(home, fake, "channels", "add", "email", "sam@example.org") == 0
    out = capsys.readouterr().out
    assert "a verification code was sent to sam@example.org" in out
    assert "channels verify CODE" in out
    fake.channel("webhook", "https://h.example/x")
    fake.channel("email", "old@example.org", verified=True)
    assert run(home, fake, "channels", "resend-code") == 0
    assert fake.bodies[-1] == (f"POST /v1/channels/{fake.channels[0]['id']}/resend-code", None)
    assert "a new code was sent to sam@example.org" in capsys.readouterr().out
    assert run(home, fake, "channels", "verify", " 123 456 ") == 0
    assert capsys.readouterr().out == (
        "sam@example.org is verified; it now gets reply.received\n")
    assert fake.bodies[-1] == (f"POST /v1/channels/{fake.channels[0]['id']}/verify",
                               {"code": "123456"})

    first = fake.channel("email", "a@example.org")
    fake.channel("email", "b@example.org")
    assert run(home, fake, "channels", "verify", "123456") == 2
    err = capsys.readouterr().err
    assert "2 email channels wait for a code" in err
    assert "--channel ID" in err
    assert run(home, fake, "channels", "verify", "999999", "--channel", "a@example.org") == 1
    assert "wrong code (4 attempts left)" in capsys.readouterr().err
    assert run(home, fake, "channels", "verify", "111111", "--channel", "a@example.org") == 1
    assert capsys.readouterr().err == (
        "interlude-client: the code has expired; ask for a new one; `interlude-client channels "
        f"resend-code --channel {first['id']}` mails a new one\n")
    assert run(home, fake, "channels", "verify", "123456", "--channel", first["id"]) == 0
    assert run(home, fake, "channels", "verify", "1", "--channel", "https://h.example/x") == 2
    assert "only email channels have codes" in capsys.readouterr().err


def test_list_kinds_remove_and_unknown_channels(fake: FakeGateway, home: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    enroll(home, fake)
    capsys.readouterr()
    assert run(home, fake, "channels", "list") == 0
    assert capsys.readouterr().out.startswith("no channels: notifications reach you only in "
                                              "the app")
    email = fake.channel("email", "Sam@Example.org")
    hook = fake.channel("webhook", "https://h.example/x", kinds=["reply.received"])
    assert run(home, fake, "channels", "list", "--json") == 0
    assert json.loads(capsys.readouterr().out) == [email, hook]
    assert run(home, fake, "channels", "list") == 0
    assert "NOT VERIFIED: run `channels verify CODE`" in capsys.readouterr().out

    assert run(home, fake, "channels", "kinds", "sam@example.org", "reply.received") == 0
    assert fake.bodies[-1] == (f"PUT /v1/channels/{email['id']}", {"kinds": ["reply.received"]})
    assert capsys.readouterr().out == "Sam@Example.org now gets reply.received\n"

    assert run(home, fake, "channels", "remove", "https://h.example/x") == 0
    assert fake.bodies[-1] == (f"DELETE /v1/channels/{hook['id']}", None)
    assert [c["id"] for c in fake.channels] == [email["id"]]
    before = len(fake.bodies)
    assert run(home, fake, "channels", "remove", "nothing-like-it") == 2
    assert "no channel 'nothing-like-it'; see `interlude-client channels list`" in \
        capsys.readouterr().err
    assert len(fake.bodies) == before


@pytest.mark.usefixtures("in_tokyo")
def test_deliveries_show_failures_with_their_channel(fake: FakeGateway, home: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    enroll(home, fake)
    hook = fake.channel("webhook", "https://h.example/x")
    gone = str(uuid.uuid4())

    def delivery(state: str, channel_id: str, error: str | None) -> dict[str, Any]:
        return {"id": str(uuid.uuid4()), "channel_id": channel_id,
                "notification_id": str(uuid.uuid4()), "state": state, "attempts": 3,
                "last_error": error, "next_attempt_at": "2026-12-16T10:00:00+00:00",
                "created_at": "2026-12-16T09:00:00+00:00",
                "updated_at": "2026-12-16T09:30:00+00:00"}

    fake.deliveries = [delivery("failed", hook["id"], "HTTP 500"),
                       delivery("dead", gone, "channel removed"),
                       delivery("sent", hook["id"], None)]
    capsys.readouterr()
    assert run(home, fake, "channels", "deliveries", "--failed") == 0
    assert fake.bodies[-1] == ("GET /v1/deliveries?state=failed,dead&limit=50", None)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert lines[0] == (
        f"2026-12-16 18:30 JST  failed   https://h.example/x  notification "
        f"{fake.deliveries[0]['notification_id']}  attempts 3  next 2026-12-16 19:00 JST  "
        "last error: HTTP 500")
    assert f"dead     removed channel {gone}" in lines[1]
    assert "next" not in lines[1]
    assert lines[2].startswith("dead deliveries are not retried")
    fake.deliveries = []
    assert run(home, fake, "channels", "deliveries", "--failed") == 0
    assert capsys.readouterr().out == "no failed or dead deliveries\n"


# -- watch ----------------------------------------------------------------------------------

def test_stream_url_follows_the_server_scheme() -> None:
    assert stream.stream_url("http://gw:8080") == "ws://gw:8080/v1/stream"
    assert stream.stream_url("https://interlude.example/") == "wss://interlude.example/v1/stream"
    assert stream.stream_url("https://example.org/api", "abc") == (
        "wss://example.org/api/v1/stream?after=abc")
    with pytest.raises(ValueError, match="not an http"):
        stream.stream_url("ftp://x")


def test_backoff_doubles_with_jitter_up_to_a_cap() -> None:
    for attempt, ceiling in ((0, 1.0), (1, 2.0), (3, 8.0), (10, 30.0), (500, 30.0)):
        delay = stream.backoff_delay(attempt)
        assert ceiling / 2 <= delay <= ceiling


def _notification_frame(kind: str = "reply.received", **fields: Any) -> dict[str, Any]:
    return {"type": "notification", "notification": {
        "id": str(uuid.uuid4()), "kind": kind, "relationship_id": None, "message_id": None,
        "actor_id": None, "details": None, "created_at": "2026-12-16T09:00:00+00:00",
        **fields}}


def _message_frame(fake: FakeGateway, kind: str) -> dict[str, Any]:
    return {"type": "message", "relationship_id": str(fake.relationship_id),
            "message_id": str(uuid.uuid4()), "kind": kind,
            "sent_at": "2026-12-16T09:00:00+00:00"}


@pytest.fixture
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "BACKOFF_FIRST_SECONDS", 0.01)
    monkeypatch.setattr(stream, "BACKOFF_MAX_SECONDS", 0.05)


def test_watch_prints_json_lines_and_resumes_from_the_last_notification(
        fake: FakeGateway, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    enroll(home, fake)
    message = _message_frame(fake, "reply")
    first = _notification_frame(relationship_id=str(fake.relationship_id),
                                actor_id=str(fake.therapist_id))
    fake.stream_scripts.append([{"type": "heartbeat", "at": "x"}, message, first])
    capsys.readouterr()
    assert run(home, fake, "watch", "--json", "--count", "2", "--timeout", "10") == 0
    out = capsys.readouterr()
    assert [json.loads(line) for line in out.out.splitlines()] == [message, first]
    assert "connected; watching" in out.err
    assert fake.streams[0]["auth"] == {"type": "auth", "access_token": fake.access_token}
    assert fake.streams[0]["query"] == {}  # the token goes in the first frame, never the URL
    assert load(home).last_notification_id == first["notification"]["id"]

    second = _notification_frame("reply.received")
    fake.stream_scripts.append([second, {"type": "resumed", "after": "x", "count": 1,
                                         "complete": True}])
    assert run(home, fake, "watch", "--json", "--once", "--timeout", "10") == 0
    assert json.loads(capsys.readouterr().out) == second
    assert fake.streams[1]["after"] == first["notification"]["id"]
    assert load(home).last_notification_id == second["notification"]["id"]


@pytest.mark.usefixtures("in_tokyo")
def test_watch_in_words(fake: FakeGateway, home: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    enroll(home, fake)
    rel = str(fake.relationship_id)
    own = _message_frame(fake, "checkin")
    reply = _message_frame(fake, "reply")
    notification = _notification_frame(relationship_id=rel, message_id=reply["message_id"],
                                       actor_id=str(fake.therapist_id))
    stranger = _message_frame(fake, "reply") | {"relationship_id": str(uuid.uuid4())}
    fake.stream_scripts.append([own, reply, notification, stranger,
                                {"type": "error", "code": "bad_message", "message": "huh"}])
    capsys.readouterr()
    assert run(home, fake, "watch", "--count", "4", "--timeout", "10") == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"2026-12-16 18:00 JST  message: you sent a check-in to Dr T  (relationship {rel}, "
        f"message {own['message_id']})",
        "2026-12-16 18:00 JST  message: new reply from Dr T; `interlude-client inbox` shows it"
        f"  (relationship {rel}, message {reply['message_id']})",
        f"2026-12-16 18:00 JST  notification: new reply from Dr T  (relationship {rel}, "
        f"message {reply['message_id']})",
        f"2026-12-16 18:00 JST  message: new reply  (relationship "
        f"{stranger['relationship_id']}, message {stranger['message_id']})"]
    assert "Traceback" not in err


@pytest.mark.usefixtures("quick_backoff")
def test_watch_reconnects_after_a_restart_and_resumes(
        fake: FakeGateway, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    enroll(home, fake)
    seen = _notification_frame()
    later = _notification_frame()
    fake.stream_scripts += [[seen, ("close", 1001)], [("close", 1013)], [later]]
    capsys.readouterr()
    assert run(home, fake, "watch", "--json", "--count", "2", "--timeout", "10") == 0
    out, err = capsys.readouterr()
    assert [json.loads(line) for line in out.splitlines()] == [seen, later]
    assert [s["after"] for s in fake.streams] == [None, seen["notification"]["id"],
                                                  seen["notification"]["id"]]
    assert "connection lost (closed with 1001: scripted close); reconnecting in 0 s" in err
    assert "reconnected" in err


def test_watch_refreshes_the_session_once_on_4401(fake: FakeGateway, home: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    enroll(home, fake)
    old_token = fake.access_token
    event = _notification_frame()
    fake.stream_scripts += [[("close", 4401)], [event]]
    capsys.readouterr()
    assert run(home, fake, "watch", "--json", "--once", "--timeout", "10") == 0
    assert json.loads(capsys.readouterr().out) == event
    assert fake.access_token != old_token
    assert [s["auth"]["access_token"] for s in fake.streams] == [old_token, fake.access_token]
    state = load(home)
    assert (state.access_token, state.refresh_token) == (fake.access_token, fake.refresh_token)

    fake.stream_scripts += [[("close", 4401)], [("close", 4401)]]
    assert run(home, fake, "watch", "--once", "--timeout", "10") == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "interlude-client: the stream refused the session even after it was refreshed; "
        "sign in again with `interlude-client login --email EMAIL`")


def test_watch_stops_on_refusals_and_timeouts(fake: FakeGateway, home: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    enroll(home, fake)
    fake.stream_scripts.append([("close", 4429)])
    capsys.readouterr()
    assert run(home, fake, "watch", "--timeout", "10") == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        "interlude-client: you already have the most open streams the server allows (5)")
    assert len(fake.streams) == 1  # not retried

    started = time.monotonic()
    assert run(home, fake, "watch", "--count", "2", "--timeout", "0.5") == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "interlude-client: timed out after 0.5 s with 0 of 2 event(s)")
    assert run(home, fake, "watch", "--timeout", "0.5") == 0
    assert time.monotonic() - started < 10


def test_watch_against_no_server_fails_in_one_line(home: Path, fake: FakeGateway,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    enroll(home, fake)
    capsys.readouterr()
    assert cli.main(["--server", "http://127.0.0.1:9", "--home", str(home), "watch",
                     "--timeout", "10"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("interlude-client: cannot reach the Interlude server at "
                          "http://127.0.0.1:9")
    assert len(err.splitlines()) == 1


def test_ctrl_c_ends_a_watch_with_0(fake: FakeGateway, home: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    enroll(home, fake)

    async def interrupted(args: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_watch, "cmd_watch", interrupted)
    assert run(home, fake, "watch") == 0
    monkeypatch.setattr(cli, "cmd_whoami", interrupted)
    assert run(home, fake, "whoami") == 130
