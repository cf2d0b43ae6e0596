"""AMQP for the services: connect, declare the topology, publish with confirms.

Services never touch channels directly; consuming is in
:mod:`shared.amqp_consume`. Connections here are plain (not "robust"): robust
connections are known to come back without their consumers, so both the
publisher and the consume loops own their reconnection, which is explicit and
testable.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import aio_pika
import aio_pika.abc
import aiormq.exceptions
import structlog
from pamqp.commands import Basic

EVENTS_EXCHANGE = "interlude.events"
DEAD_LETTER_EXCHANGE = "interlude.dead"
# How often a failing handler is retried before the broker dead-letters it.
DELIVERY_LIMIT = 5

log = structlog.get_logger(__name__)

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    aio_pika.exceptions.AMQPError,
    aiormq.exceptions.AMQPError,
    # Acking on a channel that died under us; not an AMQPError subclass.
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)


class PublishFailed(Exception):
    """The broker did not confirm the message (nack, unroutable or gone)."""


class Unroutable(PublishFailed):
    """The broker returned the message: no queue is bound for its routing key."""


async def connect(url: str, *, timeout: float = 10.0) -> aio_pika.abc.AbstractConnection:
    return await aio_pika.connect(url, timeout=timeout)


async def declare_exchanges(channel: aio_pika.abc.AbstractChannel) -> aio_pika.abc.AbstractExchange:
    """Declare the durable events exchange and the dead-letter exchange."""
    await channel.declare_exchange(DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    return await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC,
                                          durable=True)


async def declare_consumer_queue(channel: aio_pika.abc.AbstractChannel, name: str,
                                 bindings: Sequence[str], *, retired: Sequence[str] = (),
                                 ) -> aio_pika.abc.AbstractQueue:
    """A durable quorum queue bound to ``bindings``, with its own dead-letter queue.

    A durable queue keeps the bindings an earlier release gave it; ``retired``
    names those to remove (removing one that is not there is harmless)."""
    events = await declare_exchanges(channel)
    dead = await channel.declare_queue(f"{name}.dead", durable=True,
                                       arguments={"x-queue-type": "quorum"})
    await dead.bind(DEAD_LETTER_EXCHANGE, routing_key=name)
    queue = await channel.declare_queue(name, durable=True, arguments={
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-routing-key": name,
        "x-delivery-limit": DELIVERY_LIMIT,
    })
    for key in bindings:
        await queue.bind(events, routing_key=key)
    for key in retired:
        await queue.unbind(events, routing_key=key)
    return queue


class Publisher:
    """Publishes to the events exchange with publisher confirms (and ``mandatory``
    unless told otherwise).

    :meth:`publish` returns only once the broker has confirmed the message; an
    unroutable mandatory message (returned) or a nack raises :class:`PublishFailed`. On any
    connection trouble the connection is dropped and re-made on the next call.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        # Concurrent publishes share one connection; only one of them may make it.
        self._lock = asyncio.Lock()

    async def ensure(self) -> aio_pika.abc.AbstractExchange:
        """Connect (if not connected) and declare the exchanges."""
        async with self._lock:
            if self._exchange is not None and self._connection is not None \
                    and not self._connection.is_closed:
                return self._exchange
            await self.close()
            self._connection = await connect(self._url)
            channel = await self._connection.channel(publisher_confirms=True,
                                                     on_return_raises=True)
            self._exchange = await declare_exchanges(channel)
            self._channel = channel
            return self._exchange

    async def check(self, timeout: float = 3.0) -> None:
        """Raise unless the broker answers now: a passive declare is a round trip, so
        a connection the broker has dropped is noticed here, not at the next publish."""
        try:
            await asyncio.wait_for(self.ensure(), timeout)
            assert self._channel is not None
            await self._channel.declare_exchange(EVENTS_EXCHANGE, passive=True,
                                                 timeout=timeout)
        except BaseException:
            await self.close()
            raise

    async def publish(self, routing_key: str, body: bytes, *, message_id: str,
                      correlation_id: str | None = None, timeout: float = 10.0,
                      mandatory: bool = True) -> None:
        """Publish and wait for the confirm. With ``mandatory=False`` a message no
        queue is bound for is confirmed and dropped by the broker, not returned."""
        try:
            exchange = await self.ensure()
            message = aio_pika.Message(
                body, message_id=message_id, correlation_id=correlation_id,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await exchange.publish(message, routing_key, mandatory=mandatory, timeout=timeout)
        except aio_pika.exceptions.DeliveryError as exc:
            if isinstance(exc.frame, Basic.Return):
                raise Unroutable(f"no queue is bound for {routing_key}") from exc
            raise PublishFailed(f"broker refused {routing_key}: {exc}") from exc
        except CONNECTION_ERRORS as exc:
            await self.close()
            raise PublishFailed(f"broker unreachable: {exc.__class__.__name__}") from exc

    async def close(self) -> None:
        connection, self._connection, self._exchange = self._connection, None, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await connection.close()


async def declare_transient_queue(channel: aio_pika.abc.AbstractChannel, name: str,
                                  bindings: Sequence[str], *,
                                  max_length: int = 10_000) -> aio_pika.abc.AbstractQueue:
    """An exclusive, auto-deleted queue bound to ``bindings``: it lives as long as
    this connection, for a fan-out copy of the events (one per process).

    ``max_length`` bounds what piles up if the consumer stalls (oldest dropped).
    """
    events = await declare_exchanges(channel)
    queue = await channel.declare_queue(name, durable=False, exclusive=True, auto_delete=True,
                                        arguments={"x-max-length": max_length})
    for key in bindings:
        await queue.bind(events, routing_key=key)
    return queue
