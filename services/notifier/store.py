"""All SQL of the notifier: the inbox (dedupe) and the notification feed.

Results are frozen dataclasses; failures are domain errors, never HTTP.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

CHECKIN_RECEIVED = "checkin.received"
REPLY_RECEIVED = "reply.received"

_COLUMNS = "id, user_id, kind, relationship_id, message_id, actor_id, event_id, created_at, read_at"

# Failures that say the database is (for now) out of reach, not that the work is wrong.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
    OSError,
    TimeoutError,
)


class StoreUnavailable(Exception):
    """The database cannot be reached right now; the same call may succeed later."""


class NotificationNotFound(LookupError):
    """No such notification for this user."""


@dataclass(frozen=True, slots=True)
class NewNotification:
    """A notification to create; ``created_at`` is when its event happened."""

    user_id: uuid.UUID
    kind: str
    relationship_id: uuid.UUID
    message_id: uuid.UUID
    actor_id: uuid.UUID
    event_id: uuid.UUID
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Notification:
    id: uuid.UUID
    user_id: uuid.UUID
    kind: str
    relationship_id: uuid.UUID
    message_id: uuid.UUID
    actor_id: uuid.UUID
    event_id: uuid.UUID
    created_at: datetime
    read_at: datetime | None

    @classmethod
    def from_record(cls, record: Any) -> Notification:
        return cls(**dict(record.items()))


@dataclass(frozen=True, slots=True)
class FeedPosition:
    """Where a page of the feed ended: the last row's sort key."""

    created_at: datetime
    id: uuid.UUID


@dataclass(frozen=True, slots=True)
class FeedPage:
    items: tuple[Notification, ...]
    next_position: FeedPosition | None


@contextlib.asynccontextmanager
async def _reachable() -> AsyncIterator[None]:
    try:
        yield
    except _UNAVAILABLE as exc:
        raise StoreUnavailable(exc.__class__.__name__) from exc


class NotifierStore:
    """Every query of the notifier, over one asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def record_event(self, event_id: uuid.UUID, event_type: str,
                           notifications: Sequence[NewNotification]) -> bool:
        """Record ``event_id`` in the inbox and create ``notifications``, in one transaction.

        Returns False, and creates nothing, if the event was recorded before.
        """
        async with _reachable(), self._pool.acquire() as conn, conn.transaction():
            inserted = await conn.fetchval(
                "/* record_event */ INSERT INTO notifier.inbox (event_id, event_type)"
                " VALUES ($1, $2) ON CONFLICT (event_id) DO NOTHING RETURNING true",
                event_id, event_type,
            )
            if not inserted:
                return False
            if notifications:
                await conn.executemany(
                    "/* record_event */ INSERT INTO notifier.notifications"
                    " (id, user_id, kind, relationship_id, message_id, actor_id, event_id,"
                    "  created_at)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                    " ON CONFLICT (event_id, user_id) DO NOTHING",
                    [(uuid.uuid4(), n.user_id, n.kind, n.relationship_id, n.message_id,
                      n.actor_id, n.event_id, n.created_at) for n in notifications],
                )
            return True

    async def feed(self, user_id: uuid.UUID, *, limit: int, after: FeedPosition | None = None,
                   unread_only: bool = False) -> FeedPage:
        """One page of ``user_id``'s notifications, newest first, after ``after``."""
        conditions = ["user_id = $1"]
        args: list[Any] = [user_id, limit + 1]
        if after is not None:
            args += [after.created_at, after.id]
            conditions.append("(created_at, id) < ($3, $4)")
        if unread_only:
            conditions.append("read_at IS NULL")
        async with _reachable(), self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"/* feed */ SELECT {_COLUMNS} FROM notifier.notifications"
                f" WHERE {' AND '.join(conditions)}"
                " ORDER BY created_at DESC, id DESC LIMIT $2",
                *args,
            )
        items = tuple(Notification.from_record(row) for row in rows[:limit])
        more = len(rows) > limit
        last = items[-1] if items else None
        position = FeedPosition(last.created_at, last.id) if more and last else None
        return FeedPage(items=items, next_position=position)

    async def mark_read(self, user_id: uuid.UUID, notification_id: uuid.UUID) -> Notification:
        """Mark one of ``user_id``'s notifications read (idempotent: the first time stays)."""
        async with _reachable(), self._pool.acquire() as conn:
            row = await conn.fetchrow(
                "/* mark_read */ UPDATE notifier.notifications"
                " SET read_at = COALESCE(read_at, now())"
                f" WHERE id = $1 AND user_id = $2 RETURNING {_COLUMNS}",
                notification_id, user_id,
            )
        if row is None:
            raise NotificationNotFound(str(notification_id))
        return Notification.from_record(row)

    async def mark_all_read(self, user_id: uuid.UUID) -> int:
        """Mark every unread notification of ``user_id`` read; returns how many."""
        async with _reachable(), self._pool.acquire() as conn:
            status = await conn.execute(
                "/* mark_all_read */ UPDATE notifier.notifications SET read_at = now()"
                " WHERE user_id = $1 AND read_at IS NULL",
                user_id,
            )
        return int(status.rsplit(" ", 1)[-1])
