"""Routes for office hours, absences and agreements."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from services.messaging.boundaries_store import Availability, BoundariesStore
from services.messaging.routes import member_relationship, require_role
from services.messaging.store import NotFound
from services.messaging.typedefs import BOUNDARIES, SETTINGS
from shared.boundaries import Agreement
from shared.schedule import QuietHours, ScheduleError, WeeklySchedule
from shared.schedule_time import is_open, next_alert_time
from shared.web import ApiError, identity_of, parse_model, parse_uuid, read_json, read_model


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HoursBody(_Body):
    spec: Annotated[StrictStr, Field(max_length=2000)]
    tz: Annotated[StrictStr, Field(min_length=1, max_length=64)]


class AbsenceBody(_Body):
    first_day: date
    last_day: date
    note: Annotated[StrictStr, Field(max_length=200)] | None = None


class ReplyWindowBody(_Body):
    amount: StrictInt
    unit: Literal["office_hours", "business_days"]


class QuietBody(_Body):
    spec: Annotated[StrictStr, Field(max_length=32)]
    tz: Annotated[StrictStr, Field(min_length=1, max_length=64)]


class AgreementBody(_Body):
    checkins_allowed: StrictInt | None = None
    checkin_period: Literal["week", "day"] | None = None
    reply_window: ReplyWindowBody | None = None
    urgent_policy: Literal["no-urgent", "urgent-in-hours", "urgent-anytime"] | None = None
    client_quiet_hours: QuietBody | None = None
    crisis_resources: Annotated[StrictStr, Field(min_length=1, max_length=2000)] | None = None


def _store(request: web.Request) -> BoundariesStore:
    return request.app[BOUNDARIES]


def availability_json(availability: Availability, now: datetime) -> dict[str, Any]:
    schedule = availability.schedule
    if schedule is None:
        return {"set": False, "tz": None, "spec": None, "windows": [], "absences": [],
                "open_now": True, "next_open": None, "version": availability.version}
    data = schedule.to_json()
    upcoming = next_alert_time(schedule, now)
    return {"set": True, "tz": schedule.tz, "spec": schedule.to_spec(),
            "windows": data["windows"], "absences": data["absences"],
            "open_now": is_open(schedule, now),
            "next_open": None if upcoming is None else upcoming.isoformat(),
            "version": availability.version}


def agreement_json(relationship_id: uuid.UUID, agreement: Agreement, version: int,
                   practice_default: str) -> dict[str, Any]:
    return {"relationship_id": str(relationship_id), "version": version,
            **agreement.to_json(),
            "crisis_resources_effective": agreement.crisis_text(practice_default)}


async def get_own_availability(request: web.Request) -> web.Response:
    identity = identity_of(request)
    require_role(identity, "therapist")
    availability = await _store(request).availability(identity.user_id)
    return web.json_response(availability_json(availability, datetime.now(UTC)))


async def put_hours(request: web.Request) -> web.Response:
    identity = identity_of(request)
    require_role(identity, "therapist")
    body = await read_model(request, HoursBody)
    try:
        schedule = WeeklySchedule.parse(body.spec, body.tz)
    except ScheduleError as exc:
        field = "tz" if "time zone" in str(exc) else "spec"
        raise ApiError(422, "invalid_schedule", str(exc), field=field) from None
    now = datetime.now(UTC)
    availability = await _store(request).set_hours(identity.user_id, schedule, now,
                                                   identity.request_id)
    return web.json_response(availability_json(availability, now))


async def add_absence(request: web.Request) -> web.Response:
    identity = identity_of(request)
    require_role(identity, "therapist")
    body = await read_model(request, AbsenceBody)
    if body.last_day < body.first_day:
        raise ApiError(422, "invalid", "last_day is before first_day", field="last_day")
    try:
        absence, _ = await _store(request).add_absence(
            identity.user_id, body.first_day, body.last_day, body.note, datetime.now(UTC),
            identity.request_id)
    except NotFound as exc:
        raise ApiError(409, "no_hours", str(exc)) from None
    except ValueError as exc:
        raise ApiError(409, "too_many_absences", str(exc)) from None
    return web.json_response(absence.to_json(), status=201)


async def list_absences(request: web.Request) -> web.Response:
    identity = identity_of(request)
    require_role(identity, "therapist")
    availability = await _store(request).availability(identity.user_id)
    schedule = availability.schedule
    items = [] if schedule is None else [a.to_json() for a in schedule.absences]
    return web.json_response({"items": items})


async def remove_absence(request: web.Request) -> web.Response:
    identity = identity_of(request)
    require_role(identity, "therapist")
    absence_id = parse_uuid(request.match_info["absence_id"], "absence")
    try:
        await _store(request).remove_absence(identity.user_id, absence_id, datetime.now(UTC),
                                             identity.request_id)
    except NotFound:
        raise ApiError(404, "not_found", "no such absence") from None
    return web.Response(status=204)


async def relationship_availability(request: web.Request) -> web.Response:
    rel = await member_relationship(request)
    availability = await _store(request).availability(rel.therapist_id)
    return web.json_response(availability_json(availability, datetime.now(UTC)))


async def get_agreement(request: web.Request) -> web.Response:
    rel = await member_relationship(request)
    agreement, version = await _store(request).agreement(rel.id)
    return web.json_response(agreement_json(rel.id, agreement, version,
                                            request.app[SETTINGS].crisis_resources))


async def put_agreement(request: web.Request) -> web.Response:
    identity = identity_of(request)
    require_role(identity, "therapist")
    rel = await member_relationship(request)
    raw = await read_json(request)
    body = parse_model(AgreementBody, raw)
    current, _ = await _store(request).agreement(rel.id)
    changes: dict[str, Any] = {}
    given = set(raw) if isinstance(raw, dict) else set()
    if "checkins_allowed" in given:
        changes["checkins_allowed"] = body.checkins_allowed
    if body.checkin_period is not None:
        changes["checkin_period"] = body.checkin_period
    if body.reply_window is not None:
        changes["reply_window_amount"] = body.reply_window.amount
        changes["reply_window_unit"] = body.reply_window.unit
    if body.urgent_policy is not None:
        changes["urgent_policy"] = body.urgent_policy
    if "client_quiet_hours" in given:
        quiet = body.client_quiet_hours
        try:
            changes["client_quiet_hours"] = None if quiet is None else QuietHours.parse(
                quiet.spec, quiet.tz)
        except ScheduleError as exc:
            raise ApiError(422, "invalid", str(exc), field="client_quiet_hours") from None
    if "crisis_resources" in given:
        changes["crisis_resources"] = body.crisis_resources
    try:
        agreement = dataclasses.replace(current, **changes)
    except ValueError as exc:
        raise ApiError(422, "invalid", str(exc)) from None
    version = await _store(request).set_agreement(rel, agreement, identity.request_id)
    return web.json_response(agreement_json(rel.id, agreement, version,
                                            request.app[SETTINGS].crisis_resources))


def setup_boundary_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v1/availability", get_own_availability)
    r.add_put("/v1/availability", put_hours)
    r.add_get("/v1/availability/absences", list_absences)
    r.add_post("/v1/availability/absences", add_absence)
    r.add_delete("/v1/availability/absences/{absence_id}", remove_absence)
    r.add_get("/v1/relationships/{relationship_id}/availability", relationship_availability)
    r.add_get("/v1/relationships/{relationship_id}/agreement", get_agreement)
    r.add_put("/v1/relationships/{relationship_id}/agreement", put_agreement)
