"""The notifier's database out of reach: :class:`StoreUnavailable`, and
:func:`reachable`, which every notifier store (and the channel routes, around
:mod:`services.notifier.channels_store`) runs its database work in.

It tells a database that is down, restarting or refusing connections (the
same call may succeed later: the consumer retries the event, the routes answer
503, the scheduler waits a tick) from work that is wrong.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg

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


@contextlib.asynccontextmanager
async def reachable() -> AsyncIterator[None]:
    """Turn "the database is out of reach" failures into :class:`StoreUnavailable`."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise StoreUnavailable(exc.__class__.__name__) from exc
