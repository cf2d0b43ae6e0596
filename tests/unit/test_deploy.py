"""Static checks of deploy/ and of the configuration docs.

Nothing is built or run: compose only resolves its file (``config``), and the
rest is parsing. The point is that the compose file, the Dockerfile, the example
environment, docs/configuration.md and the variables the code reads cannot
drift apart unnoticed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
ENV_EXAMPLE = ROOT / "deploy" / ".env.example"
CONFIG_DOC = ROOT / "docs" / "configuration.md"
PYPROJECT = ROOT / "pyproject.toml"

VARIABLE = re.compile(r"INTERLUDE_[A-Z0-9_]+")
REQUIRED_SECRETS = ("INTERLUDE_INTERNAL_KEY", "POSTGRES_PASSWORD", "RABBITMQ_DEFAULT_PASS")
CLIENT_VARIABLES = (
    "INTERLUDE_SERVER", "INTERLUDE_CLIENT_HOME", "INTERLUDE_PASSPHRASE", "INTERLUDE_PASSWORD",
)
APP_SERVICES = ("gateway", "messaging", "notifier")
COMPOSE_TIMEOUT = 60


# --- helpers -----------------------------------------------------------------


def _names(text: str) -> set[str]:
    return {m.rstrip("_") for m in VARIABLE.findall(text)} - {"INTERLUDE"}


def _code_variables() -> set[str]:
    """Every ``INTERLUDE_*`` name the product code mentions (settings first)."""
    sources = [ROOT / "shared" / "settings.py"]
    for package in ("shared", "services", "client"):
        sources.extend(sorted((ROOT / package).rglob("*.py")))
    names: set[str] = set()
    for path in sources:
        names |= _names(path.read_text(encoding="utf-8"))
    return names


def _documented_variables() -> dict[str, list[str]]:
    """Variable name -> its row cells, from the reference tables of docs/configuration.md.

    Reference tables are those whose header starts with ``| Variable |``; other
    tables on the page (how compose wires things) merely mention variables.
    """
    rows: dict[str, list[str]] = {}
    in_reference_table = False
    for line in CONFIG_DOC.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            in_reference_table = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "Variable":
            in_reference_table = True
            continue
        match = re.fullmatch(r"`([A-Z][A-Z0-9_]*)`", cells[0])
        if in_reference_table and match:
            rows[match.group(1)] = cells
    return rows


def _env_example() -> tuple[dict[str, str], set[str]]:
    """(active assignments, every name shown, commented out or not)."""
    active: dict[str, str] = {}
    shown: set[str] = set()
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if not match:
            continue
        shown.add(match.group(2))
        if match.group(1) is None:
            active[match.group(2)] = match.group(3)
    return active, shown


def _compose_text_without_comments() -> str:
    lines = COMPOSE.read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _run_compose_config(env_file: Path, workdir: Path) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("docker-compose")
    if executable is None:
        pytest.fail(
            "docker-compose is not on PATH; these deployment checks need it "
            "(Debian: apt-get install docker-compose). They must not be skipped."
        )
    # A clean environment: compose prefers the shell's values over the env file,
    # so an INTERLUDE_* or POSTGRES_* variable of the caller would hide mistakes.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(workdir)}
    return subprocess.run(
        [executable, "-f", str(COMPOSE), "--env-file", str(env_file), "config"],
        capture_output=True, text=True, timeout=COMPOSE_TIMEOUT, env=env, cwd=workdir,
        check=False,
    )


def _filled_env(**overrides: str | None) -> str:
    """deploy/.env.example with its empty secrets filled in (``None`` drops one)."""
    active, _ = _env_example()
    values = dict(active)
    for name in REQUIRED_SECRETS:
        values[name] = f"test-{name.lower().replace('_', '-')}-" + "0123456789" * 4
    for name, value in overrides.items():
        if value is None:
            values.pop(name, None)
        else:
            values[name] = value
    return "".join(f"{k}={v}\n" for k, v in values.items())


def _dockerfile_instructions() -> list[tuple[str, str]]:
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


# --- (a), (b) compose resolves, and refuses missing secrets ------------------


def test_compose_config_resolves_with_the_example_env(tmp_path: Path) -> None:
    env_file = tmp_path / "deploy.env"
    env_file.write_text(_filled_env(), encoding="utf-8")
    result = _run_compose_config(env_file, tmp_path)
    assert result.returncode == 0, result.stderr

    resolved = yaml.safe_load(result.stdout)
    for name in ("migrate", *APP_SERVICES):
        environment = resolved["services"][name]["environment"]
        assert not [v for v in environment.values() if "${" in str(v)], environment
        # What compose hands the container must pass the services' own validation.
        settings = load_settings({k: str(v) for k, v in environment.items()})
        assert settings.is_production
        assert settings.host == "0.0.0.0"  # noqa: S104 - containers must listen on all
        assert settings.messaging_url == "http://messaging:8081"
        assert settings.notifier_url == "http://notifier:8082"


def test_compose_refuses_the_example_env_unedited(tmp_path: Path) -> None:
    env_file = tmp_path / "deploy.env"
    env_file.write_text(ENV_EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    result = _run_compose_config(env_file, tmp_path)
    assert result.returncode != 0, "the example env must not start with empty secrets"


@pytest.mark.parametrize("secret", REQUIRED_SECRETS)
@pytest.mark.parametrize("how", ["missing", "empty"])
def test_compose_names_a_missing_secret(tmp_path: Path, secret: str, how: str) -> None:
    env_file = tmp_path / "deploy.env"
    env_file.write_text(_filled_env(**{secret: None if how == "missing" else ""}),
                        encoding="utf-8")
    result = _run_compose_config(env_file, tmp_path)
    assert result.returncode != 0
    assert f"{secret} is required" in result.stdout + result.stderr


# --- (c) the compose file's shape ---------------------------------------------


def test_compose_has_no_obsolete_version_key() -> None:
    assert "version" not in _compose()


def test_compose_commands_are_the_console_commands() -> None:
    services = _compose()["services"]
    assert _command(services["migrate"]) == ["interlude", "migrate"]
    for name in APP_SERVICES:
        assert _command(services[name]) == ["interlude", "serve", name]


@pytest.mark.parametrize("name", APP_SERVICES)
def test_service_waits_for_healthy_backing_services_and_migration(name: str) -> None:
    depends_on = _compose()["services"][name]["depends_on"]
    assert depends_on["postgres"] == {"condition": "service_healthy"}
    assert depends_on["rabbitmq"] == {"condition": "service_healthy"}
    assert depends_on["migrate"] == {"condition": "service_completed_successfully"}


def test_gateway_waits_for_healthy_internal_services() -> None:
    depends_on = _compose()["services"]["gateway"]["depends_on"]
    assert depends_on["messaging"] == {"condition": "service_healthy"}
    assert depends_on["notifier"] == {"condition": "service_healthy"}


def test_migrate_waits_for_postgres() -> None:
    migrate = _compose()["services"]["migrate"]
    assert migrate["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert migrate["restart"] == "no"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_service_health_check_hits_readyz_on_its_own_port(name: str) -> None:
    service = _compose()["services"][name]
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD"
    port = service["environment"][f"INTERLUDE_{name.upper()}_PORT"]
    assert f"http://127.0.0.1:{port}/readyz" in " ".join(test)


def test_backing_services_have_health_checks_and_volumes() -> None:
    services = _compose()["services"]
    assert services["postgres"]["image"] == "postgres:15"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.13")
    rabbitmq_check = services["rabbitmq"]["healthcheck"]["test"]
    assert rabbitmq_check[-3:] == ["rabbitmq-diagnostics", "-q", "ping"]
    for name in ("postgres", "rabbitmq"):
        assert services[name]["volumes"], name


def test_only_the_gateway_publishes_a_port() -> None:
    services = _compose()["services"]
    assert [name for name, s in services.items() if s.get("ports")] == ["gateway"]


def test_compose_builds_from_the_repository_root() -> None:
    services = _compose()["services"]
    for name in ("migrate", *APP_SERVICES):
        build = services[name]["build"]
        assert build == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_every_interlude_variable_in_compose_is_documented() -> None:
    undocumented = _names(_compose_text_without_comments()) - set(_documented_variables())
    assert not undocumented, f"add to docs/configuration.md: {sorted(undocumented)}"


def test_env_example_and_compose_agree() -> None:
    active, _ = _env_example()
    interpolated = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", _compose_text_without_comments()))
    # COMPOSE_PROJECT_NAME is read by compose itself, not interpolated.
    assert set(active) - {"COMPOSE_PROJECT_NAME"} == interpolated
    for secret in REQUIRED_SECRETS:
        assert active[secret] == "", f"{secret} must be an empty placeholder in .env.example"


# --- (d) the code's variables are documented ------------------------------------


def test_settings_variables_are_found() -> None:
    # Guards the scan itself: an empty set would make the next tests pass vacuously.
    expected = {"INTERLUDE_ENV", "INTERLUDE_DATABASE_URL", "INTERLUDE_INTERNAL_KEY"}
    assert expected <= _code_variables()


def test_every_code_variable_is_in_the_configuration_doc() -> None:
    documented = set(_documented_variables())
    missing = (_code_variables() | set(CLIENT_VARIABLES)) - documented
    assert not missing, f"add to docs/configuration.md: {sorted(missing)}"


def test_every_code_variable_is_in_the_env_example() -> None:
    _, shown = _env_example()
    missing = (_code_variables() | set(CLIENT_VARIABLES)) - shown
    assert not missing, f"add to deploy/.env.example: {sorted(missing)}"


def test_documented_interlude_rows_are_complete() -> None:
    for name, cells in _documented_variables().items():
        if name.startswith("INTERLUDE_"):
            assert len(cells) == 5, (name, cells)
            assert all(cells), (name, cells)


# --- (e) the image ----------------------------------------------------------------


def test_image_runs_a_declared_console_command() -> None:
    scripts = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["scripts"]
    instructions = _dockerfile_instructions()
    entrypoints = [json.loads(rest) for kw, rest in instructions if kw == "ENTRYPOINT"]
    cmds = [json.loads(rest) for kw, rest in instructions if kw == "CMD"]
    assert cmds, "the Dockerfile needs an exec-form CMD"
    argv = entrypoints[-1] if entrypoints else cmds[-1]
    assert argv[0] == "interlude"
    assert argv[0] in scripts
    # Compose passes full commands (`interlude serve gateway`); an ENTRYPOINT
    # would turn them into `interlude interlude serve gateway`.
    assert not entrypoints
    for name in ("migrate", *APP_SERVICES):
        assert _command(_compose()["services"][name])[0] in scripts


def test_image_is_multi_stage_non_root_and_production() -> None:
    instructions = _dockerfile_instructions()
    args = " ".join(rest for kw, rest in instructions if kw == "ARG")
    assert "python:3.11-slim" in args
    assert len([kw for kw, _ in instructions if kw == "FROM"]) >= 2
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users
    assert users[-1].split(":")[0] not in ("root", "0")
    env: dict[str, str] = {}
    for kw, rest in instructions:
        if kw == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    assert env["INTERLUDE_HOST"] == "0.0.0.0"  # noqa: S104 - containers must listen on all
    assert env["INTERLUDE_ENV"] == "production"


def test_image_bakes_in_no_secret() -> None:
    text = " ".join(f"{kw} {rest}" for kw, rest in _dockerfile_instructions())
    for forbidden in (*REQUIRED_SECRETS, "INTERLUDE_DATABASE_URL", "INTERLUDE_AMQP_URL",
                      "INTERLUDE_PASSWORD", "INTERLUDE_PASSPHRASE"):
        assert forbidden not in text
    # Only the distribution's sources are copied, never the whole context
    # (a local deploy/.env or .venv must not reach the image).
    copies = [rest for kw, rest in _dockerfile_instructions() if kw == "COPY"]
    assert not [c for c in copies if c.split()[0] in (".", "./") or "deploy" in c]
