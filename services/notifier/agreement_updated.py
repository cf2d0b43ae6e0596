"""``agreement.updated``: a relationship's agreement was set or changed.

The notifier keeps its own copy (a newer version replaces an older one, never
the reverse). A change of the client's quiet hours re-plans their held replies.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from services.notifier.store import EventTransaction, HeldAlert
from shared.boundaries import Agreement, client_alert_time
from shared.events import AgreementEventData, Event, MalformedEvent, decode_data
from shared.schedule import ScheduleError


def decode(event: Event) -> tuple[AgreementEventData, Agreement]:
    data = decode_data(event, AgreementEventData)
    try:
        return data, Agreement.from_json(data.terms)
    except (ScheduleError, ValueError, TypeError, AttributeError) as exc:
        raise MalformedEvent(f"agreement terms: {exc}") from None


def stored_terms(agreement: Agreement) -> dict[str, Any]:
    """The terms as the notifier keeps them: normalised, without the crisis text."""
    return {**agreement.to_json(), "crisis_resources": None}


def recheck_reply(agreement: Agreement, alert: HeldAlert) -> datetime | None:
    """When a held reply's alert is due under the new quiet hours."""
    if alert.released_at is None:
        return alert.release_at
    return client_alert_time(agreement, alert.released_at)


async def handle(tx: EventTransaction, event: Event, now: datetime) -> str:
    """Apply an agreement change inside its event's transaction; returns what happened."""
    data, agreement = decode(event)
    await tx.lock_user(data.therapist_id)
    if not await tx.save_agreement(data.relationship_id, data.therapist_id, data.client_id,
                                   data.version, stored_terms(agreement)):
        return "stale version ignored"
    changes: list[tuple[uuid.UUID, datetime | None, datetime | None]] = []
    for alert in await tx.held_replies_in(data.relationship_id):
        release_at = recheck_reply(agreement, alert)
        if release_at != alert.release_at:
            changes.append((alert.id, alert.released_at, release_at))
    await tx.reschedule(changes)
    return f"applied; {len(changes)} held reply alert(s) re-planned"
