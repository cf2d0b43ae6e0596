"""The agreement between a therapist and a client, and the pure rules built on it.

Every rule takes ``now`` from its caller; nothing here reads the clock. A
``schedule`` of ``None`` means the therapist has not set office hours yet: then
every alert is immediate and time counts as plain wall time, which is what
Interlude did before office hours existed and what a new therapist expects
until they set them.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, time, timedelta
from typing import Any, Literal, cast

from shared.schedule import QuietHours, ScheduleError, WeeklySchedule
from shared.schedule_parse import load_zone
from shared.schedule_time import (
    add_business_days,
    add_office_time,
    is_open,
    next_alert_time,
    office_windows_between,
    quiet_until,
)

Period = Literal["week", "day"]
ReplyUnit = Literal["office_hours", "business_days"]
UrgentPolicy = Literal["no-urgent", "urgent-in-hours", "urgent-anytime"]
PERIODS: tuple[Period, ...] = ("week", "day")
REPLY_UNITS: tuple[ReplyUnit, ...] = ("office_hours", "business_days")
URGENT_POLICIES: tuple[UrgentPolicy, ...] = ("no-urgent", "urgent-in-hours", "urgent-anytime")
MAX_CRISIS_TEXT = 2000

DEFAULT_CRISIS_RESOURCES = (
    "If you are in danger or cannot keep yourself safe, call your local emergency "
    "number now. If you need to talk to someone before your therapist replies, "
    "contact a crisis line in your country (in the EU dial 112; in the US call or "
    "text 988)."
)


@dataclasses.dataclass(frozen=True)
class Agreement:
    """What a therapist and a client agreed; set by the therapist, seen by both."""

    checkins_allowed: int | None = 3          # per period; None: no limit
    checkin_period: Period = "week"
    reply_window_amount: int = 2
    reply_window_unit: ReplyUnit = "business_days"
    urgent_policy: UrgentPolicy = "urgent-in-hours"
    client_quiet_hours: QuietHours | None = None
    crisis_resources: str | None = None       # None: the practice default

    def __post_init__(self) -> None:
        if self.checkins_allowed is not None and not 0 <= self.checkins_allowed <= 1000:
            raise ValueError("checkins_allowed must be between 0 and 1000")
        if self.checkin_period not in PERIODS:
            raise ValueError(f"checkin_period must be one of {', '.join(PERIODS)}")
        if self.reply_window_unit not in REPLY_UNITS:
            raise ValueError(f"reply window unit must be one of {', '.join(REPLY_UNITS)}")
        limit = 2000 if self.reply_window_unit == "office_hours" else 60
        if not 1 <= self.reply_window_amount <= limit:
            raise ValueError(f"reply window must be between 1 and {limit} "
                             f"{self.reply_window_unit.replace('_', ' ')}")
        if self.urgent_policy not in URGENT_POLICIES:
            raise ValueError(f"urgent policy must be one of {', '.join(URGENT_POLICIES)}")
        if self.crisis_resources is not None and not (
                0 < len(self.crisis_resources) <= MAX_CRISIS_TEXT):
            raise ValueError(f"crisis resources must be 1 to {MAX_CRISIS_TEXT} characters")

    def to_json(self) -> dict[str, Any]:
        return {
            "checkins_allowed": self.checkins_allowed,
            "checkin_period": self.checkin_period,
            "reply_window": {"amount": self.reply_window_amount, "unit": self.reply_window_unit},
            "urgent_policy": self.urgent_policy,
            "client_quiet_hours": None if self.client_quiet_hours is None
            else self.client_quiet_hours.to_json(),
            "crisis_resources": self.crisis_resources,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Agreement:
        """The inverse of :meth:`to_json`; ValueError on anything malformed."""
        try:
            return cls._from_json(data)
        except (TypeError, AttributeError, KeyError) as exc:
            raise ValueError(f"malformed agreement: {exc}") from None

    @classmethod
    def _from_json(cls, data: dict[str, Any]) -> Agreement:
        quiet = data.get("client_quiet_hours")
        window = data.get("reply_window") or {}
        return cls(
            checkins_allowed=data.get("checkins_allowed"),
            checkin_period=cast(Period, data.get("checkin_period", "week")),
            reply_window_amount=int(window.get("amount", 2)),
            reply_window_unit=cast(ReplyUnit, window.get("unit", "business_days")),
            urgent_policy=cast(UrgentPolicy, data.get("urgent_policy", "urgent-in-hours")),
            client_quiet_hours=None if quiet is None else QuietHours.from_json(quiet),
            crisis_resources=data.get("crisis_resources"),
        )

    def crisis_text(self, practice_default: str = DEFAULT_CRISIS_RESOURCES) -> str:
        return self.crisis_resources or practice_default


def period_start(agreement: Agreement, schedule: WeeklySchedule | None,
                 now: datetime) -> datetime:
    """Start of the current check-in period: local midnight of today or of this
    week's Monday, in the therapist's zone (UTC when no hours are set)."""
    return period_start_in(schedule.tz if schedule is not None else None,
                           agreement.checkin_period, now)


def period_start_in(tz: str | None, period: Period, now: datetime) -> datetime:
    """:func:`period_start` from the zone's name (None: UTC) and the period."""
    zone = load_zone(tz) if tz is not None else UTC
    local = now.astimezone(zone)
    day = local.date()
    if period == "week":
        day -= timedelta(days=day.weekday())
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def reply_by(schedule: WeeklySchedule | None, agreement: Agreement,
             received_at: datetime) -> datetime | None:
    """When a reply is due; None when the therapist has no office time ahead."""
    amount = agreement.reply_window_amount
    if schedule is None:
        step = timedelta(hours=amount) if agreement.reply_window_unit == "office_hours" \
            else timedelta(days=amount)
        return received_at.astimezone(UTC) + step
    if agreement.reply_window_unit == "office_hours":
        return add_office_time(schedule, received_at, timedelta(hours=amount))
    return add_business_days(schedule, received_at, amount)


