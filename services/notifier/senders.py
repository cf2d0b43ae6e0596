"""What the delivery worker hands a channel, and how a channel says it failed.

A sender gets a :class:`Claimed` delivery (ids, kind, time, counts and where to
send) and either returns (sent) or raises :class:`DeliveryFailed`. Senders never
see content or names: the notifier has none.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

EMAIL = "email"
WEBHOOK = "webhook"
CHANNEL_TYPES = (EMAIL, WEBHOOK)
# The fairness key of every email channel: they all go through the one SMTP relay.
SMTP_HOST_KEY = "smtp"
# What a digest's webhook payload may carry: counts, nothing else.
DIGEST_COUNTS = ("checkins", "clients", "beyond_agreement", "urgent")


class DeliveryFailed(Exception):
    """A delivery attempt failed. ``reason`` is stored and shown to the owner and the
    operator, so it names what went wrong (``HTTP 503``, ``timeout``), never a
    secret; ``permanent`` ends the retries at once."""

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason[:300]
        self.permanent = permanent


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery a worker has claimed (leased), with what sending it needs."""

    id: uuid.UUID
    lease_id: uuid.UUID
    attempts: int                  # including this one
    user_id: uuid.UUID
    channel_id: uuid.UUID
    channel_type: str
    channel_removed: bool
    address: str | None
    url: str | None
    host: str | None
    secret_sealed: bytes | None
    notification_id: uuid.UUID
    kind: str
    created_at: datetime
    details: dict[str, Any] | None


class Sender(Protocol):
    async def send(self, delivery: Claimed) -> None:
        """Deliver once; raise :class:`DeliveryFailed` if it did not go."""

    @property
    def max_seconds(self) -> float:
        """The longest one :meth:`send` may take (it gives up then)."""
