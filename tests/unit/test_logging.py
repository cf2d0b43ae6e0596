"""Logs are JSON on stdout and never carry secrets or content, whatever the caller passes."""

from __future__ import annotations

import json

import pytest
import structlog

from shared.logging import configure_logging


def test_secret_and_content_fields_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("test", "json")
    try:
        structlog.get_logger("t").info(
            "careless", password="hunter2-hunter2", access_token="ila_abc", text="my secret",
            envelope="QUJD", code="ABCD-EFGH", user_id="u-1")
    finally:
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()
    line = capsys.readouterr().out.strip().splitlines()[-1]
    record = json.loads(line)
    for field in ("password", "access_token", "text", "envelope", "code"):
        assert record[field] == "[redacted]"
    assert record["user_id"] == "u-1"
    assert record["service"] == "test"
    for secret in ("hunter2", "ila_abc", "my secret", "QUJD", "ABCD-EFGH"):
        assert secret not in line


def test_nested_secrets_are_redacted_too(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("test", "json")
    try:
        structlog.get_logger("t").info("careless", request={"password": "hunter2-hunter2",
                                                            "items": [{"token": "ila_x"}]})
    finally:
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "hunter2" not in line
    assert "ila_x" not in line
    assert json.loads(line)["request"]["password"] == "[redacted]"
