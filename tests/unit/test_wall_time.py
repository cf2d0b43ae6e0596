"""Wall times to UTC across daylight-saving changes, and day stepping at the
ends of the calendar."""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from zoneinfo import ZoneInfo

from shared.wall_time import ONE_DAY, next_day, previous_day, wall_to_utc

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def test_an_ordinary_wall_time_is_that_instant() -> None:
    assert wall_to_utc(date(2026, 6, 1), time(9, 0), BERLIN) == datetime(2026, 6, 1, 7, 0,
                                                                          tzinfo=UTC)


def test_a_wall_time_in_the_spring_forward_gap_is_the_transition() -> None:
    # 02:30 does not exist in Berlin that night: clocks go from 02:00 CET to 03:00 CEST.
    assert wall_to_utc(date(2026, 3, 29), time(2, 30), BERLIN) == datetime(
        2026, 3, 29, 1, 0, tzinfo=UTC)


def test_a_repeated_wall_time_in_the_fall_back_hour_is_its_first_occurrence() -> None:
    # 01:30 happens twice in New York that night: first EDT (UTC-4), then EST.
    assert wall_to_utc(date(2026, 11, 1), time(1, 30), NEW_YORK) == datetime(
        2026, 11, 1, 5, 30, tzinfo=UTC)


def test_day_steps_stay_put_at_the_ends_of_the_calendar() -> None:
    assert next_day(date(2026, 12, 31)) == date(2027, 1, 1)
    assert previous_day(date(2026, 1, 1)) == date(2025, 12, 31)
    assert next_day(date.max) == date.max
    assert previous_day(date.min) == date.min
    assert date(2026, 1, 1) + ONE_DAY == date(2026, 1, 2)
