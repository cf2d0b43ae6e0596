"""The text and stored forms of office and quiet hours: parsing, checking, canonical formatting.

The spec syntax is the one the CLI takes::

    Mon-Thu 09:00-12:00,14:00-17:00; Fri 09:00-13:00; Sat 22:00-02:00

Groups are separated by ``;``. A group is a day list followed by a comma-separated
list of ``HH:MM-HH:MM`` windows. Days are ``Mon Tue Wed Thu Fri Sat Sun``
(case-insensitive), joined by ``,`` or written as a range with ``-``; a range may
wrap around the week (``Fri-Mon`` is Fri, Sat, Sun, Mon). An end at or before its
start spans midnight into the next day; ``24:00`` is allowed as an end and means
the midnight that closes the day. Whitespace around tokens is ignored, and so are
empty groups. An empty spec means no office hours at all.
"""

from __future__ import annotations

import itertools
import re
import zoneinfo
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, time

DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_DAY_INDEX = {name.lower(): index for index, name in enumerate(DAY_NAMES)}
_TIME = re.compile(r"(\d{1,2}):(\d{2})")
_RANGE = re.compile(r"(\d{1,2}:\d{2})\s*-\s*(\d{1,2}:\d{2})")

# (weekday, start, end) with the conventions of shared.schedule.Window.
WindowTuple = tuple[int, time, time]


class ScheduleError(ValueError):
    """A schedule, quiet-hours spec or stored form is invalid; the message names the bad part."""


def load_zone(tz: object) -> zoneinfo.ZoneInfo:
    """The ZoneInfo for an IANA key, or ScheduleError naming the key."""
    if not isinstance(tz, str):
        raise ScheduleError(f"time zone must be a string, got {tz!r}")
    try:
        return zoneinfo.ZoneInfo(tz)
    except (KeyError, ValueError, OSError):
        # ZoneInfoNotFoundError is a KeyError; malformed keys raise ValueError;
        # a key naming a directory (e.g. "Europe") raises an OSError.
        raise ScheduleError(f"unknown time zone {tz!r}") from None


def check_minute(value: object, what: str) -> time:
    """A naive ``time`` with whole minutes, or ScheduleError."""
    if not isinstance(value, time):
        raise ScheduleError(f"{what} must be a datetime.time, got {value!r}")
    if value.tzinfo is not None or value.second or value.microsecond:
        raise ScheduleError(f"{what} {value.isoformat()} must be a naive time in whole minutes")
    return value


def format_time(value: time, *, as_end: bool = False) -> str:
    """``HH:MM``; an end at midnight is written ``24:00``."""
    if as_end and value == time(0):
        return "24:00"
    return f"{value.hour:02d}:{value.minute:02d}"


def parse_time(text: str, where: str, *, as_end: bool = False) -> time:
    """Parse ``HH:MM`` (or ``24:00`` as an end). ``where`` is quoted in errors."""
    match = _TIME.fullmatch(text.strip())
    hour, minute = (int(match[1]), int(match[2])) if match else (-1, -1)
    if hour == 24 and minute == 0:
        if not as_end:
            raise ScheduleError(f"24:00 is only allowed as an end, in {where}")
        return time(0)
    if not (0 <= hour <= 23 and 0 <= minute <= 59):
        raise ScheduleError(f"bad time {text.strip()!r} in {where}, expected HH:MM")
    return time(hour, minute)


def parse_range(text: str, where: str) -> tuple[time, time]:
    """Parse ``HH:MM-HH:MM``; equal start and end is an error, except ``00:00-24:00``."""
    match = _RANGE.fullmatch(text.strip())
    if not match:
        raise ScheduleError(f"bad window {text.strip()!r} in {where}, expected HH:MM-HH:MM")
    start = parse_time(match[1], where)
    end = parse_time(match[2], where, as_end=True)
    if start == end and match[2].strip() != "24:00":
        raise ScheduleError(
            f"end {format_time(end)} must differ from start {format_time(start)} in {where}"
        )
    return start, end


def _parse_day(token: str, where: str) -> int:
    if not token:
        raise ScheduleError(f"missing day in {where}")
    try:
        return _DAY_INDEX[token.lower()]
    except KeyError:
        raise ScheduleError(f"unknown day {token!r} in {where}") from None


def _parse_days(text: str, where: str) -> list[int]:
    days: list[int] = []
    for item in text.split(","):
        first, dash, last = (part.strip() for part in item.strip().partition("-"))
        start = _parse_day(first, where)
        if not dash:
            days.append(start)
            continue
        stop = _parse_day(last, where)
        span = (stop - start) % 7
        days.extend((start + offset) % 7 for offset in range(span + 1))
    return days


