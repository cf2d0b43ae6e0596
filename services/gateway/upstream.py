"""Calls from the gateway to the internal services, signed with the internal key."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import structlog

from shared.internal_auth import Identity, sign_headers
from shared.web import ApiError

log = structlog.get_logger(__name__)
UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=10, connect=3)
RETRY_AFTER_SECONDS = "2"


class UpstreamResponse:
    """An internal service's answer: its status and JSON body, parsed on first use
    (a route that passes the body on as it is never parses it)."""

    __slots__ = ("_data", "_parsed", "is_json", "raw", "status")

    def __init__(self, status: int, raw: bytes, *, is_json: bool = True) -> None:
        self.status = status
        self.raw = raw
        self.is_json = is_json          # the service said its body is JSON
        self._data: Any = None
        self._parsed = False

    @property
    def data(self) -> Any:
        """The body as JSON; None when there is none or it is not JSON."""
        if not self._parsed:
            self._parsed = True
            try:
                self._data = json.loads(self.raw) if self.raw else None
            except ValueError:
                self._data = None
        return self._data


class Upstream:
    """One internal service reached over HTTP."""

    def __init__(self, name: str, base_url: str, key: bytes,
                 session: aiohttp.ClientSession) -> None:
        self.name = name
        self._base_url = base_url
        self._key = key
        self._session = session

    async def call(self, method: str, path_qs: str, identity: Identity, *,
                   payload: Any = None, headers: dict[str, str] | None = None,
                   raw_body: bytes | None = None) -> UpstreamResponse:
        """Call the service as ``identity``; 503 (with Retry-After) if it is unreachable."""
        body = raw_body if raw_body is not None else (
            b"" if payload is None else json.dumps(payload).encode())
        signed = sign_headers(self._key, method=method, path_qs=path_qs, identity=identity,
                              body=body)
        all_headers = {**(headers or {}), **signed}
        if body:
            all_headers["Content-Type"] = "application/json"
        try:
            async with self._session.request(method, self._base_url + path_qs, data=body,
                                             headers=all_headers,
                                             timeout=UPSTREAM_TIMEOUT) as response:
                raw = await response.read()
                status = response.status
                is_json = response.content_type == "application/json"
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("upstream unreachable", upstream=self.name, error=exc.__class__.__name__)
            raise ApiError(503, "unavailable", f"the {self.name} service is unavailable; "
                           "try again shortly", headers={"Retry-After": RETRY_AFTER_SECONDS}
                           ) from None
        if status >= 500:
            log.error("upstream failed", upstream=self.name, status=status)
            if status == 503:
                raise ApiError(503, "unavailable", f"the {self.name} service is unavailable; "
                               "try again shortly", headers={"Retry-After": RETRY_AFTER_SECONDS})
            raise ApiError(502, "upstream_error", f"the {self.name} service failed")
        return UpstreamResponse(status, raw, is_json=is_json)

    async def ready(self) -> bool:
        try:
            async with self._session.get(self._base_url + "/healthz",
                                         timeout=aiohttp.ClientTimeout(total=2)) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False
