"""The draining listener, over real loopback sockets: connections serve as
usual; at close, the ones still queued in the kernel are taken and answered,
not reset; a connect after the close is refused."""

from __future__ import annotations

import asyncio
import socket

import pytest

from shared.listener import DrainingListener

pytestmark = pytest.mark.timeout(20)


class Answer(asyncio.Protocol):
    """Answers the first bytes it gets with ``got <bytes>`` and closes."""

    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"got " + data)
        self.transport.close()


def ask(address: tuple[str, int], data: bytes) -> bytes:
    with socket.create_connection(address, timeout=5) as conn:
        conn.sendall(data)
        return conn.recv(100)


async def test_connections_are_served_while_it_listens() -> None:
    listener = DrainingListener(Answer, "127.0.0.1", 0)
    await listener.start()
    try:
        address = listener.addresses[0]
        answers = await asyncio.gather(*(asyncio.to_thread(ask, address, b"%d" % i)
                                         for i in range(20)))
        assert answers == [b"got %d" % i for i in range(20)]
    finally:
        assert await listener.close() == 0


async def test_close_answers_the_connections_still_queued_and_refuses_later_ones() -> None:
    listener = DrainingListener(Answer, "127.0.0.1", 0)
    await listener.start()
    address = listener.addresses[0]
    # The event loop does not run while these connect and send: the kernel
    # completes their handshakes and they wait in the accept queue, as they do
    # when a busy server is told to stop.
    clients = [socket.create_connection(address, timeout=5) for _ in range(5)]
    try:
        for i, client in enumerate(clients):
            client.sendall(b"%d" % i)
        assert await listener.close() == 5
        answers = await asyncio.gather(*(asyncio.to_thread(client.recv, 100)
                                         for client in clients))
        assert answers == [b"got %d" % i for i in range(5)]
    finally:
        for client in clients:
            client.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5)
    assert listener.addresses == []


async def test_a_port_in_use_is_an_error_and_leaves_no_socket_open() -> None:
    first = DrainingListener(Answer, "127.0.0.1", 0)
    await first.start()
    try:
        second = DrainingListener(Answer, "127.0.0.1", first.addresses[0][1])
        with pytest.raises(OSError, match="in use"):
            await second.start()
        assert second.addresses == []
    finally:
        await first.close()