def reminder_time(schedule: WeeklySchedule | None, received_at: datetime,
                  due: datetime) -> datetime:
    """When to remind the therapist of an unanswered check-in: once three quarters
    of the office time between receipt and the reply-by time has passed."""
    if schedule is None:
        return received_at + (due - received_at) * 3 / 4
    total = sum((end - start for start, end in office_windows_between(schedule, received_at, due)),
                timedelta())
    at = add_office_time(schedule, received_at, total * 3 / 4)
    return due if at is None else at


@dataclasses.dataclass(frozen=True)
class CheckinPlan:
    """When the therapist is alerted about one check-in."""

    alert_at: datetime | None   # None: no office time ahead; held until the hours change
    immediate: bool
    reason: Literal["no_hours_set", "in_hours", "urgent", "outside_hours", "beyond_agreement",
                    "no_office_hours"]

    @property
    def held(self) -> bool:
        return not self.immediate


def _next_digest_time(schedule: WeeklySchedule, now: datetime) -> datetime | None:
    """For a check-in beyond the agreement that arrives inside office hours: the
    next opening after the current stretch of office time, or the first office
    time of the next local day, whichever comes first (so hours that never close,
    or close only briefly around midnight, still bring a digest once a day)."""
    stretch = office_windows_between(schedule, now, now + timedelta(days=2))
    after_stretch = next_alert_time(schedule, stretch[0][1]) if stretch else None
    zone = load_zone(schedule.tz)
    tomorrow = datetime.combine(now.astimezone(zone).date() + timedelta(days=1), time(0),
                                tzinfo=zone).astimezone(UTC)
    next_day = next_alert_time(schedule, tomorrow)
    candidates = [t for t in (after_stretch, next_day) if t is not None]
    return min(candidates) if candidates else None


def plan_checkin_alert(schedule: WeeklySchedule | None, agreement: Agreement, now: datetime,
                       *, urgent: bool, beyond: bool) -> CheckinPlan:
    now = now.astimezone(UTC)
    urgent = urgent and agreement.urgent_policy != "no-urgent"
    if schedule is None:
        return CheckinPlan(now, True, "no_hours_set")
    if urgent and agreement.urgent_policy == "urgent-anytime":
        return CheckinPlan(now, True, "urgent")
    if is_open(schedule, now):
        if not beyond:
            return CheckinPlan(now, True, "in_hours")
        if urgent:
            return CheckinPlan(now, True, "urgent")
        return CheckinPlan(_next_digest_time(schedule, now), False, "beyond_agreement")
    at = next_alert_time(schedule, now)
    if at is None:
        return CheckinPlan(None, False, "no_office_hours")
    return CheckinPlan(at, False, "beyond_agreement" if beyond else "outside_hours")


