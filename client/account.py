"""What every CLI command shares: the opened account, the server, the chosen relationship.

Kept apart from ``client.cli`` so the command modules (messages, boundaries)
can use it without importing each other.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

from client.api import GatewayClient, Relationship
from client.session import LocalStore, State, UsageError

PROG = "interlude-client"
DEFAULT_SERVER = "http://127.0.0.1:8080"
SERVER_ENV = "INTERLUDE_SERVER"


def warn(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def server_url(args: argparse.Namespace, state: State | None) -> str:
    server: str = args.server or os.environ.get(SERVER_ENV) or (
        state.server if state is not None else DEFAULT_SERVER)
    return server.rstrip("/")


def local_time(iso: str | None) -> str:
    """An ISO instant in this machine's local zone, ``YYYY-MM-DD HH:MM ZONE``."""
    if not iso:
        return "-"
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M %Z")
    except ValueError:
        return iso


# -- an opened account -----------------------------------------------------------

@dataclass
class Account:
    store: LocalStore
    state: State
    api: GatewayClient


@contextlib.asynccontextmanager
async def open_account(args: argparse.Namespace, *, publish: bool = True
                       ) -> AsyncIterator[Account]:
    """Load the keystore, connect, retry an unfinished key publication; save on the way out."""
    store = LocalStore(args.home)
    state = store.load()
    saved = [state.to_json()]

    def save() -> None:
        store.save(state)
        saved[0] = state.to_json()

    def on_tokens(access: str, refresh: str) -> None:
        # Persist at once: the old refresh token is now spent.
        state.access_token, state.refresh_token = access, refresh
        save()

    async with GatewayClient(server_url(args, state), access_token=state.access_token,
                             refresh_token=state.refresh_token, on_tokens=on_tokens) as api:
        try:
            if publish and not state.keys_published and state.access_token:
                await publish_keys(api, state)
            yield Account(store, state, api)
        finally:
            if state.to_json() != saved[0]:
                save()


async def publish_keys(api: GatewayClient, state: State) -> None:
    """Publish this device's self-signed public keys (idempotent)."""
    keys = state.keys
    await api.publish_device(
        state.device_id, suite=keys.suite, hpke_public_key=b64(keys.hpke_public_key),
        signing_public_key=b64(keys.signing_public_key),
        signature=b64(keys.sign_device_record(state.user.id, state.device_id)))
    state.keys_published = True


# -- choosing a relationship ---------------------------------------------------------

def peer_label(rel: Relationship, me: uuid.UUID) -> str:
    peer = rel.peer_of(me)
    return f"{peer.display_name} <{peer.email}>" if peer else str(rel.peer_id_of(me))


def choose_relationship(rels: list[Relationship], me: uuid.UUID, selector: str | None,
                        *, option: str = "--to") -> Relationship:
    """The relationship named by `selector` (peer email or id), or the only active one."""
    if selector:
        wanted = selector.strip().lower()
        for rel in rels:
            peer = rel.peer_of(me)
            if str(rel.id) == wanted or (peer is not None and peer.email.lower() == wanted):
                return rel
        raise UsageError(f"no relationship with {selector!r}; see `{PROG} relationships`")
    active = [r for r in rels if r.status == "active"]
    if len(active) == 1:
        return active[0]
    if not active:
        raise UsageError("you have no active relationship yet")
    names = ", ".join(peer_label(r, me) for r in active)
    raise UsageError(f"you have {len(active)} relationships ({names}); choose one with "
                     f"{option} EMAIL or {option} RELATIONSHIP_ID")
