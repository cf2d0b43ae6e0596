"""Async HTTP client for the gateway's public API (docs/api.md).

One method per route, answering frozen dataclasses. Every error answer becomes
:class:`ApiError` (built from the JSON error body); a server that cannot be
reached becomes :class:`ServerUnreachable`. An expired access token is refreshed
once, transparently, and the rotated tokens are handed to a callback so the
caller can persist them before anything else happens.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import aiohttp

from client.channels import AddedChannel, Channel, Delivery, added_channel, channel_of
from client.terms import Absence, Agreement, Availability, Expectation

DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=30, connect=10)
IDEMPOTENCY_HEADER = "Idempotency-Key"
NOT_SIGNED_IN = "not_signed_in"  # our own code: no tokens here, nothing was sent

TokenCallback = Callable[[str, str], Awaitable[None] | None]
"""Called with (access_token, refresh_token) after every login, enroll or refresh."""


class ApiError(Exception):
    """The gateway answered with an error (docs/api.md, "every error is ...")."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.code!r}, {self.message!r}, field={self.field!r})"


class ServerUnreachable(Exception):
    """The server could not be reached, or did not answer in time."""


@dataclass(frozen=True, slots=True)
class User:
    id: uuid.UUID
    email: str
    display_name: str
    role: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> User:
        return cls(uuid.UUID(data["id"]), data["email"], data["display_name"], data["role"])

    def to_json(self) -> dict[str, Any]:
        return {"id": str(self.id), "email": self.email, "display_name": self.display_name,
                "role": self.role}


@dataclass(frozen=True, slots=True)
class Session:
    user: User
    access_token: str
    refresh_token: str
    expires_in: int
    relationship_id: uuid.UUID | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Session:
        rel = data.get("relationship_id")
        return cls(User.from_json(data["user"]), data["access_token"], data["refresh_token"],
                   int(data.get("expires_in", 0)), uuid.UUID(rel) if rel else None)


@dataclass(frozen=True, slots=True)
class Invite:
    id: uuid.UUID
    code: str
    expires_at: str


@dataclass(frozen=True, slots=True)
class Relationship:
    id: uuid.UUID
    therapist_id: uuid.UUID
    client_id: uuid.UUID
    status: str
    created_at: str
    therapist: User | None
    client: User | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Relationship:
        def person(key: str) -> User | None:
            value = data.get(key)
            return User.from_json(value) if value else None

        return cls(uuid.UUID(data["id"]), uuid.UUID(data["therapist_id"]),
                   uuid.UUID(data["client_id"]), data["status"], data["created_at"],
                   person("therapist"), person("client"))

    def peer_of(self, user_id: uuid.UUID) -> User | None:
        """The other person of this relationship, seen from `user_id`."""
        return self.client if user_id == self.therapist_id else self.therapist

    def peer_id_of(self, user_id: uuid.UUID) -> uuid.UUID:
        return self.client_id if user_id == self.therapist_id else self.therapist_id

    def person(self, user_id: uuid.UUID) -> User | None:
        return self.therapist if user_id == self.therapist_id else (
            self.client if user_id == self.client_id else None)


@dataclass(frozen=True, slots=True)
class Device:
    """A published device record. Keys are base64 as the server sends them."""

    user_id: uuid.UUID
    device_id: uuid.UUID
    version: int
    suite: int
    hpke_public_key: str
    signing_public_key: str
    signature: str
    key_id: str
    updated_at: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Device:
        return cls(uuid.UUID(data["user_id"]), uuid.UUID(data["device_id"]),
                   int(data["version"]), int(data["suite"]), data["hpke_public_key"],
                   data["signing_public_key"], data["signature"], data["key_id"],
                   data["updated_at"])


@dataclass(frozen=True, slots=True)
class PublishedDevice:
    device: Device
    changed: bool
    created: bool


