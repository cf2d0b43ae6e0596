"""Properties of the schedule rules over random schedules, zones, absences and instants."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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

ZONES = [
    "Europe/Berlin", "America/New_York", "Australia/Lord_Howe",
    "Asia/Kolkata", "Pacific/Chatham", "UTC",
]
TICK = timedelta(microseconds=1)
FIRST, LAST = datetime(2025, 12, 1, tzinfo=UTC), datetime(2027, 1, 31, tzinfo=UTC)
PROPERTY = settings(max_examples=200, deadline=None)


def _transitions() -> list[tuple[str, datetime]]:
    """Every UTC offset change of the zones in the test range, found by zoneinfo itself."""
    found = []
    for tz in ZONES:
        zone, moment = ZoneInfo(tz), FIRST
        while moment < LAST:
            step = moment + timedelta(minutes=15)
            if moment.astimezone(zone).utcoffset() != step.astimezone(zone).utcoffset():
                found.append((tz, step))
            moment = step
    return found


ZONE_TRANSITIONS = _transitions()
TRANSITIONS = [moment for _, moment in ZONE_TRANSITIONS]

# Wall times on the quarter hour around 01:00-04:00 hit the gaps and repeats.
wall_times = st.one_of(
    st.builds(time, st.integers(0, 23), st.integers(0, 59)),
    st.builds(time, st.integers(0, 4), st.sampled_from([0, 15, 30, 45])),
)
instants = st.one_of(
    st.datetimes(FIRST.replace(tzinfo=None), LAST.replace(tzinfo=None), timezones=st.just(UTC)),
    st.builds(
        lambda moment, offset: moment + timedelta(microseconds=offset),
        st.sampled_from(TRANSITIONS),
        st.integers(-30 * 3600 * 10**6, 30 * 3600 * 10**6),
    ),
)


def minutes_of(weekday: int, start: time, end: time) -> set[int]:
    """The minutes of the week a window covers: an independent check for overlaps."""
    begin = weekday * 1440 + start.hour * 60 + start.minute
    length = (end.hour * 60 + end.minute - start.hour * 60 - start.minute) % 1440 or 1440
    return {(begin + m) % (7 * 1440) for m in range(length)}


@st.composite
def schedules(draw: st.DrawFn) -> WeeklySchedule:
    raw = draw(st.lists(st.tuples(st.integers(0, 6), wall_times, wall_times), max_size=8))
    windows: list[Window] = []
    covered: set[int] = set()
    for weekday, start, end in raw:
        if start == end != time(0):
            continue
        minutes = minutes_of(weekday, start, end)
        if minutes & covered:
            continue
        covered |= minutes
        windows.append(Window(weekday, start, end))
    absences = []
    for _ in range(draw(st.integers(0, 4))):
        first = draw(st.dates(FIRST.date(), LAST.date()))
        last = first + timedelta(days=draw(st.one_of(st.integers(0, 3), st.integers(0, 40))))
        # Often line an absence's edge up with a window, where the edge rules matter.
        align = draw(st.sampled_from(["none", "last day", "day before"])) if windows else "none"
        if align != "none":
            weekday = draw(st.sampled_from(windows)).weekday
            if align == "last day":
                last += timedelta(days=(weekday - last.weekday()) % 7)
            else:
                first += timedelta(days=(weekday + 1 - first.weekday()) % 7)
                last = max(first, last)
        absences.append(Absence(None, first, last))
    return WeeklySchedule(draw(st.sampled_from(ZONES)), tuple(windows), tuple(absences))


@st.composite
def schedules_and_moments(draw: st.DrawFn) -> tuple[WeeklySchedule, datetime]:
    """A schedule and an instant, often within a day and a half of an absence's edge."""
    schedule = draw(schedules())
    zone = ZoneInfo(schedule.tz)
    edges = [
        datetime.combine(day, time(0), zone).astimezone(UTC)
        for a in schedule.absences for day in (a.first_day, a.last_day + timedelta(days=1))
    ]
    if not edges:
        return schedule, draw(instants)
    near_edge = st.builds(
        lambda edge, offset: edge + timedelta(microseconds=offset),
        st.sampled_from(edges), st.integers(-36 * 3600 * 10**6, 36 * 3600 * 10**6),
    )
    return schedule, draw(st.one_of(instants, near_edge))


