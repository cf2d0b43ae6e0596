"""``interlude-client watch``: follow the live stream, one line per event.

Unlike the other commands, ``watch`` runs for a long time, so it does not hold
the home's lock throughout (that would block every other command of this home):
it takes the lock only to refresh the session or to record the last
notification seen, and re-reads the keystore each time, since another command
may have rotated the tokens meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from client.account import PROG, local_time, server_url, warn
from client.api import NOT_SIGNED_IN, ApiError, GatewayClient, Relationship, ServerUnreachable
from client.explain import notification_text
from client.keystore import KeystoreError
from client.session import LocalStore, State, UsageError, home_lock_async
from client.stream import Watcher

LOCK_WAIT_SECONDS = 10.0
NAMES_REFETCH_SECONDS = 60.0
EXIT_OK, EXIT_API = 0, 1


class Home:
    """This home's keystore, opened once, changed only under the home lock."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.store = LocalStore(args.home)
        self.state = self.store.load()

    @property
    def server(self) -> str:
        return server_url(self.args, self.state)

    async def update(self, change: Callable[[State], None]) -> None:
        async with home_lock_async(self.store.home, LOCK_WAIT_SECONDS):
            state = await asyncio.to_thread(self.store.reload)
            change(state)
            await asyncio.to_thread(self.store.save, state)
        self.state = state

    @contextlib.asynccontextmanager
    async def api(self) -> AsyncIterator[GatewayClient]:
        """The HTTP API with this home's current tokens; rotated ones are saved at once."""
        async with home_lock_async(self.store.home, LOCK_WAIT_SECONDS):
            state = await asyncio.to_thread(self.store.reload)

            async def on_tokens(access: str, refresh: str) -> None:
                # The old refresh token is spent: persist before anything else.
                state.access_token, state.refresh_token = access, refresh
                await asyncio.to_thread(self.store.save, state)

            async with GatewayClient(server_url(self.args, state),
                                     access_token=state.access_token,
                                     refresh_token=state.refresh_token,
                                     on_tokens=on_tokens) as api:
                yield api
            self.state = state


class HomeTokens:
    """The watcher's tokens: this home's, refreshed under its lock."""

    def __init__(self, home: Home) -> None:
        self.home = home

    def current(self) -> str:
        token = self.home.state.access_token
        if not token:
            raise ApiError(401, NOT_SIGNED_IN, f"not signed in; run `{PROG} login --email EMAIL`")
        return token

    async def refresh(self, stale: str) -> None:
        async with self.home.api() as api:
            if api.access_token and api.access_token != stale:
                return  # another command of this home refreshed meanwhile
            await api.refresh()


