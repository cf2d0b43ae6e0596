"""Signed identity headers between the gateway and internal services."""

from __future__ import annotations

import uuid

import pytest

from shared.internal_auth import (
    HEADER_SIGNATURE,
    HEADER_USER,
    Identity,
    InternalAuthError,
    sign_headers,
    verify_headers,
)

KEY = b"k" * 40
WHO = Identity(uuid.uuid4(), "client", "req-1")


def signed(**overrides: object) -> dict[str, str]:
    args: dict[str, object] = {"method": "POST", "path_qs": "/v1/x?a=1", "identity": WHO,
                               "body": b"{}", "now": 1000.0}
    args.update(overrides)
    return sign_headers(KEY, **args)  # type: ignore[arg-type]


def test_a_signed_call_yields_its_identity() -> None:
    identity = verify_headers(KEY, method="POST", path_qs="/v1/x?a=1", headers=signed(),
                              body=b"{}", now=1010.0)
    assert identity == WHO


@pytest.mark.parametrize(("change", "reason"), [
    ({"body": b'{"a": 1}'}, "bad signature"),
    ({"path_qs": "/v1/y"}, "bad signature"),
    ({"method": "GET"}, "bad signature"),
    ({"now": 1031.0}, "stale request"),
    ({"now": 969.0}, "stale request"),
])
def test_anything_changed_or_late_is_refused(change: dict[str, object], reason: str) -> None:
    call = {"method": "POST", "path_qs": "/v1/x?a=1", "body": b"{}", "now": 1000.0, **change}
    with pytest.raises(InternalAuthError, match=reason):
        verify_headers(KEY, headers=signed(), **call)  # type: ignore[arg-type]


def test_missing_or_forged_headers_are_refused() -> None:
    headers = signed()
    del headers[HEADER_SIGNATURE]
    with pytest.raises(InternalAuthError, match="missing header"):
        verify_headers(KEY, method="POST", path_qs="/v1/x?a=1", headers=headers, body=b"{}",
                       now=1000.0)
    forged = {**signed(), HEADER_USER: str(uuid.uuid4())}
    with pytest.raises(InternalAuthError, match="bad signature"):
        verify_headers(KEY, method="POST", path_qs="/v1/x?a=1", headers=forged, body=b"{}",
                       now=1000.0)
    with pytest.raises(InternalAuthError, match="bad signature"):
        verify_headers(b"other-key" * 5, method="POST", path_qs="/v1/x?a=1", headers=signed(),
                       body=b"{}", now=1000.0)