def parse_spec(spec: str) -> list[WindowTuple]:
    """Parse the CLI office-hours syntax into (weekday, start, end) tuples, in spec order."""
    if not isinstance(spec, str):
        raise ScheduleError(f"office hours must be a string, got {spec!r}")
    windows: list[WindowTuple] = []
    for raw in spec.split(";"):
        group = raw.strip()
        if not group:
            continue
        where = f'"{group}"'
        split_at = next((i for i, char in enumerate(group) if char.isdigit()), len(group))
        day_text, time_text = group[:split_at].strip(), group[split_at:].strip()
        if not day_text:
            raise ScheduleError(f"missing days before the times in {where}")
        if not time_text:
            raise ScheduleError(f"missing times after the days in {where}")
        days = _parse_days(day_text, where)
        ranges = [parse_range(item, where) for item in time_text.split(",")]
        windows.extend((day, start, end) for day in days for start, end in ranges)
    return windows


def _format_days(days: Sequence[int]) -> str:
    """Runs of three or more consecutive days become ranges: ``Mon-Wed,Fri,Sat``."""
    parts: list[str] = []
    run_start = 0
    for index in range(1, len(days) + 1):
        if index < len(days) and days[index] == days[index - 1] + 1:
            continue
        run = days[run_start:index]
        if len(run) >= 3:
            parts.append(f"{DAY_NAMES[run[0]]}-{DAY_NAMES[run[-1]]}")
        else:
            parts.extend(DAY_NAMES[day] for day in run)
        run_start = index
    return ",".join(parts)


def format_spec(windows: Iterable[WindowTuple]) -> str:
    """The canonical spec: days with identical windows grouped, groups ordered by first day."""
    per_day: dict[int, list[tuple[time, time]]] = {}
    for day, start, end in windows:
        per_day.setdefault(day, []).append((start, end))
    groups: dict[tuple[tuple[time, time], ...], list[int]] = {}
    for day in sorted(per_day):
        groups.setdefault(tuple(sorted(per_day[day])), []).append(day)
    rendered = []
    for ranges, days in sorted(groups.items(), key=lambda item: item[1][0]):
        times = ",".join(f"{format_time(s)}-{format_time(e, as_end=True)}" for s, e in ranges)
        rendered.append(f"{_format_days(days)} {times}")
    return "; ".join(rendered)


def format_window(day: int, start: time, end: time) -> str:
    """One window as spec text, e.g. ``Sat 22:00-02:00``."""
    return f"{DAY_NAMES[day]} {format_time(start)}-{format_time(end, as_end=True)}"


def find_overlap(windows: Sequence[WindowTuple]) -> tuple[WindowTuple, WindowTuple] | None:
    """Two windows that share some minute of the week (local time), if any.

    Windows that merely touch (one ends where the next starts) do not overlap.
    """
    week = 7 * 1440
    segments: list[tuple[int, int, WindowTuple]] = []
    for window in windows:
        day, start, end = window
        begin = day * 1440 + start.hour * 60 + start.minute
        length = (end.hour * 60 + end.minute - start.hour * 60 - start.minute) % 1440 or 1440
        stop = begin + length
        segments.append((begin, min(stop, week), window))
        if stop > week:  # Sunday night into Monday morning
            segments.append((0, stop - week, window))
    segments.sort(key=lambda segment: (segment[0], segment[1]))
    for (_, stop, first), (begin, _, second) in itertools.pairwise(segments):
        if begin < stop:
            return first, second
    return None


def window_to_json(window: WindowTuple) -> dict[str, object]:
    """``{"day": "Sat", "start": "22:00", "end": "02:00"}``."""
    day, start, end = window
    end_text = format_time(end, as_end=True)
    return {"day": DAY_NAMES[day], "start": format_time(start), "end": end_text}


def window_from_json(value: object) -> WindowTuple:
    """The inverse of ``window_to_json``; ScheduleError on any malformed field."""
    fields = json_object(value, "window")
    day, start, end = (fields.get(key) for key in ("day", "start", "end"))
    if not (isinstance(day, str) and isinstance(start, str) and isinstance(end, str)):
        raise ScheduleError(f"window needs string day, start and end, got {value!r}")
    where = f'"{day} {start}-{end}"'
    begin, finish = parse_range(f"{start}-{end}", where)
    return _parse_day(day.strip(), where), begin, finish


def json_object(value: object, what: str) -> Mapping[str, object]:
    """``value`` if it is a JSON object, else ScheduleError."""
    if not isinstance(value, Mapping):
        raise ScheduleError(f"{what} must be an object, got {value!r}")
    return value


def json_list(value: object, what: str) -> list[object]:
    """``value`` as a list if it is a JSON array, else ScheduleError."""
    if not isinstance(value, list | tuple):
        raise ScheduleError(f"{what} must be a list, got {value!r}")
    return list(value)


def json_str(value: object, what: str) -> str:
    """``value`` if it is a string, else ScheduleError."""
    if not isinstance(value, str):
        raise ScheduleError(f"{what} must be a string, got {value!r}")
    return value


def json_optional_str(value: object, what: str) -> str | None:
    """``value`` if it is a string or null, else ScheduleError."""
    return None if value is None else json_str(value, what)


def json_date(value: object, what: str) -> date:
    """An ISO ``YYYY-MM-DD`` string as a date, else ScheduleError."""
    try:
        return date.fromisoformat(json_str(value, what))
    except ValueError:
        raise ScheduleError(f"{what} {value!r} is not an ISO date (YYYY-MM-DD)") from None
