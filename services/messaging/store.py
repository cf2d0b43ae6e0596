"""All SQL of the messaging service.

Stores raise domain errors (below); routes translate them to HTTP. Every write
that announces something adds its event to the outbox in the same transaction
and wakes the relay with NOTIFY.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from shared import codes
from shared.boundaries import Agreement
from shared.db import uuid_literal
from shared.events import (
    AGREEMENT_UPDATED,
    DEVICE_KEYS_CHANGED,
    RELATIONSHIP_CREATED,
    AgreementEventData,
    DeviceKeysEventData,
    RelationshipEventData,
    new_event,
)

OUTBOX_CHANNEL = "messaging_outbox"
INVITE_LIFETIME = timedelta(days=7)
MAX_DEVICES_PER_USER = 10


class MessagingError(Exception):
    """Base of the domain errors of this store."""


class NotFound(MessagingError):
    pass


class Conflict(MessagingError):
    pass


class Gone(MessagingError):
    pass


class LimitReached(MessagingError):
    pass


@dataclass(frozen=True, slots=True)
class Relationship:
    id: uuid.UUID
    therapist_id: uuid.UUID
    client_id: uuid.UUID
    status: str
    created_at: datetime

    def has_member(self, user_id: uuid.UUID) -> bool:
        return user_id in (self.therapist_id, self.client_id)


@dataclass(frozen=True, slots=True)
class Invite:
    id: uuid.UUID
    code: str
    therapist_id: uuid.UUID
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Redemption:
    relationship_id: uuid.UUID
    therapist_id: uuid.UUID
    client_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class Device:
    user_id: uuid.UUID
    device_id: uuid.UUID
    version: int
    suite: int
    hpke_public_key: bytes
    signing_public_key: bytes
    signature: bytes
    key_id: bytes
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: uuid.UUID
    seq: int
    relationship_id: uuid.UUID
    kind: str
    sender_id: uuid.UUID
    sender_device_id: uuid.UUID
    urgent: bool
    sent_at: datetime
    envelope: bytes
    created_at: datetime
    visible_at: datetime
    terms: dict[str, Any] | None  # what the sender was told when it was accepted
    delivery_seq: int | None      # its place in the delivery order; None while held


async def lock_relationship(conn: asyncpg.Connection, relationship_id: uuid.UUID) -> None:
    """Serialise writers of one relationship's messages until the transaction ends."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", str(relationship_id))


def lock_relationship_statement(relationship_id: uuid.UUID) -> str:
    """:func:`lock_relationship`'s statement (the same key: hashtext of the id's
    text) with the id spliced in, to travel in a simple query."""
    return f"SELECT pg_advisory_xact_lock(hashtext({uuid_literal(relationship_id)}))"


def hash_code(code: str) -> bytes:
    return codes.hash_code(code, "invite")


async def add_event(conn: asyncpg.Connection, routing_key: str, data: object,
                     correlation_id: str) -> None:
    event = new_event(routing_key, data, correlation_id)  # type: ignore[arg-type]
    # The row and the relay's wake-up in one round trip (delivered at commit).
    await conn.execute(
        "WITH e AS (INSERT INTO messaging.outbox (event_id, routing_key, payload)"
        " VALUES ($1, $2, $3) RETURNING 1)"
        f" SELECT pg_notify('{OUTBOX_CHANNEL}', '') FROM e",
        event.event_id, routing_key, event.model_dump(mode="json"),
    )


async def save_agreement(conn: asyncpg.Connection, relationship: Relationship,
                         agreement: Agreement, correlation_id: str) -> int:
    """Store a relationship's agreement (in the caller's transaction) and announce it."""
    terms = agreement.to_json()
    version = await conn.fetchval(
        "INSERT INTO messaging.agreements (relationship_id, terms, version) VALUES ($1, $2, 1)"
        " ON CONFLICT (relationship_id) DO UPDATE SET terms = EXCLUDED.terms,"
        " version = messaging.agreements.version + 1, updated_at = now() RETURNING version",
        relationship.id, json.loads(json.dumps(terms)))
    public_terms = {k: v for k, v in terms.items() if k != "crisis_resources"}
    await add_event(conn, AGREEMENT_UPDATED, AgreementEventData(
        relationship_id=relationship.id, therapist_id=relationship.therapist_id,
        client_id=relationship.client_id, version=version, terms=public_terms,
    ), correlation_id)
    return int(version)