@dataclass(frozen=True, slots=True)
class Message:
    id: uuid.UUID
    seq: int
    relationship_id: uuid.UUID
    kind: str
    sender_id: uuid.UUID
    sender_device_id: uuid.UUID
    urgent: bool
    sent_at: str
    created_at: str
    envelope: str | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Message:
        return cls(uuid.UUID(data["id"]), int(data["seq"]), uuid.UUID(data["relationship_id"]),
                   data["kind"], uuid.UUID(data["sender_id"]),
                   uuid.UUID(data["sender_device_id"]), bool(data["urgent"]), data["sent_at"],
                   data["created_at"], data.get("envelope"))


@dataclass(frozen=True, slots=True)
class PostedMessage:
    message: Message
    created: bool  # False: the server recognised a retry and answered the first result
    answer: dict[str, Any]  # the whole answer, e.g. for --json
    expectation: Expectation | None = None  # check-ins: what the client is told
    release_at: str | None = None  # replies: when the client sees it
    held: bool = False  # replies: held until the therapist's office hours open


@dataclass(frozen=True, slots=True)
class Notification:
    id: uuid.UUID
    kind: str
    relationship_id: uuid.UUID | None
    message_id: uuid.UUID | None
    actor_id: uuid.UUID | None
    actor_name: str | None
    created_at: str
    read_at: str | None
    details: dict[str, Any] | None = None  # digest counts, a reminder's reply_by

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Notification:
        def opt_uuid(key: str) -> uuid.UUID | None:
            value = data.get(key)
            return uuid.UUID(value) if value else None

        return cls(uuid.UUID(data["id"]), data["kind"], opt_uuid("relationship_id"),
                   opt_uuid("message_id"), opt_uuid("actor_id"), data.get("actor_name"),
                   data["created_at"], data.get("read_at"), data.get("details"))

    def to_json(self) -> dict[str, Any]:
        def text(value: uuid.UUID | None) -> str | None:
            return str(value) if value else None

        return {"id": str(self.id), "kind": self.kind,
                "relationship_id": text(self.relationship_id),
                "message_id": text(self.message_id), "actor_id": text(self.actor_id),
                "actor_name": self.actor_name, "created_at": self.created_at,
                "read_at": self.read_at, "details": self.details}


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    data: Any


def _error_from(status: int, raw: bytes, reason: str | None) -> ApiError:
    try:
        error = json.loads(raw)["error"]
        return ApiError(status, str(error["code"]), str(error["message"]), error.get("field"))
    except (ValueError, KeyError, TypeError):
        # Not our JSON error (a proxy page, an empty body): say what we know.
        return ApiError(status, "http_error", f"the server answered HTTP {status} "
                        f"{reason or ''}".rstrip())


