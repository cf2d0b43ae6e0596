"""Delivery channels and their deliveries as the gateway answers them (docs/api.md).

A channel is where a user's notifications are sent besides the app: an email
address (once verified with the code mailed to it) or a webhook URL (signed
with a ``whsec_`` secret the server shows once). Which kinds of notification a
channel gets is the user's choice.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

CHECKIN_RECEIVED = "checkin.received"
REPLY_RECEIVED = "reply.received"
DIGEST = "digest"
REMINDER_REPLY_DUE = "reminder.reply_due"
KINDS = (CHECKIN_RECEIVED, REPLY_RECEIVED, DIGEST, REMINDER_REPLY_DUE)
# What each role ever receives: a channel's other kinds would stay silent.
KINDS_OF_ROLE = {
    "therapist": (CHECKIN_RECEIVED, DIGEST, REMINDER_REPLY_DUE),
    "client": (REPLY_RECEIVED,),
}

DELIVERY_STATES = ("pending", "failed", "sent", "dead")
FAILED_STATES = ("failed", "dead")


@dataclass(frozen=True, slots=True)
class Channel:
    id: uuid.UUID
    type: str  # "email" | "webhook"
    target: str  # the address or the URL
    verified: bool
    kinds: tuple[str, ...]
    created_at: str
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Channel:
        target = data.get("address") if data["type"] == "email" else data.get("url")
        return cls(uuid.UUID(data["id"]), str(data["type"]), str(target or ""),
                   bool(data.get("verified")), tuple(data.get("kinds") or ()),
                   str(data.get("created_at") or ""), data)


@dataclass(frozen=True, slots=True)
class AddedChannel:
    channel: Channel
    secret: str | None  # webhooks: the signing secret, shown this once
    code_sent: bool | None  # email: whether the verification email went out
    answer: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Delivery:
    id: uuid.UUID
    channel_id: uuid.UUID
    notification_id: uuid.UUID
    state: str
    attempts: int
    last_error: str | None
    next_attempt_at: str | None
    created_at: str
    updated_at: str
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Delivery:
        return cls(uuid.UUID(data["id"]), uuid.UUID(data["channel_id"]),
                   uuid.UUID(data["notification_id"]), str(data["state"]),
                   int(data.get("attempts") or 0), data.get("last_error"),
                   data.get("next_attempt_at"), str(data.get("created_at") or ""),
                   str(data.get("updated_at") or ""), data)


def channel_of(data: dict[str, Any]) -> Channel:
    """The channel of an answer ``{channel, ...}`` (or a bare channel)."""
    return Channel.from_json(data.get("channel", data))


def added_channel(data: dict[str, Any]) -> AddedChannel:
    code_sent = data.get("code_sent")
    return AddedChannel(channel_of(data), data.get("secret"),
                        None if code_sent is None else bool(code_sent), data)
