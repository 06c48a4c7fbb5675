"""Group calls when the members sit on different nodes: one room on one node's relay."""

from __future__ import annotations

import pytest

from tests.scaleout.cluster import Cluster
from tests.scaleout.redis_server import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.postgres]
AV = {"audio": True, "video": True}


async def test_members_on_three_nodes_share_one_room_on_one_node(
    cluster: Cluster, redis_server: RedisServer
) -> None:
    alice = await cluster.client("alice", "d", home=0)
    bob = await cluster.client("bob", "d", home=1)
    carol = await cluster.client("carol", "d", home=2)
    created = await alice.request(
        "group.create", name="call", members=["bob", "carol"], join_policy="invite_only")
    group = created["group"]
    joined = [await c.request("room.join", group=group, media=AV) for c in (bob, alice, carol)]
    rooms = {j["room"] for j in joined}
    assert len(rooms) == 1, joined
    room = rooms.pop()
    host = redis_server.client().hget(f"{cluster.prefix}rooms:node", room)
    assert host in ("n1", "n2", "n3")
    assert [p["user"] for p in joined[2]["participants"]] == ["bob", "alice"]
    # The relay's offers and the membership events reach every node's devices.
    for c in (alice, bob, carol):
        offer = await c.next_event("room.sdp", timeout=10)
        assert offer["room"] == room and offer["sdp"]["type"] == "offer"
    assert (await bob.next_event("room.joined"))["user"] == "alice"
    # Requests of devices on other nodes are forwarded to the hosting node.
    await carol.request("room.leave", room=room)
    left = await bob.next_event("room.left", timeout=10)
    assert (left["room"], left["user"]) == (room, "carol")
    with pytest.raises(Exception) as e:
        await carol.request("room.leave", room=room)
    assert getattr(e.value, "code", None) == "forbidden"
    await alice.request("room.leave", room=room)
    await bob.request("room.leave", room=room)
    ended = await carol.next_event("room.ended", timeout=10)
    assert ended["room"] == room


async def test_when_the_hosting_node_dies_members_are_told_and_rejoin_elsewhere(
    cluster: Cluster, redis_server: RedisServer
) -> None:
    clients = {
        name: await cluster.client(name, "d", home=i)
        for i, name in enumerate(("alice", "bob", "carol"))
    }
    created = await clients["alice"].request(
        "group.create", name="call", members=["bob", "carol"], join_policy="invite_only")
    group = created["group"]
    room = (await clients["bob"].request("room.join", group=group, media=AV))["room"]
    await clients["carol"].request("room.join", group=group, media=AV)
    host = redis_server.client().hget(f"{cluster.prefix}rooms:node", room)
    assert host is not None
    host_index = int(host[1:]) - 1
    cluster.kill(host_index)
    survivors = [c for i, c in enumerate(clients.values()) if i != host_index]
    for c in survivors:
        if c.user in ("bob", "carol"):
            ev = await c.next_event("room.dropped", timeout=30)
            assert ev == {"type": "room.dropped", "room": room, "reason": "relay_failed"}
    again = await survivors[0].request("room.join", group=group, media=AV, timeout=15)
    assert again["room"] != room
    new_host = redis_server.client().hget(f"{cluster.prefix}rooms:node", again["room"])
    assert new_host is not None and new_host != host