def wall_clock_office_time(
    schedule: WeeklySchedule, start: datetime, end: datetime
) -> list[tuple[datetime, datetime]]:
    """An independent model of office time, valid only while the UTC offset is constant."""
    zone = ZoneInfo(schedule.tz)
    offset = start.astimezone(zone).utcoffset()
    assert offset is not None
    absent = {a.first_day + timedelta(days=n)
              for a in schedule.absences for n in range((a.last_day - a.first_day).days + 1)}
    pieces = []
    day = start.astimezone(zone).date() - timedelta(days=1)
    while day <= end.astimezone(zone).date():
        for window in schedule.windows:
            if window.weekday != day.weekday():
                continue
            begin = datetime.combine(day, window.start)
            end_day = day if window.end > window.start else day + timedelta(days=1)
            midnight = datetime.combine(day + timedelta(days=1), time(0))
            parts = [(day, begin, min(midnight, datetime.combine(end_day, window.end))),
                     (day + timedelta(days=1), midnight, datetime.combine(end_day, window.end))]
            for part_day, a, b in parts:
                a_utc = max((a - offset).replace(tzinfo=UTC), start)
                b_utc = min((b - offset).replace(tzinfo=UTC), end)
                if part_day not in absent and a_utc < b_utc:
                    pieces.append((a_utc, b_utc))
        day += timedelta(days=1)
    merged: list[tuple[datetime, datetime]] = []
    for a, b in sorted(pieces):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def absent_on(schedule: WeeklySchedule, moment: datetime) -> bool:
    day = moment.astimezone(ZoneInfo(schedule.tz)).date()
    return any(a.first_day <= day <= a.last_day for a in schedule.absences)


def total(intervals: list[tuple[datetime, datetime]]) -> timedelta:
    return sum((end - start for start, end in intervals), timedelta(0))


def quiet_by_wall_clock(start: time, end: time, wall: time) -> bool:
    if start < end or end == time(0):
        return start <= wall and (wall < end or end == time(0))
    return wall >= start or wall < end


def far_from_transitions(tz: str, moment: datetime) -> bool:
    zone = ZoneInfo(tz)
    offsets = {(moment + timedelta(hours=h)).astimezone(zone).utcoffset() for h in (-50, 0, 50)}
    return len(offsets) == 1


@PROPERTY
@given(schedules())
def test_spec_and_json_round_trip(schedule: WeeklySchedule) -> None:
    again = WeeklySchedule.parse(schedule.to_spec(), schedule.tz, schedule.absences)
    assert again == schedule
    assert WeeklySchedule.from_json(json.loads(json.dumps(schedule.to_json()))) == schedule


@PROPERTY
@given(st.lists(st.tuples(st.integers(0, 6), wall_times, wall_times), min_size=2, max_size=5))
def test_overlap_check_agrees_with_minute_sets(raw: list[tuple[int, time, time]]) -> None:
    windows = [Window(*w) for w in raw if not (w[1] == w[2] != time(0))]
    overlapping = any(
        minutes_of(a.weekday, a.start, a.end) & minutes_of(b.weekday, b.start, b.end)
        for i, a in enumerate(windows) for b in windows[i + 1:]
    )
    if overlapping:
        with pytest.raises(ScheduleError, match="overlapping windows"):
            WeeklySchedule("UTC", tuple(windows))
    else:
        WeeklySchedule("UTC", tuple(windows))


