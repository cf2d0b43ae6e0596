"""The real services as processes, shared by the end-to-end tests of one module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import TestEnv
from tests.e2e.helpers import Stack, run_stack


@pytest.fixture(scope="module")
def stack(test_env: TestEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One set of services per test module; each test makes its own people."""
    yield from run_stack(test_env, tmp_path_factory.mktemp("services"))
