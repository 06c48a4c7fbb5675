"""1:1 calls whose media goes through the media relay (``via: "relay"``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from signaling.client import Client, ClientError
from tests.support import Node, running_node, start_node

AV = {"audio": True, "video": True}
SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with running_node(
        f"sqlite:///{tmp_path / 's.db'}",
        tmp_path,
        relay_in_process=True,
        relay_addresses=["127.0.0.1"],
    ) as n:
        yield n


async def _ring(caller: Client, callee: Client, call_id: str = "c1") -> dict:
    reply = await caller.request(
        "call.invite", call_id=call_id, to={"user": callee.user}, media=AV, via="relay"
    )
    assert reply["via"] == "relay" and reply["state"] == "ringing"
    invite = await callee.next_event("call.invite")
    return invite


async def test_relay_call_rings_and_connects_without_any_sdp(node: Node):
    alice = await node.client("alice", "a1")
    bob = await node.client("bob", "b1")
    invite = await _ring(alice, bob)
    assert invite["via"] == "relay" and "sdp" not in invite
    await bob.request("call.accept", call_id="c1")
    accepted = await alice.next_event("call.accepted")
    assert accepted == {"type": "call.accepted", "call_id": "c1", "device": "b1", "via": "relay"}
    a = await alice.request("room.join", call="c1", media=AV)
    b = await bob.request("room.join", call="c1", media=AV)
    assert a["room"] == b["room"] and a["call"] == "c1"
    assert [p["user"] for p in b["participants"]] == ["alice"]
    assert (await alice.next_event("room.sdp"))["room"] == a["room"]


async def test_relay_call_refuses_peer_to_peer_signaling(node: Node):
    alice = await node.client("alice", "a1")
    bob = await node.client("bob", "b1")
    await _ring(alice, bob)
    await bob.request("call.accept", call_id="c1")
    for kind, extra in (
        ("call.ice", {"candidate": None}),
        ("call.sdp", {"sdp": {"type": "offer", "sdp": SDP}}),
    ):
        with pytest.raises(ClientError) as e:
            await alice.request(kind, call_id="c1", **extra)
        assert e.value.code == "bad_request" and "room" in e.value.message


async def test_only_the_answering_devices_join_and_only_once_answered(node: Node):
    alice = await node.client("alice", "a1")
    bob = await node.client("bob", "b1")
    bob2 = await node.client("bob", "b2")
    eve = await node.client("eve")
    await _ring(alice, bob)
    with pytest.raises(ClientError) as e:
        await alice.request("room.join", call="c1", media=AV)
    assert e.value.code == "conflict"
    await bob.request("call.accept", call_id="c1")
    with pytest.raises(ClientError) as e:
        await bob2.request("room.join", call="c1", media=AV)
    assert e.value.code == "forbidden"
    with pytest.raises(ClientError) as e:
        await eve.request("room.join", call="c1", media=AV)
    assert e.value.code == "not_found"
    with pytest.raises(ClientError) as e:
        await alice.request("room.join", call="nope", media=AV)
    assert e.value.code == "not_found"


async def test_hangup_closes_the_call_room(node: Node):
    alice = await node.client("alice", "a1")
    bob = await node.client("bob", "b1")
    await _ring(alice, bob)
    await bob.request("call.accept", call_id="c1")
    room = (await alice.request("room.join", call="c1", media=AV))["room"]
    await bob.request("room.join", call="c1", media=AV)
    await alice.request("call.hangup", call_id="c1")
    assert (await bob.next_event("call.ended"))["reason"] == "hangup"
    with pytest.raises(ClientError) as e:
        await bob.request("room.leave", room=room)
    assert e.value.code == "not_found"
    log = (await bob.next_event("msg.new", where=lambda m: m["kind"] == "call"))["body"]
    assert log["outcome"] == "completed"


async def test_a_p2p_call_has_no_room(node: Node):
    alice = await node.client("alice", "a1")
    bob = await node.client("bob", "b1")
    offer = {"type": "offer", "sdp": SDP}
    await alice.request("call.invite", call_id="p1", to={"user": "bob"}, media=AV, sdp=offer)
    await bob.next_event("call.invite")
    with pytest.raises(ClientError) as e:
        await alice.request("room.join", call="p1", media=AV)
    assert e.value.code == "bad_request"


async def test_server_policy_sends_every_call_through_the_relay(tmp_path: Path):
    n = await start_node(
        f"sqlite:///{tmp_path / 's.db'}",
        tmp_path,
        relay_in_process=True,
        relay_addresses=["127.0.0.1"],
        call_via_relay=True,
    )
    try:
        alice = await n.client("alice", "a1")
        bob = await n.client("bob", "b1")
        offer = {"type": "offer", "sdp": SDP}
        reply = await alice.request(
            "call.invite", call_id="c9", to={"user": "bob"}, media=AV, sdp=offer
        )
        assert reply["via"] == "relay"
        invite = await bob.next_event("call.invite")
        assert invite["via"] == "relay" and "sdp" not in invite
    finally:
        await n.stop()
