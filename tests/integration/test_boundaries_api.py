"""Office hours, absences and agreements through the real gateway and messaging."""

from __future__ import annotations

import asyncio
import base64
import uuid
from datetime import UTC, date, datetime, timedelta

import pytest

from services.messaging import submission
from services.messaging.typedefs import POOL
from tests.integration.conftest import new_pair
from tests.support.stack import Person, Stack

pytestmark = pytest.mark.integration
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
ALWAYS = "Mon-Sun 00:00-24:00"


def elsewhere_in_the_week() -> tuple[str, datetime]:
    """A one-hour window on a day two days from now (UTC), and when it opens."""
    day = datetime.now(UTC).date() + timedelta(days=2)
    opens = datetime(day.year, day.month, day.day, 9, tzinfo=UTC)
    return f"{DAYS[day.weekday()]} 09:00-10:00", opens


async def set_hours(stack: Stack, therapist: Person, spec: str, tz: str = "UTC") -> dict:
    status, data = await stack.call("PUT", "/v1/availability", therapist,
                                    json={"spec": spec, "tz": tz})
    assert status == 200, data
    return data


async def checkin(stack: Stack, client: Person, rid: uuid.UUID, text: str = "x",
                  flags: int = 0) -> dict:
    status, data = await stack.post(client, rid, await stack.envelope(client, rid, text,
                                                                      flags=flags))
    assert status == 201, data
    return data


async def test_schedule_errors_name_the_bad_part(stack: Stack) -> None:
    therapist, client, _ = await new_pair(stack)
    status, data = await stack.call("PUT", "/v1/availability", therapist,
                                    json={"spec": "Mnd 09:00-12:00", "tz": "Europe/Berlin"})
    assert status == 422
    assert "Mnd" in data["error"]["message"]
    assert data["error"]["field"] == "spec"
    status, data = await stack.call("PUT", "/v1/availability", therapist,
                                    json={"spec": "Mon 09:00-12:00", "tz": "Europe/Berln"})
    assert status == 422
    assert data["error"]["field"] == "tz"
    assert "Europe/Berln" in data["error"]["message"]
    status, data = await stack.call("PUT", "/v1/availability", client,
                                    json={"spec": ALWAYS, "tz": "UTC"})
    assert status == 403


async def test_hours_are_shown_to_both_sides(stack: Stack) -> None:
    therapist, client, rid = await new_pair(stack)
    status, data = await stack.call("GET", f"/v1/relationships/{rid}/availability", client)
    assert status == 200
    assert data["set"] is False
    spec = "Mon-Thu 09:00-12:00,14:00-17:00; Fri 09:00-13:00"
    shown = await set_hours(stack, therapist, spec, "Europe/Berlin")
    assert shown["spec"] == spec
    assert shown["tz"] == "Europe/Berlin"
    status, data = await stack.call("GET", f"/v1/relationships/{rid}/availability", client)
    assert data["spec"] == spec
    assert data["version"] == shown["version"]


async def test_checkin_outside_hours_is_told_honestly(stack: Stack) -> None:
    therapist, client, rid = await new_pair(stack)
    spec, opens = elsewhere_in_the_week()
    await set_hours(stack, therapist, spec)
    told = (await checkin(stack, client, rid))["expectation"]
    assert told["alert"] == "later"
    assert datetime.fromisoformat(told["alert_at"]) == opens
    assert told["reason"] == "outside_hours"
    assert told["crisis_resources"]
    assert told["used"] == 1
    assert told["allowed"] == 3
    assert told["within_agreement"] is True
    assert datetime.fromisoformat(told["reply_by"]) > opens
    assert "will be alerted at" in told["summary"]


async def test_checkin_inside_hours_alerts_now_without_crisis_text(stack: Stack) -> None:
    therapist, client, rid = await new_pair(stack)
    await set_hours(stack, therapist, ALWAYS)
    told = (await checkin(stack, client, rid))["expectation"]
    assert told["alert"] == "now"
    assert told["crisis_resources"] is None
    urgent = (await checkin(stack, client, rid, flags=1))["expectation"]
    assert urgent["urgent"] is True
    assert urgent["crisis_resources"]


async def test_no_office_hours_at_all_is_said_plainly(stack: Stack) -> None:
    therapist, client, rid = await new_pair(stack)
    await set_hours(stack, therapist, "")
    told = (await checkin(stack, client, rid))["expectation"]
    assert told["alert"] == "never"
    assert told["alert_at"] is None
    assert "no one will be alerted" in told["summary"]
    assert told["crisis_resources"]


async def test_checkins_beyond_the_agreement_are_accepted_and_flagged(stack: Stack) -> None:
    therapist, client, rid = await new_pair(stack)
    await set_hours(stack, therapist, ALWAYS)
    status, agreement = await stack.call("PUT", f"/v1/relationships/{rid}/agreement", therapist,
                                         json={"checkins_allowed": 1, "checkin_period": "day"})
    assert status == 200
    assert agreement["checkins_allowed"] == 1
    first = (await checkin(stack, client, rid))["expectation"]
    second = (await checkin(stack, client, rid))["expectation"]
    assert first["within_agreement"] is True
    assert second["within_agreement"] is False
    assert second["used"] == 2
    assert second["alert"] == "later"
    assert second["reason"] == "beyond_agreement"
    status, page = await stack.call("GET", f"/v1/relationships/{rid}/messages", therapist)
    assert len(page["items"]) == 2  # never refused, never dropped


