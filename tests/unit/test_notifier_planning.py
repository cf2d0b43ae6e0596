"""The notifier's planning steps over a fixed clock: hold or alert, re-plan after an
hours or agreement change, what a due batch becomes, when a reminder goes out.

The office-hours rules themselves are shared.boundaries' (tested there); these
tests pin how the notifier applies them.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, time, timedelta

import pytest

from services.notifier import (
    agreement_updated,
    availability_updated,
    checkin_submitted,
    reply_sent,
)
from services.notifier.scheduler import compose, digest_details, reminder_decision
from services.notifier.store import (
    CHECKIN_RECEIVED,
    DIGEST,
    HELD_CHECKIN,
    HELD_REPLY,
    REMINDER_REPLY_DUE,
    REPLY_RECEIVED,
    HeldAlert,
    PendingReminder,
)
from shared.boundaries import Agreement
from shared.events import (
    AGREEMENT_UPDATED,
    AVAILABILITY_UPDATED,
    CHECKIN_SUBMITTED,
    REPLY_SENT,
    AgreementEventData,
    AvailabilityEventData,
    Event,
    MalformedEvent,
    MessageEventData,
    new_event,
)
from shared.schedule import QuietHours, WeeklySchedule

# Monday 2025-06-02; office hours weekdays 09:00-17:00 UTC.
MONDAY = datetime(2025, 6, 2, tzinfo=UTC)
HOURS = WeeklySchedule.parse("Mon-Fri 09:00-17:00", "UTC")
IN_HOURS = MONDAY.replace(hour=10)
EVENING = MONDAY.replace(hour=20)
TUESDAY_OPENING = MONDAY + timedelta(days=1, hours=9)
QUIET = QuietHours(tz="UTC", start=time(21, 0), end=time(8, 0))


def message(event_type: str, **fields: object) -> tuple[Event, MessageEventData]:
    therapist, client = uuid.uuid4(), uuid.uuid4()
    values: dict[str, object] = {
        "message_id": uuid.uuid4(), "relationship_id": uuid.uuid4(), "therapist_id": therapist,
        "client_id": client, "sender_id": client if event_type == CHECKIN_SUBMITTED else therapist,
        "sent_at": MONDAY, **fields}
    data = MessageEventData.model_validate(values)
    return new_event(event_type, data, correlation_id="c"), data


def checkin(schedule: WeeklySchedule | None, now: datetime, agreement: Agreement | None = None,
            **fields: object) -> checkin_submitted.CheckinOutcome:
    event, data = message(CHECKIN_SUBMITTED, **fields)
    return checkin_submitted.plan(event, data, schedule, agreement or Agreement(), now)


def reply(schedule: WeeklySchedule | None, now: datetime, agreement: Agreement | None = None,
          **fields: object) -> reply_sent.ReplyOutcome:
    event, data = message(REPLY_SENT, **fields)
    return reply_sent.plan(event, data, schedule, agreement or Agreement(), now)


def held(kind: str = HELD_CHECKIN, **fields: object) -> HeldAlert:
    values: dict[str, object] = {
        "id": uuid.uuid4(), "recipient_id": uuid.uuid4(), "kind": kind,
        "relationship_id": uuid.uuid4(), "message_id": uuid.uuid4(), "actor_id": uuid.uuid4(),
        "event_id": uuid.uuid4(), "urgent": False, "beyond": False, "created_at": EVENING,
        "released_at": None, "release_at": TUESDAY_OPENING, **fields}
    return HeldAlert(**values)  # type: ignore[arg-type]


# --- check-ins ---------------------------------------------------------------------------


def test_checkin_in_hours_alerts_at_once() -> None:
    outcome = checkin(HOURS, IN_HOURS)
    assert outcome.notification is not None
    assert outcome.notification.kind == CHECKIN_RECEIVED
    assert outcome.held is None


def test_checkin_without_hours_alerts_at_once() -> None:
    assert checkin(None, EVENING).notification is not None


def test_checkin_outside_hours_is_held_until_the_next_opening() -> None:
    outcome = checkin(HOURS, EVENING)
    assert outcome.notification is None
    assert outcome.held is not None
    assert outcome.held.kind == HELD_CHECKIN
    assert outcome.held.release_at == TUESDAY_OPENING
    assert outcome.held.created_at == EVENING


def test_checkin_beyond_the_agreement_in_hours_waits_for_the_next_window() -> None:
    outcome = checkin(HOURS, IN_HOURS, beyond_agreement=True)
    assert outcome.held is not None
    assert outcome.held.beyond
    assert outcome.held.release_at == TUESDAY_OPENING


@pytest.mark.parametrize(("policy", "alerted"), [
    ("urgent-anytime", True), ("urgent-in-hours", False), ("no-urgent", False)])
def test_urgent_checkin_outside_hours_follows_the_urgent_policy(policy: str,
                                                                  alerted: bool) -> None:
    agreement = Agreement(urgent_policy=policy)  # type: ignore[arg-type]
    outcome = checkin(HOURS, EVENING, agreement, urgent=True)
    assert (outcome.notification is not None) is alerted
    if not alerted:
        assert outcome.held is not None
        assert outcome.held.urgent


def test_checkin_with_no_office_time_ahead_waits_for_new_hours() -> None:
    outcome = checkin(WeeklySchedule(tz="UTC"), IN_HOURS)
    assert outcome.held is not None
    assert outcome.held.release_at is None


def test_checkin_with_a_reply_by_gets_a_reminder_in_its_last_quarter() -> None:
    due = MONDAY.replace(hour=17) + timedelta(days=1)   # Tuesday's close: 16 office hours
    outcome = checkin(HOURS, MONDAY.replace(hour=9), sent_at=MONDAY.replace(hour=9),
                      reply_by=due)
    assert outcome.reminder is not None
    assert outcome.reminder.reply_by == due
    assert outcome.reminder.remind_at == MONDAY.replace(hour=13) + timedelta(days=1)


def test_checkin_without_a_reply_by_gets_no_reminder() -> None:
    assert checkin(HOURS, IN_HOURS).reminder is None


# --- replies -----------------------------------------------------------------------------


def test_reply_in_hours_alerts_the_client_at_once() -> None:
    outcome = reply(HOURS, IN_HOURS)
    assert outcome.notification is not None
    assert outcome.notification.kind == REPLY_RECEIVED
    assert outcome.answers_before == MONDAY


def test_reply_outside_hours_is_held_until_the_window() -> None:
    outcome = reply(HOURS, EVENING)
    assert outcome.held is not None
    assert outcome.held.kind == HELD_REPLY
    assert (outcome.held.released_at, outcome.held.release_at) == (TUESDAY_OPENING,
                                                                   TUESDAY_OPENING)


def test_reply_sent_now_outside_hours_alerts_at_once() -> None:
    assert reply(HOURS, EVENING, deliver_now=True).notification is not None


def test_client_quiet_hours_push_the_reply_alert_to_their_end() -> None:
    agreement = Agreement(client_quiet_hours=QuietHours(tz="UTC", start=time(7), end=time(10)))
    outcome = reply(HOURS, EVENING, agreement)
    assert outcome.held is not None
    assert outcome.held.released_at == TUESDAY_OPENING
    assert outcome.held.release_at == TUESDAY_OPENING.replace(hour=10)


def test_a_reply_sent_now_still_respects_quiet_hours() -> None:
    outcome = reply(HOURS, MONDAY.replace(hour=22), Agreement(client_quiet_hours=QUIET),
                    deliver_now=True)
    assert outcome.held is not None
    assert outcome.held.release_at == TUESDAY_OPENING.replace(hour=8)


# --- re-planning -------------------------------------------------------------------------


def test_new_hours_open_now_make_a_held_checkin_due_now() -> None:
    evening_hours = WeeklySchedule.parse("Mon 18:00-23:00", "UTC")
    assert availability_updated.recheck_checkin(evening_hours, EVENING, held()) == EVENING


def test_no_hours_make_every_held_checkin_due_now() -> None:
    assert availability_updated.recheck_checkin(None, EVENING, held()) == EVENING


def test_new_hours_closed_now_move_a_held_checkin_to_their_opening() -> None:
    later = WeeklySchedule.parse("Wed 12:00-13:00", "UTC")
    assert availability_updated.recheck_checkin(later, EVENING, held()) == \
        MONDAY + timedelta(days=2, hours=12)
    assert availability_updated.recheck_checkin(WeeklySchedule(tz="UTC"), EVENING,
                                                held()) is None


def test_changed_hours_release_a_checkin_beyond_the_agreement_too() -> None:
    alert = held(beyond=True, created_at=IN_HOURS)
    # The therapist just changed their hours while open: it goes into a digest now.
    longer = WeeklySchedule.parse("Mon-Fri 08:00-18:00", "UTC")
    now = IN_HOURS + timedelta(minutes=5)
    assert availability_updated.recheck_checkin(longer, now, alert) == now
    # Closed now under the new hours: the next opening.
    mornings = WeeklySchedule.parse("Mon-Fri 08:00-09:00", "UTC")
    assert availability_updated.recheck_checkin(mornings, now, alert) == \
        TUESDAY_OPENING.replace(hour=8)


def test_a_held_reply_not_yet_released_follows_new_hours() -> None:
    alert = held(HELD_REPLY, released_at=TUESDAY_OPENING)
    evening_hours = WeeklySchedule.parse("Mon 18:00-23:00", "UTC")
    assert availability_updated.recheck_reply(evening_hours, Agreement(), EVENING, alert) == (
        EVENING, EVENING)
    quiet = Agreement(client_quiet_hours=QuietHours(tz="UTC", start=time(19), end=time(21)))
    assert availability_updated.recheck_reply(evening_hours, quiet, EVENING, alert) == (
        EVENING, MONDAY.replace(hour=21))


def test_a_released_reply_waiting_out_quiet_hours_ignores_new_hours() -> None:
    alert = held(HELD_REPLY, released_at=MONDAY.replace(hour=16),
                 release_at=TUESDAY_OPENING.replace(hour=8))
    closed = WeeklySchedule(tz="UTC")
    agreement = Agreement(client_quiet_hours=QUIET)
    assert availability_updated.recheck_reply(closed, agreement, EVENING, alert) == (
        MONDAY.replace(hour=16), MONDAY.replace(hour=16))
    later = MONDAY.replace(hour=22)
    alert = dataclasses.replace(alert, released_at=later)
    assert availability_updated.recheck_reply(closed, agreement, EVENING + timedelta(hours=3),
                                              alert) == (later, TUESDAY_OPENING.replace(hour=8))


def test_new_quiet_hours_move_a_held_reply() -> None:
    alert = held(HELD_REPLY, released_at=EVENING, release_at=EVENING)
    assert agreement_updated.recheck_reply(Agreement(client_quiet_hours=QUIET), alert) == \
        EVENING
    assert agreement_updated.recheck_reply(
        Agreement(client_quiet_hours=QuietHours(tz="UTC", start=time(19), end=time(7))),
        alert) == TUESDAY_OPENING.replace(hour=7)


def test_agreement_terms_are_kept_normalised_without_crisis_text() -> None:
    data = AgreementEventData(relationship_id=uuid.uuid4(), therapist_id=uuid.uuid4(),
                              client_id=uuid.uuid4(), version=1,
                              terms={"checkins_allowed": 5, "crisis_resources": "call X"})
    _, agreement = agreement_updated.decode(new_event(AGREEMENT_UPDATED, data, "c"))
    terms = agreement_updated.stored_terms(agreement)
    assert terms["crisis_resources"] is None
    assert Agreement.from_json(terms) == dataclasses.replace(agreement, crisis_resources=None)


@pytest.mark.parametrize("event", [
    new_event(AVAILABILITY_UPDATED, AvailabilityEventData(
        therapist_id=uuid.uuid4(), version=1, schedule={"tz": "Mars/Olympus"}), "c"),
    new_event(AGREEMENT_UPDATED, AgreementEventData(
        relationship_id=uuid.uuid4(), therapist_id=uuid.uuid4(), client_id=uuid.uuid4(),
        version=1, terms={"urgent_policy": "whenever"}), "c"),
])
def test_bad_hours_or_terms_are_malformed(event: Event) -> None:
    decode = (availability_updated.decode if event.type == AVAILABILITY_UPDATED
              else agreement_updated.decode)
    with pytest.raises(MalformedEvent):
        decode(event)


# --- the scheduler's decisions -------------------------------------------------------------


def test_due_checkins_become_one_digest_of_counts_and_replies_one_each() -> None:
    therapist, alice, bob = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    alerts = [held(recipient_id=therapist, actor_id=alice),
              held(recipient_id=therapist, actor_id=alice, beyond=True),
              held(recipient_id=therapist, actor_id=bob, urgent=True)]
    [(digest, ids)] = compose(therapist, alerts, TUESDAY_OPENING)
    assert digest.kind == DIGEST
    assert digest.user_id == therapist
    assert digest.created_at == TUESDAY_OPENING
    assert (digest.relationship_id, digest.message_id, digest.actor_id, digest.event_id) == (
        None, None, None, None)
    assert digest.details == {"checkins": 3, "clients": 2, "beyond_agreement": 1, "urgent": 1}
    assert ids == [a.id for a in alerts]

    client = uuid.uuid4()
    replies = [held(HELD_REPLY, recipient_id=client) for _ in range(2)]
    planned = compose(client, replies, TUESDAY_OPENING)
    assert [(n.kind, n.message_id, n.event_id, ids) for n, ids in planned] == [
        (REPLY_RECEIVED, r.message_id, r.event_id, [r.id]) for r in replies]
    assert compose(client, [], TUESDAY_OPENING) == []


def test_a_message_counted_twice_is_one_checkin() -> None:
    alert = held()
    assert digest_details([alert, dataclasses.replace(alert, id=uuid.uuid4())])["checkins"] == 1


def _reminder() -> PendingReminder:
    return PendingReminder(message_id=uuid.uuid4(), therapist_id=uuid.uuid4(),
                           relationship_id=uuid.uuid4(), client_id=uuid.uuid4(),
                           received_at=MONDAY, reply_by=TUESDAY_OPENING.replace(hour=17),
                           remind_at=IN_HOURS)


def test_a_due_reminder_is_sent_in_hours_with_its_reply_by_only() -> None:
    reminder = _reminder()
    for schedule in (HOURS, None):
        decision = reminder_decision(reminder, schedule, IN_HOURS)
        assert decision.send is not None
        assert decision.send.kind == REMINDER_REPLY_DUE
        assert decision.send.user_id == reminder.therapist_id
        assert decision.send.message_id == reminder.message_id
        assert decision.send.details == {"reply_by": "2025-06-03T17:00:00+00:00"}


def test_a_due_reminder_outside_hours_waits_for_the_opening() -> None:
    decision = reminder_decision(_reminder(), HOURS, EVENING)
    assert decision.send is None
    assert decision.retry_at == TUESDAY_OPENING
    assert reminder_decision(_reminder(), WeeklySchedule(tz="UTC"), EVENING).retry_at is None
