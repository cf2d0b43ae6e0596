"""The draining listener, over real loopback sockets: connections serve as
usual; at close, new handshakes are dropped, the connections still queued in
the kernel are taken and answered, not reset; a connect after the close is
refused."""

from __future__ import annotations

import asyncio
import socket

import pytest

from shared.listener import DrainingListener, drop_new_handshakes

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


async def started(host: str = "127.0.0.1", port: int = 0) -> DrainingListener:
    listener = DrainingListener(Answer, host, port)
    await listener.bind()
    listener.start()
    return listener


async def test_connections_are_served_while_it_listens() -> None:
    listener = await started()
    try:
        address = listener.addresses[0]
        answers = await asyncio.gather(*(asyncio.to_thread(ask, address, b"%d" % i)
                                         for i in range(20)))
        assert answers == [b"got %d" % i for i in range(20)]
    finally:
        taken = await listener.close()
    assert taken == 0


@pytest.mark.parametrize("accepting", [True, False])
async def test_close_answers_the_connections_still_queued_and_refuses_later_ones(
        accepting: bool) -> None:
    listener = DrainingListener(Answer, "127.0.0.1", 0)
    await listener.bind()
    if accepting:
        listener.start()
    address = listener.addresses[0]
    # The event loop does not run while these connect and send: the kernel
    # completes their handshakes and they wait in the accept queue, as they do
    # when a busy server is told to stop. A started listener takes them while
    # handshakes settle; one that never started takes them all in the drain.
    clients = [socket.create_connection(address, timeout=5) for _ in range(5)]
    try:
        for i, client in enumerate(clients):
            client.sendall(b"%d" % i)
        taken = await listener.close()
        answers = await asyncio.gather(*(asyncio.to_thread(client.recv, 100)
                                         for client in clients))
        assert answers == [b"got %d" % i for i in range(5)]
    finally:
        for client in clients:
            client.close()
    assert taken == (0 if accepting else 5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5)
    assert listener.addresses == []


async def test_a_port_in_use_is_an_error_and_leaves_no_socket_open() -> None:
    first = await started()
    try:
        second = DrainingListener(Answer, "127.0.0.1", first.addresses[0][1])
        with pytest.raises(OSError, match="in use"):
            await second.bind()
        assert second.addresses == []
    finally:
        await first.close()


async def test_connections_queued_before_start_are_served() -> None:
    listener = DrainingListener(Answer, "127.0.0.1", 0)
    await listener.bind()
    address = listener.addresses[0]
    client = socket.create_connection(address, timeout=5)
    try:
        client.sendall(b"early")
        listener.start()
        assert await asyncio.to_thread(client.recv, 100) == b"got early"
    finally:
        client.close()
        await listener.close()


async def test_the_filter_drops_new_handshakes_and_keeps_established_connections() -> None:
    listener = await started()
    address = listener.addresses[0]
    established = await asyncio.to_thread(socket.create_connection, address, 5)
    try:
        assert drop_new_handshakes(listener._sockets[0])
        # The SYN is dropped: no handshake, no reset, the connect just waits.
        with pytest.raises(TimeoutError):
            await asyncio.to_thread(socket.create_connection, address, 0.5)
        established.sendall(b"still here")
        assert await asyncio.to_thread(established.recv, 100) == b"got still here"
    finally:
        established.close()
        await listener.close()