def reply_release_time(schedule: WeeklySchedule | None, now: datetime, *,
                       deliver_now: bool) -> datetime:
    """When a reply reaches the client: now inside office hours (or when the
    therapist sends it explicitly now), else at the opening of the next window."""
    now = now.astimezone(UTC)
    if deliver_now or schedule is None or is_open(schedule, now):
        return now
    at = next_alert_time(schedule, now)
    # With no office time ahead at all there is nothing to wait for.
    return now if at is None else at


def client_alert_time(agreement: Agreement, released_at: datetime) -> datetime:
    """When the client is alerted to a released reply: after their quiet hours."""
    if agreement.client_quiet_hours is None:
        return released_at
    return quiet_until(agreement.client_quiet_hours, released_at)


@dataclasses.dataclass(frozen=True)
class Expectation:
    """What a client is told at the moment of sending a check-in."""

    plan: CheckinPlan
    reply_by: datetime | None
    used: int
    allowed: int | None
    period: Period
    urgent: bool
    crisis_resources: str | None
    therapist_tz: str | None

    @property
    def within_agreement(self) -> bool:
        return self.allowed is None or self.used <= self.allowed

    def summary(self) -> str:
        def when(at: datetime) -> str:
            zone = load_zone(self.therapist_tz) if self.therapist_tz else UTC
            return at.astimezone(zone).strftime("%a %d %b %Y, %H:%M %Z")

        parts = []
        if self.plan.immediate:
            parts.append("Your therapist is being alerted now.")
        elif self.plan.alert_at is None:
            parts.append("Your therapist has no office hours ahead: no one will be alerted "
                         "to this check-in until they set new hours.")
        else:
            parts.append(f"Your therapist will be alerted at {when(self.plan.alert_at)}, "
                         "when their office hours next open.")
        if self.reply_by is not None:
            parts.append(f"Expect a reply by {when(self.reply_by)}.")
        if self.allowed is not None:
            parts.append(f"This is check-in {self.used} of {self.allowed} agreed this "
                         f"{self.period}" + ("." if self.within_agreement else
                                            "; it is beyond the agreement, so it waits for "
                                            "your therapist's next digest."))
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        def iso(at: datetime | None) -> str | None:
            return None if at is None else at.isoformat()

        return {
            "alert": "now" if self.plan.immediate else (
                "never" if self.plan.alert_at is None else "later"),
            "alert_at": iso(self.plan.alert_at),
            "reason": self.plan.reason,
            "reply_by": iso(self.reply_by),
            "used": self.used,
            "allowed": self.allowed,
            "period": self.period,
            "within_agreement": self.within_agreement,
            "urgent": self.urgent,
            "crisis_resources": self.crisis_resources,
            "summary": self.summary(),
        }


def expectation_for_checkin(schedule: WeeklySchedule | None, agreement: Agreement,
                            now: datetime, *, used: int, urgent: bool,
                            practice_crisis_text: str = DEFAULT_CRISIS_RESOURCES
                            ) -> Expectation:
    """``used`` counts this check-in too (the first of the period is 1)."""
    beyond = agreement.checkins_allowed is not None and used > agreement.checkins_allowed
    plan = plan_checkin_alert(schedule, agreement, now, urgent=urgent, beyond=beyond)
    due = reply_by(schedule, agreement, now)
    crisis = agreement.crisis_text(practice_crisis_text) if (plan.held or urgent) else None
    return Expectation(plan, due, used, agreement.checkins_allowed, agreement.checkin_period,
                       urgent, crisis, schedule.tz if schedule is not None else None)


__all__ = [
    "DEFAULT_CRISIS_RESOURCES", "Agreement", "CheckinPlan", "Expectation", "ScheduleError",
    "client_alert_time", "expectation_for_checkin", "period_start", "period_start_in",
    "plan_checkin_alert", "reminder_time", "reply_by", "reply_release_time",
]
