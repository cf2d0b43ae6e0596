"""End to end: office hours, absences, agreements and what sending tells people.

Real services as processes, the real CLI as subprocesses, the real clock: hours
"that exclude now" are a one-hour window two days ahead (UTC), hours "that
include now" are the whole week. The client's machine runs in Asia/Tokyo, so
times must be shown in its zone with the therapist's (UTC) named beside them.
"""

from __future__ import annotations

import time as clock
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from shared.boundaries import Agreement, reply_by
from shared.schedule import WeeklySchedule
from shared.schedule_parse import DAY_NAMES
from shared.schedule_time import next_alert_time
from tests.e2e.helpers import Cli, Stack, enroll_pair, poll

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

CLIENT_TZ = "Asia/Tokyo"      # the client's machine: not the therapist's zone, no DST
THERAPIST_TZ = "Europe/Berlin"  # the therapist's machine (their office hours are in UTC)
ALWAYS_OPEN = "Mon-Sun 00:00-24:00"
QUIET_SECONDS = 5.0
DIGEST_SECONDS = 20.0


def _closed_hours(now: datetime) -> str:
    """One hour two days from now, UTC: closed now, open again before long."""
    return f"{DAY_NAMES[(now + timedelta(days=2)).weekday()]} 10:00-11:00"


def _shown(at: datetime, zone: str) -> str:
    return at.astimezone(ZoneInfo(zone)).strftime("%a %d %b %Y, %H:%M %Z")


def _boxed(out: str) -> str:
    """The text inside the boxed crisis block, unwrapped."""
    lines = out.splitlines()
    top = lines.index(next(line for line in lines if line.startswith("+---")))
    bottom = lines.index(next(line for line in lines[top + 1:] if line.startswith("+---")),
                         top + 1)
    inner = [line[2:-2].strip() for line in lines[top + 1:bottom]]
    assert inner[0] == "IF YOU CANNOT WAIT", inner
    return " ".join(part for part in inner[1:] if part)


def _one_error_line(result: Any, *needles: str) -> str:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("interlude-client: "), lines
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return str(lines[0])


def test_hours_errors_and_absences(stack: Stack, tmp_path: Path) -> None:
    cli = Cli(stack)
    therapist, client = enroll_pair(cli, tmp_path)

    out = cli.run(client, "hours", "show").stdout
    assert "No office hours set: alerts reach your therapist at any time" in out
    assert "No office hours set: alerts reach you at any time" in cli.run(
        therapist, "hours", "show").stdout

    bad_spec = cli.run(therapist, "hours", "set", "Mon 09:00-25:00; Fri 09:00-13:00",
                       "--tz", "UTC", ok=False)
    _one_error_line(bad_spec, "25:00")
    bad_day = cli.run(therapist, "hours", "set", "Mox 09:00-12:00", "--tz", "UTC", ok=False)
    _one_error_line(bad_day, "'Mox'")
    bad_zone = cli.run(therapist, "hours", "set", "Mon 09:00-12:00", "--tz", "Mars/Olympus",
                       ok=False)
    _one_error_line(bad_zone, "Mars/Olympus")
    assert cli.json(therapist, "hours", "show")["set"] is False  # nothing was stored

    spec = "Mon-Thu 09:00-12:00,14:00-17:00; Fri 09:00-13:00; Sat 22:00-02:00"
    saved = cli.json(therapist, "hours", "set", spec, "--tz", "Europe/Berlin")
    assert (saved["set"], saved["spec"], saved["tz"]) == (True, spec, "Europe/Berlin")

    first, last = date.today() + timedelta(days=30), date.today() + timedelta(days=39)
    added = cli.json(therapist, "away", "add", first.isoformat(), last.isoformat(),
                     "--note", "Winter break")
    assert (added["first_day"], added["last_day"], added["note"]) == (
        first.isoformat(), last.isoformat(), "Winter break")
    listed = cli.json(therapist, "away", "list")
    assert [a["id"] for a in listed] == [added["id"]]
    text = cli.run(therapist, "away", "list").stdout
    assert f"{added['id']}  {first} to {last}  Winter break" in text

    seen = cli.run(client, "hours", "show").stdout
    assert f"Office hours (Europe/Berlin): {spec}" in seen
    assert f"{first} to {last}  Winter break" in seen
    assert "Open now: " in seen

    backwards = cli.run(therapist, "away", "add", last.isoformat(), first.isoformat(), ok=False)
    _one_error_line(backwards, "before the first day")
    cli.run(therapist, "away", "remove", added["id"])
    assert cli.json(therapist, "away", "list") == []
    gone = cli.run(therapist, "away", "remove", added["id"], ok=False)
    assert gone.returncode == 1
    _one_error_line(gone)
    refused = cli.run(client, "hours", "set", "Mon 09:00-12:00", "--tz", "UTC", ok=False)
    _one_error_line(refused, "only a therapist")


