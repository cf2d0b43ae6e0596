"""SQL for office hours, absences and agreements (owned by messaging).

Every change announces the new state through the outbox in the same
transaction: ``availability.updated`` carries the therapist's whole schedule
(absence notes left out), ``agreement.updated`` the relationship's terms
(crisis text left out). Each carries a version so a reader keeps the newest.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import asyncpg

from services.messaging.store import NotFound, Relationship, add_event, save_agreement
from shared.boundaries import Agreement, reply_release_time
from shared.events import AVAILABILITY_UPDATED, AvailabilityEventData
from shared.schedule import Absence, WeeklySchedule

MAX_ABSENCES = 200


@dataclass(frozen=True, slots=True)
class Availability:
    therapist_id: uuid.UUID
    schedule: WeeklySchedule | None   # None: no office hours set yet
    version: int


def availability_from_rows(therapist_id: uuid.UUID, row: Mapping[str, Any] | None,
                           absences: Sequence[Mapping[str, Any]]) -> Availability:
    """The therapist's availability from its row (None: no hours set) and absences."""
    if row is None:
        return Availability(therapist_id, None, 0)
    schedule = WeeklySchedule.from_json({
        "tz": row["tz"], "windows": row["windows"],
        "absences": [{"id": str(a["id"]), "first_day": a["first_day"].isoformat(),
                      "last_day": a["last_day"].isoformat(), "note": a["note"]}
                     for a in absences],
    })
    return Availability(therapist_id, schedule, row["version"])


async def _load_availability(conn: asyncpg.Connection,
                             therapist_id: uuid.UUID) -> Availability:
    row = await conn.fetchrow("SELECT * FROM messaging.availability WHERE therapist_id = $1",
                              therapist_id)
    absences = await conn.fetch(
        "SELECT id, first_day, last_day, note FROM messaging.absences"
        " WHERE therapist_id = $1 ORDER BY first_day, id", therapist_id)
    return availability_from_rows(therapist_id, row, absences)


async def _announce_availability(conn: asyncpg.Connection, therapist_id: uuid.UUID,
                                 now: datetime, correlation_id: str) -> Availability:
    """Bump the version, publish the new schedule, and re-time held replies."""
    version = await conn.fetchval(
        "UPDATE messaging.availability SET version = version + 1, updated_at = $2"
        " WHERE therapist_id = $1 RETURNING version", therapist_id, now)
    if version is None:
        # Absences before any hours: record an empty week so there is a version.
        raise NotFound("set office hours before adding absences")
    availability = await _load_availability(conn, therapist_id)
    schedule = availability.schedule
    await add_event(conn, AVAILABILITY_UPDATED, AvailabilityEventData(
        therapist_id=therapist_id, version=version,
        schedule=None if schedule is None else schedule.to_json(include_notes=False),
    ), correlation_id)
    # Replies held for the next window follow the new hours (never later than before).
    held = await conn.fetch(
        "SELECT id, visible_at FROM messaging.messages WHERE sender_id = $1 AND kind = 'reply'"
        " AND visible_at > $2 FOR UPDATE", therapist_id, now)
    for row in held:
        release = reply_release_time(schedule, now, deliver_now=False)
        if release < row["visible_at"]:
            await conn.execute("UPDATE messaging.messages SET visible_at = $2 WHERE id = $1",
                               row["id"], release)
    return availability


class BoundariesStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def availability(self, therapist_id: uuid.UUID) -> Availability:
        async with self.pool.acquire() as conn:
            return await _load_availability(conn, therapist_id)

    async def set_hours(self, therapist_id: uuid.UUID, schedule: WeeklySchedule, now: datetime,
                        correlation_id: str) -> Availability:
        windows = schedule.to_json()["windows"]
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO messaging.availability (therapist_id, tz, windows, version)"
                " VALUES ($1, $2, $3, 0) ON CONFLICT (therapist_id) DO UPDATE"
                " SET tz = EXCLUDED.tz, windows = EXCLUDED.windows",
                therapist_id, schedule.tz, windows)
            return await _announce_availability(conn, therapist_id, now, correlation_id)

    async def add_absence(self, therapist_id: uuid.UUID, first_day: date, last_day: date,
                          note: str | None, now: datetime,
                          correlation_id: str) -> tuple[Absence, Availability]:
        absence_id = uuid.uuid4()
        async with self.pool.acquire() as conn, conn.transaction():
            count = await conn.fetchval(
                "SELECT count(*) FROM messaging.absences WHERE therapist_id = $1", therapist_id)
            if count >= MAX_ABSENCES:
                raise ValueError(f"at most {MAX_ABSENCES} absences; remove old ones first")
            await conn.execute(
                "INSERT INTO messaging.absences (id, therapist_id, first_day, last_day, note)"
                " VALUES ($1, $2, $3, $4, $5)", absence_id, therapist_id, first_day, last_day,
                note)
            availability = await _announce_availability(conn, therapist_id, now, correlation_id)
        return Absence(str(absence_id), first_day, last_day, note), availability

    async def remove_absence(self, therapist_id: uuid.UUID, absence_id: uuid.UUID,
                             now: datetime, correlation_id: str) -> Availability:
        async with self.pool.acquire() as conn, conn.transaction():
            deleted = await conn.fetchval(
                "DELETE FROM messaging.absences WHERE id = $1 AND therapist_id = $2 RETURNING id",
                absence_id, therapist_id)
            if deleted is None:
                raise NotFound("no such absence")
            return await _announce_availability(conn, therapist_id, now, correlation_id)

    async def agreement(self, relationship_id: uuid.UUID) -> tuple[Agreement, int]:
        row = await self.pool.fetchrow(
            "SELECT terms, version FROM messaging.agreements WHERE relationship_id = $1",
            relationship_id)
        if row is None:
            return Agreement(), 0
        return Agreement.from_json(row["terms"]), row["version"]

    async def set_agreement(self, relationship: Relationship, agreement: Agreement,
                            correlation_id: str) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            return await save_agreement(conn, relationship, agreement, correlation_id)
