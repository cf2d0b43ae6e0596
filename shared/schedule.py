"""Office hours, absences and quiet hours: the value types, their checks and stored forms.

``Window``, ``Absence``, ``WeeklySchedule`` and ``QuietHours`` are frozen and
checked on construction (ScheduleError names the bad part); each parses from and
formats to the CLI syntax or its JSON form via ``shared.schedule_parse``. The
rules over them (``is_open``, ``next_alert_time``, ``office_windows_between``,
``add_office_time``, ``add_business_days``, ``is_quiet``, ``quiet_until``) live
in ``shared.schedule_time``, which reads the derived, cached views the types
offer (``zone``, ``by_weekday``, ``absent_days``, ``absent_utc``). Both modules
resolve wall times to instants with ``shared.wall_time``.

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

import dataclasses
import functools
from collections.abc import Iterable
from datetime import date, datetime, time, tzinfo

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
from shared.wall_time import ONE_DAY, next_day, wall_to_utc

__all__ = [
    "Absence",
    "QuietHours",
    "ScheduleError",
    "WeeklySchedule",
    "Window",
]

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
    def zone(self) -> tzinfo:
        """The zone ``tz`` names, loaded once."""
        return load_zone(self.tz)

    @functools.cached_property
    def by_weekday(self) -> tuple[tuple[Window, ...], ...]:
        """The windows grouped by weekday: index 0 (Mon) to 6 (Sun), each sorted."""
        return tuple(tuple(w for w in self.windows if w.weekday == d) for d in range(7))

    @functools.cached_property
    def absent_days(self) -> tuple[tuple[date, date], ...]:
        """Absences merged into sorted, disjoint, non-adjacent inclusive date ranges."""
        merged: list[tuple[date, date]] = []
        for absence in self.absences:
            if merged and absence.first_day <= merged[-1][1] + ONE_DAY:
                merged[-1] = (merged[-1][0], max(merged[-1][1], absence.last_day))
            else:
                merged.append((absence.first_day, absence.last_day))
        return tuple(merged)

    @functools.cached_property
    def absent_utc(self) -> tuple[tuple[datetime, ...], tuple[datetime, ...]]:
        """Starts and ends of ``absent_days`` as sorted UTC instants, for bisecting."""
        starts: list[datetime] = []
        ends: list[datetime] = []
        for first, last in self.absent_days:
            starts.append(wall_to_utc(first, time(0), self.zone))
            ends.append(wall_to_utc(next_day(last), time(0), self.zone))
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
    def zone(self) -> tzinfo:
        """The zone ``tz`` names, loaded once."""
        return load_zone(self.tz)


def _as_tuple(window: Window) -> WindowTuple:
    return window.weekday, window.start, window.end


def _absence_key(absence: Absence) -> tuple[date, date, str, str]:
    return absence.first_day, absence.last_day, absence.id or "", absence.note or ""
