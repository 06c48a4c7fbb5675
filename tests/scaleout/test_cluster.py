"""Three signaling node processes sharing Redis and PostgreSQL: chat, groups, receipts and
typing between users on different nodes, and nothing acknowledged lost when a node dies,
Redis restarts or the nodes restart one by one."""

from __future__ import annotations

import asyncio
import signal

import pytest

from signaling.client import Client
from tests.scaleout.chatload import ChatLoad
from tests.scaleout.cluster import Cluster
from tests.scaleout.redis_server import RedisServer
from tests.support import until

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


def assert_exactly_once(load: ChatLoad, cluster: Cluster) -> None:
    print(load.summary())
    assert load.acked_total > 0
    problems = {
        "lost": load.missing(),
        "duplicated": load.duplicated(),
        "never acknowledged": load.unexpected(),
    }
    assert not any(problems.values()), f"{problems}\n{cluster.logs()}"


async def test_users_on_different_nodes_chat_one_to_one(cluster: Cluster) -> None:
    alice = await cluster.client("alice", "phone", home=0)
    bob = await cluster.client("bob", "phone", home=1)
    bob_laptop = await cluster.client("bob", "laptop", home=2)
    assert {alice.auth_ok["node"], bob.auth_ok["node"], bob_laptop.auth_ok["node"]} == {
        "n1", "n2", "n3"}
    sent = await alice.send_text("hi bob", user="bob", client_msg_id="c1")
    for device in (bob, bob_laptop):
        ev = await device.next_event("msg.new")
        assert (ev["conv"], ev["seq"]) == (sent["conv"], sent["seq"])
        assert ev["body"] == {"text": "hi bob"}
    await bob_laptop.send_text("hi alice", user="alice")
    ev = await alice.next_event("msg.new")
    assert ev["from"] == "bob" and ev["from_device"] == "laptop"
    # bob's phone sees what his laptop sent, on another node
    ev = await bob.next_event("msg.new")
    assert ev["body"] == {"text": "hi alice"}


async def test_receipts_and_typing_cross_nodes(cluster: Cluster) -> None:
    alice = await cluster.client("alice", "phone", home=0)
    bob = await cluster.client("bob", "phone", home=1)
    sent = await alice.send_text("read me", user="bob")
    await bob.next_event("msg.new")
    await bob.request("typing", conv=sent["conv"])
    ev = await alice.next_event("typing")
    assert ev == {"type": "typing", "conv": sent["conv"], "user": "bob"}
    await bob.request("receipt.read", conv=sent["conv"], seq=sent["seq"])
    ev = await alice.next_event("receipt", where=lambda e: e["kind"] == "read")
    assert (ev["conv"], ev["user"], ev["seq"]) == (sent["conv"], "bob", sent["seq"])


async def test_group_members_on_three_nodes_each_get_a_message_once(
    cluster: Cluster, redis_server: RedisServer
) -> None:
    users = [f"u{i}" for i in range(9)]
    clients = [await cluster.client(u, "d", home=i % 3) for i, u in enumerate(users)]
    created = await clients[0].request(
        "group.create", name="across", members=users[1:], join_policy="invite_only")
    conv = created["conv"]
    for c in clients[1:]:  # the creation notice reaches everyone, wherever connected
        await c.next_event("msg.new", where=lambda e: e["conv"] == conv)
    await asyncio.sleep(0.3)
    redis_server.client().config_resetstat()
    sent = await clients[0].send_text("hello all", group=created["group"])
    for c in clients[1:]:
        ev = await c.next_event("msg.new", where=lambda e: e["conv"] == conv)
        assert (ev["seq"], ev["body"]) == (sent["seq"], {"text": "hello all"})
    # one publish per other node that holds members (two), not one per member (eight)
    assert redis_server.command_calls("publish") == 2
    reply = await clients[4].send_text("from n2", group=created["group"])
    for c in clients[:4] + clients[5:]:
        ev = await c.next_event("msg.new", where=lambda e: e["seq"] == reply["seq"])
        assert ev["from"] == "u4"
    await asyncio.sleep(0.2)
    again = [e for c in clients for e in c.pending_events()
             if e.get("type") == "msg.new" and e["seq"] in (sent["seq"], reply["seq"])]
    assert again == []