def test_agreement_set_is_seen_by_the_client(stack: Stack, tmp_path: Path) -> None:
    cli = Cli(stack)
    therapist, client = enroll_pair(cli, tmp_path)

    before = cli.json(client, "agreement", "show")
    assert (before["checkins_allowed"], before["checkin_period"], before["urgent_policy"],
            before["reply_window"]) == (3, "week", "urgent-in-hours",
                                        {"amount": 2, "unit": "business_days"})

    crisis = "Call Ana on +49 30 1234 5678 between sessions, or 112 in an emergency."
    cli.run(therapist, "agreement", "set", "--client", client.email, "--checkins", "1",
            "--per", "day", "--reply-within", "8 office hours", "--urgent", "urgent-anytime",
            "--quiet", "21:00-08:00", "--client-tz", "Europe/Berlin", "--crisis", crisis)
    after = cli.json(client, "agreement", "show")
    assert after["version"] > before["version"]
    assert (after["checkins_allowed"], after["checkin_period"], after["urgent_policy"]) == (
        1, "day", "urgent-anytime")
    assert after["reply_window"] == {"amount": 8, "unit": "office_hours"}
    assert after["client_quiet_hours"] == {"tz": "Europe/Berlin", "start": "21:00",
                                           "end": "08:00"}
    assert after["crisis_resources"] == after["crisis_resources_effective"] == crisis
    shown = cli.run(client, "agreement", "show").stdout
    for line in ("check-ins:        1 per day", "reply within:     8 office hours",
                 "urgent:           urgent-anytime",
                 "quiet hours:      21:00-08:00 Europe/Berlin",
                 "crisis resources (set for this relationship):"):
        assert line in shown, shown
    assert therapist.email in shown

    # Beyond the agreed frequency a check-in is still accepted, and the client is told.
    assert "Check-in 1 of 1 agreed this day: within the agreement." in cli.run(
        client, "send", "first of the day").stdout
    beyond = cli.run(client, "send", "second of the day").stdout
    assert "Check-in 2 of 1 agreed this day: beyond the agreement. It is still accepted" \
        in beyond

    cli.run(therapist, "agreement", "set", "--checkins", "unlimited", "--no-quiet",
            "--crisis-default")
    reset = cli.json(client, "agreement", "show")
    assert (reset["checkins_allowed"], reset["client_quiet_hours"],
            reset["crisis_resources"]) == (None, None, None)
    assert reset["crisis_resources_effective"]

    bad = cli.run(therapist, "agreement", "set", "--quiet", "21:00-08:00", ok=False)
    _one_error_line(bad, "--client-tz")
    refused = cli.run(client, "agreement", "set", "--checkins", "9", ok=False)
    _one_error_line(refused, "only a therapist")