def _relationship(row: asyncpg.Record) -> Relationship:
    return Relationship(row["id"], row["therapist_id"], row["client_id"], row["status"],
                        row["created_at"])


def device_from_row(row: asyncpg.Record) -> Device:
    return Device(row["user_id"], row["device_id"], row["version"], row["suite"],
                  bytes(row["hpke_public_key"]), bytes(row["signing_public_key"]),
                  bytes(row["signature"]), bytes(row["key_id"]), row["updated_at"])


def message_from_row(row: asyncpg.Record, *, envelope: bytes | None = None) -> StoredMessage:
    """A stored message; ``envelope`` stands in for a row read without its bytes."""
    return StoredMessage(row["id"], row["seq"], row["relationship_id"], row["kind"],
                         row["sender_id"], row["sender_device_id"], row["urgent"],
                         row["sent_at"],
                         bytes(row["envelope"]) if envelope is None else envelope,
                         row["created_at"],
                         row["visible_at"], row["terms"], row["delivery_seq"])


class MessagingStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # -- invites and relationships ---------------------------------------------------

    async def create_invite(self, therapist_id: uuid.UUID, now: datetime) -> Invite:
        code = codes.new_code()
        invite_id = uuid.uuid4()
        expires_at = now + INVITE_LIFETIME
        await self.pool.execute(
            "INSERT INTO messaging.invites (id, code_hash, therapist_id, client_id, expires_at)"
            " VALUES ($1, $2, $3, $4, $5)",
            invite_id, hash_code(code), therapist_id, uuid.uuid4(), expires_at,
        )
        return Invite(invite_id, code, therapist_id, expires_at)

    async def redeem_invite(self, code: str, now: datetime, correlation_id: str) -> Redemption:
        """Create the relationship an invite promises; the same again on a retry."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM messaging.invites WHERE code_hash = $1 FOR UPDATE",
                hash_code(code),
            )
            if row is None:
                raise NotFound("invalid code")
            if row["expires_at"] <= now:
                raise Gone("this code has expired; ask your therapist for a new invite")
            if row["relationship_id"] is not None:
                return Redemption(row["relationship_id"], row["therapist_id"], row["client_id"])
            relationship_id = uuid.uuid4()
            await conn.execute(
                "INSERT INTO messaging.relationships (id, therapist_id, client_id)"
                " VALUES ($1, $2, $3)",
                relationship_id, row["therapist_id"], row["client_id"],
            )
            await conn.execute(
                "UPDATE messaging.invites SET redeemed_at = $2, relationship_id = $3"
                " WHERE id = $1",
                row["id"], now, relationship_id,
            )
            await add_event(conn, RELATIONSHIP_CREATED, RelationshipEventData(
                relationship_id=relationship_id, therapist_id=row["therapist_id"],
                client_id=row["client_id"]), correlation_id)
            await save_agreement(conn, Relationship(
                relationship_id, row["therapist_id"], row["client_id"], "active", now),
                Agreement(), correlation_id)
            return Redemption(relationship_id, row["therapist_id"], row["client_id"])

    async def relationships_of(self, user_id: uuid.UUID) -> list[Relationship]:
        rows = await self.pool.fetch(
            "SELECT * FROM messaging.relationships WHERE therapist_id = $1 OR client_id = $1"
            " ORDER BY created_at, id",
            user_id,
        )
        return [_relationship(r) for r in rows]

    async def relationship_for_member(self, relationship_id: uuid.UUID,
                                      user_id: uuid.UUID) -> Relationship:
        """The relationship if ``user_id`` is in it; otherwise NotFound (never 'forbidden')."""
        row = await self.pool.fetchrow(
            "SELECT * FROM messaging.relationships WHERE id = $1", relationship_id)
        if row is None or not _relationship(row).has_member(user_id):
            raise NotFound("no such relationship")
        return _relationship(row)

    # -- device keys -----------------------------------------------------------------

    async def publish_device(self, *, user_id: uuid.UUID, device_id: uuid.UUID, suite: int,
                             hpke_public_key: bytes, signing_public_key: bytes,
                             signature: bytes, key_id: bytes,
                             correlation_id: str) -> tuple[Device, bool]:
        """Store a device's keys; returns (device, changed). Unchanged keys are a no-op."""
        async with self.pool.acquire() as conn, conn.transaction():
            # Serialise a user's device changes (limit check, version numbers).
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", str(user_id))
            current = await conn.fetchrow(
                "SELECT * FROM messaging.devices WHERE user_id = $1 AND device_id = $2",
                user_id, device_id,
            )
            if current is not None:
                same = (current["suite"] == suite
                        and bytes(current["hpke_public_key"]) == hpke_public_key
                        and bytes(current["signing_public_key"]) == signing_public_key)
                if same:
                    return device_from_row(current), False
                version = current["version"] + 1
            else:
                count = await conn.fetchval(
                    "SELECT count(*) FROM messaging.devices WHERE user_id = $1", user_id)
                if count >= MAX_DEVICES_PER_USER:
                    raise LimitReached(f"at most {MAX_DEVICES_PER_USER} devices per account")
                version = 1
            row = await conn.fetchrow(
                "INSERT INTO messaging.devices (user_id, device_id, version, suite,"
                " hpke_public_key, signing_public_key, signature, key_id)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                " ON CONFLICT (user_id, device_id) DO UPDATE SET version = EXCLUDED.version,"
                " suite = EXCLUDED.suite, hpke_public_key = EXCLUDED.hpke_public_key,"
                " signing_public_key = EXCLUDED.signing_public_key,"
                " signature = EXCLUDED.signature, key_id = EXCLUDED.key_id, updated_at = now()"
                " RETURNING *",
                user_id, device_id, version, suite, hpke_public_key, signing_public_key,
                signature, key_id,
            )
            await conn.execute(
                "INSERT INTO messaging.device_key_history (user_id, device_id, version, suite,"
                " hpke_public_key, signing_public_key, signature, key_id)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                user_id, device_id, version, suite, hpke_public_key, signing_public_key,
                signature, key_id,
            )
            await add_event(conn, DEVICE_KEYS_CHANGED, DeviceKeysEventData(
                user_id=user_id, device_id=device_id, key_id=key_id.hex(), version=version,
            ), correlation_id)
            return device_from_row(row), True

    async def devices_of(self, user_ids: list[uuid.UUID]) -> list[Device]:
        rows = await self.pool.fetch(
            "SELECT * FROM messaging.devices WHERE user_id = ANY($1::uuid[])"
            " ORDER BY user_id, device_id",
            user_ids,
        )
        return [device_from_row(r) for r in rows]

    async def device(self, user_id: uuid.UUID, device_id: uuid.UUID) -> Device:
        row = await self.pool.fetchrow(
            "SELECT * FROM messaging.devices WHERE user_id = $1 AND device_id = $2",
            user_id, device_id,
        )
        if row is None:
            raise NotFound("no such device")
        return device_from_row(row)

    async def device_history(self, user_id: uuid.UUID) -> list[Device]:
        rows = await self.pool.fetch(
            "SELECT *, published_at AS updated_at FROM messaging.device_key_history"
            " WHERE user_id = $1 ORDER BY device_id, version",
            user_id,
        )
        return [device_from_row(r) for r in rows]

    # -- messages --------------------------------------------------------------------

    async def list_messages(self, relationship_id: uuid.UUID, *, viewer_id: uuid.UUID,
                            after: int, limit: int, now: datetime
                            ) -> tuple[list[StoredMessage], list[StoredMessage]]:
        """``(messages, held)``: messages in delivery order after the cursor
        ``after``, and the viewer's own replies still held for office hours.

        Replies whose time has come are given their place in the delivery order
        first, so a reader's cursor never skips one.
        """
        async with self.pool.acquire() as conn:
            due = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM messaging.messages WHERE relationship_id = $1"
                " AND delivery_seq IS NULL AND visible_at <= $2)", relationship_id, now)
            if due:
                async with conn.transaction():
                    await lock_relationship(conn, relationship_id)
                    await conn.execute(
                        "UPDATE messaging.messages"
                        " SET delivery_seq = nextval('messaging.delivery_seq')"
                        " WHERE id IN (SELECT id FROM messaging.messages"
                        " WHERE relationship_id = $1 AND delivery_seq IS NULL"
                        " AND visible_at <= $2 ORDER BY visible_at, seq)",
                        relationship_id, now)
            rows = await conn.fetch(
                "SELECT * FROM messaging.messages WHERE relationship_id = $1"
                " AND delivery_seq > $2 ORDER BY delivery_seq LIMIT $3",
                relationship_id, after, limit)
            held = await conn.fetch(
                "SELECT * FROM messaging.messages WHERE relationship_id = $1"
                " AND delivery_seq IS NULL AND sender_id = $2 ORDER BY seq",
                relationship_id, viewer_id)
        return [message_from_row(r) for r in rows], [message_from_row(r) for r in held]
