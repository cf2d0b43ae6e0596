"""The delivery machinery's pure parts: the retry policy, the alert emails, settings."""

from __future__ import annotations

import pytest

from services.notifier.delivery import RetryPolicy
from services.notifier.mail import ALERT_SUBJECT, alert_message, check_address, code_message
from shared.settings import SettingsError, load_settings

PRODUCTION = {
    "INTERLUDE_ENV": "production",
    "INTERLUDE_DATABASE_URL": "postgresql://u:p@db/interlude",
    "INTERLUDE_AMQP_URL": "amqp://u:p@mq/interlude",
    "INTERLUDE_INTERNAL_KEY": "k" * 40,
}
SMTP = {"INTERLUDE_SMTP_HOST": "smtp.example.org", "INTERLUDE_SMTP_FROM": "alerts@example.org"}


def test_retries_wait_longer_each_time_then_give_up() -> None:
    policy = RetryPolicy(base_seconds=10, factor=3, cap_seconds=1000, max_attempts=5)
    for _ in range(200):
        waits = [policy.retry_in(n) for n in range(1, 5)]
        assert all(w is not None for w in waits)
        assert 7.5 <= waits[0] <= 10
        assert 22.5 <= waits[1] <= 30
        assert waits == sorted(waits)  # type: ignore[type-var]
    assert policy.retry_in(5) is None
    assert RetryPolicy(base_seconds=10, factor=3, cap_seconds=60).retry_in(7) <= 60  # type: ignore[operator]


def test_default_policy_gives_an_endpoint_hours_before_giving_up() -> None:
    policy = RetryPolicy()
    assert policy.max_attempts == 8
    longest = sum(policy.base_seconds * policy.factor ** (n - 1) for n in range(1, 8))
    assert 5 * 3600 < longest < 8 * 3600


def test_the_alert_email_says_only_that_there_is_something_new() -> None:
    message = alert_message("Interlude <alerts@example.org>", "dr@example.org",
                            "https://app.example.org")
    assert message["Subject"] == ALERT_SUBJECT
    assert message["To"] == "dr@example.org"
    assert "example.org>" in message["Message-ID"]
    text = message.get_content()
    assert "https://app.example.org" in text
    assert "something new" in text


def test_the_verification_email_carries_the_code_and_no_link() -> None:
    text = code_message("alerts@example.org", "dr@example.org", "123456", 30).get_content()
    assert "123456" in text
    assert "http" not in text


@pytest.mark.parametrize("bad", ["nope", "a@b", "a b@example.org", "x@example.org\nBcc: y@z.org",
                                 "<x@example.org>", "a@b@example.org"])
def test_addresses_are_checked(bad: str) -> None:
    with pytest.raises(ValueError, match="email"):
        check_address(bad)
    assert check_address(" Dr@Example.ORG ") == "Dr@example.org"


def test_smtp_is_off_unless_a_host_is_set() -> None:
    assert load_settings({}).smtp is None
    with pytest.raises(SettingsError, match="INTERLUDE_SMTP_HOST is required"):
        load_settings({"INTERLUDE_SMTP_FROM": "a@example.org"})


def test_smtp_settings_and_their_defaults() -> None:
    smtp = load_settings(SMTP).smtp
    assert smtp is not None
    assert (smtp.security, smtp.port, smtp.timeout) == ("starttls", 587, 10.0)
    tls = load_settings({**SMTP, "INTERLUDE_SMTP_SECURITY": "tls"}).smtp
    assert tls is not None
    assert tls.port == 465
    with_auth = load_settings({**SMTP, "INTERLUDE_SMTP_USERNAME": "u",
                               "INTERLUDE_SMTP_PASSWORD": "secret-pw"})
    assert "secret-pw" not in repr(with_auth)


@pytest.mark.parametrize(("extra", "named"), [
    ({"INTERLUDE_SMTP_SECURITY": "ssl"}, "INTERLUDE_SMTP_SECURITY"),
    ({"INTERLUDE_SMTP_FROM": ""}, "INTERLUDE_SMTP_FROM"),
    ({"INTERLUDE_SMTP_FROM": "not an address"}, "INTERLUDE_SMTP_FROM"),
    ({"INTERLUDE_SMTP_USERNAME": "u"}, "INTERLUDE_SMTP_USERNAME"),
    ({"INTERLUDE_SMTP_TIMEOUT": "0"}, "INTERLUDE_SMTP_TIMEOUT"),
    ({"INTERLUDE_SMTP_PORT": "x"}, "INTERLUDE_SMTP_PORT"),
    ({"INTERLUDE_WEBHOOK_TIMEOUT": "600"}, "INTERLUDE_WEBHOOK_TIMEOUT"),
    ({"INTERLUDE_PUBLIC_URL": "ftp://x"}, "INTERLUDE_PUBLIC_URL"),
])
def test_bad_smtp_and_delivery_settings_are_named(extra: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        load_settings({**SMTP, **extra})


def test_production_refuses_a_password_over_an_unencrypted_connection() -> None:
    plain = {**PRODUCTION, **SMTP, "INTERLUDE_SMTP_SECURITY": "none",
             "INTERLUDE_SMTP_USERNAME": "u", "INTERLUDE_SMTP_PASSWORD": "p"}
    with pytest.raises(SettingsError, match="INTERLUDE_SMTP_SECURITY=none"):
        load_settings(plain)
    assert load_settings({**plain, "INTERLUDE_SMTP_SECURITY": "starttls"}).smtp is not None
    # Without credentials, a local relay on an unencrypted port is allowed.
    relay = {**PRODUCTION, **SMTP, "INTERLUDE_SMTP_SECURITY": "none"}
    assert load_settings(relay).smtp is not None


def test_production_wants_an_https_public_url() -> None:
    with pytest.raises(SettingsError, match="INTERLUDE_PUBLIC_URL"):
        load_settings({**PRODUCTION, "INTERLUDE_PUBLIC_URL": "http://app.example.org"})
    settings = load_settings({**PRODUCTION, "INTERLUDE_PUBLIC_URL": "https://app.example.org/"})
    assert settings.public_url == "https://app.example.org"
