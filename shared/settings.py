"""Settings read from ``INTERLUDE_*`` environment variables.

Every service builds one frozen :class:`Settings` at start. A missing or invalid
value raises :class:`SettingsError` whose message is one line naming the
variable, so ``interlude serve`` can print it and exit non-zero.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parseaddr
from urllib.parse import urlsplit

from shared.boundaries import DEFAULT_CRISIS_RESOURCES, MAX_CRISIS_TEXT

DEV_DATABASE_URL = "postgresql://root@127.0.0.1:5432/interlude"
DEV_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
# Known only so that production can refuse it.
DEV_INTERNAL_KEY = "interlude-development-internal-key-do-not-use-in-production"
MIN_INTERNAL_KEY_LENGTH = 32
ENVIRONMENTS = ("development", "production")
SMTP_SECURITY = ("none", "starttls", "tls")
_SMTP_DEFAULT_PORTS = {"none": 25, "starttls": 587, "tls": 465}


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the variable."""


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    """The SMTP relay the notifier sends email through."""

    host: str
    port: int
    security: str                 # one of SMTP_SECURITY
    sender: str                   # the From address
    timeout: float                # seconds, per connection and per command
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Settings:
    env: str
    database_url: str
    amqp_url: str
    gateway_port: int
    messaging_port: int
    notifier_port: int
    internal_key: bytes
    host: str
    messaging_url: str
    notifier_url: str
    log_format: str
    outbox_poll_seconds: float
    crisis_resources: str
    trusted_proxy_hops: int
    # None: no SMTP relay, so no email channels.
    smtp: SmtpSettings | None = None
    # Where people open Interlude; the only link an alert email carries.
    public_url: str | None = None
    webhook_timeout: float = 10.0
    # How long the gateway may answer a token it verified from memory (0: never).
    token_cache_seconds: float = 5.0

    @property
    def is_production(self) -> bool:
        return self.env == "production"


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a port number, got {raw!r}") from None
    if not 1 <= value <= 65535:
        raise SettingsError(f"{name} must be between 1 and 65535, got {value}")
    return value


def _url(env: Mapping[str, str], name: str, default: str | None, schemes: tuple[str, ...]) -> str:
    raw = env.get(name) or default
    if not raw:
        raise SettingsError(f"{name} is required (e.g. {schemes[0]}://host/...)")
    parts = urlsplit(raw)
    if parts.scheme not in schemes or not parts.hostname:
        raise SettingsError(f"{name} must be a {' or '.join(schemes)} URL with a host")
    return raw


def _seconds(env: Mapping[str, str], name: str, default: float, low: float,
             high: float) -> float:
    raw = env.get(name) or ""
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not low <= value <= high:
        raise SettingsError(f"{name} must be between {low:g} and {high:g} seconds")
    return value


def _smtp(env: Mapping[str, str], production: bool) -> SmtpSettings | None:
    host = (env.get("INTERLUDE_SMTP_HOST") or "").strip()
    if not host:
        stray = sorted(name for name in ("INTERLUDE_SMTP_USERNAME", "INTERLUDE_SMTP_PASSWORD",
                                         "INTERLUDE_SMTP_FROM", "INTERLUDE_SMTP_PORT")
                       if env.get(name))
        if stray:
            raise SettingsError(f"INTERLUDE_SMTP_HOST is required when {stray[0]} is set")
        return None
    security = env.get("INTERLUDE_SMTP_SECURITY") or "starttls"
    if security not in SMTP_SECURITY:
        raise SettingsError(f"INTERLUDE_SMTP_SECURITY must be one of {', '.join(SMTP_SECURITY)},"
                            f" got {security!r}")
    port = _port(env, "INTERLUDE_SMTP_PORT", _SMTP_DEFAULT_PORTS[security])
    username = env.get("INTERLUDE_SMTP_USERNAME") or None
    password = env.get("INTERLUDE_SMTP_PASSWORD") or None
    if (username is None) != (password is None):
        raise SettingsError("INTERLUDE_SMTP_USERNAME and INTERLUDE_SMTP_PASSWORD must be set"
                            " together")
    if production and username is not None and security == "none":
        raise SettingsError("INTERLUDE_SMTP_SECURITY=none would send INTERLUDE_SMTP_PASSWORD"
                            " in clear; use starttls or tls in production")
    sender = (env.get("INTERLUDE_SMTP_FROM") or "").strip()
    if not sender:
        raise SettingsError("INTERLUDE_SMTP_FROM is required when INTERLUDE_SMTP_HOST is set")
    _, address = parseaddr(sender)
    if "@" not in address or any(c in sender for c in "\r\n"):
        raise SettingsError(f"INTERLUDE_SMTP_FROM must be an email address, got {sender!r}")
    timeout = _seconds(env, "INTERLUDE_SMTP_TIMEOUT", 10.0, 1, 120)
    return SmtpSettings(host=host, port=port, security=security, sender=sender,
                        timeout=timeout, username=username, password=password)


