"""structlog set-up shared by every process.

Logs go to stdout: JSON when not on a terminal (containers, CI, the supervisor),
coloured console lines on a terminal. A redaction processor drops any field whose
name says it is a secret or content, so a careless ``log.info(..., password=pw)``
cannot leak it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

# Field names that must never reach a log line, whatever their value.
_REDACTED_KEYS = frozenset({
    "password", "passphrase", "token", "access_token", "refresh_token", "code",
    "enrollment_code", "authorization", "secret", "private_key", "text", "plaintext",
    "envelope", "ciphertext", "body", "content", "internal_key", "signature",
})


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "[redacted]" if str(k).lower() in _REDACTED_KEYS else _scrub(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def _redact(_: Any, __: str, event_dict: structlog.types.EventDict) -> structlog.types.EventDict:
    for key in list(event_dict):
        if key.lower() in _REDACTED_KEYS:
            event_dict[key] = "[redacted]"
        else:
            event_dict[key] = _scrub(event_dict[key])
    return event_dict


def configure_logging(service: str, fmt: str = "auto", level: int = logging.INFO) -> None:
    """Configure structlog for ``service``; ``fmt`` is auto, json or console."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(service=service)
    # aiohttp's and aio-pika's stdlib loggers: warnings and above, to stderr.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
