"""The SQL of deliveries: claim, settle, list. They are created with their
notification, in the same statement (:func:`services.notifier.store.insert_notifications`).

A delivery is one notification for one channel; ``UNIQUE (notification_id,
channel_id)`` makes it exist once however often the notification's work is
repeated. Workers claim due rows with ``FOR UPDATE SKIP LOCKED`` and lease
them: the claim moves ``next_attempt_at`` past the longest a send may take and
stamps a ``lease_id``, and only the holder of that lease may settle the row.
So two replicas never send the same delivery at once, and a worker that dies
mid-send leaves a row that another one retries when the lease runs out.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.notifier.senders import Claimed

DELIVERIES_CHANNEL = "notifier_deliveries"
STATES = ("pending", "failed", "sent", "dead")
UNDELIVERED = ("failed", "dead")

_FIELDS = ("id", "channel_id", "notification_id", "user_id", "state", "attempts", "last_error",
           "next_attempt_at", "created_at", "updated_at", "sent_at")
_COLUMNS = ", ".join(_FIELDS)
_D_COLUMNS = ", ".join(f"d.{name}" for name in _FIELDS)


@dataclass(frozen=True, slots=True)
class Delivery:
    id: uuid.UUID
    channel_id: uuid.UUID
    notification_id: uuid.UUID
    user_id: uuid.UUID
    state: str
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None

    @classmethod
    def from_record(cls, record: Any) -> Delivery:
        return cls(**{k: record[k] for k in cls.__slots__})


class DeliveryStore:
    """Every query of the delivery worker, the deliveries API and the operator."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def claim(self, limit: int, *, busy_hosts: Sequence[str], lease_id: uuid.UUID,
                    lease_seconds: float) -> list[Claimed]:
        """Lease up to ``limit`` due deliveries whose endpoint host is not in
        ``busy_hosts``, oldest due first; each claim counts as an attempt."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                "/* claim_deliveries */ WITH due AS ("
                "  SELECT d.id FROM notifier.deliveries d"
                "  JOIN notifier.channels c ON c.id = d.channel_id"
                "  WHERE d.state IN ('pending', 'failed') AND d.next_attempt_at <= now()"
                "  AND (c.host IS NULL OR NOT (c.host = ANY ($2::text[])))"
                "  ORDER BY d.next_attempt_at LIMIT $1 FOR UPDATE OF d SKIP LOCKED)"
                " UPDATE notifier.deliveries d SET attempts = d.attempts + 1, lease_id = $3,"
                "  next_attempt_at = now() + $4 * interval '1 second', updated_at = now()"
                " FROM due, notifier.channels c, notifier.notifications n"
                " WHERE d.id = due.id AND c.id = d.channel_id AND n.id = d.notification_id"
                " RETURNING d.id, d.attempts, d.user_id, d.channel_id, d.notification_id,"
                "  c.type, c.deleted_at, c.address, c.url, c.host, c.secret_sealed,"
                "  n.kind, n.created_at, n.details",
                limit, list(busy_hosts), lease_id, lease_seconds)
        return [Claimed(
            id=r["id"], lease_id=lease_id, attempts=r["attempts"], user_id=r["user_id"],
            channel_id=r["channel_id"], channel_type=r["type"],
            channel_removed=r["deleted_at"] is not None, address=r["address"], url=r["url"],
            host=r["host"], secret_sealed=r["secret_sealed"],
            notification_id=r["notification_id"], kind=r["kind"], created_at=r["created_at"],
            details=r["details"],
        ) for r in rows]

    async def mark_sent(self, claimed: Claimed) -> bool:
        """Settle as sent; False if the lease ran out and another worker holds it."""
        async with self._pool.acquire() as conn:
            status = await conn.execute(
                "/* mark_sent */ UPDATE notifier.deliveries SET state = 'sent',"
                " sent_at = now(), updated_at = now(), next_attempt_at = NULL, lease_id = NULL"
                " WHERE id = $1 AND lease_id = $2", claimed.id, claimed.lease_id)
        return str(status).endswith(" 1")

    async def mark_failed(self, claimed: Claimed, error: str, *,
                          retry_in: float | None) -> bool:
        """Record a failed attempt: retried in ``retry_in`` seconds, or dead if None."""
        async with self._pool.acquire() as conn:
            status = await conn.execute(
                "/* mark_failed */ UPDATE notifier.deliveries SET"
                " state = CASE WHEN $3::float8 IS NULL THEN 'dead' ELSE 'failed' END,"
                " next_attempt_at = now() + $3::float8 * interval '1 second',"
                " last_error = $4, updated_at = now(), lease_id = NULL"
                " WHERE id = $1 AND lease_id = $2",
                claimed.id, claimed.lease_id, retry_in, error[:300])
        return str(status).endswith(" 1")

    async def release(self, claimed: Claimed, *, retry_in: float) -> None:
        """Give a claimed delivery back untried (its endpoint was busy): the claim
        does not count as an attempt."""
        async with self._pool.acquire() as conn:
            await conn.execute(
                "/* release_delivery */ UPDATE notifier.deliveries SET"
                " attempts = attempts - 1, lease_id = NULL,"
                " next_attempt_at = now() + $3 * interval '1 second'"
                " WHERE id = $1 AND lease_id = $2", claimed.id, claimed.lease_id, retry_in)

    async def seconds_to_next_due(self, *, busy_hosts: Sequence[str]) -> float | None:
        """Seconds until the next delivery not bound for ``busy_hosts`` is due (<= 0:
        now); None if none waits."""
        async with self._pool.acquire() as conn:
            value = await conn.fetchval(
                "/* next_due */ SELECT extract(epoch FROM min(d.next_attempt_at) - now())"
                " FROM notifier.deliveries d JOIN notifier.channels c ON c.id = d.channel_id"
                " WHERE d.state IN ('pending', 'failed')"
                " AND (c.host IS NULL OR NOT (c.host = ANY ($1::text[])))", list(busy_hosts))
        return None if value is None else float(value)

    async def of_user(self, user_id: uuid.UUID, *, states: Sequence[str],
                      limit: int) -> list[Delivery]:
        """The user's deliveries in ``states`` (all if empty), newest first."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"/* deliveries_of_user */ SELECT {_COLUMNS} FROM notifier.deliveries"
                " WHERE user_id = $1 AND (cardinality($2::text[]) = 0 OR state = ANY ($2))"
                " ORDER BY created_at DESC, id DESC LIMIT $3",
                user_id, list(states), limit)
        return [Delivery.from_record(r) for r in rows]

    async def for_operator(self, *, states: Sequence[str], limit: int
                           ) -> list[tuple[Delivery, str]]:
        """Deliveries in ``states`` across all users, most recently changed first,
        each with its channel's type (never its address or URL)."""
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"/* deliveries_for_operator */ SELECT {_D_COLUMNS}, c.type AS channel_type"
                " FROM notifier.deliveries d"
                " JOIN notifier.channels c ON c.id = d.channel_id"
                " WHERE d.state = ANY ($1::text[]) ORDER BY d.updated_at DESC, d.id DESC LIMIT $2",
                list(states), limit)
        return [(Delivery.from_record(r), r["channel_type"]) for r in rows]
