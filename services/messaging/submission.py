"""Accepting a message: one connection, one transaction, few round trips.

Every round trip to Postgres costs about as much CPU as the rest of the request
on a small machine (docs/performance.md), so a submit is shaped around them:

1. ``BEGIN`` and the relationship's lock, held to the end of the transaction,
   in one simple query;
2. one query, read *after* the lock so it sees every message committed before
   ours: the relationship (if the sender is in it), both members' device keys,
   the therapist's office hours and absences, the agreement and, for a
   check-in, how many check-ins arrived since this period probably began
   (:class:`CheckinPeriods`);
3. one statement inserting the message, its event in the outbox and the
   Idempotency-Key, if any (the caller wakes its own relay after the commit,
   in-process: no NOTIFY);
4. ``COMMIT``.

One writer per relationship at a time: check-ins are numbered in order (1 and 2,
never 1 and 1), and a message's place in the delivery order commits before the
next one takes its place, so no reader's cursor can pass a place that is still
being written.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.messaging.boundaries_store import availability_from_rows
from services.messaging.store import (
    Conflict,
    Device,
    NotFound,
    Relationship,
    StoredMessage,
    device_from_row,
    lock_relationship_statement,
    message_from_row,
)
from shared.boundaries import Agreement, Period, period_start_in
from shared.db import transaction_opened_with
from shared.events import CHECKIN_SUBMITTED, REPLY_SENT, MessageEventData, new_event
from shared.schedule import WeeklySchedule


@dataclass(frozen=True, slots=True)
class SubmitContext:
    relationship: Relationship
    devices: list[Device]               # both members', ordered by user and device
    schedule: WeeklySchedule | None     # the therapist's office hours; None if unset
    agreement: Agreement
    # The guessed start of this check-in period, if any, and how many check-ins
    # arrived since then.
    guessed_start: datetime | None
    checkins_since_guess: int


@dataclass(frozen=True, slots=True)
class Terms:
    """What the server decided about a message as it accepted it."""

    beyond_agreement: bool = False
    reply_by: datetime | None = None
    deliver_now: bool = False
    visible_at: datetime | None = None          # None: visible at once
    told: dict[str, Any] | None = None          # the answer's expectation / release


# Given how many check-ins the client has sent this period (this one included),
# decide the message's terms. Called inside the storing transaction.
Decide = Callable[[int], Terms]


@dataclass(frozen=True, slots=True)
class NewMessage:
    id: uuid.UUID
    relationship: Relationship
    kind: str
    sender_id: uuid.UUID
    sender_device_id: uuid.UUID
    urgent: bool
    sent_at: datetime
    envelope: bytes


_CONTEXT = (
    "SELECT r.id, r.therapist_id, r.client_id, r.status, r.created_at,"
    " ARRAY(SELECT d FROM messaging.devices d"
    "       WHERE d.user_id IN (r.therapist_id, r.client_id)"
    "       ORDER BY d.user_id, d.device_id) AS devices,"
    # Columns, not a row: asyncpg cannot decode a row type holding jsonb.
    " a.tz, a.windows, a.version AS availability_version,"
    " ARRAY(SELECT ab FROM messaging.absences ab WHERE ab.therapist_id = r.therapist_id"
    "       ORDER BY ab.first_day, ab.id) AS absences,"
    " (SELECT g.terms FROM messaging.agreements g WHERE g.relationship_id = r.id) AS agreement,"
    # The check-ins since a guessed start of this period ($3; none for NULL).
    " (SELECT count(*) FROM messaging.messages m WHERE m.relationship_id = r.id"
    "  AND m.kind = 'checkin' AND m.created_at >= $3::timestamptz) AS checkins_since_guess"
    " FROM messaging.relationships r"
    " LEFT JOIN messaging.availability a ON a.therapist_id = r.therapist_id"
    " WHERE r.id = $1 AND $2 IN (r.therapist_id, r.client_id)"
)


class CheckinPeriods:
    """What each relationship's check-in period was last seen to be (the
    therapist's zone and the agreed period), to guess where the current period
    began before the context is read. A guess is only used when the context
    proves it right, so a stale one costs a query, never a wrong count."""

    def __init__(self, limit: int = 10_000) -> None:
        self._limit = limit
        self._seen: dict[uuid.UUID, tuple[str | None, Period]] = {}

    def guess(self, relationship_id: uuid.UUID, now: datetime) -> datetime | None:
        seen = self._seen.get(relationship_id)
        return None if seen is None else period_start_in(seen[0], seen[1], now)

    def learn(self, context: SubmitContext) -> None:
        if len(self._seen) >= self._limit:
            self._seen.clear()
        tz = context.schedule.tz if context.schedule is not None else None
        self._seen[context.relationship.id] = (tz, context.agreement.checkin_period)


# The message, its event (with the row's own visible_at) and the key, or nothing
# at all when the id is taken: data-modifying CTEs run to completion whether or
# not the outer query reads them, and each inserts only for a row of ``m``.
_INSERT_MESSAGE = (
    "WITH m AS ("
    " INSERT INTO messaging.messages (id, relationship_id, kind, sender_id,"
    " sender_device_id, urgent, sent_at, envelope, envelope_sha256,"
    " beyond_agreement, reply_by, deliver_now, visible_at, terms, delivery_seq)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
    " coalesce($13, now()), $14, CASE WHEN coalesce($13, now()) <= now()"
    " THEN nextval('messaging.delivery_seq') END)"
    " ON CONFLICT (id) DO NOTHING"
    " RETURNING id, seq, relationship_id, kind, sender_id, sender_device_id, urgent,"
    " sent_at, created_at, visible_at, terms, delivery_seq"
    "), e AS ("
    " INSERT INTO messaging.outbox (event_id, routing_key, payload)"
    " SELECT $15, $16, jsonb_set($17::jsonb, '{data,visible_at}', to_jsonb(m.visible_at))"
    " FROM m RETURNING 1"
    "), k AS ("
    " INSERT INTO messaging.idempotency_keys (user_id, key, request_hash, message_id)"
    " SELECT $4, $18::text, $19, m.id FROM m WHERE $18::text IS NOT NULL"
    " ON CONFLICT DO NOTHING RETURNING 1"
    ")"
    # No NOTIFY: the route wakes this process's relay itself after the commit.
    " SELECT m.* FROM m"
)


def _context(row: asyncpg.Record, guessed_start: datetime | None) -> SubmitContext:
    relationship = Relationship(row["id"], row["therapist_id"], row["client_id"],
                                row["status"], row["created_at"])
    hours = None if row["tz"] is None else {
        "tz": row["tz"], "windows": row["windows"], "version": row["availability_version"]}
    availability = availability_from_rows(relationship.therapist_id, hours, row["absences"])
    terms = row["agreement"]
    return SubmitContext(
        relationship=relationship,
        devices=[device_from_row(d) for d in row["devices"]],
        schedule=availability.schedule,
        agreement=Agreement() if terms is None else Agreement.from_json(terms),
        guessed_start=guessed_start,
        checkins_since_guess=row["checkins_since_guess"],
    )


class Submission:
    """A message being accepted, inside its transaction and its relationship's lock."""

    def __init__(self, conn: asyncpg.Connection, context: SubmitContext) -> None:
        self._conn = conn
        self.context = context

    async def _checkins_since(self, start: datetime) -> int:
        """How many of the relationship's check-ins arrived at or after ``start``."""
        ctx = self.context
        if ctx.guessed_start == start:
            return ctx.checkins_since_guess
        # No guess, or a wrong one (the first check-in this process sees, new
        # hours or agreement, a period that began in between): ask for this
        # start. Still under the lock, so still exact.
        count: int = await self._conn.fetchval(
            "SELECT count(*) FROM messaging.messages WHERE relationship_id = $1"
            " AND kind = 'checkin' AND created_at >= $2", ctx.relationship.id, start)
        return count

    async def store(self, message: NewMessage, *, idempotency_key: str | None,
                    request_hash: bytes, correlation_id: str, decide: Decide,
                    period_start: datetime | None) -> tuple[StoredMessage, bool]:
        """Store the message and its event; returns (message, created).

        For a check-in, ``period_start`` is where the agreed period began: the
        check-ins since then (this one included) are counted and handed to
        ``decide``. A retry of the same envelope (same id and bytes) returns the
        stored message with ``created`` False; another envelope reusing the id,
        or an Idempotency-Key reused for another request, conflicts.
        """
        conn = self._conn
        digest = hashlib.sha256(message.envelope).digest()
        if idempotency_key is not None:
            # Two concurrent retries with one key: the second waits, then finds it.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                               f"{message.sender_id}/{idempotency_key}")
            existing_key = await conn.fetchrow(
                "SELECT i.request_hash, m.* FROM messaging.idempotency_keys i"
                " JOIN messaging.messages m ON m.id = i.message_id"
                " WHERE i.user_id = $1 AND i.key = $2",
                message.sender_id, idempotency_key,
            )
            if existing_key is not None:
                if bytes(existing_key["request_hash"]) != request_hash:
                    raise Conflict("Idempotency-Key was already used with a different request")
                return message_from_row(existing_key), False
        rel = message.relationship
        used = 0
        if message.kind == "checkin" and period_start is not None:
            used = 1 + await self._checkins_since(period_start)
        terms = decide(used)
        event = new_event(
            CHECKIN_SUBMITTED if message.kind == "checkin" else REPLY_SENT,
            MessageEventData(
                message_id=message.id, relationship_id=rel.id,
                therapist_id=rel.therapist_id, client_id=rel.client_id,
                sender_id=message.sender_id, sent_at=message.sent_at,
                urgent=message.urgent, beyond_agreement=terms.beyond_agreement,
                reply_by=terms.reply_by, deliver_now=terms.deliver_now,
                visible_at=None,  # the row's, set by the statement
            ),
            correlation_id)
        # Insert first: a retry (the id is known) is the rare case, looked up only
        # when the insert finds the id taken. The envelope is not sent back.
        row = await conn.fetchrow(
            _INSERT_MESSAGE,
            message.id, rel.id, message.kind, message.sender_id,
            message.sender_device_id, message.urgent, message.sent_at, message.envelope,
            digest, terms.beyond_agreement, terms.reply_by, terms.deliver_now,
            terms.visible_at, terms.told,
            event.event_id, event.type, event.model_dump(mode="json"),
            idempotency_key, request_hash,
        )
        if row is not None:
            return message_from_row(row, envelope=message.envelope), True
        # The id is taken (ON CONFLICT waited for its writer to finish).
        existing = await conn.fetchrow("SELECT * FROM messaging.messages WHERE id = $1",
                                       message.id)
        if existing is None:  # taken and gone again: not expected, but be exact
            raise Conflict("this message is being stored by another request; retry")
        if bytes(existing["envelope_sha256"]) != digest \
                or existing["sender_id"] != message.sender_id:
            raise Conflict("a different message with this id already exists")
        return message_from_row(existing), False


@asynccontextmanager
async def begin_submission(pool: asyncpg.Pool, relationship_id: uuid.UUID,
                           member_id: uuid.UUID, *, period_guess: datetime | None = None
                           ) -> AsyncIterator[Submission]:
    """Open a submission to the relationship for ``member_id``; commits on a clean exit.

    For a check-in, ``period_guess`` (see :class:`CheckinPeriods`) is where this
    period probably began: the check-ins since then are counted with the
    context, and if the guess is right, counting them costs no round trip of
    its own.

    Raises NotFound, as :meth:`MessagingStore.relationship_for_member` does, when
    there is no such relationship or ``member_id`` is not in it (never 'forbidden').
    """
    # Taken before membership is known: a stranger holds it for one round trip.
    lock = lock_relationship_statement(relationship_id)
    async with pool.acquire() as conn, transaction_opened_with(conn, lock):
        row = await conn.fetchrow(_CONTEXT, relationship_id, member_id, period_guess)
        if row is None:
            raise NotFound("no such relationship")
        yield Submission(conn, _context(row, period_guess))
