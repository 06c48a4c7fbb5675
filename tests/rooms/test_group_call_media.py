"""A group call with real media through the server: aiortc devices, the signaling of a real
node (``room.*`` over the WebSocket) and the relay in its worker process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.media.peers import HEIGHT, WIDTH, Peer, wait_for
from tests.rooms.wire_relay import WireRelay
from tests.support import Node, start_node

pytestmark = pytest.mark.netns


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    n = await start_node(
        f"sqlite:///{tmp_path / 's.db'}",
        tmp_path,
        relay_workers=1,
        relay_addresses=["127.0.0.1"],
    )
    try:
        yield n
    finally:
        await n.stop()


async def _device(node: Node, user: str, group: str) -> tuple[Peer, WireRelay]:
    client = await node.client(user)
    wire = WireRelay(client, group)
    peer = Peer(wire, "", user)  # type: ignore[arg-type]
    await peer.join()
    return peer, wire


def _gets_video_and_audio_of(peer: Peer, others: list[str], frames: int = 10) -> bool:
    return all(
        peer.frames[(o, "video")] >= frames and peer.frames[(o, "audio")] >= frames for o in others
    )


async def test_three_members_see_and_hear_each_other_and_a_late_joiner_catches_up(node: Node):
    owner = await node.client("alice")
    created = await owner.request(
        "group.create", name="call", members=["bob", "carol", "dave"], join_policy="open"
    )
    group = created["group"]["id"] if isinstance(created["group"], dict) else created["group"]
    names = ["alice", "bob", "carol"]
    devices = [await _device(node, n, group) for n in names]
    peers = [p for p, _ in devices]
    late: tuple[Peer, WireRelay] | None = None
    try:
        for p in peers:
            others = [o for o in names if o != p.name]
            assert await wait_for(lambda p=p, o=others: _gets_video_and_audio_of(p, o), 20), (
                p.name,
                dict(p.frames),
            )
            for o in others:
                assert p.sizes[o] == (WIDTH, HEIGHT)
            assert (p.name, "video") not in p.frames
        late = await _device(node, "dave", group)
        assert await wait_for(lambda: _gets_video_and_audio_of(late[0], names, 1), 10), dict(
            late[0].frames
        )
        # One leaves: the others keep receiving each other.
        await peers[2].leave()
        before = {
            p.name: p.frames[(o, "video")] for p in peers[:2] for o in names[:2] if o != p.name
        }
        assert await wait_for(
            lambda: all(
                p.frames[(o, "video")] > before[p.name] + 15
                for p in peers[:2]
                for o in names[:2]
                if o != p.name
            ),
            10,
        )
    finally:
        for p, wire in [*devices, *([late] if late else [])]:
            await wire.close()
            await p.close()


async def test_a_recorded_call_leaves_playable_files_of_every_publisher(node: Node, tmp_path: Path):
    import av

    owner = await node.client("alice")
    created = await owner.request("group.create", name="rec", members=["bob"], join_policy="open")
    group = created["group"]["id"] if isinstance(created["group"], dict) else created["group"]
    devices = [await _device(node, n, group) for n in ("alice", "bob")]
    try:
        alice = devices[0][0]
        assert await wait_for(lambda: _gets_video_and_audio_of(alice, ["bob"]), 20)
        wire = devices[0][1]  # alice's device in the room (the owner's)
        room = wire.room
        await wire.client.request("room.record", room=room, on=True)
        before = alice.frames[("bob", "video")]
        assert await wait_for(lambda: alice.frames[("bob", "video")] > before + 60, 10)
        files = (await wire.client.request("room.record", room=room, on=False))["files"]
        assert len(files) == 2 and all(
            Path(f).is_relative_to(Path(node.config.data_dir)) for f in files
        )
        for f in files:
            with av.open(f) as container:
                video = [s for s in container.streams if s.type == "video"]
                assert video, f"{f} has no video stream"
                decoded = sum(1 for _ in container.decode(video=0))
            assert decoded >= 30, f"{f}: {decoded} frames"
    finally:
        for p, wire in devices:
            await wire.close()
            await p.close()


async def test_a_one_to_one_call_through_the_relay_carries_media_both_ways(node: Node):
    alice_c = await node.client("alice", "a1")
    bob_c = await node.client("bob", "b1")
    await alice_c.request(
        "call.invite",
        call_id="rc1",
        to={"user": "bob"},
        media={"audio": True, "video": True},
        via="relay",
    )
    await bob_c.next_event("call.invite")
    await bob_c.request("call.accept", call_id="rc1")
    await alice_c.next_event("call.accepted")
    devices = []
    try:
        for client in (alice_c, bob_c):
            wire = WireRelay(client, call="rc1")
            peer = Peer(wire, "", client.user)  # type: ignore[arg-type]
            await peer.join()
            devices.append((peer, wire))
        alice, bob = devices[0][0], devices[1][0]
        assert await wait_for(lambda: _gets_video_and_audio_of(alice, ["bob"], 20), 20), dict(
            alice.frames
        )
        assert await wait_for(lambda: _gets_video_and_audio_of(bob, ["alice"], 20), 20), dict(
            bob.frames
        )
        assert alice.sizes["bob"] == (WIDTH, HEIGHT) and bob.sizes["alice"] == (WIDTH, HEIGHT)
        for _, wire in devices:
            await wire.close()  # stop forwarding events to the peers: the test reads them now
        await alice_c.request("call.hangup", call_id="rc1")
        assert (await bob_c.next_event("call.ended"))["reason"] == "hangup"
    finally:
        for p, wire in devices:
            await wire.close()
            await p.close()