def _public_url(env: Mapping[str, str], production: bool) -> str | None:
    raw = env.get("INTERLUDE_PUBLIC_URL") or ""
    if not raw:
        return None
    schemes = ("https",) if production else ("https", "http")
    return _url(env, "INTERLUDE_PUBLIC_URL", None, schemes).rstrip("/")


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build settings from ``env`` (default: the process environment)."""
    env = os.environ if env is None else env
    mode = env.get("INTERLUDE_ENV", "development") or "development"
    if mode not in ENVIRONMENTS:
        raise SettingsError(f"INTERLUDE_ENV must be one of {', '.join(ENVIRONMENTS)}, got {mode!r}")
    production = mode == "production"

    database_url = _url(
        env,
        "INTERLUDE_DATABASE_URL",
        None if production else DEV_DATABASE_URL,
        ("postgresql", "postgres"),
    )
    amqp_url = _url(
        env, "INTERLUDE_AMQP_URL", None if production else DEV_AMQP_URL, ("amqp", "amqps")
    )
    amqp_user = urlsplit(amqp_url).username
    if production and amqp_user in (None, "", "guest"):
        # No user means the AMQP client falls back to guest/guest.
        raise SettingsError(
            "INTERLUDE_AMQP_URL must name a user other than the default guest in production"
        )

    raw_key = env.get("INTERLUDE_INTERNAL_KEY") or ""
    if not raw_key:
        if production:
            raise SettingsError("INTERLUDE_INTERNAL_KEY is required in production")
        raw_key = DEV_INTERNAL_KEY
    elif production and raw_key == DEV_INTERNAL_KEY:
        raise SettingsError(
            "INTERLUDE_INTERNAL_KEY is the development default; refused in production"
        )
    if len(raw_key) < MIN_INTERNAL_KEY_LENGTH:
        raise SettingsError(
            f"INTERLUDE_INTERNAL_KEY must be at least {MIN_INTERNAL_KEY_LENGTH} characters"
        )

    gateway_port = _port(env, "INTERLUDE_GATEWAY_PORT", 8080)
    messaging_port = _port(env, "INTERLUDE_MESSAGING_PORT", 8081)
    notifier_port = _port(env, "INTERLUDE_NOTIFIER_PORT", 8082)
    host = env.get("INTERLUDE_HOST", "127.0.0.1") or "127.0.0.1"
    messaging_url = _url(
        env, "INTERLUDE_MESSAGING_URL", f"http://127.0.0.1:{messaging_port}", ("http", "https")
    )
    notifier_url = _url(
        env, "INTERLUDE_NOTIFIER_URL", f"http://127.0.0.1:{notifier_port}", ("http", "https")
    )

    log_format = env.get("INTERLUDE_LOG_FORMAT", "auto") or "auto"
    if log_format not in ("auto", "json", "console"):
        raise SettingsError(
            f"INTERLUDE_LOG_FORMAT must be auto, json or console, got {log_format!r}"
        )

    raw_poll = env.get("INTERLUDE_OUTBOX_POLL_SECONDS", "2") or "2"
    try:
        poll = float(raw_poll)
    except ValueError:
        raise SettingsError(
            f"INTERLUDE_OUTBOX_POLL_SECONDS must be a number, got {raw_poll!r}"
        ) from None
    if not 0.05 <= poll <= 300:
        raise SettingsError("INTERLUDE_OUTBOX_POLL_SECONDS must be between 0.05 and 300")

    crisis = (env.get("INTERLUDE_CRISIS_RESOURCES") or DEFAULT_CRISIS_RESOURCES).strip()
    if len(crisis) > MAX_CRISIS_TEXT:
        raise SettingsError(
            f"INTERLUDE_CRISIS_RESOURCES must be at most {MAX_CRISIS_TEXT} characters"
        )

    raw_hops = env.get("INTERLUDE_TRUSTED_PROXY_HOPS", "0") or "0"
    if not raw_hops.isdigit() or int(raw_hops) > 5:
        raise SettingsError(
            f"INTERLUDE_TRUSTED_PROXY_HOPS must be a whole number from 0 to 5, got {raw_hops!r}"
        )

    return Settings(
        env=mode,
        database_url=database_url,
        amqp_url=amqp_url,
        gateway_port=gateway_port,
        messaging_port=messaging_port,
        notifier_port=notifier_port,
        internal_key=raw_key.encode(),
        host=host,
        messaging_url=messaging_url.rstrip("/"),
        notifier_url=notifier_url.rstrip("/"),
        log_format=log_format,
        outbox_poll_seconds=poll,
        crisis_resources=crisis,
        trusted_proxy_hops=int(raw_hops),
        smtp=_smtp(env, production),
        public_url=_public_url(env, production),
        webhook_timeout=_seconds(env, "INTERLUDE_WEBHOOK_TIMEOUT", 10.0, 1, 60),
        token_cache_seconds=_seconds(env, "INTERLUDE_TOKEN_CACHE_SECONDS", 5.0, 0, 60),
    )
