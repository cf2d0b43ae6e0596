"""The pure rules between an agreement, office hours and an injected now."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from shared.boundaries import (
    Agreement,
    client_alert_time,
    expectation_for_checkin,
    period_start,
    plan_checkin_alert,
    reminder_time,
    reply_by,
    reply_release_time,
)
from shared.schedule import QuietHours, WeeklySchedule

BERLIN = WeeklySchedule.parse("Mon-Thu 09:00-12:00,14:00-17:00; Fri 09:00-13:00",
                              "Europe/Berlin")
# Wednesday 2 December 2026; Berlin is UTC+1.
WED_10 = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)    # 10:00 local: open
WED_13 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)   # 13:00 local: lunch, closed
FRI_20 = datetime(2026, 12, 4, 19, 0, tzinfo=UTC)   # 20:00 local Friday: closed
DEFAULT = Agreement()


def test_inside_hours_and_within_the_agreement_alerts_now() -> None:
    plan = plan_checkin_alert(BERLIN, DEFAULT, WED_10, urgent=False, beyond=False)
    assert plan.immediate
    assert plan.alert_at == WED_10
    assert plan.reason == "in_hours"


def test_outside_hours_waits_for_the_next_window() -> None:
    plan = plan_checkin_alert(BERLIN, DEFAULT, WED_13, urgent=False, beyond=False)
    assert plan.held
    assert plan.alert_at == datetime(2026, 12, 2, 13, 0, tzinfo=UTC)  # 14:00 local
    weekend = plan_checkin_alert(BERLIN, DEFAULT, FRI_20, urgent=False, beyond=False)
    assert weekend.alert_at == datetime(2026, 12, 7, 8, 0, tzinfo=UTC)  # Monday 09:00


def test_beyond_the_agreement_inside_hours_waits_for_the_next_opening() -> None:
    plan = plan_checkin_alert(BERLIN, DEFAULT, WED_10, urgent=False, beyond=True)
    assert plan.held
    assert plan.reason == "beyond_agreement"
    assert plan.alert_at == datetime(2026, 12, 2, 13, 0, tzinfo=UTC)


@pytest.mark.parametrize(("policy", "at", "immediate"), [
    ("urgent-anytime", FRI_20, True),
    ("urgent-in-hours", FRI_20, False),
    ("urgent-in-hours", WED_10, True),
    ("no-urgent", FRI_20, False),
])
def test_urgent_follows_the_policy(policy: str, at: datetime, immediate: bool) -> None:
    agreement = Agreement(urgent_policy=policy)  # type: ignore[arg-type]
    plan = plan_checkin_alert(BERLIN, agreement, at, urgent=True, beyond=True)
    assert plan.immediate is immediate


def test_no_hours_set_alerts_at_once_and_empty_hours_never() -> None:
    assert plan_checkin_alert(None, DEFAULT, FRI_20, urgent=False, beyond=False).immediate
    empty = WeeklySchedule.parse("", "Europe/Berlin")
    plan = plan_checkin_alert(empty, DEFAULT, FRI_20, urgent=False, beyond=False)
    assert plan.alert_at is None
    assert plan.reason == "no_office_hours"


def test_reply_by_counts_office_time_or_business_days() -> None:
    hours = Agreement(reply_window_amount=4, reply_window_unit="office_hours")
    # Friday 20:00: Monday 09:00-12:00 is 3 h, then 1 h from 14:00 -> Monday 15:00 local.
    assert reply_by(BERLIN, hours, FRI_20) == datetime(2026, 12, 7, 14, 0, tzinfo=UTC)
    days = Agreement(reply_window_amount=2, reply_window_unit="business_days")
    # Wednesday: Thursday is day 1, Friday day 2, ending 13:00 local.
    assert reply_by(BERLIN, days, WED_10) == datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    assert reply_by(None, days, WED_10) == WED_10 + timedelta(days=2)


def test_reminder_comes_in_the_last_quarter_of_office_time() -> None:
    due = datetime(2026, 12, 7, 14, 0, tzinfo=UTC)  # 4 office hours after Friday 20:00
    # Three office hours in: Monday 12:00 local, the end of the morning window.
    assert reminder_time(BERLIN, FRI_20, due) == datetime(2026, 12, 7, 11, 0, tzinfo=UTC)
    assert reminder_time(None, WED_10, WED_10 + timedelta(hours=8)) == WED_10 + timedelta(
        hours=6)


def test_replies_wait_for_office_hours_unless_sent_now_and_respect_quiet_hours() -> None:
    assert reply_release_time(BERLIN, WED_10, deliver_now=False) == WED_10
    assert reply_release_time(BERLIN, FRI_20, deliver_now=True) == FRI_20
    monday = reply_release_time(BERLIN, FRI_20, deliver_now=False)
    assert monday == datetime(2026, 12, 7, 8, 0, tzinfo=UTC)
    quiet = Agreement(client_quiet_hours=QuietHours.parse("21:00-08:00", "America/New_York"))
    # Monday 09:00 Berlin is 03:00 in New York: the client hears at 08:00 there.
    assert client_alert_time(quiet, monday) == datetime(2026, 12, 7, 13, 0, tzinfo=UTC)
    assert client_alert_time(DEFAULT, monday) == monday


def test_period_starts_at_local_midnight_of_the_day_or_monday() -> None:
    assert period_start(DEFAULT, BERLIN, WED_10) == datetime(2026, 11, 29, 23, 0, tzinfo=UTC)
    daily = Agreement(checkin_period="day")
    assert period_start(daily, BERLIN, WED_10) == datetime(2026, 12, 1, 23, 0, tzinfo=UTC)
    assert period_start(daily, None, WED_10) == datetime(2026, 12, 2, tzinfo=UTC)


def test_expectation_tells_the_truth_and_crisis_resources_when_not_prompt() -> None:
    prompt = expectation_for_checkin(BERLIN, DEFAULT, WED_10, used=1, urgent=False)
    assert prompt.to_json()["alert"] == "now"
    assert prompt.crisis_resources is None
    assert "check-in 1 of 3 agreed this week." in prompt.summary()
    late = expectation_for_checkin(BERLIN, DEFAULT, FRI_20, used=4, urgent=False)
    told = late.to_json()
    assert told["alert"] == "later"
    assert told["within_agreement"] is False
    assert told["crisis_resources"]
    assert "Mon 07 Dec 2026, 09:00 CET" in told["summary"]
    assert "beyond the agreement" in told["summary"]
    custom = Agreement(crisis_resources="Call the practice line.")
    urgent = expectation_for_checkin(BERLIN, custom, WED_10, used=1, urgent=True)
    assert urgent.crisis_resources == "Call the practice line."
    none = expectation_for_checkin(WeeklySchedule.parse("", "UTC"), DEFAULT, WED_10, used=1,
                                   urgent=False)
    assert none.to_json()["alert"] == "never"
    assert "no one will be alerted" in none.summary()


def test_agreement_round_trips_and_refuses_nonsense() -> None:
    agreement = Agreement(checkins_allowed=None, checkin_period="day", reply_window_amount=8,
                          reply_window_unit="office_hours", urgent_policy="urgent-anytime",
                          client_quiet_hours=QuietHours.parse("22:00-07:00", "UTC"),
                          crisis_resources="x")
    assert Agreement.from_json(agreement.to_json()) == agreement
    with pytest.raises(ValueError, match="reply window"):
        Agreement(reply_window_amount=0)
    with pytest.raises(ValueError, match="urgent policy"):
        Agreement(urgent_policy="sometimes")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [
    {"reply_window": 5}, {"client_quiet_hours": 7}, {"checkins_allowed": "x"}, [],
])
def test_malformed_agreement_json_is_one_kind_of_error(bad: object) -> None:
    with pytest.raises(ValueError, match=r"agreement|must|checkins"):
        Agreement.from_json(bad)  # type: ignore[arg-type]


def test_beyond_the_agreement_in_hours_that_never_close_waits_for_the_next_day() -> None:
    always = WeeklySchedule.parse("Mon-Sun 00:00-24:00", "Europe/Berlin")
    plan = plan_checkin_alert(always, DEFAULT, WED_10, urgent=False, beyond=True)
    assert plan.alert_at == datetime(2026, 12, 2, 23, 0, tzinfo=UTC)  # Thursday 00:00 local
    late = WeeklySchedule.parse("Mon-Sun 20:00-02:00", "UTC")
    at = datetime(2026, 12, 2, 21, 0, tzinfo=UTC)
    assert plan_checkin_alert(late, DEFAULT, at, urgent=False, beyond=True).alert_at == (
        datetime(2026, 12, 3, 0, 0, tzinfo=UTC))
