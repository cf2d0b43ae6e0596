"""Making notifications: the one statement that creates them, announces them in
the notifier's outbox and queues their deliveries, all in the caller's transaction.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.notifier.deliveries_store import DELIVERIES_CHANNEL
from shared.events import NOTIFICATION_CREATED, NotificationEventData, new_event
from shared.outbox import Outbox

# notification.created events for live streams, relayed by the notifier itself.
# Only gateways with a stream open bind them; with none running there is no one
# to tell (a stream that connects later reads the feed), so they may go nowhere.
NOTIFIER_OUTBOX = Outbox(schema="notifier", channel="notifier_outbox",
                         hints=frozenset({NOTIFICATION_CREATED}))


@dataclass(frozen=True, slots=True)
class NewNotification:
    """A notification to create. ``created_at`` is when its event happened (or, for
    an alert that was held, when it was delivered). ``details`` holds counts and
    times only, never content or names."""

    user_id: uuid.UUID
    kind: str
    relationship_id: uuid.UUID | None
    message_id: uuid.UUID | None
    actor_id: uuid.UUID | None
    event_id: uuid.UUID | None
    created_at: datetime
    details: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class NewReminder:
    """A reminder to the therapist for a check-in with a reply-by time."""

    message_id: uuid.UUID
    therapist_id: uuid.UUID
    relationship_id: uuid.UUID
    client_id: uuid.UUID
    received_at: datetime
    reply_by: datetime
    remind_at: datetime | None


@dataclass(frozen=True, slots=True)
class Created:
    """What :func:`create_notifications` did: the notifications' ids, and whether
    any ``notification.created`` went into the outbox (some notification was new)."""

    ids: list[uuid.UUID]
    announced: bool


async def insert_notifications(conn: asyncpg.Connection,
                               notifications: Sequence[NewNotification]) -> list[uuid.UUID]:
    """Insert ``notifications``; returns their ids (an existing one for a repeat of an
    event and recipient, which the unique key refuses to create twice).

    Every notification this creates is also, in the same transaction, announced
    by a ``notification.created`` event in the notifier's outbox and queued for
    delivery to each verified channel of its user that takes its kind; a repeat
    creates neither again. This is the one place notifications are made. All of
    it is one statement (one round trip), which wakes the outbox relays and the
    delivery workers at commit if it gave them work.
    """
    return (await create_notifications(conn, notifications)).ids


async def create_notifications(conn: asyncpg.Connection,
                               notifications: Sequence[NewNotification], *,
                               notify_relay: bool = True,
                               reminders: Sequence[NewReminder] = ()) -> Created:
    """:func:`insert_notifications`, saying whether it announced anything. With
    ``notify_relay=False`` it sends the outbox relays no NOTIFY: the caller wakes
    its own process's relay after the commit instead (the delivery workers are
    still notified). ``reminders`` are added by the same statement (a reminder
    already there for its message is kept), so an alerted check-in with a
    reply-by time costs one round trip, not two; they need ``notifications``."""
    if not notifications:
        if reminders:
            raise ValueError("reminders travel with notifications; add them on their own")
        return Created([], False)
    new_ids = [uuid.uuid4() for _ in notifications]
    # Each notification's announcement is made up front with the id it will get if
    # it is new; only the ones actually inserted go into the outbox.
    announcements = [new_event(NOTIFICATION_CREATED, NotificationEventData(
        notification_id=new_id, user_id=n.user_id, kind=n.kind,
        relationship_id=n.relationship_id, message_id=n.message_id, actor_id=n.actor_id,
        details=n.details, created_at=n.created_at,
    ), str(n.event_id or new_id)) for new_id, n in zip(new_ids, notifications, strict=True)]
    rows = await conn.fetch(
        "/* insert_notifications */ WITH wanted AS ("
        " SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::uuid[], $5::uuid[],"
        "  $6::uuid[], $7::uuid[], $8::timestamptz[], $9::text[], $10::uuid[], $11::text[])"
        "  WITH ORDINALITY AS w (id, user_id, kind, relationship_id, message_id, actor_id,"
        "  event_id, created_at, details, announcement_id, announcement, ord)),"
        " created AS ("
        " INSERT INTO notifier.notifications (id, user_id, kind, relationship_id, message_id,"
        "  actor_id, event_id, created_at, details)"
        # JSON goes as text and is cast here: the same with or without a jsonb codec.
        " SELECT id, user_id, kind, relationship_id, message_id, actor_id, event_id,"
        "  created_at, details::jsonb FROM wanted ORDER BY ord"
        " ON CONFLICT (event_id, user_id) DO NOTHING RETURNING id, user_id, kind, event_id),"
        " announced AS ("
        f" INSERT INTO {NOTIFIER_OUTBOX.qualified} (event_id, routing_key, payload)"
        " SELECT w.announcement_id, $12, w.announcement::jsonb"
        " FROM wanted w JOIN created c ON c.id = w.id ORDER BY w.ord RETURNING 1),"
        " delivering AS ("
        " INSERT INTO notifier.deliveries (id, notification_id, channel_id, user_id,"
        "  next_attempt_at)"
        " SELECT gen_random_uuid(), n.id, ch.id, ch.user_id, now() FROM created n"
        " JOIN notifier.channels ch ON ch.user_id = n.user_id AND n.kind = ANY (ch.kinds)"
        "  AND ch.deleted_at IS NULL AND ch.verified_at IS NOT NULL"
        " ON CONFLICT (notification_id, channel_id) DO NOTHING RETURNING 1),"
        " reminded AS ("
        " INSERT INTO notifier.reminders (message_id, therapist_id, relationship_id,"
        "  client_id, received_at, reply_by, remind_at)"
        " SELECT * FROM unnest($16::uuid[], $17::uuid[], $18::uuid[], $19::uuid[],"
        "  $20::timestamptz[], $21::timestamptz[], $22::timestamptz[])"
        " ON CONFLICT (message_id) DO NOTHING RETURNING 1)"
        # A data-modifying WITH runs whether or not it is read; NOTIFY is delivered at
        # commit, once per channel and transaction.
        # The id: the row created, else (COALESCE evaluates a subquery only when
        # the ones before it gave NULL, i.e. only for a repeat) the same event
        # and user created earlier in this call, else by an earlier transaction:
        # a lookup by the unique key. (A join to the table here was planned as a
        # scan of the whole table per call once its statistics were stale.)
        " SELECT COALESCE(c.id,"
        "  (SELECT t.id FROM created t"
        "   WHERE t.event_id = w.event_id AND t.user_id = w.user_id LIMIT 1),"
        "  (SELECT old.id FROM notifier.notifications old"
        "   WHERE old.event_id = w.event_id AND old.user_id = w.user_id)) AS id,"
        "  (SELECT pg_notify($13, '') FROM (SELECT FROM announced LIMIT 1) a WHERE $15)"
        "   AS notified,"
        "  EXISTS (SELECT FROM announced) AS announced,"
        "  (SELECT pg_notify($14, '') FROM (SELECT FROM delivering LIMIT 1) d) AS delivering"
        " FROM wanted w LEFT JOIN created c ON c.id = w.id"
        " ORDER BY w.ord",
        new_ids, [n.user_id for n in notifications], [n.kind for n in notifications],
        [n.relationship_id for n in notifications], [n.message_id for n in notifications],
        [n.actor_id for n in notifications], [n.event_id for n in notifications],
        [n.created_at for n in notifications],
        [None if n.details is None else json.dumps(n.details) for n in notifications],
        [e.event_id for e in announcements], [e.model_dump_json() for e in announcements],
        NOTIFICATION_CREATED, NOTIFIER_OUTBOX.channel, DELIVERIES_CHANNEL, notify_relay,
        [r.message_id for r in reminders], [r.therapist_id for r in reminders],
        [r.relationship_id for r in reminders], [r.client_id for r in reminders],
        [r.received_at for r in reminders], [r.reply_by for r in reminders],
        [r.remind_at for r in reminders],
    )
    ids: list[uuid.UUID] = []
    for row, n in zip(rows, notifications, strict=True):
        found = row["id"]
        if found is None:
            # Committed by another transaction after this statement's snapshot was
            # taken (the conflict waited for it): a new statement sees it.
            found = await conn.fetchval(
                "/* insert_notifications */ SELECT id FROM notifier.notifications"
                " WHERE event_id = $1 AND user_id = $2", n.event_id, n.user_id)
        ids.append(found)
    return Created(ids, bool(rows[0]["announced"]))
