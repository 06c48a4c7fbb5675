"""Offline catch-up, durability across crashes, graceful shutdown, webhook push."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from aiohttp import web

from signaling.client import Client, ConnectionLost
from tests.support import Node, ServerProcess, free_port, server_env, start_node, token


async def test_offline_device_catches_up_by_conv_list_and_history(any_node: Node):
    alice = await any_node.client("alice")
    bob = await any_node.client("bob", "b1")
    await alice.send_text("first", user="bob")
    await bob.next_event("msg.new")
    await bob.close()
    for i in range(130):  # more than one history page
        await alice.send_text(f"while away {i}", user="bob")
    back = Client(any_node.ws_url, token("bob"), device="b1")
    back.watermark["dm:alice:bob"] = 1  # what the device had stored locally
    await back.connect()
    try:
        assert await back.sync() == 0  # connect() already synced everything after seq 1
        got = [back.pending_events()]
        texts = [e["body"]["text"] for e in got[0] if e["type"] == "msg.new"]
        assert texts == [f"while away {i}" for i in range(130)]
    finally:
        await back.close()


async def test_client_reconnects_after_server_restart_and_fills_the_gap(tmp_path: Path):
    port = free_port()
    proc = ServerProcess(port, tmp_path, server_env(TALKBRIDGE_RATE_LIMIT="0"))
    await proc.start()
    try:
        alice = Client(proc.ws_url, token("alice"))
        bob = Client(proc.ws_url, token("bob"), max_backoff=0.3)
        await alice.connect()
        await bob.connect()
        await alice.send_text("before restart", user="bob")
        assert (await bob.next_event("msg.new"))["body"]["text"] == "before restart"
        proc.kill(signal.SIGTERM)
        assert (await bob.next_event("client.disconnected", timeout=10))["code"] in (
            1012,
            1006,
            None,
        )
        await proc.start()
        await alice.close()
        writer = Client(proc.ws_url, token("alice"))
        await writer.connect()
        await writer.send_text("while bob was reconnecting", user="bob")
        await bob.next_event("client.reconnected", timeout=15)
        ev = await bob.next_event("msg.new", timeout=10)
        assert ev["body"]["text"] == "while bob was reconnecting" and ev["seq"] == 2
        await writer.close()
        await bob.close()
    finally:
        proc.stop()


async def _stored_seqs(proc: ServerProcess, user: str) -> list[int]:
    """Every message seq the server has for ``user``, as a fresh device syncs them."""
    reader = Client(proc.ws_url, token(user), backlog=True)
    await reader.connect()
    try:
        return [e["seq"] for e in reader.pending_events() if e["type"] == "msg.new"]
    finally:
        await reader.close()


async def test_acknowledged_messages_survive_a_crash(tmp_path: Path):
    port = free_port()
    proc = ServerProcess(port, tmp_path, server_env(TALKBRIDGE_RATE_LIMIT="0"))
    await proc.start()
    try:
        alice = Client(proc.ws_url, token("alice"), reconnect=False)
        await alice.connect()
        acked = []

        async def sender() -> None:
            for i in range(10_000):
                try:
                    acked.append(
                        (await alice.send_text(f"m{i}", user="bob", client_msg_id=f"k{i}"))["seq"]
                    )
                except ConnectionLost:
                    return

        task = asyncio.create_task(sender())
        while len(acked) < 200:  # noqa: ASYNC110 - polling a plain list the sender fills
            await asyncio.sleep(0.01)
        proc.kill(signal.SIGKILL)
        await task
        await alice.close()
        await proc.start()
        stored = await _stored_seqs(proc, "bob")
        assert set(acked) <= set(stored), "an acknowledged message was lost"
        assert stored == list(range(1, len(stored) + 1)), "the sequence has a gap"
    finally:
        proc.stop()


async def test_sigterm_tells_clients_to_reconnect_and_finishes_in_flight_writes(tmp_path: Path):
    port = free_port()
    proc = ServerProcess(port, tmp_path, server_env(TALKBRIDGE_RATE_LIMIT="0"))
    await proc.start()
    try:
        alice = Client(proc.ws_url, token("alice"), reconnect=False)
        await alice.connect()
        sends = [asyncio.create_task(alice.send_text(f"m{i}", user="bob")) for i in range(200)]
        await asyncio.sleep(0.01)
        assert proc.kill(signal.SIGTERM) == 0
        ev = await alice.next_event("server.shutdown", timeout=10)
        assert ev["reconnect_after_ms"] > 0
        assert (await alice.next_event("client.disconnected"))["code"] == 1012
        results = await asyncio.gather(*sends, return_exceptions=True)
        acked = [r["seq"] for r in results if isinstance(r, dict)]
        await alice.close()
        await proc.start()
        assert set(acked) <= set(await _stored_seqs(proc, "bob"))
    finally:
        proc.stop()


async def test_readyz_reports_store_and_bus(node: Node):
    import aiohttp

    async with aiohttp.ClientSession() as s:
        r = await s.get(f"{node.url}/readyz")
        assert r.status == 200 and await r.json() == {"ok": True, "store": True, "bus": True}
        r = await s.get(f"{node.url}/metrics")
        assert "talkbridge_connections" in await r.text()


@pytest.fixture
async def webhook():
    """A real HTTP endpoint that fails its first call with 503, then records pushes."""
    received: list[dict] = []
    calls = {"n": 0}

    async def hook(request: web.Request) -> web.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            return web.Response(status=503)
        received.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/push", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/push", received, calls
    finally:
        await runner.cleanup()


async def test_webhook_push_for_offline_recipient_is_retried_until_delivered(
    tmp_path: Path, webhook
):
    url, received, calls = webhook
    n = await start_node(f"sqlite:///{tmp_path / 's.db'}", tmp_path, push_webhook=url)
    try:
        alice = await n.client("alice")
        await n.client("alice", "second-device")
        await alice.send_text("ping me", user="bob")
        async with asyncio.timeout(10):
            while not received:  # noqa: ASYNC110 - polling what the webhook recorded
                await asyncio.sleep(0.05)
        assert calls["n"] == 2  # the 503 was retried
        assert received == [
            {
                "user": "bob",
                "kind": "message",
                "conv": "dm:alice:bob",
                "sender": "alice",
                "preview": "ping me",
                "mentioned": False,
                "data": {"seq": 1, "msg_id": received[0]["data"]["msg_id"], "kind": "text"},
            }
        ]
    finally:
        await n.stop()
