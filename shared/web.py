"""aiohttp plumbing shared by the three services.

* every error is JSON (``{"error": {"code", "message", "field"?}}``), never a
  traceback; unexpected exceptions are logged and answered 500 without detail;
* a request id is taken from ``X-Request-Id`` (or made) and bound to the logs;
* request bodies are validated with pydantic models that forbid unknown fields;
* ``/healthz`` and ``/readyz``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from shared.internal_auth import Identity, InternalAuthError, verify_headers

REQUEST_ID_HEADER = "X-Request-Id"
# What asyncpg raises while Postgres is down, restarting or unreachable.
DATABASE_UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError, asyncpg.InterfaceError,
    asyncpg.AdminShutdownError, asyncpg.CrashShutdownError, ConnectionError, OSError,
    TimeoutError,
)
log = structlog.get_logger(__name__)

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ReadyCheck = Callable[[web.Application], Awaitable[dict[str, str]]]

READY_CHECK: web.AppKey[ReadyCheck] = web.AppKey("ready_check")
IDENTITY: web.RequestKey[Identity] = web.RequestKey("identity")
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)


class ApiError(Exception):
    """An error answered to the caller as JSON."""

    def __init__(self, status: int, code: str, message: str, *, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return web.json_response({"error": error}, status=status, headers=headers)


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
                 415: "unsupported_media_type", 422: "invalid", 429: "rate_limited"}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request.headers.get(REQUEST_ID_HEADER) or str(uuid.uuid4())
    request_id = request_id[:128]
    request[REQUEST_ID] = request_id
    structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        response = await handler(request)
    except ApiError as exc:
        response = error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)
    except web.HTTPRequestEntityTooLarge:
        response = error_response(413, "payload_too_large", "request body is too large")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _STATUS_CODES.get(exc.status, "error")
        response = error_response(exc.status, code, exc.reason)
    except DATABASE_UNAVAILABLE as exc:
        # The database is down or restarting: nothing was accepted; say when to retry.
        log.warning("database unavailable", path=request.path, error=exc.__class__.__name__)
        response = error_response(503, "unavailable", "the service is briefly unavailable; "
                                  "try again shortly", headers={"Retry-After": "2"})
    except Exception:
        log.exception("unhandled error", path=request.path, method=request.method)
        response = error_response(500, "internal", "internal error")
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
    response.headers[REQUEST_ID_HEADER] = request_id
    return response


def _field_of(error: Any) -> str:
    return ".".join(str(part) for part in error.get("loc", ())) or "body"


async def read_json(request: web.Request) -> Any:
    """The request's JSON body; 400 if it is not JSON, 413 if too big."""
    if request.content_type not in ("application/json", ""):
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    raw = await request.read()
    if not raw:
        raise ApiError(400, "bad_request", "request body is empty; JSON expected")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "bad_request", "request body is not valid JSON") from None


def parse_model(model: type[M], data: Any) -> M:
    """Validate ``data`` against ``model``; 422 naming the first bad field."""
    if not isinstance(data, dict):
        raise ApiError(422, "invalid", "request body must be a JSON object", field="body")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = _field_of(first)
        if first.get("type") == "extra_forbidden":
            message = f"unknown field {field!r}"
        elif first.get("type") == "missing":
            message = f"field {field!r} is required"
        else:
            message = f"field {field!r}: {first.get('msg', 'invalid value')}"
        raise ApiError(422, "invalid", message, field=field) from None


async def read_model(request: web.Request, model: type[M]) -> M:
    return parse_model(model, await read_json(request))


def query_int(request: web.Request, name: str, default: int, *, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(422, "invalid", f"query parameter {name!r} must be an integer",
                       field=name) from None
    if not low <= value <= high:
        raise ApiError(422, "invalid", f"query parameter {name!r} must be between {low} and {high}",
                       field=name)
    return value


def parse_uuid(raw: str, name: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(404, "not_found", f"no such {name}") from None


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    check = request.app[READY_CHECK]
    try:
        problems = await check(request.app)
    except Exception as exc:  # readiness must answer, whatever broke
        problems = {"check": exc.__class__.__name__}
    if problems:
        return web.json_response({"status": "not ready", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})


def add_health_routes(app: web.Application, check: ReadyCheck) -> None:
    app[READY_CHECK] = check
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


def internal_auth_middleware(key: bytes) -> Any:
    """Refuse any call to an internal service that is not signed by the gateway.

    ``/healthz`` and ``/readyz`` stay open for orchestrators. The verified
    caller is stored as ``request[IDENTITY]``.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in ("/healthz", "/readyz"):
            return await handler(request)
        body = await request.read()
        try:
            identity = verify_headers(key, method=request.method, path_qs=request.path_qs,
                                      headers=request.headers, body=body)
        except InternalAuthError as exc:
            log.warning("internal call refused", reason=str(exc), path=request.path)
            raise ApiError(401, "unauthorized", f"internal call refused: {exc}") from None
        request[IDENTITY] = identity
        structlog.contextvars.bind_contextvars(request_id=identity.request_id)
        return await handler(request)

    return middleware


def identity_of(request: web.Request) -> Identity:
    return request[IDENTITY]