class Names:
    """Who is who in the user's relationships, to name people in event lines."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.me = home.state.user.id
        self.relationships: dict[uuid.UUID, Relationship] = {}
        self._fetched_at: float | None = None

    async def fetch(self) -> None:
        async with self.home.api() as api:
            rels = await api.relationships()
        self.relationships = {r.id: r for r in rels}
        self._fetched_at = time.monotonic()

    async def refetch_for(self, relationship_id: str | None) -> None:
        """Best effort, at most once a minute: a relationship made since the watch began."""
        rel_id = _uuid(relationship_id)
        if rel_id is None or rel_id in self.relationships or (
                self._fetched_at is not None
                and time.monotonic() - self._fetched_at < NAMES_REFETCH_SECONDS):
            return
        with contextlib.suppress(ApiError, ServerUnreachable, UsageError, KeystoreError):
            await self.fetch()

    def person(self, user_id: uuid.UUID | None) -> str | None:
        for rel in self.relationships.values():
            person = rel.person(user_id) if user_id else None
            if person is not None:
                return person.display_name
        return None


def _uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _where(relationship_id: Any, message_id: Any) -> str:
    parts = [f"{name} {value}" for name, value in (("relationship", relationship_id),
                                                   ("message", message_id)) if value]
    return f"  ({', '.join(parts)})" if parts else ""


def event_line(frame: dict[str, Any], names: Names) -> str:
    """One stream event in words (never content: the stream carries none)."""
    if frame["type"] == "notification":
        n = frame.get("notification") or {}
        text = notification_text(str(n.get("kind")), names.person(_uuid(n.get("actor_id"))),
                                 n.get("details"))
        return (f"{local_time(n.get('created_at'))}  notification: {text}"
                f"{_where(n.get('relationship_id'), n.get('message_id'))}")
    what = "check-in" if frame.get("kind") == "checkin" else "reply"
    rel = names.relationships.get(_uuid(frame.get("relationship_id")) or uuid.UUID(int=0))
    if rel is None:
        text = f"new {what}"
    else:
        sender = rel.client if frame.get("kind") == "checkin" else rel.therapist
        if sender is not None and sender.id == names.me:
            peer = rel.peer_of(names.me)
            text = f"you sent a {what}" + (f" to {peer.display_name}" if peer else "")
        else:
            text = f"new {what}" + (f" from {sender.display_name}" if sender else "") + \
                f"; `{PROG} inbox` shows it"
    return (f"{local_time(frame.get('sent_at'))}  message: {text}"
            f"{_where(frame.get('relationship_id'), frame.get('message_id'))}")


class LastSeen:
    """Records the last notification shown in the keystore, in the background:
    a burst of notifications costs one save, not one per notification."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self._pending: str | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._failed = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="watch-last-seen")

    def note(self, notification_id: str) -> None:
        self._pending = notification_id
        self._wake.set()

    async def close(self) -> None:
        """Save what is pending and stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            await self._save()
        await self._save()

    async def _save(self) -> None:
        wanted = self._pending
        if wanted is None or wanted == self.home.state.last_notification_id:
            return
        try:
            await self.home.update(lambda state: setattr(state, "last_notification_id", wanted))
        except (UsageError, KeystoreError, OSError) as exc:
            if not self._failed:
                self._failed = True
                warn(f"{PROG}: could not record the last notification seen ({exc}); the next "
                     "watch may show some again")


class Printer:
    """The watcher's handler: prints events and counts them."""

    def __init__(self, names: Names, last_seen: LastSeen, *, as_json: bool,
                 count: int | None) -> None:
        self.names = names
        self.last_seen = last_seen
        self.as_json = as_json
        self.count = count
        self.seen = 0

    async def event(self, frame: dict[str, Any]) -> bool:
        if self.as_json:
            line = json.dumps(frame, ensure_ascii=False)
        else:
            body = frame.get("notification") if frame["type"] == "notification" else frame
            await self.names.refetch_for((body or {}).get("relationship_id"))
            line = event_line(frame, self.names)
        print(line, flush=True)
        if frame["type"] == "notification":
            notification_id = (frame.get("notification") or {}).get("id")
            if isinstance(notification_id, str):
                self.last_seen.note(notification_id)
        self.seen += 1
        return self.count is not None and self.seen >= self.count

    def status(self, text: str) -> None:
        warn(f"{PROG}: {text}")


async def cmd_watch(args: argparse.Namespace) -> int:
    count = 1 if args.once else args.count
    home = Home(args)
    last_seen = LastSeen(home)
    names = Names(home)
    printer = Printer(names, last_seen, as_json=args.json, count=count)
    last_seen.start()
    try:
        async with asyncio.timeout(args.timeout) as limit:
            # Also proves the session works (refreshing it if needed) before connecting.
            await names.fetch()
            watcher = Watcher(home.server, HomeTokens(home), printer,
                              after=home.state.last_notification_id)
            await watcher.run()
    except TimeoutError:
        if not limit.expired():
            raise
        if count is not None and printer.seen < count:
            warn(f"{PROG}: timed out after {args.timeout:g} s with {printer.seen} of {count} "
                 "event(s)")
            return EXIT_API
    finally:
        await last_seen.close()
    return EXIT_OK


# -- parsing ------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``watch`` on the main parser's subcommands."""
    help_ = ("follow your notifications and message arrivals live (who and when, never "
             "content); resumes after the last notification an earlier watch showed")
    p = sub.add_parser("watch", help=help_, description=help_, epilog=(
        "Events go to stdout, one per line; connection news goes to stderr. Exit codes: 0 "
        "when stopped (Ctrl-C), after --count events, or at --timeout without --count; 1 "
        "when the server refuses or cannot be reached, or --timeout passes before --count "
        "events."))
    p.set_defaults(func=cmd_watch, locks_home=False, interrupt_code=EXIT_OK)
    p.add_argument("--json", action="store_true",
                   help="print each event as the stream's JSON frame, one per line")
    bound = p.add_mutually_exclusive_group()
    bound.add_argument("--count", metavar="N", type=_positive_int,
                       help="stop after N events (notifications and messages)")
    bound.add_argument("--once", action="store_true", help="stop after the first event")
    p.add_argument("--timeout", metavar="SECONDS", type=_seconds,
                   help="stop after this many seconds, whatever happens")
