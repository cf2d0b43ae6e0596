"""Signed identity headers between the gateway and internal services.

The gateway authenticates the caller and forwards who they are in headers signed
with ``INTERLUDE_INTERNAL_KEY`` (HMAC-SHA256). Internal services refuse calls
whose signature is missing, wrong, or older than :data:`MAX_SKEW_SECONDS`.
The MAC covers method, path with query, timestamp, identity, request id and a
hash of the body, so a captured request cannot be replayed with other content
or against another route, and not at all after the window.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

HEADER_USER = "X-Interlude-User"
HEADER_ROLE = "X-Interlude-Role"
HEADER_REQUEST_ID = "X-Interlude-Request-Id"
HEADER_TIMESTAMP = "X-Interlude-Timestamp"
HEADER_SIGNATURE = "X-Interlude-Signature"
MAX_SKEW_SECONDS = 30
ROLES = ("therapist", "client", "system")
# A call made by the gateway itself rather than on behalf of a user.
SYSTEM_USER = uuid.UUID(int=0)


class InternalAuthError(Exception):
    """The call is not signed correctly; the message says why."""


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: uuid.UUID
    role: str
    request_id: str


def _mac(key: bytes, method: str, path_qs: str, ts: str, user: str, role: str,
         request_id: str, body: bytes) -> str:
    msg = "\n".join([method.upper(), path_qs, ts, user, role, request_id,
                     hashlib.sha256(body).hexdigest()])
    return hmac.new(key, msg.encode(), hashlib.sha256).hexdigest()


def sign_headers(key: bytes, *, method: str, path_qs: str, identity: Identity, body: bytes,
                 now: float | None = None) -> dict[str, str]:
    """Headers to attach to an internal call made on behalf of ``identity``."""
    ts = str(int(time.time() if now is None else now))
    user = str(identity.user_id)
    return {
        HEADER_USER: user,
        HEADER_ROLE: identity.role,
        HEADER_REQUEST_ID: identity.request_id,
        HEADER_TIMESTAMP: ts,
        HEADER_SIGNATURE: _mac(key, method, path_qs, ts, user, identity.role,
                               identity.request_id, body),
    }


def verify_headers(key: bytes, *, method: str, path_qs: str, headers: Mapping[str, str],
                   body: bytes, now: float | None = None) -> Identity:
    """Check the signed headers of an internal call and return the caller."""
    try:
        user = headers[HEADER_USER]
        role = headers[HEADER_ROLE]
        request_id = headers[HEADER_REQUEST_ID]
        ts = headers[HEADER_TIMESTAMP]
        signature = headers[HEADER_SIGNATURE]
    except KeyError as missing:
        raise InternalAuthError(f"missing header {missing.args[0]}") from None
    expected = _mac(key, method, path_qs, ts, user, role, request_id, body)
    if not hmac.compare_digest(expected, signature):
        raise InternalAuthError("bad signature")
    try:
        sent = int(ts)
    except ValueError:
        raise InternalAuthError("bad timestamp") from None
    current = time.time() if now is None else now
    if abs(current - sent) > MAX_SKEW_SECONDS:
        raise InternalAuthError("stale request")
    if role not in ROLES:
        raise InternalAuthError("unknown role")
    try:
        user_id = uuid.UUID(user)
    except ValueError:
        raise InternalAuthError("bad user id") from None
    return Identity(user_id=user_id, role=role, request_id=request_id[:128])
