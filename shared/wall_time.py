"""Local wall-clock dates and times to UTC instants, and day stepping.

``wall_to_utc`` turns a wall time on a local date in a zone into the UTC
instant it denotes. Daylight saving makes that ambiguous in two ways, resolved
as the schedule definitions in ``shared.schedule`` require:

* a **nonexistent** wall time (in the spring-forward gap) resolves to the first
  valid instant after it, which is the transition itself: Berlin ``02:30`` on
  2026-03-29 is 03:00 CEST;
* an **ambiguous** wall time (in the fall-back repeat) resolves to its first
  occurrence (``fold=0``): New York ``01:30`` on 2026-11-01 is 01:30 EDT.

``next_day`` and ``previous_day`` step a date by ``ONE_DAY`` but stay put at
``date.max`` and ``date.min`` instead of overflowing.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta, tzinfo

__all__ = ["ONE_DAY", "next_day", "previous_day", "wall_to_utc"]

ONE_DAY = timedelta(days=1)


def wall_to_utc(day: date, wall: time, zone: tzinfo) -> datetime:
    """The UTC instant of wall time ``wall`` on local date ``day`` in ``zone``: the
    first occurrence if it repeats, the transition (first valid instant after it)
    if it falls in a gap."""
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


def previous_day(day: date) -> date:
    """The day before ``day``; ``date.min`` stays ``date.min``."""
    return day if day == date.min else day - ONE_DAY


def next_day(day: date) -> date:
    """The day after ``day``; ``date.max`` stays ``date.max``."""
    return day if day == date.max else day + ONE_DAY
