"""The rules over office hours, absences and quiet hours: pure time arithmetic.

The value types and the definitions these rules follow (window bounds, DST gaps
and folds, absence days, office days and business days, quiet hours) are in
``shared.schedule``; wall times become instants through ``shared.wall_time``.

Nothing here reads the clock; every rule takes ``now``/``at``/``start`` from its
caller. Every datetime taken must be timezone-aware (a naive one is a
ValueError) and is treated as the instant it denotes; every datetime returned
is in UTC.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, tzinfo

from shared.schedule import QuietHours, WeeklySchedule, Window
from shared.wall_time import ONE_DAY, next_day, previous_day, wall_to_utc

__all__ = [
    "DEFAULT_HORIZON_DAYS",
    "add_business_days",
    "add_office_time",
    "is_open",
    "is_quiet",
    "next_alert_time",
    "office_windows_between",
    "quiet_until",
]

DEFAULT_HORIZON_DAYS = 366
_TICK = timedelta(microseconds=1)
Interval = tuple[datetime, datetime]


def is_open(schedule: WeeklySchedule, at: datetime) -> bool:
    """Whether ``at`` is inside office hours (window starts inclusive, ends exclusive)."""
    at = _utc(at, "at")
    return next(_open_pieces(schedule, at, at + _TICK), None) is not None


def next_alert_time(
    schedule: WeeklySchedule, now: datetime, horizon_days: int = DEFAULT_HORIZON_DAYS
) -> datetime | None:
    """When the therapist can next be alerted: ``now`` if open, else the next opening.

    The next opening is the start of the next window, or the first open instant
    of a window whose beginning fell on an absence day (local midnight after the
    absence). None when there is no office time in ``[now, now + horizon_days)``.
    """
    now = _utc(now, "now")
    first = next(_open_pieces(schedule, now, _horizon(now, horizon_days)), None)
    return None if first is None else first[0]


def office_windows_between(
    schedule: WeeklySchedule, start: datetime, end: datetime
) -> list[Interval]:
    """The office time in ``[start, end)`` as sorted, disjoint, merged UTC intervals.

    Absences are removed; intervals are clipped to ``[start, end)``; windows that
    touch (``Mon 22:00-24:00`` and ``Tue 00:00-02:00``) come out as one interval.
    """
    start, end = _utc(start, "start"), _utc(end, "end")
    merged: list[Interval] = []
    for begin, finish in _open_pieces(schedule, start, end):
        if merged and begin <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], finish))
        else:
            merged.append((begin, finish))
    return merged


def add_office_time(
    schedule: WeeklySchedule,
    start: datetime,
    duration: timedelta,
    horizon_days: int = DEFAULT_HORIZON_DAYS,
) -> datetime | None:
    """The earliest instant by which exactly ``duration`` of office time has passed since ``start``.

    Only time inside windows counts, absences excluded, to the microsecond. For a
    positive duration the result lies inside a window or at its end. A zero
    duration gives ``start``. None when the office time in
    ``[start, start + horizon_days)`` is shorter than ``duration``.
    """
    start = _utc(start, "start")
    if duration < timedelta(0):
        raise ValueError(f"duration must not be negative, got {duration}")
    if not duration:
        return start
    remaining = duration
    for begin, finish in _open_pieces(schedule, start, _horizon(start, horizon_days)):
        if finish - begin >= remaining:
            return begin + remaining
        remaining -= finish - begin
    return None


def add_business_days(
    schedule: WeeklySchedule,
    start: datetime,
    days: int,
    horizon_days: int = DEFAULT_HORIZON_DAYS,
) -> datetime | None:
    """The end of the ``days``-th office day after the local day of ``start``.

    See the ``shared.schedule`` docstring for *office day* and its end. ``days``
    must be at least 1. None when fewer than ``days`` office days follow within
    ``horizon_days`` local days after the day of receipt.
    """
    start = _utc(start, "start")
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"days must be a positive integer, got {days!r}")
    zone = schedule.zone
    receipt = start.astimezone(zone).date()
    last = receipt + timedelta(days=_check_horizon(horizon_days))
    day, counted = receipt + ONE_DAY, 0
    while day <= last:
        absent_until = _absent_through(schedule, day)
        if absent_until is not None:
            day = absent_until + ONE_DAY
            continue
        day_end: datetime | None = None
        for window in schedule.by_weekday[day.weekday()]:
            begin, finish = _window_interval(window, day, zone)
            for piece in _minus_absences(schedule, begin, finish):
                day_end = piece[1]
        if day_end is not None:
            counted += 1
            if counted == days:
                return day_end
        day += ONE_DAY
    return None


def is_quiet(quiet: QuietHours, at: datetime) -> bool:
    """Whether ``at`` falls inside the client's quiet hours (start inclusive, end exclusive)."""
    return _quiet_period(quiet, _utc(at, "at")) is not None


