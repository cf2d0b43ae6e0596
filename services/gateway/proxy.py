"""Routes the gateway forwards to messaging and the notifier, as the caller.

The internal services decide what the caller may see; the gateway adds only
what it owns itself: the display names and emails of the people involved.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from services.gateway.accounts import account_json
from services.gateway.auth import identity_for
from services.gateway.typedefs import MESSAGING, NOTIFIER, STORE
from services.gateway.upstream import Upstream, UpstreamResponse
from shared.web import ApiError

# The only client header an internal service needs besides the signed identity.
_FORWARDED_HEADERS = ("Idempotency-Key",)


async def _forward(request: web.Request, upstream: Upstream) -> UpstreamResponse:
    body = await request.read() if request.can_read_body else b""
    if body and request.content_type not in ("application/json", ""):
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    headers = {h: request.headers[h] for h in _FORWARDED_HEADERS if h in request.headers}
    return await upstream.call(request.method, request.path_qs, identity_for(request),
                               raw_body=body, headers=headers)


def _respond(result: UpstreamResponse) -> web.Response:
    if result.raw and result.is_json:
        # Passed on as it came: the internal services answer JSON, and parsing
        # it only to serialise it again costs the busiest route for nothing.
        return web.Response(body=result.raw, status=result.status,
                            content_type="application/json")
    if result.data is None:
        return web.Response(status=result.status)
    return web.json_response(result.data, status=result.status)


async def to_messaging(request: web.Request) -> web.Response:
    return _respond(await _forward(request, request.app[MESSAGING]))


async def to_notifier(request: web.Request) -> web.Response:
    return _respond(await _forward(request, request.app[NOTIFIER]))


async def _people(request: web.Request, ids: set[uuid.UUID]) -> dict[str, dict[str, Any]]:
    accounts = await request.app[STORE].accounts_by_id(sorted(ids))
    return {str(k): account_json(v) for k, v in accounts.items()}


async def _with_people(request: web.Request, rel: dict[str, Any]) -> dict[str, Any]:
    people = await _people(request, {uuid.UUID(rel["therapist_id"]),
                                     uuid.UUID(rel["client_id"])})
    return {**rel, "therapist": people.get(rel["therapist_id"]),
            "client": people.get(rel["client_id"])}


async def relationships(request: web.Request) -> web.Response:
    result = await _forward(request, request.app[MESSAGING])
    if result.status != 200:
        return _respond(result)
    items = result.data["items"]
    ids = {uuid.UUID(r[k]) for r in items for k in ("therapist_id", "client_id")}
    people = await _people(request, ids)
    enriched = [{**r, "therapist": people.get(r["therapist_id"]),
                 "client": people.get(r["client_id"])} for r in items]
    return web.json_response({"items": enriched})


async def relationship(request: web.Request) -> web.Response:
    result = await _forward(request, request.app[MESSAGING])
    if result.status != 200:
        return _respond(result)
    return web.json_response(await _with_people(request, result.data))


async def notifications(request: web.Request) -> web.Response:
    result = await _forward(request, request.app[NOTIFIER])
    if result.status != 200:
        return _respond(result)
    items = result.data["items"]
    people = await _people(request, {uuid.UUID(n["actor_id"]) for n in items
                                     if n.get("actor_id")})
    for item in items:
        actor = people.get(item.get("actor_id") or "")
        item["actor_name"] = actor["display_name"] if actor else None
    return web.json_response(result.data)


def setup_proxy_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/invites", to_messaging)
    r.add_get("/v1/relationships", relationships)
    r.add_get("/v1/relationships/{relationship_id}", relationship)
    r.add_get("/v1/relationships/{relationship_id}/devices", to_messaging)
    r.add_get("/v1/relationships/{relationship_id}/devices/history", to_messaging)
    r.add_put("/v1/devices/{device_id}", to_messaging)
    r.add_post("/v1/relationships/{relationship_id}/messages", to_messaging)
    r.add_get("/v1/relationships/{relationship_id}/messages", to_messaging)
    r.add_get("/v1/availability", to_messaging)
    r.add_put("/v1/availability", to_messaging)
    r.add_get("/v1/availability/absences", to_messaging)
    r.add_post("/v1/availability/absences", to_messaging)
    r.add_delete("/v1/availability/absences/{absence_id}", to_messaging)
    r.add_get("/v1/relationships/{relationship_id}/availability", to_messaging)
    r.add_get("/v1/relationships/{relationship_id}/agreement", to_messaging)
    r.add_put("/v1/relationships/{relationship_id}/agreement", to_messaging)
    r.add_get("/v1/notifications", notifications)
    r.add_post("/v1/notifications/read-all", to_notifier)
    r.add_post("/v1/notifications/{notification_id}/read", to_notifier)
    r.add_get("/v1/channels", to_notifier)
    r.add_post("/v1/channels", to_notifier)
    r.add_put("/v1/channels/{channel_id}", to_notifier)
    r.add_delete("/v1/channels/{channel_id}", to_notifier)
    r.add_post("/v1/channels/{channel_id}/verify", to_notifier)
    r.add_post("/v1/channels/{channel_id}/resend-code", to_notifier)
    r.add_post("/v1/channels/{channel_id}/rotate-secret", to_notifier)
    r.add_get("/v1/deliveries", to_notifier)
