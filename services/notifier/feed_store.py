"""A user's notifications as the HTTP routes read and mark them: the feed (newest
first, a page at a time), the ones stored after a given one (a stream's
resume), and marking them read.

:class:`FeedStore` holds these queries over the pool;
:class:`services.notifier.store.NotifierStore`, the one store the app holds,
adds the consumer's event transaction to them. Notifications are made only by
:mod:`services.notifier.notifications_store`. Results are frozen dataclasses;
failures are domain errors, never HTTP.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.notifier.unavailable import reachable

_COLUMNS = ("id, user_id, kind, relationship_id, message_id, actor_id, event_id, created_at,"
            " read_at, details")
_N_COLUMNS = ", ".join("n." + column.strip() for column in _COLUMNS.split(","))


class NotificationNotFound(LookupError):
    """No such notification for this user."""


@dataclass(frozen=True, slots=True)
class Notification:
    id: uuid.UUID
    user_id: uuid.UUID
    kind: str
    relationship_id: uuid.UUID | None
    message_id: uuid.UUID | None
    actor_id: uuid.UUID | None
    event_id: uuid.UUID | None
    created_at: datetime
    read_at: datetime | None
    details: dict[str, Any] | None

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


class FeedStore:
    """The queries of a user's notifications, over one asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    async def stored_after(self, user_id: uuid.UUID, notification_id: uuid.UUID, *,
                           limit: int) -> list[Notification] | None:
        """``user_id``'s notifications stored after ``notification_id``, in the order
        they were stored, at most ``limit``; None if that notification is not
        theirs (or does not exist).

        Not the feed's order: a notification can be stored after one with a later
        ``created_at`` (its event arrived late), and the feed would put it below
        the one a reader saw last. This is what a stream's resume reads.
        """
        async with reachable(), self._pool.acquire() as conn:
            rows = await conn.fetch(
                f"/* stored_after */ SELECT m.found, {_N_COLUMNS}"
                " FROM (SELECT true AS found, seq FROM notifier.notifications"
                "  WHERE id = $2 AND user_id = $1) m"
                " LEFT JOIN LATERAL (SELECT * FROM notifier.notifications"
                "  WHERE user_id = $1 AND seq > m.seq ORDER BY seq LIMIT $3) n ON true"
                " ORDER BY n.seq",
                user_id, notification_id, limit)
        if not rows:
            return None
        return [Notification.from_record({k: v for k, v in row.items() if k != "found"})
                for row in rows if row["id"] is not None]

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
        async with reachable(), self._pool.acquire() as conn:
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
        async with reachable(), self._pool.acquire() as conn:
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
        async with reachable(), self._pool.acquire() as conn:
            status = await conn.execute(
                "/* mark_all_read */ UPDATE notifier.notifications SET read_at = now()"
                " WHERE user_id = $1 AND read_at IS NULL",
                user_id,
            )
        return int(status.rsplit(" ", 1)[-1])
