"""Office hours, absences and quiet hours: explicit cases, DST days included."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from shared.schedule import Absence, QuietHours, ScheduleError, WeeklySchedule, Window
from shared.schedule_time import (
    add_business_days,
    add_office_time,
    is_open,
    is_quiet,
    next_alert_time,
    office_windows_between,
    quiet_until,
)

WEEKDAYS = "Mon-Thu 09:00-12:00,14:00-17:00; Fri 09:00-13:00"


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def local(
    tz: str, year: int, month: int, day: int, hour: int = 0, minute: int = 0, *, fold: int = 0
) -> datetime:
    """The UTC instant of a local wall time (``fold=1`` for the second of a repeated hour)."""
    return datetime(year, month, day, hour, minute, tzinfo=ZoneInfo(tz), fold=fold).astimezone(UTC)


def only_window(schedule: WeeklySchedule, day: date) -> tuple[datetime, datetime]:
    """The single open interval on local ``day`` (searched over a generous UTC span)."""
    start = datetime.combine(day, time(0), UTC) - timedelta(days=1)
    intervals = office_windows_between(schedule, start, start + timedelta(days=3))
    [interval] = [i for i in intervals if i[0].astimezone(ZoneInfo(schedule.tz)).date() == day]
    return interval


def total(intervals: list[tuple[datetime, datetime]]) -> timedelta:
    return sum((end - start for start, end in intervals), timedelta(0))


# --- parsing -------------------------------------------------------------------


def test_parse_the_cli_syntax() -> None:
    schedule = WeeklySchedule.parse(WEEKDAYS, "Europe/Berlin")
    assert schedule.tz == "Europe/Berlin"
    assert len(schedule.windows) == 9
    assert schedule.windows[0] == Window(0, time(9), time(12))
    assert schedule.windows[-1] == Window(4, time(9), time(13))
    assert schedule.to_spec() == WEEKDAYS


@pytest.mark.parametrize(("spec", "canonical"), [
    ("", ""),
    ("   ", ""),
    ("mon,WED 9:00-12:00", "Mon,Wed 09:00-12:00"),
    ("Mon 14:00-17:00; Mon 09:00-12:00", "Mon 09:00-12:00,14:00-17:00"),
    ("Mon-Sun 00:00-24:00", "Mon-Sun 00:00-24:00"),
    ("Sat 22:00-02:00", "Sat 22:00-02:00"),
    ("Fri-Mon 10:00-11:00", "Mon,Fri-Sun 10:00-11:00"),
    ("Sat,Sun 10:00-11:00;", "Sat,Sun 10:00-11:00"),
    (" Tue , Thu  08:00 - 09:30 , 18:00-24:00 ", "Tue,Thu 08:00-09:30,18:00-24:00"),
    ("Mon-Wed 09:00-10:00; Fri 09:00-10:00", "Mon-Wed,Fri 09:00-10:00"),
    ("Sun 23:00-00:00", "Sun 23:00-24:00"),
])
def test_spec_round_trips_to_canonical_form(spec: str, canonical: str) -> None:
    schedule = WeeklySchedule.parse(spec, "UTC")
    assert schedule.to_spec() == canonical
    assert WeeklySchedule.parse(canonical, "UTC") == schedule


def test_24_00_end_and_whole_day_window() -> None:
    [window] = WeeklySchedule.parse("Tue 00:00-24:00", "UTC").windows
    assert window == Window(1, time(0), time(0))
    schedule = WeeklySchedule.parse("Tue 00:00-24:00", "UTC")
    assert office_windows_between(schedule, utc(2026, 1, 5), utc(2026, 1, 12)) == [
        (utc(2026, 1, 6), utc(2026, 1, 7))
    ]


@pytest.mark.parametrize(("spec", "tz", "message"), [
    ("Mnd 09:00-12:00", "UTC", """unknown day 'Mnd' in "Mnd 09:00-12:00\""""),
    ("Mon-Frj 09:00-12:00", "UTC", "unknown day 'Frj'"),
    ("Mon,,Tue 09:00-12:00", "UTC", "missing day in"),
    ("Mon 12:00-12:00", "UTC", 'end 12:00 must differ from start 12:00 in "Mon 12:00-12:00"'),
    ("Mon 00:00-00:00", "UTC", "end 00:00 must differ from start 00:00"),
    ("Mon 09:00-12:00", "Europe/Berln", "unknown time zone 'Europe/Berln'"),
    ("Mon 09:00-12:00", "", "unknown time zone ''"),
    ("Mon 09:00-12:00", "../etc/passwd", "unknown time zone"),
    ("Mon 09:00-12:00", "Europe", "unknown time zone 'Europe'"),
    ("Mon 09:00-12:00,11:00-13:00", "UTC",
     "overlapping windows Mon 09:00-12:00 and Mon 11:00-13:00"),
    ("Sun 22:00-02:00; Mon 01:00-03:00", "UTC",
     "overlapping windows Sun 22:00-02:00 and Mon 01:00-03:00"),
    ("Mon,Mon 09:00-10:00", "UTC", "overlapping windows Mon 09:00-10:00 and Mon 09:00-10:00"),
    ("Mon 25:00-26:00", "UTC", """bad time '25:00' in "Mon 25:00-26:00\""""),
    ("Mon 09:60-10:00", "UTC", "bad time '09:60'"),
    ("Mon 24:00-02:00", "UTC", "24:00 is only allowed as an end"),
    ("Mon 0900-1200", "UTC", "bad window '0900-1200'"),
    ("Mon 09:00", "UTC", "bad window '09:00'"),
    ("Mon", "UTC", 'missing times after the days in "Mon"'),
    ("09:00-12:00", "UTC", "missing days before the times"),
    ("Mon 09:00-12:00; Tue 9-10", "UTC", """bad window '9-10' in "Tue 9-10\""""),
])
def test_parse_errors_name_the_bad_part(spec: str, tz: str, message: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        WeeklySchedule.parse(spec, tz)
    assert message in str(caught.value)


def test_schedule_error_is_a_value_error() -> None:
    assert issubclass(ScheduleError, ValueError)


def test_touching_windows_are_allowed_and_merged_in_office_time() -> None:
    schedule = WeeklySchedule.parse("Mon 09:00-12:00,12:00-13:00", "UTC")
    assert office_windows_between(schedule, utc(2026, 1, 5), utc(2026, 1, 6)) == [
        (utc(2026, 1, 5, 9), utc(2026, 1, 5, 13))
    ]
    week = WeeklySchedule.parse("Sun 22:00-24:00; Mon 00:00-01:00", "UTC")
    assert office_windows_between(week, utc(2026, 1, 4), utc(2026, 1, 6)) == [
        (utc(2026, 1, 4, 22), utc(2026, 1, 5, 1))
    ]


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ScheduleError, match="weekday must be 0"):
        Window(7, time(9), time(10))
    with pytest.raises(ScheduleError, match="whole minutes"):
        Window(0, time(9, 0, 30), time(10))
    with pytest.raises(ScheduleError, match="end 09:00 must differ from start 09:00 in Mon"):
        Window(0, time(9), time(9))
    with pytest.raises(ScheduleError, match="before its first day"):
        Absence(None, date(2026, 1, 2), date(2026, 1, 1))
    with pytest.raises(ScheduleError, match="overlapping windows"):
        WeeklySchedule("UTC", (Window(0, time(9), time(12)), Window(0, time(11), time(13))))
    # Windows and absences are sorted, so equal schedules compare equal.
    a, b = Window(0, time(14), time(15)), Window(0, time(9), time(10))
    assert WeeklySchedule("UTC", (a, b)) == WeeklySchedule("UTC", (b, a))