def test_a_checkin_outside_hours_waits_for_the_digest(stack: Stack, tmp_path: Path) -> None:
    cli = Cli(stack)
    therapist, client = enroll_pair(cli, tmp_path)
    now = datetime.now(UTC)
    closed = _closed_hours(now)
    cli.run(therapist, "hours", "set", closed, "--tz", "UTC")
    crisis = cli.json(client, "agreement", "show")["crisis_resources_effective"]

    schedule = WeeklySchedule.parse(closed, "UTC")
    alert_at = next_alert_time(schedule, now)
    due = reply_by(schedule, Agreement(), now)
    assert alert_at is not None
    assert due is not None
    assert alert_at.date() == (now + timedelta(days=2)).date()

    out = cli.run(client, "send", "I keep thinking about Sunday", tz=CLIENT_TZ).stdout
    assert (f"Your therapist will be alerted at {_shown(alert_at, CLIENT_TZ)} "
            f"({alert_at:%H:%M} UTC, your therapist's time, UTC), when their office hours "
            "next open.") in out, out
    assert (f"Expect a reply by {_shown(due, CLIENT_TZ)} ({due:%H:%M} UTC, your therapist's "
            "time, UTC).") in out, out
    assert "Check-in 1 of 3 agreed this week: within the agreement." in out
    assert _boxed(out) == " ".join(crisis.split())

    # Held: nothing reaches the therapist while their hours are closed.
    deadline = clock.monotonic() + QUIET_SECONDS
    while clock.monotonic() < deadline:
        assert cli.json(therapist, "notifications") == []
        clock.sleep(1)

    cli.run(therapist, "hours", "set", ALWAYS_OPEN, "--tz", "UTC")
    items = poll("the therapist's digest", lambda: cli.json(therapist, "notifications"),
                 lambda items: any(n["kind"] == "digest" for n in items),
                 timeout=DIGEST_SECONDS)
    digest = next(n for n in items if n["kind"] == "digest")
    assert digest["details"]["checkins"] == 1, digest
    assert digest["details"]["clients"] == 1, digest
    assert "checkin.received" not in {n["kind"] for n in items}, items
    listed = cli.run(therapist, "notifications").stdout
    assert "digest: 1 new check-in from 1 client" in listed, listed

    # Inside hours, the next check-in alerts at once and needs no crisis box.
    now_out = cli.run(client, "send", "better today").stdout
    assert "Your therapist is being alerted now." in now_out
    assert "IF YOU CANNOT WAIT" not in now_out


def test_a_reply_outside_hours_is_held_unless_now(stack: Stack, tmp_path: Path) -> None:
    cli = Cli(stack)
    therapist, client = enroll_pair(cli, tmp_path)
    now = datetime.now(UTC)
    closed = _closed_hours(now)
    cli.run(therapist, "hours", "set", closed, "--tz", "UTC")

    answer = cli.json(client, "send", "can we move Thursday?")
    assert answer["expectation"]["alert"] == "later"
    assert answer["expectation"]["crisis_resources"]

    now_reply = cli.run(therapist, "reply", "--to", client.email, "--now", "see you Friday")
    assert "Delivered now, as asked" in now_reply.stdout
    assert [(m["kind"], m.get("text")) for m in cli.json(client, "inbox")] == [
        ("checkin", "can we move Thursday?"), ("reply", "see you Friday")]

    opening = next_alert_time(WeeklySchedule.parse(closed, "UTC"), now)
    assert opening is not None
    held = cli.run(therapist, "reply", "--to", client.email, "bring the notes",
                   tz=THERAPIST_TZ).stdout
    assert (f"Held: you are outside your office hours, so {client.name} receives it at "
            f"{_shown(opening, THERAPIST_TZ)}, when your hours next open.") in held, held
    assert "send it with --now" in held
    assert [m.get("text") for m in cli.json(client, "inbox")] == [
        "can we move Thursday?", "see you Friday"]
    # The therapist's own history holds both replies.
    assert [m.get("text") for m in cli.json(therapist, "inbox")] == [
        "can we move Thursday?", "see you Friday", "bring the notes"]


def test_a_held_reply_hides_nothing_else_from_the_client(stack: Stack, tmp_path: Path) -> None:
    """A held reply is invisible to the client until released, but only that reply: a
    reply sent later with --now, and the client's own later check-ins, are not held."""
    cli = Cli(stack)
    therapist, client = enroll_pair(cli, tmp_path)
    cli.run(therapist, "hours", "set", _closed_hours(datetime.now(UTC)), "--tz", "UTC")
    cli.run(therapist, "reply", "--to", client.email, "held until my hours open")
    cli.run(therapist, "reply", "--to", client.email, "--now", "urgent: call me")
    cli.run(client, "send", "a later check-in")
    seen = [m.get("text") for m in cli.json(client, "inbox")]
    assert seen == ["urgent: call me", "a later check-in"], (
        f"the client sees {seen}: messages after a held reply are hidden from the client")