async def test_concurrent_checkins_are_counted_one_after_another(stack: Stack) -> None:
    """Sent at once, five check-ins are numbered 1 to 5: each is counted under the
    relationship's lock, after the ones committed before it."""
    therapist, client, rid = await new_pair(stack)
    await set_hours(stack, therapist, ALWAYS)
    envelopes = [await stack.envelope(client, rid, f"at once {i}") for i in range(5)]
    results = await asyncio.wait_for(asyncio.gather(
        *(stack.post(client, rid, e) for e in envelopes)), timeout=30)
    assert [status for status, _ in results] == [201] * 5, results
    used = sorted(data["expectation"]["used"] for _, data in results)
    assert used == [1, 2, 3, 4, 5]


async def test_the_period_is_guessed_right_and_a_wrong_guess_still_counts_exactly(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """From the second check-in on, the context's count since the guessed start
    of the period is the one used; a wrong guess costs a query, not the count."""
    therapist, client, rid = await new_pair(stack)
    await set_hours(stack, therapist, ALWAYS, tz="Pacific/Auckland")
    hits: list[bool] = []
    real = submission.Submission._checkins_since

    async def spy(self: submission.Submission, start: datetime) -> int:
        hits.append(self.context.guessed_start == start)
        return await real(self, start)

    monkeypatch.setattr(submission.Submission, "_checkins_since", spy)
    used = [(await checkin(stack, client, rid, f"n{i}"))["expectation"]["used"]
            for i in range(3)]
    assert used == [1, 2, 3]
    assert hits == [False, True, True]
    # An old check-in, from before any current period: a guess reaching back
    # past it would count it.
    pool = stack.apps["messaging"][POOL]
    await pool.execute("UPDATE messaging.messages SET created_at = now() - interval '40 days'"
                       " WHERE id = (SELECT id FROM messaging.messages"
                       " WHERE relationship_id = $1 ORDER BY seq LIMIT 1)", rid)
    monkeypatch.setattr(submission.CheckinPeriods, "guess",
                        lambda self, rid, now: now - timedelta(days=365))
    assert (await checkin(stack, client, rid, "n3"))["expectation"]["used"] == 3
    assert hits[-1] is False


async def test_a_retry_is_told_the_same_thing(stack: Stack) -> None:
    therapist, client, rid = await new_pair(stack)
    await set_hours(stack, therapist, ALWAYS)
    envelope = await stack.envelope(client, rid, "once")
    first = await stack.post(client, rid, envelope, idempotency_key="k1")
    await checkin(stack, client, rid)
    again = await stack.post(client, rid, envelope, idempotency_key="k1")
    assert again[0] == 200
    assert again[1]["expectation"] == first[1]["expectation"]


async def test_absences_can_be_added_listed_and_removed(stack: Stack) -> None:
    therapist, client, rid = await new_pair(stack)
    status, _ = await stack.call("POST", "/v1/availability/absences", therapist, json={
        "first_day": "2026-12-24", "last_day": "2027-01-02"})
    assert status == 409  # hours first
    await set_hours(stack, therapist, ALWAYS)
    today = date.today()
    status, absence = await stack.call("POST", "/v1/availability/absences", therapist, json={
        "first_day": (today - timedelta(days=1)).isoformat(),
        "last_day": (today + timedelta(days=1)).isoformat(), "note": "Leave"})
    assert status == 201
    assert absence["note"] == "Leave"
    told = (await checkin(stack, client, rid))["expectation"]
    assert told["alert"] == "later"
    assert datetime.fromisoformat(told["alert_at"]).date() >= today + timedelta(days=1)
    status, listed = await stack.call("GET", "/v1/availability/absences", therapist)
    assert [a["id"] for a in listed["items"]] == [absence["id"]]
    status, _data = await stack.call("POST", "/v1/availability/absences", therapist, json={
        "first_day": "2027-01-02", "last_day": "2026-12-24"})
    assert status == 422
    assert (await stack.call("DELETE", f"/v1/availability/absences/{absence['id']}",
                             therapist))[0] == 204
    assert (await stack.call("DELETE", f"/v1/availability/absences/{absence['id']}",
                             therapist))[0] == 404
    assert (await checkin(stack, client, rid))["expectation"]["alert"] == "now"


async def test_agreement_is_visible_to_both_and_set_by_the_therapist(stack: Stack) -> None:
    therapist, client, rid = await new_pair(stack)
    status, agreement = await stack.call("GET", f"/v1/relationships/{rid}/agreement", client)
    assert status == 200
    assert agreement["version"] == 1
    assert agreement["reply_window"] == {"amount": 2, "unit": "business_days"}
    assert agreement["crisis_resources"] is None
    assert agreement["crisis_resources_effective"]
    status, _ = await stack.call("PUT", f"/v1/relationships/{rid}/agreement", client,
                                 json={"checkins_allowed": 99})
    assert status == 403
    status, data = await stack.call("PUT", f"/v1/relationships/{rid}/agreement", therapist, json={
        "urgent_policy": "urgent-anytime", "reply_window": {"amount": 8, "unit": "office_hours"},
        "client_quiet_hours": {"spec": "21:00-08:00", "tz": "Europe/Berlin"},
        "crisis_resources": "Call the practice line."})
    assert status == 200, data
    assert data["version"] == 2
    assert data["urgent_policy"] == "urgent-anytime"
    assert data["client_quiet_hours"]["tz"] == "Europe/Berlin"
    assert data["crisis_resources_effective"] == "Call the practice line."
    assert data["checkins_allowed"] == 3  # untouched fields stay
    for bad in ({"urgent_policy": "sometimes"}, {"reply_window": {"amount": 0,
                                                                    "unit": "office_hours"}},
                {"client_quiet_hours": {"spec": "9pm", "tz": "UTC"}}, {"nonsense": 1}):
        status, data = await stack.call("PUT", f"/v1/relationships/{rid}/agreement", therapist,
                                        json=bad)
        assert status == 422, bad
    pool = stack.apps["messaging"][POOL]
    versions = await pool.fetch(
        "SELECT (payload->'data'->>'version')::int AS v FROM messaging.outbox"
        " WHERE routing_key = 'agreement.updated' AND payload->'data'->>'relationship_id' = $1"
        " ORDER BY id", str(rid))
    assert [r["v"] for r in versions] == [1, 2]
    # The crisis text is the practice's, not the notifier's business.
    payload = await pool.fetchval(
        "SELECT payload::text FROM messaging.outbox WHERE routing_key = 'agreement.updated'"
        " AND payload->'data'->>'relationship_id' = $1 ORDER BY id DESC LIMIT 1", str(rid))
    assert "Call the practice line" not in payload


async def test_replies_outside_hours_are_held_until_the_window_opens(stack: Stack) -> None:
    therapist, client, rid = await new_pair(stack)
    spec, opens = elsewhere_in_the_week()
    await set_hours(stack, therapist, spec)
    await checkin(stack, client, rid, "first")
    status, held = await stack.post(therapist, rid, await stack.envelope(therapist, rid, "later"))
    assert status == 201
    assert held["held"] is True
    assert datetime.fromisoformat(held["release_at"]) == opens
    status, now_reply = await stack.call(
        "POST", f"/v1/relationships/{rid}/messages", therapist,
        json={"envelope": base64.b64encode(
            await stack.envelope(therapist, rid, "now")).decode(), "deliver_now": True})
    assert status == 201
    assert now_reply["held"] is False
    # The client keeps writing while the reply waits.
    await checkin(stack, client, rid, "second")

    def ids(page: dict) -> list[str]:
        return [m["id"] for m in page["items"]]

    _, by_client = await stack.call("GET", f"/v1/relationships/{rid}/messages", client)
    _, by_therapist = await stack.call("GET", f"/v1/relationships/{rid}/messages", therapist)
    # Nothing held hides what came after it; the therapist sees their held reply apart.
    assert [m["kind"] for m in by_client["items"]] == ["checkin", "reply", "checkin"]
    assert by_client["held"] == []
    assert ids(by_therapist) == ids(by_client)
    assert [m["id"] for m in by_therapist["held"]] == [held["id"]]
    # A reader that remembers its cursor picks the held reply up when it is released.
    _, page = await stack.call("GET", f"/v1/relationships/{rid}/messages?limit=3", client)
    cursor = page["next_cursor"]
    assert cursor is not None
    await set_hours(stack, therapist, ALWAYS)
    _, after = await stack.call(
        "GET", f"/v1/relationships/{rid}/messages?cursor={cursor}", client)
    assert ids(after) == [held["id"]]
    _, by_therapist = await stack.call("GET", f"/v1/relationships/{rid}/messages", therapist)
    assert by_therapist["held"] == []
    assert len(by_therapist["items"]) == 4


async def test_availability_changes_are_announced(stack: Stack) -> None:
    therapist, _, _ = await new_pair(stack)
    await set_hours(stack, therapist, ALWAYS, "Europe/Berlin")
    await stack.call("POST", "/v1/availability/absences", therapist, json={
        "first_day": "2026-12-24", "last_day": "2027-01-02", "note": "Winter break"})
    pool = stack.apps["messaging"][POOL]
    rows = await pool.fetch(
        "SELECT payload FROM messaging.outbox WHERE routing_key = 'availability.updated'"
        " AND payload->'data'->>'therapist_id' = $1 ORDER BY id", str(therapist.user_id))
    assert [r["payload"]["data"]["version"] for r in rows] == [1, 2]
    last = rows[-1]["payload"]["data"]["schedule"]
    assert last["tz"] == "Europe/Berlin"
    assert last["absences"][0]["first_day"] == "2026-12-24"
    assert last["absences"][0]["note"] is None  # notes stay with messaging