def test_json_round_trip_through_text() -> None:
    schedule = WeeklySchedule.parse(
        WEEKDAYS + "; Sat 22:00-02:00; Sun 12:00-24:00",
        "Australia/Lord_Howe",
        [Absence("a1", date(2026, 12, 24), date(2027, 1, 2), "Holidays"),
         Absence(None, date(2026, 6, 1), date(2026, 6, 1), None)],
    )
    data = json.loads(json.dumps(schedule.to_json()))
    assert data["tz"] == "Australia/Lord_Howe"
    assert {"day": "Sun", "start": "12:00", "end": "24:00"} in data["windows"]
    assert data["absences"][1] == {
        "id": "a1", "first_day": "2026-12-24", "last_day": "2027-01-02", "note": "Holidays",
    }
    assert WeeklySchedule.from_json(data) == schedule
    stripped = schedule.to_json(include_notes=False)["absences"]
    assert isinstance(stripped, list)
    assert [a["note"] for a in stripped] == [None, None]


@pytest.mark.parametrize(("data", "message"), [
    ([], "schedule must be an object"),
    ({"windows": []}, "schedule tz must be a string"),
    ({"tz": "UTC", "windows": {}}, "schedule windows must be a list"),
    ({"tz": "UTC", "windows": [{"day": "Mnd", "start": "09:00", "end": "10:00"}]},
     "unknown day 'Mnd'"),
    ({"tz": "UTC", "windows": [{"day": "Mon", "start": "09:00"}]},
     "window needs string day, start and end"),
    ({"tz": "UTC", "absences": [{"first_day": "2026-13-01", "last_day": "2026-12-01"}]},
     "absence first_day '2026-13-01' is not an ISO date"),
    ({"tz": "UTC", "absences": [{"first_day": "2026-01-01", "last_day": "2026-01-01",
                                 "id": 5}]}, "absence id must be a string"),
])
def test_from_json_errors_name_the_bad_part(data: object, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        WeeklySchedule.from_json(data)


# --- rules on ordinary days --------------------------------------------------------


def test_is_open_and_next_alert_on_an_ordinary_week() -> None:
    schedule = WeeklySchedule.parse(WEEKDAYS, "Europe/Berlin")
    monday_0900 = local("Europe/Berlin", 2026, 1, 12, 9)
    assert is_open(schedule, monday_0900)
    assert not is_open(schedule, monday_0900 - timedelta(microseconds=1))
    assert not is_open(schedule, local("Europe/Berlin", 2026, 1, 12, 12))  # the end is exclusive
    assert next_alert_time(schedule, monday_0900) == monday_0900
    lunch = local("Europe/Berlin", 2026, 1, 12, 12, 30)
    assert next_alert_time(schedule, lunch) == local("Europe/Berlin", 2026, 1, 12, 14)
    friday_evening = local("Europe/Berlin", 2026, 1, 16, 13)
    assert next_alert_time(schedule, friday_evening) == local("Europe/Berlin", 2026, 1, 19, 9)


def test_inputs_must_be_aware_and_outputs_are_utc() -> None:
    schedule = WeeklySchedule.parse(WEEKDAYS, "Europe/Berlin")
    naive = datetime(2026, 1, 12, 9)
    with pytest.raises(ValueError, match="timezone-aware"):
        is_open(schedule, naive)
    with pytest.raises(ValueError, match="timezone-aware"):
        next_alert_time(schedule, naive)
    with pytest.raises(ValueError, match="timezone-aware"):
        office_windows_between(schedule, naive, utc(2026, 1, 13))
    with pytest.raises(ValueError, match="timezone-aware"):
        add_office_time(schedule, naive, timedelta(hours=1))
    with pytest.raises(ValueError, match="timezone-aware"):
        add_business_days(schedule, naive, 1)
    with pytest.raises(ValueError, match="timezone-aware"):
        is_quiet(QuietHours.parse("21:00-08:00", "UTC"), naive)
    tokyo = datetime(2026, 1, 12, 18, tzinfo=timezone(timedelta(hours=9)))  # 10:00 in Berlin
    result = next_alert_time(schedule, tokyo)
    assert result == tokyo
    assert result is not None
    assert result.tzinfo is UTC


def test_window_spanning_midnight() -> None:
    schedule = WeeklySchedule.parse("Sat 22:00-02:00", "Europe/Berlin")
    saturday, sunday = date(2026, 1, 17), date(2026, 1, 18)
    assert saturday.weekday() == 5
    start, end = only_window(schedule, saturday)
    assert (start, end) == (local("Europe/Berlin", 2026, 1, 17, 22),
                            local("Europe/Berlin", 2026, 1, 18, 2))
    assert is_open(schedule, local("Europe/Berlin", 2026, 1, 18, 1, 59))
    assert not is_open(schedule, local("Europe/Berlin", 2026, 1, 18, 2))
    sunday_1am = local("Europe/Berlin", 2026, 1, 18, 1)
    assert next_alert_time(schedule, sunday_1am) == sunday_1am
    # An absence on Sunday closes the part after midnight, on Saturday the part before.
    sunday_off = WeeklySchedule.parse("Sat 22:00-02:00", "Europe/Berlin",
                                      [Absence(None, sunday, sunday)])
    assert office_windows_between(sunday_off, utc(2026, 1, 17), utc(2026, 1, 19)) == [
        (local("Europe/Berlin", 2026, 1, 17, 22), local("Europe/Berlin", 2026, 1, 18))
    ]
    saturday_off = WeeklySchedule.parse("Sat 22:00-02:00", "Europe/Berlin",
                                        [Absence(None, saturday, saturday)])
    assert next_alert_time(saturday_off, utc(2026, 1, 17)) == local("Europe/Berlin", 2026, 1, 18)
    # The same when a longer absence ends that Saturday.
    week_off = WeeklySchedule.parse("Sat 22:00-02:00", "Europe/Berlin",
                                    [Absence(None, date(2026, 1, 12), saturday)])
    assert next_alert_time(week_off, utc(2026, 1, 11, 12)) == local("Europe/Berlin", 2026, 1, 18)


def test_absence_across_the_year_boundary() -> None:
    holidays = Absence("h", date(2026, 12, 24), date(2027, 1, 2), "Holidays")
    schedule = WeeklySchedule.parse("Mon-Fri 09:00-17:00", "Europe/Berlin", [holidays])
    wednesday = local("Europe/Berlin", 2026, 12, 23, 18)
    assert not is_open(schedule, local("Europe/Berlin", 2026, 12, 24, 10))
    assert not is_open(schedule, local("Europe/Berlin", 2026, 12, 31, 10))
    assert is_open(schedule, local("Europe/Berlin", 2026, 12, 23, 16))
    # 2027-01-02 is a Saturday, so the first window back is Monday 4 January.
    assert next_alert_time(schedule, wednesday) == local("Europe/Berlin", 2027, 1, 4, 9)
    assert office_windows_between(schedule, wednesday, local("Europe/Berlin", 2027, 1, 4)) == []
    assert add_business_days(schedule, wednesday, 1) == local("Europe/Berlin", 2027, 1, 4, 17)
    assert add_office_time(schedule, local("Europe/Berlin", 2026, 12, 23, 15),
                           timedelta(hours=3)) == local("Europe/Berlin", 2027, 1, 4, 10)


def test_overlapping_absences_are_merged() -> None:
    schedule = WeeklySchedule.parse("Mon-Sun 09:00-17:00", "UTC", [
        Absence(None, date(2026, 3, 2), date(2026, 3, 5)),
        Absence(None, date(2026, 3, 4), date(2026, 3, 6)),
        Absence(None, date(2026, 3, 7), date(2026, 3, 7)),
    ])
    assert next_alert_time(schedule, utc(2026, 3, 1, 18)) == utc(2026, 3, 8, 9)


def test_empty_schedule_never_alerts() -> None:
    schedule = WeeklySchedule.parse("", "Europe/Berlin")
    now = utc(2026, 5, 1, 12)
    assert not is_open(schedule, now)
    assert next_alert_time(schedule, now) is None
    assert office_windows_between(schedule, now, now + timedelta(days=30)) == []
    assert add_office_time(schedule, now, timedelta(minutes=1)) is None
    assert add_business_days(schedule, now, 1) is None


def test_fully_absent_horizon_gives_none() -> None:
    schedule = WeeklySchedule.parse("Mon-Fri 09:00-17:00", "UTC",
                                    [Absence(None, date(2026, 1, 1), date(2027, 6, 30))])
    assert next_alert_time(schedule, utc(2026, 1, 1)) is None
    assert next_alert_time(schedule, utc(2026, 1, 1), horizon_days=600) == utc(2027, 7, 1, 9)


def test_reply_by_counts_exact_office_hours_across_weekend_and_absence() -> None:
    tz = "America/New_York"
    schedule = WeeklySchedule.parse("Mon-Fri 09:00-17:00", tz,
                                    [Absence(None, date(2026, 1, 19), date(2026, 1, 19))])
    friday_1530 = local(tz, 2026, 1, 16, 15, 30)
    due = add_office_time(schedule, friday_1530, timedelta(hours=4))
    # 1.5 h on Friday, the weekend and Monday's absence skipped, 2.5 h on Tuesday.
    assert due == local(tz, 2026, 1, 20, 11, 30)
    assert total(office_windows_between(schedule, friday_1530, due)) == timedelta(hours=4)
    odd = timedelta(hours=9, microseconds=7)
    due = add_office_time(schedule, friday_1530, odd)
    assert due == local(tz, 2026, 1, 20, 16, 30) + timedelta(microseconds=7)
    assert total(office_windows_between(schedule, friday_1530, due)) == odd
    assert add_office_time(schedule, friday_1530, timedelta(0)) == friday_1530
    with pytest.raises(ValueError, match="must not be negative"):
        add_office_time(schedule, friday_1530, timedelta(seconds=-1))


def test_business_days() -> None:
    tz = "Europe/Berlin"
    schedule = WeeklySchedule.parse(WEEKDAYS + "; Sat 22:00-02:00", tz,
                                    [Absence(None, date(2026, 1, 20), date(2026, 1, 20))])
    monday_early = local(tz, 2026, 1, 12, 7)
    # The day of receipt never counts, even before its hours.
    assert add_business_days(schedule, monday_early, 1) == local(tz, 2026, 1, 13, 17)
    # Thursday's receipt: Friday ends 13:00, Saturday's window ends 02:00 Sunday.
    thursday = local(tz, 2026, 1, 15, 20)
    assert add_business_days(schedule, thursday, 1) == local(tz, 2026, 1, 16, 13)
    assert add_business_days(schedule, thursday, 2) == local(tz, 2026, 1, 18, 2)
    # Monday 19th, then Tuesday 20th is absent, so the 4th office day is Wednesday 21st.
    assert add_business_days(schedule, thursday, 4) == local(tz, 2026, 1, 21, 17)
    with pytest.raises(ValueError, match="positive integer"):
        add_business_days(schedule, thursday, 0)


def test_business_day_end_is_cut_by_an_absence_the_next_day() -> None:
    schedule = WeeklySchedule.parse("Sat 22:00-02:00", "UTC",
                                    [Absence(None, date(2026, 1, 18), date(2026, 1, 18))])
    assert add_business_days(schedule, utc(2026, 1, 16), 1) == utc(2026, 1, 18)


# --- daylight saving ---------------------------------------------------------------


@pytest.mark.parametrize(("tz", "day", "before", "after"), [
    ("Europe/Berlin", date(2026, 3, 29), timedelta(hours=1), timedelta(hours=2)),
    ("Europe/Berlin", date(2026, 10, 25), timedelta(hours=2), timedelta(hours=1)),
    ("America/New_York", date(2026, 3, 8), timedelta(hours=-5), timedelta(hours=-4)),
    ("America/New_York", date(2026, 11, 1), timedelta(hours=-4), timedelta(hours=-5)),
    ("Australia/Lord_Howe", date(2026, 4, 5), timedelta(hours=11), timedelta(hours=10.5)),
    ("Australia/Lord_Howe", date(2026, 10, 4), timedelta(hours=10.5), timedelta(hours=11)),
])
def test_dst_days(tz: str, day: date, before: timedelta, after: timedelta) -> None:
    zone = ZoneInfo(tz)
    # The transition really happens on this day (checked against zoneinfo, not assumed).
    assert datetime.combine(day, time(0), zone).utcoffset() == before
    assert datetime.combine(day, time(12), zone).utcoffset() == after
    # 09:00-17:00 keeps its wall-clock bounds: after the change, so 8 real hours.
    office = WeeklySchedule.parse(f"{day.strftime('%a')} 09:00-17:00", tz)
    start, end = only_window(office, day)
    assert start == datetime.combine(day, time(9), UTC) - after
    assert start.tzinfo is UTC
    assert end - start == timedelta(hours=8)
    # A window across the change is as long as the clock says minus the shift.
    night = WeeklySchedule.parse(f"{day.strftime('%a')} 00:00-08:00", tz)
    start, end = only_window(night, day)
    assert start == datetime.combine(day, time(0), UTC) - before
    assert end - start == timedelta(hours=8) - (after - before)


def test_dst_real_lengths_of_a_window_across_the_change() -> None:
    def length(tz: str, day: date) -> timedelta:
        schedule = WeeklySchedule.parse(f"{day.strftime('%a')} 00:00-08:00", tz)
        start, end = only_window(schedule, day)
        return end - start

    assert length("Europe/Berlin", date(2026, 3, 29)) == timedelta(hours=7)
    assert length("Europe/Berlin", date(2026, 10, 25)) == timedelta(hours=9)
    assert length("Australia/Lord_Howe", date(2026, 10, 4)) == timedelta(hours=7.5)
    assert length("Australia/Lord_Howe", date(2026, 4, 5)) == timedelta(hours=8.5)


def test_nonexistent_start_begins_at_the_first_valid_instant() -> None:
    # Berlin 2026-03-29: 02:00-03:00 does not exist; 02:30 starts at 03:00 CEST.
    schedule = WeeklySchedule.parse("Sun 02:30-05:00", "Europe/Berlin")
    start, end = only_window(schedule, date(2026, 3, 29))
    assert start == utc(2026, 3, 29, 1)
    assert start.astimezone(ZoneInfo("Europe/Berlin")).time() == time(3)
    assert end - start == timedelta(hours=2)
    assert next_alert_time(schedule, utc(2026, 3, 28, 12)) == utc(2026, 3, 29, 1)
    # Lord Howe 2026-10-04: 02:00-02:30 does not exist; 02:10 starts at 02:30 (+11).
    howe = WeeklySchedule.parse("Sun 02:10-03:00", "Australia/Lord_Howe")
    start, end = only_window(howe, date(2026, 10, 4))
    assert start == utc(2026, 10, 3, 15, 30)
    assert end - start == timedelta(minutes=30)


def test_window_inside_the_gap_is_empty_that_day() -> None:
    schedule = WeeklySchedule.parse("Sun 02:00-02:45", "Europe/Berlin")
    # 2026-03-29 has no such time; the next opening is the following Sunday.
    assert next_alert_time(schedule, utc(2026, 3, 28)) == local("Europe/Berlin", 2026, 4, 5, 2)
    assert add_business_days(schedule, utc(2026, 3, 28), 1) == local(
        "Europe/Berlin", 2026, 4, 5, 2, 45)


def test_ambiguous_time_uses_the_first_occurrence() -> None:
    # New York 2026-11-01: 01:00-02:00 happens twice; 01:30 is the EDT one.
    schedule = WeeklySchedule.parse("Sun 01:30-03:00", "America/New_York")
    start, end = only_window(schedule, date(2026, 11, 1))
    assert start == utc(2026, 11, 1, 5, 30)
    assert end == utc(2026, 11, 1, 8)  # 03:00 EST
    assert end - start == timedelta(hours=2, minutes=30)
    second_0130 = local("America/New_York", 2026, 11, 1, 1, 30, fold=1)
    assert is_open(schedule, second_0130)
    # Lord Howe 2026-04-05: 01:30-02:00 happens twice (+11 then +10:30).
    howe = WeeklySchedule.parse("Sun 01:45-02:15", "Australia/Lord_Howe")
    start, end = only_window(howe, date(2026, 4, 5))
    assert start == utc(2026, 4, 4, 14, 45)
    assert end - start == timedelta(hours=1)


def test_office_hours_across_a_dst_change_count_real_time() -> None:
    tz = "Europe/Berlin"
    schedule = WeeklySchedule.parse("Sat 22:00-06:00", tz)
    saturday = local(tz, 2026, 3, 28, 22)
    # 8 wall-clock hours but only 7 real ones that night.
    assert add_office_time(schedule, saturday, timedelta(hours=7)) == local(tz, 2026, 3, 29, 6)
    assert add_office_time(schedule, saturday, timedelta(hours=8)) == local(tz, 2026, 4, 4, 23)


# --- quiet hours -------------------------------------------------------------------


def test_quiet_hours_span_midnight() -> None:
    quiet = QuietHours.parse("21:00-08:00", "Europe/Berlin")
    assert quiet.to_spec() == "21:00-08:00"
    assert QuietHours.from_json(json.loads(json.dumps(quiet.to_json()))) == quiet
    evening = local("Europe/Berlin", 2026, 1, 12, 21)
    assert is_quiet(quiet, evening)
    assert quiet_until(quiet, evening) == local("Europe/Berlin", 2026, 1, 13, 8)
    assert is_quiet(quiet, local("Europe/Berlin", 2026, 1, 13, 7, 59))
    noon = local("Europe/Berlin", 2026, 1, 13, 12)
    assert not is_quiet(quiet, noon)
    assert quiet_until(quiet, noon) == noon
    assert not is_quiet(quiet, local("Europe/Berlin", 2026, 1, 13, 8))


def test_quiet_hours_on_dst_days() -> None:
    quiet = QuietHours.parse("22:00-08:00", "America/New_York")
    saturday = local("America/New_York", 2026, 3, 7, 23)
    until = quiet_until(quiet, saturday)
    assert until == utc(2026, 3, 8, 12)  # 08:00 EDT
    assert until - local("America/New_York", 2026, 3, 7, 22) == timedelta(hours=9)
    early = QuietHours.parse("01:30-02:30", "Europe/Berlin")
    # 02:30 does not exist on 2026-03-29: quiet ends at 03:00 CEST, after 30 real minutes.
    assert quiet_until(early, utc(2026, 3, 29, 0, 45)) == utc(2026, 3, 29, 1)


@pytest.mark.parametrize(("spec", "message"), [
    ("08:00-08:00", "end 08:00 must differ from start 08:00"),
    ("00:00-24:00", "quiet hours cannot cover the whole day"),
    ("21:00", "bad window '21:00'"),
    ("21:00-31:00", "bad time '31:00'"),
])
def test_quiet_hours_errors(spec: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        QuietHours.parse(spec, "UTC")


def test_quiet_hours_validate_the_zone() -> None:
    with pytest.raises(ScheduleError, match="unknown time zone 'Mars/Olympus'"):
        QuietHours.parse("21:00-08:00", "Mars/Olympus")
