"""A real audio+video call between aiortc peers connected to two different nodes that share
Redis (and one store), and the call surviving the death of the node that holds it.

Run inside the loopback-only namespace:
    scripts/netns-run .venv/bin/python -m pytest -m netns tests/calls
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from signaling.client import Client
from tests.calls.rtc_peer import CallPeer
from tests.calls.server import RunningServer, free_port, run_redis, run_talkbridge
from tests.calls.test_call_e2e import place_call_and_hang_up

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("loopback_only")]



@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[RunningServer, RunningServer]]:
    store = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    with run_redis(tmp_path / "redis", free_port()) as url:
        settings = {"redis": url, "store": store}
        with run_talkbridge(tmp_path / "n1", node_id="n1", **settings) as n1, \
                run_talkbridge(tmp_path / "n2", node_id="n2", **settings) as n2:
            yield n1, n2


async def test_a_call_between_users_on_two_nodes_carries_real_media(nodes):
    n1, n2 = nodes
    alice = Client(n1.ws_url, n1.token("alice"), "a1", reconnect=False)
    bob = Client(n2.ws_url, n2.token("bob"), "b1", reconnect=False)
    await alice.connect()
    await bob.connect()
    a, b = CallPeer(alice, use_ice_servers=False), CallPeer(bob, use_ice_servers=False)
    try:
        log = await place_call_and_hang_up(a, b, hold=1.0)
        assert log["body"]["outcome"] == "completed"
    finally:
        await a.close()
        await b.close()
        await alice.close()
        await bob.close()


async def test_media_keeps_flowing_when_the_calls_node_dies_and_hangup_still_works(nodes):
    n1, n2 = nodes
    alice = Client([n1.ws_url, n2.ws_url], n1.token("alice"), "a1", max_backoff=0.3)
    bob = Client(n2.ws_url, n2.token("bob"), "b1", reconnect=False)
    await alice.connect()
    await bob.connect()
    a, b = CallPeer(alice, use_ice_servers=False), CallPeer(bob, use_ice_servers=False)
    try:
        await a.call("bob")  # taken, and held, by node 1
        async with asyncio.timeout(20):
            await asyncio.gather(a.media_flowing.wait(), b.media_flowing.wait())
        os.kill(n1.pid, signal.SIGKILL)
        before = b.frames["video"]
        await asyncio.sleep(2.0)
        assert b.frames["video"] > before + 20, "media stopped with the signaling node"
        await b.hangup()  # through node 2: the call's node is gone
        async with asyncio.timeout(15):
            reason = await a.ended
        assert reason == "hangup"
    finally:
        await a.close()
        await b.close()
        await alice.close()
        await bob.close()
