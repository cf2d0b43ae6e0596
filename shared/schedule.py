"""Office hours, absences and quiet hours: pure rules over injected instants.

Nothing here reads the clock; every rule takes ``now``/``at``/``start`` from its
caller. Every datetime taken must be timezone-aware (a naive one is a
ValueError) and is treated as the instant it denotes; every datetime returned
is in UTC.

Definitions, fixed here once for the whole system:

* **Windows** are wall-clock local time in the therapist's zone. A window runs
  from its start on its weekday to its end the same day, or, when the end is at
  or before the start, to its end on the next day (``Sat 22:00-02:00``). The end
  is exclusive: at the end instant the therapist is no longer open. A window on
  a daylight-saving day keeps its wall-clock bounds, so its real length
  changes: ``00:00-12:00`` in Berlin lasts 11 hours on 2026-03-29 and 13 hours
  on 2026-10-25.
* **Nonexistent wall times** (the spring-forward gap) resolve to the first valid
  instant after them, which is the transition itself: Berlin ``02:30`` on
  2026-03-29 is 03:00 CEST. A window lying wholly inside the gap is empty.
* **Ambiguous wall times** (the fall-back repeat) resolve to their first
  occurrence (``fold=0``). A window ``01:00-03:00`` on New York's 2026-11-01
  therefore starts at 01:00 EDT and lasts three real hours.
* **Absences** cover whole local days, first and last day included: from local
  midnight starting the first day to local midnight ending the last day. Any
  part of a window that falls on an absence day is closed, including the part
  after midnight of a window that started the day before.
* **Business days.** An *office day* is a local date that is not an absence day
  and on which at least one window starts and is open for some time. A reply
  due in N business days is due at the end of the Nth office day after the day
  of receipt (the local date of ``start``), where the end of an office day is the
  end of the last window that starts on it, cut short by an absence the next
  day. The day of receipt never counts, even when the message arrives before
  that day's hours: a client is never promised a same-day reply.
* **Quiet hours** are a daily range in the client's zone, resolved with the same
  gap and fold rules.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from collections.abc import Iterable, Iterator
from datetime import UTC, date, datetime, time, timedelta, tzinfo

from shared.schedule_parse import (
    DAY_NAMES,
    ScheduleError,
    WindowTuple,
    check_minute,
    find_overlap,
    format_spec,
    format_time,
    format_window,
    json_date,
    json_list,
    json_object,
    json_optional_str,
    json_str,
    load_zone,
    parse_range,
    parse_spec,
    parse_time,
    window_from_json,
    window_to_json,
)

__all__ = [
    "DEFAULT_HORIZON_DAYS",
    "Absence",
    "QuietHours",
    "ScheduleError",
    "WeeklySchedule",
    "Window",
    "add_business_days",
    "add_office_time",
    "is_open",
    "is_quiet",
    "next_alert_time",
    "office_windows_between",
    "quiet_until",
]

DEFAULT_HORIZON_DAYS = 366
_ONE_DAY = timedelta(days=1)
_TICK = timedelta(microseconds=1)
Interval = tuple[datetime, datetime]


@dataclasses.dataclass(frozen=True)
class Window:
    """A weekly window: ``weekday`` 0=Mon..6=Sun, wall-clock ``start`` to ``end``.

    ``end <= start`` spans midnight into the next day; ``end == 00:00`` is the
    midnight closing the day (written ``24:00``), so ``00:00-24:00`` is a whole day.
    """

    weekday: int
    start: time
    end: time

    def __post_init__(self) -> None:
        if isinstance(self.weekday, bool) or self.weekday not in range(7):
            raise ScheduleError(f"weekday must be 0 (Mon) to 6 (Sun), got {self.weekday!r}")
        check_minute(self.start, "start")
        check_minute(self.end, "end")
        if self.start == self.end != time(0):
            raise ScheduleError(
                f"end {format_time(self.end)} must differ from start {format_time(self.start)}"
                f" in {DAY_NAMES[self.weekday]}"
            )

    def __str__(self) -> str:
        return format_window(self.weekday, self.start, self.end)


@dataclasses.dataclass(frozen=True)
class Absence:
    """Whole local days ``first_day`` to ``last_day`` inclusive with no office hours."""

    id: str | None
    first_day: date
    last_day: date
    note: str | None = None

    def __post_init__(self) -> None:
        for name in ("first_day", "last_day"):
            value = getattr(self, name)
            if not isinstance(value, date) or isinstance(value, datetime):
                raise ScheduleError(f"absence {name} must be a date, got {value!r}")
        if self.last_day < self.first_day:
            raise ScheduleError(
                f"absence last day {self.last_day} is before its first day {self.first_day}"
            )
        for name in ("id", "note"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ScheduleError(f"absence {name} must be a string or null")

    def to_json(self, *, include_note: bool = True) -> dict[str, object]:
        """``{"id", "first_day", "last_day", "note"}`` with ISO dates."""
        return {
            "id": self.id,
            "first_day": self.first_day.isoformat(),
            "last_day": self.last_day.isoformat(),
            "note": self.note if include_note else None,
        }

    @classmethod
    def from_json(cls, data: object) -> Absence:
        """The inverse of ``to_json``; ScheduleError on any malformed field."""
        fields = json_object(data, "absence")
        return cls(
            id=json_optional_str(fields.get("id"), "absence id"),
            first_day=json_date(fields.get("first_day"), "absence first_day"),
            last_day=json_date(fields.get("last_day"), "absence last_day"),
            note=json_optional_str(fields.get("note"), "absence note"),
        )


@dataclasses.dataclass(frozen=True)
class WeeklySchedule:
    """A therapist's weekly office hours in IANA zone ``tz``, plus absences.

    Windows may not overlap (touching is fine). Windows and absences are kept
    sorted, so equal schedules compare equal however they were written.
    """

    tz: str
    windows: tuple[Window, ...] = ()
    absences: tuple[Absence, ...] = ()

    def __post_init__(self) -> None:
        load_zone(self.tz)
        for window in self.windows:
            if not isinstance(window, Window):
                raise ScheduleError(f"windows must be Window objects, got {window!r}")
        windows = tuple(sorted(self.windows, key=_as_tuple))
        overlap = find_overlap([_as_tuple(w) for w in windows])
        if overlap:
            first, second = (format_window(*w) for w in overlap)
            raise ScheduleError(f"overlapping windows {first} and {second}")
        for absence in self.absences:
            if not isinstance(absence, Absence):
                raise ScheduleError(f"absences must be Absence objects, got {absence!r}")
        absences = tuple(sorted(self.absences, key=_absence_key))
        object.__setattr__(self, "windows", windows)
        object.__setattr__(self, "absences", absences)

    @classmethod
    def parse(cls, spec: str, tz: str, absences: Iterable[Absence] = ()) -> WeeklySchedule:
        """Parse the CLI syntax, e.g. ``"Mon-Thu 09:00-12:00,14:00-17:00; Fri 09:00-13:00"``."""
        windows = tuple(Window(day, start, end) for day, start, end in parse_spec(spec))
        return cls(tz=tz, windows=windows, absences=tuple(absences))

    def to_spec(self) -> str:
        """The canonical spec of the windows (absences are not part of it)."""
        return format_spec(_as_tuple(w) for w in self.windows)

    def to_json(self, *, include_notes: bool = True) -> dict[str, object]:
        """A JSON-ready dict (for jsonb and events); ``include_notes=False`` drops absence notes."""
        return {
            "tz": self.tz,
            "windows": [window_to_json(_as_tuple(w)) for w in self.windows],
            "absences": [a.to_json(include_note=include_notes) for a in self.absences],
        }

    @classmethod
    def from_json(cls, data: object) -> WeeklySchedule:
        """The inverse of ``to_json``; ScheduleError on any malformed field."""
        fields = json_object(data, "schedule")
        windows = json_list(fields.get("windows", []), "schedule windows")
        absences = json_list(fields.get("absences", []), "schedule absences")
        return cls(
            tz=json_str(fields.get("tz"), "schedule tz"),
            windows=tuple(Window(*window_from_json(w)) for w in windows),
            absences=tuple(Absence.from_json(a) for a in absences),
        )

    @functools.cached_property
    def _zone(self) -> tzinfo:
        return load_zone(self.tz)

    @functools.cached_property
    def _by_weekday(self) -> tuple[tuple[Window, ...], ...]:
        return tuple(tuple(w for w in self.windows if w.weekday == d) for d in range(7))

    @functools.cached_property
    def _absent_days(self) -> tuple[tuple[date, date], ...]:
        """Absences merged into disjoint, non-adjacent inclusive date ranges."""
        merged: list[tuple[date, date]] = []
        for absence in self.absences:
            if merged and absence.first_day <= merged[-1][1] + _ONE_DAY:
                merged[-1] = (merged[-1][0], max(merged[-1][1], absence.last_day))
            else:
                merged.append((absence.first_day, absence.last_day))
        return tuple(merged)

    @functools.cached_property
    def _absent_utc(self) -> tuple[tuple[datetime, ...], tuple[datetime, ...]]:
        """Starts and ends of the absences as UTC instants, for bisecting."""
        starts: list[datetime] = []
        ends: list[datetime] = []
        for first, last in self._absent_days:
            starts.append(_resolve(first, time(0), self._zone))
            ends.append(_resolve(_next_day(last), time(0), self._zone))
        return tuple(starts), tuple(ends)


@dataclasses.dataclass(frozen=True)
class QuietHours:
    """A client's daily quiet period in IANA zone ``tz``; ``end <= start`` spans midnight."""

    tz: str
    start: time
    end: time

    def __post_init__(self) -> None:
        load_zone(self.tz)
        check_minute(self.start, "quiet hours start")
        check_minute(self.end, "quiet hours end")
        if self.start == self.end:
            raise ScheduleError(
                f"quiet hours end {format_time(self.end, as_end=True)} must differ from start"
                f" {format_time(self.start)}; quiet hours cannot cover the whole day"
            )

    @classmethod
    def parse(cls, spec: str, tz: str) -> QuietHours:
        """Parse ``"21:00-08:00"``."""
        if not isinstance(spec, str):
            raise ScheduleError(f"quiet hours must be a string, got {spec!r}")
        start, end = parse_range(spec, f'"{spec.strip()}"')
        return cls(tz=tz, start=start, end=end)

    def to_spec(self) -> str:
        """``HH:MM-HH:MM`` (an end at midnight as ``24:00``)."""
        return f"{format_time(self.start)}-{format_time(self.end, as_end=True)}"

    def to_json(self) -> dict[str, object]:
        """``{"tz", "start", "end"}``."""
        return {"tz": self.tz, "start": format_time(self.start),
                "end": format_time(self.end, as_end=True)}

    @classmethod
    def from_json(cls, data: object) -> QuietHours:
        """The inverse of ``to_json``; ScheduleError on any malformed field."""
        fields = json_object(data, "quiet hours")
        start, end = (json_str(fields.get(k), f"quiet hours {k}") for k in ("start", "end"))
        where = f'"{start}-{end}"'
        return cls(tz=json_str(fields.get("tz"), "quiet hours tz"),
                   start=parse_time(start, where), end=parse_time(end, where, as_end=True))

    @functools.cached_property
    def _zone(self) -> tzinfo:
        return load_zone(self.tz)


