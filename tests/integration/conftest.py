from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pytest

from services.gateway.store import GatewayStore
from services.gateway.typedefs import STORE
from shared.amqp import Publisher
from tests.support.stack import Person, Stack, running_stack

if TYPE_CHECKING:
    from tests.conftest import TestEnv


@pytest.fixture
async def stack(test_env: TestEnv) -> AsyncIterator[Stack]:
    async with running_stack(test_env) as running:
        yield running


@pytest.fixture
async def publisher(test_env: TestEnv) -> AsyncIterator[Publisher]:
    """A confirmed publisher on this run's vhost."""
    publisher = Publisher(test_env.amqp_url)
    try:
        yield publisher
    finally:
        await publisher.close()


def unique_email(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}@example.org"


async def therapist_code(stack: Stack, email: str) -> str:
    store: GatewayStore = stack.apps["gateway"][STORE]
    _, code = await store.create_therapist(email, "Dr Test", datetime.now(UTC))
    return code


async def new_pair(stack: Stack) -> tuple[Person, Person, uuid.UUID]:
    """An enrolled therapist and client with published keys, and their relationship."""
    t_email = unique_email("therapist")
    therapist = await stack.enroll(await therapist_code(stack, t_email), t_email, "Dr Test")
    status, invite = await stack.call("POST", "/v1/invites", therapist)
    assert status == 201, invite
    client = await stack.enroll(invite["code"], unique_email("client"), "Client Test")
    await stack.publish_keys(therapist)
    await stack.publish_keys(client)
    status, rels = await stack.call("GET", "/v1/relationships", client)
    assert status == 200
    return therapist, client, uuid.UUID(rels["items"][0]["id"])
