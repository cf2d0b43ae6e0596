"""Settings: defaults for development, one clear error naming the bad variable."""

from __future__ import annotations

import pytest

from shared.settings import DEV_INTERNAL_KEY, SettingsError, load_settings

PROD = {
    "INTERLUDE_ENV": "production",
    "INTERLUDE_DATABASE_URL": "postgresql://app:pw@db:5432/interlude",
    "INTERLUDE_AMQP_URL": "amqp://app:pw@mq:5672/interlude",
    "INTERLUDE_INTERNAL_KEY": "k" * 48,
}


def test_development_defaults_reach_the_local_services() -> None:
    settings = load_settings({})
    assert settings.env == "development"
    assert settings.database_url.startswith("postgresql://root@127.0.0.1:5432/")
    assert settings.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert (settings.gateway_port, settings.messaging_port, settings.notifier_port) == (
        8080, 8081, 8082)
    assert settings.messaging_url == "http://127.0.0.1:8081"
    assert settings.internal_key == DEV_INTERNAL_KEY.encode()


def test_production_accepts_explicit_secrets() -> None:
    settings = load_settings(PROD)
    assert settings.is_production
    assert settings.internal_key == b"k" * 48


@pytest.mark.parametrize(("env", "named"), [
    ({"INTERLUDE_ENV": "staging"}, "INTERLUDE_ENV"),
    ({"INTERLUDE_GATEWAY_PORT": "http"}, "INTERLUDE_GATEWAY_PORT"),
    ({"INTERLUDE_MESSAGING_PORT": "70000"}, "INTERLUDE_MESSAGING_PORT"),
    ({"INTERLUDE_DATABASE_URL": "mysql://x/y"}, "INTERLUDE_DATABASE_URL"),
    ({"INTERLUDE_AMQP_URL": "http://mq"}, "INTERLUDE_AMQP_URL"),
    ({"INTERLUDE_INTERNAL_KEY": "short"}, "INTERLUDE_INTERNAL_KEY"),
    ({"INTERLUDE_LOG_FORMAT": "xml"}, "INTERLUDE_LOG_FORMAT"),
    ({"INTERLUDE_OUTBOX_POLL_SECONDS": "soon"}, "INTERLUDE_OUTBOX_POLL_SECONDS"),
    ({**PROD, "INTERLUDE_INTERNAL_KEY": ""}, "INTERLUDE_INTERNAL_KEY"),
    ({**PROD, "INTERLUDE_INTERNAL_KEY": DEV_INTERNAL_KEY}, "INTERLUDE_INTERNAL_KEY"),
    ({**PROD, "INTERLUDE_DATABASE_URL": ""}, "INTERLUDE_DATABASE_URL"),
    ({**PROD, "INTERLUDE_AMQP_URL": "amqp://guest:guest@mq/"}, "INTERLUDE_AMQP_URL"),
    ({**PROD, "INTERLUDE_AMQP_URL": "amqp://mq/"}, "INTERLUDE_AMQP_URL"),
])
def test_a_bad_or_missing_setting_is_one_line_naming_it(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    message = str(caught.value)
    assert named in message
    assert "\n" not in message


def test_secrets_never_appear_in_the_error() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({**PROD, "INTERLUDE_INTERNAL_KEY": "tooshort-secret"})
    assert "tooshort-secret" not in str(caught.value)
