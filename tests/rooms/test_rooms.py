"""Group calls over the wire: who may join, what members are told, notices in the timeline.

These need no media to flow: the relay is real (in process) and makes its offers, but no
device answers them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from signaling.client import Client, ClientError
from tests.support import Node, running_node

AV = {"audio": True, "video": True}


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with running_node(
        f"sqlite:///{tmp_path / 's.db'}",
        tmp_path,
        relay_in_process=True,
        relay_addresses=["127.0.0.1"],
        call_grace=0.5,
    ) as n:
        yield n


async def _group(node: Node, owner: Client, *members: str) -> str:
    data = await owner.request(
        "group.create", name="team", members=list(members), join_policy="open"
    )
    return str(data["group"]["id"] if isinstance(data["group"], dict) else data["group"])


async def _notices(c: Client, group: str) -> list[dict]:
    hist = await c.request("msg.history", conv=f"g:{group}", limit=100)
    return [m["body"] for m in hist["messages"] if m["kind"] == "notice"]


async def test_first_join_starts_the_room_and_tells_the_other_members(node: Node):
    alice = await node.client("alice")
    bob = await node.client("bob")
    group = await _group(node, alice, "bob")
    data = await alice.request("room.join", group=group, media=AV)
    assert data["room"].startswith("room_") and data["group"] == group
    assert data["participants"] == [] and data["ice_servers"] == []
    ev = await bob.next_event("room.started")
    assert ev == {"type": "room.started", "group": group, "room": data["room"], "by": "alice"}
    offer = await alice.next_event("room.sdp")
    assert offer["room"] == data["room"] and offer["sdp"]["type"] == "offer"
    assert "a=candidate" in offer["sdp"]["sdp"] and "127.0.0.1" in offer["sdp"]["sdp"]
    started = [n for n in await _notices(bob, group) if n["event"] == "call_started"]
    assert started and started[0]["actor"] == "alice" and started[0]["room"] == data["room"]


async def test_second_member_joins_the_same_room_and_others_see_it(node: Node):
    alice = await node.client("alice")
    bob = await node.client("bob")
    group = await _group(node, alice, "bob")
    room = (await alice.request("room.join", group=group, media=AV))["room"]
    data = await bob.request("room.join", group=group, media=AV)
    assert data["room"] == room
    assert [p["user"] for p in data["participants"]] == ["alice"]
    joined = await alice.next_event("room.joined")
    assert (joined["room"], joined["user"]) == (room, "bob")


async def test_non_members_cannot_join_or_signal_into_a_room(node: Node):
    alice = await node.client("alice")
    eve = await node.client("eve")
    group = await _group(node, alice, "bob")
    room = (await alice.request("room.join", group=group, media=AV))["room"]
    with pytest.raises(ClientError) as e:
        await eve.request("room.join", group=group, media=AV)
    assert e.value.code == "forbidden"
    for kind, extra in (
        ("room.sdp", {"sdp": {"type": "answer", "sdp": "v=0"}}),
        ("room.ice", {"candidate": None}),
        ("room.leave", {}),
    ):
        with pytest.raises(ClientError) as e:
            await eve.request(kind, room=room, **extra)
        assert e.value.code == "forbidden"
    with pytest.raises(ClientError) as e:
        await eve.request("room.leave", room="room_nonexistent")
    assert e.value.code == "not_found"


async def test_bad_room_join_fields_are_refused(node: Node):
    alice = await node.client("alice")
    group = await _group(node, alice, "bob")
    for fields in ({"group": group}, {"group": group, "media": {"audio": "yes"}}, {"media": AV}):
        with pytest.raises(ClientError) as e:
            await alice.request("room.join", **fields)
        assert e.value.code == "bad_request"


async def test_last_leave_ends_the_room_with_a_notice_naming_everyone(node: Node):
    alice = await node.client("alice")
    bob = await node.client("bob")
    carol = await node.client("carol")
    group = await _group(node, alice, "bob", "carol")
    room = (await alice.request("room.join", group=group, media=AV))["room"]
    await bob.request("room.join", group=group, media=AV)
    await bob.request("room.leave", room=room)
    left = await alice.next_event("room.left")
    assert (left["room"], left["user"]) == (room, "bob")
    await alice.request("room.leave", room=room)
    ended = await carol.next_event("room.ended")
    assert ended == {"type": "room.ended", "group": group, "room": room}
    notices = await _notices(carol, group)
    events = [n["event"] for n in notices]
    assert events[-3:] == ["call_started", "call_left", "call_ended"]
    end = notices[-1]
    assert end["started_by"] == "alice" and end["participants"] == ["alice", "bob"]
    assert end["duration_s"] >= 0
    with pytest.raises(ClientError) as e:
        await alice.request("room.sdp", room=room, sdp={"type": "answer", "sdp": "v=0"})
    assert e.value.code == "not_found"
    # A new call in the same group is a new room.
    again = await bob.request("room.join", group=group, media=AV)
    assert again["room"] != room


async def test_a_member_removed_mid_call_is_dropped_from_the_room(node: Node):
    alice = await node.client("alice")
    bob = await node.client("bob")
    group = await _group(node, alice, "bob")
    room = (await alice.request("room.join", group=group, media=AV))["room"]
    await bob.request("room.join", group=group, media=AV)
    await alice.request("group.kick", group=group, user="bob")
    dropped = await bob.next_event("room.dropped")
    assert dropped == {"type": "room.dropped", "room": room, "reason": "removed"}
    assert (await alice.next_event("room.left"))["user"] == "bob"
    with pytest.raises(ClientError) as e:
        await bob.request("room.sdp", room=room, sdp={"type": "answer", "sdp": "v=0"})
    assert e.value.code == "forbidden"


async def test_a_device_that_does_not_come_back_leaves_after_the_grace_period(node: Node):
    alice = await node.client("alice")
    bob = await node.client("bob", "b1", reconnect=False)
    group = await _group(node, alice, "bob")
    room = (await alice.request("room.join", group=group, media=AV))["room"]
    await bob.request("room.join", group=group, media=AV)
    await bob.close()
    left = await alice.next_event("room.left", timeout=5)
    assert (left["room"], left["user"]) == (room, "bob")


async def test_a_device_that_reconnects_within_grace_stays_in_the_room(node: Node):
    alice = await node.client("alice")
    bob = await node.client("bob", "b1", reconnect=False)
    group = await _group(node, alice, "bob")
    room = (await alice.request("room.join", group=group, media=AV))["room"]
    await bob.request("room.join", group=group, media=AV)
    await bob.close()
    back = await node.client("bob", "b1")
    await asyncio.sleep(1.0)  # twice the grace period
    assert not [e for e in alice.pending_events() if e["type"] == "room.left"]
    await back.request("room.leave", room=room)  # still a participant


async def test_only_owner_or_admin_may_record_and_everyone_is_told(node: Node):
    alice = await node.client("alice")
    bob = await node.client("bob")
    group = await _group(node, alice, "bob")
    room = (await alice.request("room.join", group=group, media=AV))["room"]
    await bob.request("room.join", group=group, media=AV)
    with pytest.raises(ClientError) as e:
        await bob.request("room.record", room=room, on=True)
    assert e.value.code == "forbidden"
    data = await alice.request("room.record", room=room, on=True)
    assert data["recording"] is True
    ev = await bob.next_event("room.recording")
    assert ev == {"type": "room.recording", "room": room, "on": True, "by": "alice"}
    await alice.request("room.record", room=room, on=False)
    events = [n["event"] for n in await _notices(bob, group)]
    assert events[-2:] == ["recording_started", "recording_stopped"]


async def test_the_join_reply_comes_before_any_event_of_the_room(node: Node):
    alice = await node.client("alice")
    group = await _group(node, alice, "bob")
    join = json.dumps({"type": "room.join", "id": "j", "group": group, "media": AV})
    for i in range(5):
        device = await node.client("alice", f"phone{i}")  # a fresh event queue each time
        await device.send_raw(join)
        first = await device.next_event(where=lambda e: e["type"] in ("reply", "room.sdp"))
        assert first["type"] == "reply" and first["ok"], first
        offer = await device.next_event("room.sdp")
        assert offer["room"] == first["data"]["room"]