@PROPERTY
@given(schedules_and_moments())
def test_next_alert_time_is_the_first_open_instant(
    schedule_and_moment: tuple[WeeklySchedule, datetime]
) -> None:
    schedule, now = schedule_and_moment
    alert = next_alert_time(schedule, now)
    if is_open(schedule, now):
        assert alert == now
    if alert is None:
        assert office_windows_between(schedule, now, now + timedelta(days=366)) == []
        return
    assert alert.tzinfo is UTC
    assert alert >= now
    assert is_open(schedule, alert)
    assert not absent_on(schedule, alert)
    assert office_windows_between(schedule, now, alert) == []


@PROPERTY
@given(schedules(), instants, st.integers(0, 60 * 3600 * 10**6))
def test_add_office_time_counts_exactly(schedule: WeeklySchedule, start: datetime,
                                        micros: int) -> None:
    duration = timedelta(microseconds=micros)
    due = add_office_time(schedule, start, duration)
    if due is None:
        horizon = office_windows_between(schedule, start, start + timedelta(days=366))
        assert total(horizon) < duration
        return
    assert due >= start
    assert total(office_windows_between(schedule, start, due)) == duration
    if duration:
        assert is_open(schedule, due - TICK)  # inside a window or at its end


@PROPERTY
@given(schedules(), instants, st.integers(1, 10 * 24 * 3600 * 10**6),
       st.lists(st.floats(0, 1, exclude_max=True), max_size=20))
def test_office_windows_agree_with_is_open(schedule: WeeklySchedule, start: datetime,
                                           span: int, probes: list[float]) -> None:
    end = start + timedelta(microseconds=span)
    intervals = office_windows_between(schedule, start, end)
    for (_, b), (c, _) in itertools.pairwise(intervals):
        assert b < c  # sorted, disjoint and merged
    for a, b in intervals:
        assert start <= a < b <= end
        assert is_open(schedule, a)
        assert is_open(schedule, b - TICK)
        assert not absent_on(schedule, a)
        if a > start:
            assert not is_open(schedule, a - TICK)
        if b < end:
            assert not is_open(schedule, b)
    for fraction in probes:
        moment = start + timedelta(microseconds=int(span * fraction))
        inside = any(a <= moment < b for a, b in intervals)
        assert is_open(schedule, moment) == inside
        if absent_on(schedule, moment):
            assert not inside


@settings(max_examples=400, deadline=None)  # the absence-edge cases it targets are rare
@given(schedules_and_moments(), st.floats(0, 1))
def test_office_time_matches_the_wall_clock_away_from_dst_changes(
    schedule_and_moment: tuple[WeeklySchedule, datetime], fraction: float
) -> None:
    schedule, moment = schedule_and_moment
    # Begin well before the moment (often an absence's edge), so skipping is exercised.
    start = moment - timedelta(days=2)
    end = start + fraction * timedelta(days=4)
    zone = ZoneInfo(schedule.tz)
    offsets = {(start + timedelta(hours=h)).astimezone(zone).utcoffset() for h in range(-26, 130)}
    if len(offsets) > 1:
        return
    assert office_windows_between(schedule, start, end) == wall_clock_office_time(
        schedule, start, end)


@PROPERTY
@given(schedules_and_moments())
def test_is_open_matches_the_wall_clock_away_from_dst_changes(
    schedule_and_moment: tuple[WeeklySchedule, datetime]
) -> None:
    schedule, moment = schedule_and_moment
    if not far_from_transitions(schedule.tz, moment):
        return
    wall = moment.astimezone(ZoneInfo(schedule.tz)).replace(tzinfo=None)
    expected = False
    for window in schedule.windows:
        for day in (wall.date() - timedelta(days=1), wall.date()):
            if day.weekday() != window.weekday:
                continue
            begin = datetime.combine(day, window.start)
            end_day = day if window.end > window.start else day + timedelta(days=1)
            expected = expected or begin <= wall < datetime.combine(end_day, window.end)
    expected = expected and not absent_on(schedule, moment)
    assert is_open(schedule, moment) == expected


