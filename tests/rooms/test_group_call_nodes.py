"""A group call whose members sit on three nodes sharing Redis: one room, on one node's
relay, carrying everyone's real media (aiortc devices, loopback-only namespace)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import redis

from signaling.client import Client
from tests.calls.server import RunningServer, free_port, run_redis, run_talkbridge
from tests.media.peers import HEIGHT, WIDTH, Peer, wait_for
from tests.rooms.test_group_call_media import _gets_video_and_audio_of
from tests.rooms.wire_relay import WireRelay

pytestmark = pytest.mark.netns
PREFIX = "tbg:"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[str, list[RunningServer]]]:
    store = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    with run_redis(tmp_path / "redis", free_port()) as url, ExitStack() as stack:
        sep = "&" if "?" in url else "?"
        settings = {"redis": f"{url}{sep}prefix={PREFIX}", "store": store,
                    "relay_in_process": "true", "relay_addresses": "127.0.0.1"}
        nodes = [stack.enter_context(run_talkbridge(tmp_path / f"n{i}", node_id=f"n{i}",
                                                    **settings)) for i in (1, 2, 3)]
        yield url, nodes


async def test_members_on_three_nodes_see_and_hear_each_other_through_one_relay(cluster):
    url, nodes = cluster
    names = ["alice", "bob", "carol"]
    clients = [Client(n.ws_url, n.token(name), "d") for n, name in zip(nodes, names, strict=True)]
    devices: list[tuple[Peer, WireRelay]] = []
    try:
        for c in clients:
            await c.connect()
        created = await clients[0].request(
            "group.create", name="spread", members=names[1:], join_policy="invite_only")
        for c, name in zip(clients, names, strict=True):
            wire = WireRelay(c, group=created["group"])
            peer = Peer(wire, "", name)  # type: ignore[arg-type]
            await peer.join()
            devices.append((peer, wire))
        rooms = {wire.room for _, wire in devices}
        assert len(rooms) == 1
        host = redis.Redis.from_url(url.split("?")[0]).hget(f"{PREFIX}rooms:node", rooms.pop())
        assert host in (b"n1", b"n2", b"n3")
        for peer, _ in devices:
            others = [o for o in names if o != peer.name]
            assert await wait_for(lambda p=peer, o=others: _gets_video_and_audio_of(p, o), 25), (
                peer.name, dict(peer.frames))
            assert all(peer.sizes[o] == (WIDTH, HEIGHT) for o in others)
    finally:
        for peer, wire in devices:
            await wire.close()
            await peer.close()
        for c in clients:
            await c.close()


async def test_rooms_live_on_relay_nodes_and_move_when_one_is_killed(tmp_path: Path):
    store = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    names = ["alice", "bob", "carol"]
    with run_redis(tmp_path / "redis", free_port()) as url, ExitStack() as stack:
        sep = "&" if "?" in url else "?"
        common = {"redis": f"{url}{sep}prefix={PREFIX}", "store": store,
                  "relay_in_process": "true", "relay_addresses": "127.0.0.1"}
        signaling = [stack.enter_context(run_talkbridge(
            tmp_path / f"s{i}", node_id=f"s{i}", relay_host="false", **common)) for i in (1, 2, 3)]
        relays = {f"r{i}": stack.enter_context(run_talkbridge(
            tmp_path / f"r{i}", node_id=f"r{i}", **common)) for i in (1, 2)}
        store_redis = redis.Redis.from_url(url.split("?")[0])
        clients = [Client(n.ws_url, n.token(name), "d")
                   for n, name in zip(signaling, names, strict=True)]
        devices: list[tuple[Peer, WireRelay]] = []
        try:
            for c in clients:
                await c.connect()
            group = (await clients[0].request(
                "group.create", name="g", members=names[1:], join_policy="invite_only"))["group"]

            async def everyone_joins() -> str:
                for (peer, wire) in devices:
                    await wire.close()
                    await peer.close()
                devices.clear()
                for c, name in zip(clients, names, strict=True):
                    wire = WireRelay(c, group=group)
                    peer = Peer(wire, "", name)  # type: ignore[arg-type]
                    await peer.join()
                    devices.append((peer, wire))
                [room] = {wire.room for _, wire in devices}
                for peer, _ in devices:
                    others = [o for o in names if o != peer.name]
                    assert await wait_for(
                        lambda p=peer, o=others: _gets_video_and_audio_of(p, o), 25
                    ), (peer.name, dict(peer.frames))
                return room

            room = await everyone_joins()
            host = store_redis.hget(f"{PREFIX}rooms:node", room)
            assert host in (b"r1", b"r2"), host  # never a signaling-only node
            dead = bytes(host).decode()
            os.kill(relays[dead].pid, signal.SIGKILL)
            for peer, _ in devices:  # every member is told, whichever node it is on
                assert await wait_for(lambda p=peer: _dropped(p, room), 30), peer.name
            again = await everyone_joins()
            new_host = store_redis.hget(f"{PREFIX}rooms:node", again)
            assert new_host in (b"r1", b"r2") and new_host != host  # the surviving relay node
        finally:
            for peer, wire in devices:
                await wire.close()
                await peer.close()
            for c in clients:
                await c.close()


def _dropped(peer: Peer, room: str) -> bool:
    return any(
        e["room"] == room and e["reason"] == "relay_failed" for e in peer.of_kind("room.dropped")
    )

