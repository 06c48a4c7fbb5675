"""A device that stops reading is dropped (close 4408); nobody else waits for it."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from pathlib import Path

from tests.support import start_node, token, until


async def _stuck_device(port: int, user: str, device: str) -> asyncio.StreamWriter:
    """A WebSocket client that completes the handshake and then never reads again (with a
    tiny receive buffer, so the server's socket backs up quickly)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws?device={device} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token(user)}\r\n\r\n"
        ).encode()
    )
    status = await reader.readline()
    assert b" 101 " in status, status
    return writer


async def test_a_device_that_stops_reading_is_dropped_and_the_others_get_everything(
    tmp_path: Path,
) -> None:
    node = await start_node(
        f"sqlite:///{tmp_path / 's.sqlite3'}", tmp_path, send_queue=64, rate_limit=0
    )
    stuck = None
    try:
        stuck = await _stuck_device(node.port, "bob", "stuck")
        await until(lambda: node.state.hub.session("bob", "stuck") is not None, 5, every=0.02)
        session = node.state.hub.session("bob", "stuck")
        assert session is not None
        alice = await node.client("alice")
        bob = await node.client("bob", "phone")
        text = "x" * 15_000  # ~15 KB a message: the stuck socket's buffers fill within MBs
        sent = 0
        while not session.closed:
            await alice.send_text(f"{sent} {text}", user="bob")
            sent += 1
            assert sent < 2_000, "the stuck device was never dropped"
        for _ in range(8):  # the sender is not held up by the dropped device
            async with asyncio.timeout(5):
                await alice.send_text(f"{sent} after", user="bob")
            sent += 1
        got: list[int] = []
        while len(got) < sent:
            event = await bob.next_event("msg.new", timeout=10)
            got.append(int(event["body"]["text"].split(" ", 1)[0]))
        assert got == list(range(sent))  # the other device: everything, in order
        assert node.state.hub.session("bob", "phone") is not None
    finally:
        if stuck is not None:
            stuck.close()
        await node.stop()
