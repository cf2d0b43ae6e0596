"""Messaging's outbox relay: the shared relay (:mod:`shared.outbox`) over
``messaging.outbox``, woken by the NOTIFY that :func:`services.messaging.store.add_event`
sends."""

from __future__ import annotations

import asyncpg

from services.messaging.store import OUTBOX_CHANNEL
from shared.amqp import Publisher
from shared.outbox import Outbox, OutboxRelay

MESSAGING_OUTBOX = Outbox(schema="messaging", channel=OUTBOX_CHANNEL)


def messaging_relay(pool: asyncpg.Pool, publisher: Publisher, dsn: str,
                    poll_seconds: float) -> OutboxRelay:
    """The relay of messaging's outbox."""
    return OutboxRelay(pool, publisher, dsn, poll_seconds, MESSAGING_OUTBOX)
