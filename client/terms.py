"""What the gateway answers about boundaries (docs/api.md, "Office hours, absences and
agreements" and "What sending tells you"), as frozen dataclasses.

Times stay ISO 8601 strings as the server sends them; ``raw`` keeps the whole
answer for ``--json`` output, so fields the server adds later pass through.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Absence:
    id: str
    first_day: str
    last_day: str
    note: str | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Absence:
        return cls(str(data["id"]), data["first_day"], data["last_day"], data.get("note"))

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "first_day": self.first_day, "last_day": self.last_day,
                "note": self.note}


@dataclass(frozen=True, slots=True)
class Availability:
    """A therapist's office hours. ``set`` False: never set, every alert is immediate;
    ``set`` with an empty ``spec``: set to no office hours at all."""

    set: bool
    tz: str | None
    spec: str | None
    absences: tuple[Absence, ...]
    open_now: bool
    next_open: str | None
    version: int
    raw: dict[str, Any] = field(compare=False, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Availability:
        return cls(bool(data["set"]), data.get("tz"), data.get("spec"),
                   tuple(Absence.from_json(a) for a in data.get("absences") or []),
                   bool(data.get("open_now")), data.get("next_open"),
                   int(data.get("version") or 0), data)

    @property
    def empty(self) -> bool:
        return self.set and not self.spec


@dataclass(frozen=True, slots=True)
class QuietHours:
    tz: str
    start: str
    end: str


@dataclass(frozen=True, slots=True)
class Agreement:
    relationship_id: str
    version: int
    checkins_allowed: int | None
    checkin_period: str
    reply_amount: int
    reply_unit: str
    urgent_policy: str
    quiet_hours: QuietHours | None
    crisis_resources: str | None          # the relationship's own text; None: practice default
    crisis_resources_effective: str | None
    raw: dict[str, Any] = field(compare=False, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Agreement:
        window = data.get("reply_window") or {}
        quiet = data.get("client_quiet_hours")
        return cls(
            str(data["relationship_id"]), int(data["version"]), data.get("checkins_allowed"),
            data.get("checkin_period", "week"), int(window.get("amount", 0)),
            window.get("unit", "business_days"), data.get("urgent_policy", "urgent-in-hours"),
            None if not quiet else QuietHours(quiet["tz"], quiet["start"], quiet["end"]),
            data.get("crisis_resources"), data.get("crisis_resources_effective"), data)


@dataclass(frozen=True, slots=True)
class Expectation:
    """What a client is told when a check-in is stored."""

    alert: str                 # "now" | "later" | "never"
    alert_at: str | None
    reason: str
    reply_by: str | None
    used: int
    allowed: int | None
    period: str
    within_agreement: bool
    urgent: bool
    crisis_resources: str | None
    summary: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Expectation:
        return cls(str(data.get("alert", "now")), data.get("alert_at"),
                   str(data.get("reason", "")), data.get("reply_by"), int(data.get("used", 0)),
                   data.get("allowed"), str(data.get("period", "week")),
                   bool(data.get("within_agreement", True)), bool(data.get("urgent")),
                   data.get("crisis_resources"), str(data.get("summary", "")))