# --- rules -------------------------------------------------------------------


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

    See the module docstring for *office day* and its end. ``days`` must be at
    least 1. None when fewer than ``days`` office days follow within
    ``horizon_days`` local days after the day of receipt.
    """
    start = _utc(start, "start")
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"days must be a positive integer, got {days!r}")
    zone = schedule._zone
    receipt = start.astimezone(zone).date()
    last = receipt + timedelta(days=_check_horizon(horizon_days))
    day, counted = receipt + _ONE_DAY, 0
    while day <= last:
        absent_until = _absent_through(schedule, day)
        if absent_until is not None:
            day = absent_until + _ONE_DAY
            continue
        day_end: datetime | None = None
        for window in schedule._by_weekday[day.weekday()]:
            begin, finish = _window_interval(window, day, zone)
            for piece in _minus_absences(schedule, begin, finish):
                day_end = piece[1]
        if day_end is not None:
            counted += 1
            if counted == days:
                return day_end
        day += _ONE_DAY
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
    zone = schedule._zone
    day = _previous_day(start.astimezone(zone).date())  # last night's window may still run
    last = _next_day(end.astimezone(zone).date())
    while day <= last:
        absent_until = _absent_through(schedule, day)
        if absent_until is not None and absent_until > day:
            # Windows starting on the last absent day may run past its midnight.
            day = absent_until
            continue
        for window in schedule._by_weekday[day.weekday()]:
            begin, finish = _window_interval(window, day, zone)
            if begin >= end:
                return
            begin, finish = max(begin, start), min(finish, end)
            if begin < finish:
                yield from _minus_absences(schedule, begin, finish)
        day += _ONE_DAY


def _window_interval(window: Window, day: date, zone: tzinfo) -> Interval:
    end_day = day if window.end > window.start else _next_day(day)
    return _resolve(day, window.start, zone), _resolve(end_day, window.end, zone)


def _minus_absences(schedule: WeeklySchedule, begin: datetime, end: datetime) -> Iterator[Interval]:
    starts, ends = schedule._absent_utc
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
    ranges = schedule._absent_days
    index = bisect.bisect_right(ranges, (day, date.max)) - 1
    if index >= 0 and ranges[index][0] <= day <= ranges[index][1]:
        return ranges[index][1]
    return None


def _quiet_period(quiet: QuietHours, at: datetime) -> Interval | None:
    zone = quiet._zone
    local_day = at.astimezone(zone).date()
    # The day after is checked too: where clocks fall back across midnight, a
    # local time late on one day can come after the next day's midnight.
    for day in (_previous_day(local_day), local_day, _next_day(local_day)):
        end_day = day if quiet.end > quiet.start else _next_day(day)
        begin, end = _resolve(day, quiet.start, zone), _resolve(end_day, quiet.end, zone)
        if begin <= at < end:
            return begin, end
    return None


def _resolve(day: date, wall: time, zone: tzinfo) -> datetime:
    """The UTC instant of a local wall time: the first occurrence if it repeats,
    the transition (first valid instant after it) if it falls in a gap."""
    naive = datetime.combine(day, wall)
    first = naive.replace(tzinfo=zone).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == naive:
        return first
    # In a gap, fold=0 applies the offset from before the transition and fold=1
    # the one after, so the transition lies in (low, high]. Transitions fall on
    # whole seconds; bisect on seconds to find it.
    low = naive.replace(tzinfo=zone, fold=1).astimezone(UTC)
    high = first
    before = low.astimezone(zone).utcoffset()
    lo_s, hi_s = int(low.timestamp()), int(high.timestamp())
    while hi_s - lo_s > 1:
        mid = (lo_s + hi_s) // 2
        if datetime.fromtimestamp(mid, UTC).astimezone(zone).utcoffset() == before:
            lo_s = mid
        else:
            hi_s = mid
    return datetime.fromtimestamp(hi_s, UTC)


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


def _previous_day(day: date) -> date:
    return day if day == date.min else day - _ONE_DAY


def _next_day(day: date) -> date:
    return day if day == date.max else day + _ONE_DAY


def _as_tuple(window: Window) -> WindowTuple:
    return window.weekday, window.start, window.end


def _absence_key(absence: Absence) -> tuple[date, date, str, str]:
    return absence.first_day, absence.last_day, absence.id or "", absence.note or ""