class GatewayClient:
    """The gateway's API. Use as ``async with GatewayClient(url) as api: ...``."""

    def __init__(self, base_url: str, *, access_token: str | None = None,
                 refresh_token: str | None = None, on_tokens: TokenCallback | None = None,
                 timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        self.access_token = access_token
        self.refresh_token = refresh_token
        self._on_tokens = on_tokens
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- plumbing -------------------------------------------------------------

    async def _raw(self, method: str, path: str, *, body: Any = None, auth: bool,
                   params: dict[str, str] | None = None,
                   headers: dict[str, str] | None = None) -> _Answer:
        if self._session is None:
            raise RuntimeError("GatewayClient used outside 'async with'")
        all_headers = dict(headers or {})
        if auth:
            if not self.access_token:
                raise ApiError(401, NOT_SIGNED_IN, "not signed in; run "
                               "`interlude-client login --email EMAIL`")
            all_headers["Authorization"] = f"Bearer {self.access_token}"
        url = self.base_url + path
        try:
            async with self._session.request(method, url, json=body, params=params,
                                             headers=all_headers) as response:
                raw = await response.read()
                status, reason = response.status, response.reason
        except TimeoutError:
            raise ServerUnreachable(f"the Interlude server at {self.base_url} did not answer "
                                    "in time") from None
        except aiohttp.ClientError as exc:
            detail = str(exc) or exc.__class__.__name__
            raise ServerUnreachable(f"cannot reach the Interlude server at {self.base_url} "
                                    f"({detail})") from None
        if status >= 400:
            raise _error_from(status, raw, reason)
        if not raw:
            return _Answer(status, None)
        try:
            return _Answer(status, json.loads(raw))
        except ValueError:
            raise ApiError(status, "bad_response", f"the server at {self.base_url} sent a "
                           "response that is not JSON") from None

    async def _call(self, method: str, path: str, *, body: Any = None, auth: bool = True,
                    params: dict[str, str] | None = None,
                    headers: dict[str, str] | None = None) -> _Answer:
        try:
            return await self._raw(method, path, body=body, auth=auth, params=params,
                                   headers=headers)
        except ApiError as exc:
            if not (auth and exc.status == 401 and exc.code == "unauthorized"
                    and self.refresh_token and self.access_token):
                raise
        await self.refresh()
        return await self._raw(method, path, body=body, auth=auth, params=params,
                               headers=headers)

    async def _adopt(self, session: Session) -> Session:
        self.access_token = session.access_token
        self.refresh_token = session.refresh_token
        if self._on_tokens is not None:
            result = self._on_tokens(session.access_token, session.refresh_token)
            if result is not None:
                await result
        return session

    # -- accounts -------------------------------------------------------------

    async def enroll(self, *, code: str, email: str, password: str,
                     display_name: str) -> Session:
        answer = await self._call("POST", "/v1/enroll", auth=False, body={
            "code": code, "email": email, "password": password, "display_name": display_name})
        return await self._adopt(Session.from_json(answer.data))

    async def login(self, *, email: str, password: str) -> Session:
        answer = await self._call("POST", "/v1/auth/login", auth=False,
                                  body={"email": email, "password": password})
        return await self._adopt(Session.from_json(answer.data))

    async def refresh(self) -> Session:
        """Rotate the tokens with the refresh token (and report them to the callback)."""
        if not self.refresh_token:
            raise ApiError(401, NOT_SIGNED_IN, "not signed in; run "
                           "`interlude-client login --email EMAIL`")
        answer = await self._raw("POST", "/v1/auth/refresh", auth=False,
                                 body={"refresh_token": self.refresh_token})
        return await self._adopt(Session.from_json(answer.data))

    async def logout(self) -> None:
        await self._call("POST", "/v1/auth/logout")
        self.access_token = self.refresh_token = None

    async def me(self) -> User:
        return User.from_json((await self._call("GET", "/v1/me")).data["user"])

    # -- relationships, invites, devices --------------------------------------

    async def create_invite(self) -> Invite:
        data = (await self._call("POST", "/v1/invites")).data
        return Invite(uuid.UUID(data["id"]), data["code"], data["expires_at"])

    async def relationships(self) -> list[Relationship]:
        data = (await self._call("GET", "/v1/relationships")).data
        return [Relationship.from_json(r) for r in data["items"]]

    async def relationship(self, relationship_id: uuid.UUID) -> Relationship:
        data = (await self._call("GET", f"/v1/relationships/{relationship_id}")).data
        return Relationship.from_json(data)

    async def publish_device(self, device_id: uuid.UUID, *, suite: int, hpke_public_key: str,
                             signing_public_key: str, signature: str) -> PublishedDevice:
        answer = await self._call("PUT", f"/v1/devices/{device_id}", body={
            "suite": suite, "hpke_public_key": hpke_public_key,
            "signing_public_key": signing_public_key, "signature": signature})
        return PublishedDevice(Device.from_json(answer.data), bool(answer.data.get("changed")),
                               answer.status == 201)

    async def devices(self, relationship_id: uuid.UUID) -> list[Device]:
        data = (await self._call("GET", f"/v1/relationships/{relationship_id}/devices")).data
        return [Device.from_json(d) for d in data["items"]]

    async def device_history(self, relationship_id: uuid.UUID) -> list[Device]:
        path = f"/v1/relationships/{relationship_id}/devices/history"
        return [Device.from_json(d) for d in (await self._call("GET", path)).data["items"]]

    # -- messages -------------------------------------------------------------

    async def post_message(self, relationship_id: uuid.UUID, envelope_b64: str, *,
                           idempotency_key: str | None = None,
                           deliver_now: bool = False) -> PostedMessage:
        headers = {IDEMPOTENCY_HEADER: idempotency_key} if idempotency_key else None
        body: dict[str, Any] = {"envelope": envelope_b64}
        if deliver_now:
            body["deliver_now"] = True
        answer = await self._call("POST", f"/v1/relationships/{relationship_id}/messages",
                                  body=body, headers=headers)
        data = answer.data
        expectation = data.get("expectation")
        return PostedMessage(Message.from_json(data), answer.status == 201, data,
                             Expectation.from_json(expectation) if expectation else None,
                             data.get("release_at"), bool(data.get("held")))

    async def messages_page(self, relationship_id: uuid.UUID, *, cursor: str | None = None,
                            limit: int | None = None
                            ) -> tuple[list[Message], str | None, list[Message]]:
        """One page in delivery order, its next cursor, and the caller's own replies
        still held for office hours (listed apart: they are not delivered yet)."""
        params = {}
        if cursor:
            params["cursor"] = cursor
        if limit:
            params["limit"] = str(limit)
        data = (await self._call("GET", f"/v1/relationships/{relationship_id}/messages",
                                 params=params)).data
        return ([Message.from_json(m) for m in data["items"]], data.get("next_cursor"),
                [Message.from_json(m) for m in data.get("held", [])])

    async def messages(self, relationship_id: uuid.UUID, *,
                       page_size: int = 200) -> AsyncIterator[Message]:
        """Every message of a relationship in delivery order, following the cursors,
        then the caller's own replies still held for office hours."""
        cursor: str | None = None
        held: list[Message] = []
        while True:
            items, cursor, page_held = await self.messages_page(relationship_id, cursor=cursor,
                                                                limit=page_size)
            held = held or page_held
            for item in items:
                yield item
            if not cursor or not items:
                break
        for item in held:
            yield item

    # -- notifications --------------------------------------------------------

    async def notifications_page(self, *, cursor: str | None = None, limit: int | None = None,
                                 unread: bool = False) -> tuple[list[Notification], str | None]:
        params = {}
        if cursor:
            params["cursor"] = cursor
        if limit:
            params["limit"] = str(limit)
        if unread:
            params["unread"] = "true"
        data = (await self._call("GET", "/v1/notifications", params=params)).data
        return [Notification.from_json(n) for n in data["items"]], data.get("next_cursor")

    async def notifications(self, *, unread: bool = False,
                            page_size: int = 100) -> AsyncIterator[Notification]:
        """The caller's notifications, newest first, following the cursors."""
        cursor: str | None = None
        while True:
            items, cursor = await self.notifications_page(cursor=cursor, limit=page_size,
                                                          unread=unread)
            for item in items:
                yield item
            if not cursor or not items:
                return

    async def mark_read(self, notification_id: uuid.UUID) -> Notification:
        data = (await self._call("POST", f"/v1/notifications/{notification_id}/read")).data
        return Notification.from_json(data["notification"])

    async def mark_all_read(self) -> int:
        return int((await self._call("POST", "/v1/notifications/read-all")).data["updated"])

    # -- office hours, absences, agreements -----------------------------------

    async def availability(self) -> Availability:
        """The caller's own office hours (therapists)."""
        return Availability.from_json((await self._call("GET", "/v1/availability")).data)

    async def set_hours(self, spec: str, tz: str) -> Availability:
        data = (await self._call("PUT", "/v1/availability", body={"spec": spec, "tz": tz})).data
        return Availability.from_json(data)

    async def absences(self) -> list[Absence]:
        data = (await self._call("GET", "/v1/availability/absences")).data
        return [Absence.from_json(a) for a in data["items"]]

    async def add_absence(self, first_day: str, last_day: str,
                          note: str | None = None) -> Absence:
        body: dict[str, Any] = {"first_day": first_day, "last_day": last_day}
        if note is not None:
            body["note"] = note
        data = (await self._call("POST", "/v1/availability/absences", body=body)).data
        return Absence.from_json(data)

    async def remove_absence(self, absence_id: uuid.UUID) -> None:
        await self._call("DELETE", f"/v1/availability/absences/{absence_id}")

    async def relationship_availability(self, relationship_id: uuid.UUID) -> Availability:
        """The therapist's office hours, as either member of the relationship sees them."""
        data = (await self._call("GET", f"/v1/relationships/{relationship_id}/availability")).data
        return Availability.from_json(data)

    async def agreement(self, relationship_id: uuid.UUID) -> Agreement:
        data = (await self._call("GET", f"/v1/relationships/{relationship_id}/agreement")).data
        return Agreement.from_json(data)

    async def set_agreement(self, relationship_id: uuid.UUID,
                            changes: dict[str, Any]) -> Agreement:
        """Change the fields given in ``changes`` (docs/api.md names them); the rest stay."""
        data = (await self._call("PUT", f"/v1/relationships/{relationship_id}/agreement",
                                 body=changes)).data
        return Agreement.from_json(data)

    # -- delivery channels ------------------------------------------------------

    async def channels(self) -> list[Channel]:
        data = (await self._call("GET", "/v1/channels")).data
        return [Channel.from_json(c) for c in data["items"]]

    async def add_channel(self, kind: str, target: str,
                          kinds: list[str] | None = None) -> AddedChannel:
        """``kind`` "email" (``target`` an address: a code is mailed to it) or "webhook"
        (``target`` a URL: the answer carries the signing secret, once)."""
        body: dict[str, Any] = {"type": kind, "address" if kind == "email" else "url": target}
        if kinds is not None:
            body["kinds"] = kinds
        return added_channel((await self._call("POST", "/v1/channels", body=body)).data)

    async def verify_channel(self, channel_id: uuid.UUID, code: str) -> Channel:
        data = (await self._call("POST", f"/v1/channels/{channel_id}/verify",
                                 body={"code": code})).data
        return channel_of(data)

    async def resend_code(self, channel_id: uuid.UUID) -> AddedChannel:
        data = (await self._call("POST", f"/v1/channels/{channel_id}/resend-code")).data
        return added_channel(data)

    async def rotate_secret(self, channel_id: uuid.UUID) -> str:
        data = (await self._call("POST", f"/v1/channels/{channel_id}/rotate-secret")).data
        return str(data["secret"])

    async def set_channel_kinds(self, channel_id: uuid.UUID, kinds: list[str]) -> Channel:
        data = (await self._call("PUT", f"/v1/channels/{channel_id}",
                                 body={"kinds": kinds})).data
        return channel_of(data)

    async def remove_channel(self, channel_id: uuid.UUID) -> None:
        await self._call("DELETE", f"/v1/channels/{channel_id}")

    async def deliveries(self, states: tuple[str, ...] = (),
                         limit: int | None = None) -> list[Delivery]:
        """The caller's deliveries, newest first; only those in ``states`` if given."""
        params = {}
        if states:
            params["state"] = ",".join(states)
        if limit:
            params["limit"] = str(limit)
        data = (await self._call("GET", "/v1/deliveries", params=params)).data
        return [Delivery.from_json(d) for d in data["items"]]
