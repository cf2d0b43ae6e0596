"""The notifier's internal API: the caller's notification feed.

The gateway calls it on behalf of a logged-in user; every route answers for the
signed caller (``identity_of``) only.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import datetime
from typing import Any

from aiohttp import web

from services.notifier.feed_store import FeedPosition, Notification, NotificationNotFound
from services.notifier.store import NotifierStore
from services.notifier.unavailable import StoreUnavailable
from shared.web import ApiError, identity_of, parse_uuid, query_int

# Typed app state; app.py fills it in its cleanup contexts.
STORE: web.AppKey[NotifierStore] = web.AppKey("notifier_store", NotifierStore)

DEFAULT_LIMIT = 50
MAX_LIMIT = 100


def encode_cursor(position: FeedPosition) -> str:
    """An opaque, URL-safe cursor for the page after ``position``."""
    raw = json.dumps({"t": position.created_at.isoformat(), "id": str(position.id)},
                     separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> FeedPosition:
    """The position a cursor stands for; :class:`ValueError` if it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        created_at = datetime.fromisoformat(data["t"])
        position = FeedPosition(created_at=created_at, id=uuid.UUID(data["id"]))
    except (binascii.Error, ValueError, TypeError, KeyError, UnicodeDecodeError):
        raise ValueError("not a feed cursor") from None
    if created_at.tzinfo is None:
        raise ValueError("not a feed cursor")
    return position


def _id_or_none(value: uuid.UUID | None) -> str | None:
    return None if value is None else str(value)


def notification_json(notification: Notification) -> dict[str, Any]:
    """A feed item. A digest has no single relationship, message or actor (null);
    ``details`` holds counts and times only (null for the message kinds)."""
    read_at = notification.read_at
    return {
        "id": str(notification.id),
        "kind": notification.kind,
        "relationship_id": _id_or_none(notification.relationship_id),
        "message_id": _id_or_none(notification.message_id),
        "actor_id": _id_or_none(notification.actor_id),
        "created_at": notification.created_at.isoformat(),
        "read_at": read_at.isoformat() if read_at is not None else None,
        "details": notification.details,
    }


def _query_bool(request: web.Request, name: str, default: bool) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return default
    if raw in ("true", "false"):
        return raw == "true"
    raise ApiError(422, "invalid", f"query parameter {name!r} must be true or false", field=name)


def _unavailable() -> ApiError:
    return ApiError(503, "unavailable", "the notification store is unavailable; try again",
                    headers={"Retry-After": "1"})


async def list_notifications(request: web.Request) -> web.Response:
    """``GET /v1/notifications?limit=&cursor=&unread=``: the caller's feed, newest first."""
    caller = identity_of(request)
    limit = query_int(request, "limit", DEFAULT_LIMIT, low=1, high=MAX_LIMIT)
    unread_only = _query_bool(request, "unread", False)
    cursor = request.query.get("cursor")
    after = None
    if cursor:
        try:
            after = decode_cursor(cursor)
        except ValueError:
            raise ApiError(422, "invalid", "query parameter 'cursor' is not a valid cursor",
                           field="cursor") from None
    try:
        page = await request.app[STORE].feed(caller.user_id, limit=limit, after=after,
                                             unread_only=unread_only)
    except StoreUnavailable:
        raise _unavailable() from None
    next_cursor = encode_cursor(page.next_position) if page.next_position else None
    return web.json_response({"items": [notification_json(n) for n in page.items],
                              "next_cursor": next_cursor})


# At most this many notifications stored after one (a stream's resume): beyond it
# the reader reloads the feed.
MAX_STORED_AFTER = 500


async def stored_after(request: web.Request) -> web.Response:
    """``GET /v1/notifications/{id}/stored-after?limit=``: the caller's notifications
    stored after that one, oldest first (an internal call: the gateway's stream
    resumes with it; it is not routed to clients)."""
    caller = identity_of(request)
    notification_id = parse_uuid(request.match_info["notification_id"], "notification")
    limit = query_int(request, "limit", MAX_STORED_AFTER, low=1, high=MAX_STORED_AFTER)
    try:
        # One more than asked: whether there are more than ``limit``.
        found = await request.app[STORE].stored_after(caller.user_id, notification_id,
                                                      limit=limit + 1)
    except StoreUnavailable:
        raise _unavailable() from None
    if found is None:
        raise ApiError(404, "not_found", "no such notification")
    return web.json_response({"items": [notification_json(n) for n in found[:limit]],
                              "more": len(found) > limit})


async def mark_read(request: web.Request) -> web.Response:
    """``POST /v1/notifications/{id}/read``: mark one of the caller's notifications read."""
    caller = identity_of(request)
    notification_id = parse_uuid(request.match_info["notification_id"], "notification")
    try:
        notification = await request.app[STORE].mark_read(caller.user_id, notification_id)
    except NotificationNotFound:
        raise ApiError(404, "not_found", "no such notification") from None
    except StoreUnavailable:
        raise _unavailable() from None
    return web.json_response({"notification": notification_json(notification)})


async def mark_all_read(request: web.Request) -> web.Response:
    """``POST /v1/notifications/read-all``: mark all the caller's notifications read."""
    caller = identity_of(request)
    try:
        updated = await request.app[STORE].mark_all_read(caller.user_id)
    except StoreUnavailable:
        raise _unavailable() from None
    return web.json_response({"updated": updated})


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/v1/notifications", list_notifications)
    app.router.add_post("/v1/notifications/read-all", mark_all_read)
    app.router.add_post("/v1/notifications/{notification_id}/read", mark_read)
    app.router.add_get("/v1/notifications/{notification_id}/stored-after", stored_after)