def quiet_until(quiet: QuietHours, at: datetime) -> datetime:
    """The end of the quiet period containing ``at``, or ``at`` itself when not quiet."""
    until = _utc(at, "at")
    # Periods can only touch when both bounds fall in one DST gap; a few steps cover that.
    for _ in range(4):
        period = _quiet_period(quiet, until)
        if period is None:
            break
        until = period[1]
    return until


# --- internals ---------------------------------------------------------------


def _open_pieces(schedule: WeeklySchedule, start: datetime, end: datetime) -> Iterator[Interval]:
    """Open office time clipped to ``[start, end)``: ordered, disjoint, possibly touching.

    Walks local days, not minutes. Wall-time resolution is monotonic and windows
    do not overlap in local time, so pieces come out in order without sorting.
    """
    if end <= start or not schedule.windows:
        return
    zone = schedule.zone
    day = previous_day(start.astimezone(zone).date())  # last night's window may still run
    last = next_day(end.astimezone(zone).date())
    while day <= last:
        absent_until = _absent_through(schedule, day)
        if absent_until is not None and absent_until > day:
            # Windows starting on the last absent day may run past its midnight.
            day = absent_until
            continue
        for window in schedule.by_weekday[day.weekday()]:
            begin, finish = _window_interval(window, day, zone)
            if begin >= end:
                return
            begin, finish = max(begin, start), min(finish, end)
            if begin < finish:
                yield from _minus_absences(schedule, begin, finish)
        day += ONE_DAY


def _window_interval(window: Window, day: date, zone: tzinfo) -> Interval:
    end_day = day if window.end > window.start else next_day(day)
    return wall_to_utc(day, window.start, zone), wall_to_utc(end_day, window.end, zone)


def _minus_absences(schedule: WeeklySchedule, begin: datetime, end: datetime) -> Iterator[Interval]:
    starts, ends = schedule.absent_utc
    index = bisect.bisect_right(ends, begin)
    cursor = begin
    while index < len(starts) and starts[index] < end and cursor < end:
        if starts[index] > cursor:
            yield cursor, starts[index]
        cursor = max(cursor, ends[index])
        index += 1
    if cursor < end:
        yield cursor, end


def _absent_through(schedule: WeeklySchedule, day: date) -> date | None:
    """The last day of the absence covering ``day``, or None when ``day`` is not absent."""
    ranges = schedule.absent_days
    index = bisect.bisect_right(ranges, (day, date.max)) - 1
    if index >= 0 and ranges[index][0] <= day <= ranges[index][1]:
        return ranges[index][1]
    return None


def _quiet_period(quiet: QuietHours, at: datetime) -> Interval | None:
    zone = quiet.zone
    local_day = at.astimezone(zone).date()
    # The day after is checked too: where clocks fall back across midnight, a
    # local time late on one day can come after the next day's midnight.
    for day in (previous_day(local_day), local_day, next_day(local_day)):
        end_day = day if quiet.end > quiet.start else next_day(day)
        begin, end = wall_to_utc(day, quiet.start, zone), wall_to_utc(end_day, quiet.end, zone)
        if begin <= at < end:
            return begin, end
    return None


def _utc(value: datetime, name: str) -> datetime:
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, got {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {value.isoformat()}")
    return value.astimezone(UTC)


def _check_horizon(horizon_days: int) -> int:
    if isinstance(horizon_days, bool) or not isinstance(horizon_days, int) or horizon_days < 1:
        raise ValueError(f"horizon_days must be a positive integer, got {horizon_days!r}")
    return horizon_days


def _horizon(start: datetime, horizon_days: int) -> datetime:
    limit = datetime(9999, 12, 1, tzinfo=UTC)  # room for a day of local-date arithmetic
    days = _check_horizon(horizon_days)
    return limit if limit - start <= timedelta(days=days) else start + timedelta(days=days)