async def test_a_member_added_on_one_node_gets_messages_sent_through_another(
    cluster: Cluster,
) -> None:
    alice = await cluster.client("alice", "d", home=0)
    bob = await cluster.client("bob", "d", home=1)
    carol = await cluster.client("carol", "d", home=2)
    created = await alice.request(
        "group.create", name="late", members=["bob"], join_policy="invite_only")
    group, conv = created["group"], created["conv"]
    # bob's node now has the group's member list cached: [alice, bob]
    first = await bob.send_text("before carol", group=group)
    await alice.next_event("msg.new", where=lambda e: e["seq"] == first["seq"])
    await alice.request("group.invite", group=group, users=["carol"])
    await carol.next_event("msg.new", where=lambda e: e["conv"] == conv)  # the invite notice
    # node n2 must have dropped its cached list when the membership changed on n1
    async def carol_hears_bob() -> bool:
        sent = await bob.send_text("for carol too", group=group)
        try:
            await carol.next_event("msg.new", timeout=0.5, where=lambda e: e["seq"] == sent["seq"])
        except TimeoutError:
            return False
        return True

    assert await carol_hears_bob(), "a member added on another node missed a live message"


async def test_a_killed_nodes_presence_expires(
    cluster: Cluster, redis_server: RedisServer
) -> None:
    idle = await cluster.client("idle", "tablet", home=2, reconnect=False)
    r = redis_server.client()
    key = f"{cluster.prefix}p:idle"
    assert r.hgetall(key) == {"tablet": f"n3 {idle.auth_ok['session']}"}
    cluster.kill(2)
    # node_ttl is 3 s in these tests: then a live node reaps n3's entries
    await until(lambda: not r.exists(key)
                and r.zscore(f"{cluster.prefix}nodes", "n3") is None, 15)
    # A message to the offline user is still stored and handed out when they connect.
    alice = await cluster.client("alice", "phone", home=0)
    sent = await alice.send_text("while you were away", user="idle")
    back = Client(cluster.urls_from(1), idle._token, device="tablet", backlog=True)
    cluster.clients.append(back)
    await back.connect()
    ev = await back.next_event("msg.new", where=lambda e: e.get("seq") == sent["seq"])
    assert ev["body"] == {"text": "while you were away"}


async def test_a_node_restarted_after_a_crash_forgets_its_earlier_sessions(
    cluster: Cluster, redis_server: RedisServer
) -> None:
    gone = await cluster.client("gone", "tablet", home=1, reconnect=False)
    r = redis_server.client()
    key = f"{cluster.prefix}p:gone"
    assert r.hget(key, "tablet") == f"n2 {gone.auth_ok['session']}"
    cluster.kill(1)
    await cluster.restart(1)  # at once, well before its peers would reap it
    assert r.hget(key, "tablet") is None


async def test_sigkill_a_node_under_load_loses_and_duplicates_nothing(cluster: Cluster) -> None:
    load = ChatLoad(cluster, pairs=6, rate=15, tag="k")
    await load.connect()
    load.start()
    await asyncio.sleep(3)
    cluster.kill(2, signal.SIGKILL)
    moved = [c for c in cluster.clients if c.auth_ok.get("node") == "n3"]
    await asyncio.sleep(5)
    await load.stop()
    assert moved and all(c.connected and c.auth_ok["node"] != "n3" for c in moved)
    assert_exactly_once(load, cluster)


async def test_redis_restart_under_load_loses_nothing(
    cluster: Cluster, redis_server: RedisServer
) -> None:
    load = ChatLoad(cluster, pairs=6, rate=15, tag="r")
    await load.connect()
    load.start()
    await asyncio.sleep(2)
    redis_server.stop()

    async def none_ready() -> bool:
        return {await cluster.readyz(i) for i in range(3)} == {503}

    await until(none_ready, 10)
    await asyncio.sleep(2)  # chat goes on meanwhile: stored in PostgreSQL
    redis_server.start()
    for i in range(3):
        await cluster.wait_ready(i, timeout=20)
    await asyncio.sleep(3)
    await load.stop()
    assert_exactly_once(load, cluster)


async def test_rolling_restart_under_load_loses_nothing(cluster: Cluster) -> None:
    load = ChatLoad(cluster, pairs=6, rate=15, tag="t")
    await load.connect()
    load.start()
    await asyncio.sleep(2)
    for i in range(3):
        assert cluster.kill(i, signal.SIGTERM) == 0
        await cluster.restart(i)
        await asyncio.sleep(1.5)
    await asyncio.sleep(1)
    await load.stop()
    assert_exactly_once(load, cluster)