@PROPERTY
@given(schedules(), instants, st.integers(1, 5))
def test_business_days_end_an_office_day_after_receipt(schedule: WeeklySchedule,
                                                       start: datetime, days: int) -> None:
    due = add_business_days(schedule, start, days)
    if due is None:
        return
    zone = ZoneInfo(schedule.tz)
    assert due > start
    assert is_open(schedule, due - TICK)
    last_office_moment = (due - TICK).astimezone(zone).date()
    assert last_office_moment >= start.astimezone(zone).date() + timedelta(days=days)
    later = add_business_days(schedule, start, days + 1)
    assert later is None or later > due


@PROPERTY
@given(st.sampled_from(ZONE_TRANSITIONS), wall_times, st.integers(1, 24 * 60 - 1))
def test_window_opening_follows_the_gap_and_fold_rules(
    zone_transition: tuple[str, datetime], start: time, minutes: int
) -> None:
    tz, transition = zone_transition
    zone = ZoneInfo(tz)
    day = transition.astimezone(zone).date()
    wall = datetime.combine(day, start)
    end = (wall + timedelta(minutes=minutes)).time()
    schedule = WeeklySchedule(tz, (Window(day.weekday(), start, end),))
    opening = next_alert_time(schedule, datetime.combine(day, time(0), UTC) - timedelta(days=2))
    assert opening is not None
    shown = opening.astimezone(zone)
    exists = wall.replace(tzinfo=zone).astimezone(UTC).astimezone(zone).replace(
        tzinfo=None) == wall
    if exists:
        # The wall time itself, and its first occurrence if it repeats.
        assert shown.replace(tzinfo=None) == wall
        assert shown.fold == 0
        return
    if shown.date() != day:
        # Only a window lying wholly inside the gap may be missing on the day itself.
        assert shown.date() == day + timedelta(days=7)
        return
    # Inside a gap: the transition, the first valid instant after the wall time.
    before = (opening - TICK).astimezone(zone)
    assert before.utcoffset() != shown.utcoffset()
    assert before.replace(tzinfo=None) < wall < shown.replace(tzinfo=None)


@PROPERTY
@given(st.sampled_from(ZONES), wall_times, wall_times, instants)
def test_quiet_until_ends_the_quiet_period(tz: str, start: time, end: time,
                                           at: datetime) -> None:
    if start == end:
        return
    quiet = QuietHours(tz, start, end)
    until = quiet_until(quiet, at)
    assert until >= at
    if not is_quiet(quiet, at):
        assert until == at
        return
    assert until > at
    assert not is_quiet(quiet, until)
    assert is_quiet(quiet, until - TICK)
    assert QuietHours.parse(quiet.to_spec(), tz) == quiet
    if far_from_transitions(tz, at):
        wall = at.astimezone(ZoneInfo(tz)).time()
        assert quiet_by_wall_clock(start, end, wall)


@PROPERTY
@given(st.sampled_from(ZONES), wall_times, wall_times, instants)
def test_quiet_hours_match_the_wall_clock_away_from_dst_changes(
    tz: str, start: time, end: time, at: datetime
) -> None:
    if start == end or not far_from_transitions(tz, at):
        return
    wall = at.astimezone(ZoneInfo(tz)).time()
    assert is_quiet(QuietHours(tz, start, end), at) == quiet_by_wall_clock(start, end, wall)


def test_transitions_cover_every_zone_with_dst() -> None:
    zones_with_changes = {
        tz for tz in ZONES
        if any(m.astimezone(ZoneInfo(tz)).utcoffset()
               != (m - TICK).astimezone(ZoneInfo(tz)).utcoffset() for m in TRANSITIONS)
    }
    assert zones_with_changes == {
        "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Pacific/Chatham"
    }
    assert date(2026, 4, 5) in {m.astimezone(ZoneInfo("Australia/Lord_Howe")).date()
                                for m in TRANSITIONS}
