"""Group lifecycle over the real server (SQLite and PostgreSQL): what members see."""

from __future__ import annotations

from pathlib import Path

import pytest

from signaling.client import ClientError
from tests.groups.world import World, make_world
from tests.support import Node, start_node


async def test_create_makes_creator_owner_and_tells_initial_members(any_node: Node):
    alice = await any_node.client("alice")
    bob = await any_node.client("bob")
    data = await alice.request(
        "group.create", group="team1", name="Team", members=["bob"], join_policy="open"
    )
    assert (data["group"], data["conv"], data["seq"]) == ("team1", "g:team1", 1)
    ev = await bob.next_event("msg.new")
    assert ev["conv"] == "g:team1" and ev["seq"] == 1 and ev["kind"] == "notice"
    assert ev["body"] == {"event": "created", "actor": "alice", "name": "Team", "users": ["bob"]}
    info = await bob.request("group.info", group="team1")
    assert info["my_role"] == "member"
    assert info["group"]["owner"] == "alice" and info["group"]["member_count"] == 2
    assert info["group"]["join_policy"] == "open"


async def test_server_chooses_an_id_when_none_given(any_node: Node):
    alice = await any_node.client("alice")
    a = await alice.request("group.create", name="One", members=[])
    b = await alice.request("group.create", name="Two", members=[])
    assert a["group"] != b["group"] and a["conv"] == f"g:{a['group']}"
    listed = (await alice.request("group.list"))["groups"]
    assert [(g["name"], g["role"], g["member_count"]) for g in listed] == [
        ("One", "owner", 1),
        ("Two", "owner", 1),
    ]


async def test_members_page_with_a_cursor(any_node: Node):
    alice = await any_node.client("alice")
    users = [f"u{i:02d}" for i in range(25)]
    g = (await alice.request("group.create", name="Big", members=users))["group"]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = await alice.request("group.members", group=g, limit=10, cursor=cursor)
        seen += [m["user"] for m in page["members"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and seen == sorted(["alice", *users])
    roles = {
        m["user"]: m["role"] for m in (await alice.request("group.members", group=g))["members"]
    }
    assert roles["alice"] == "owner" and roles["u00"] == "member"


async def test_update_is_a_notice_with_the_changed_fields(world: World):
    data = await world.req(
        "bob", "group.update", group=world.group, name="Renamed", announcement="Standup at 9"
    )
    assert data["changed"] == ["announcement", "name"]
    ev = await world.notice("carol", "updated")
    assert ev["body"] == {
        "event": "updated",
        "actor": "bob",
        "name": "Renamed",
        "announcement": "Standup at 9",
    }
    info = (await world.req("carol", "group.info", group=world.group))["group"]
    assert (info["name"], info["announcement"]) == ("Renamed", "Standup at 9")


async def test_open_group_join_and_invite_only_refusal(any_node: Node):
    w = await make_world(any_node, policy="open")
    data = await w.req("eve", "group.join", group=w.group)
    assert data["status"] == "joined"
    ev = await w.notice("carol", "member_joined")
    assert ev["body"]["users"] == ["eve"]
    await w.say("eve", "hello all")
    await w.req("alice", "group.update", group=w.group, join_policy="invite_only")
    await w.req("eve", "group.leave", group=w.group)
    await w.fails("eve", "group.join", "forbidden", group=w.group)
    # A non-member cannot even look an invite-only group up.
    await w.fails("eve", "group.info", "not_found", group=w.group)


async def test_join_request_is_told_to_owner_and_admins_and_approval_adds(world: World):
    await world.req("eve", "group.join", group=world.group, message="hi, it's eve")
    for admin in ("alice", "bob"):
        ev = await world.c[admin].next_event("group.request")
        assert (ev["group"], ev["user"], ev["message"]) == (world.group, "eve", "hi, it's eve")
    await world.fails("eve", "group.join", "conflict", group=world.group)  # already pending
    data = await world.req("bob", "group.approve", group=world.group, user="eve")
    ev = await world.c["eve"].next_event("msg.new", where=lambda e: e["seq"] == data["seq"])
    assert ev["body"]["event"] == "member_joined" and ev["body"]["users"] == ["eve"]
    resolved = await world.c["eve"].next_event("group.request_resolved")
    assert resolved["outcome"] == "approved" and resolved["by"] == "bob"
    # The newcomer sees from their join on, not the group's earlier history.
    hist = await world.req("eve", "msg.history", conv=world.conv, limit=100)
    assert [m["seq"] for m in hist["messages"]] == [data["seq"]]


async def test_rejected_request_is_gone_and_requester_is_told(world: World):
    await world.req("eve", "group.join", group=world.group)
    await world.req("alice", "group.reject", group=world.group, user="eve")
    resolved = await world.c["eve"].next_event("group.request_resolved")
    assert resolved["outcome"] == "rejected"
    assert (await world.req("alice", "group.requests", group=world.group))["requests"] == []
    await world.fails("eve", "msg.history", "forbidden", conv=world.conv)


async def test_member_invite_to_approval_group_waits_for_an_admin(world: World):
    data = await world.req("carol", "group.invite", group=world.group, users=["eve"])
    assert data["requested"] == ["eve"] and data["added"] == []
    ev = await world.c["bob"].next_event("group.request")
    assert ev["user"] == "eve" and ev["invited_by"] == "carol"
    reqs = (await world.req("alice", "group.requests", group=world.group))["requests"]
    assert reqs[0]["user"] == "eve" and reqs[0]["invited_by"] == "carol"
    await world.req("alice", "group.approve", group=world.group, user="eve")
    await world.say("eve", "thanks")


async def test_invite_adds_at_once_and_says_who_invited(world: World):
    data = await world.req("bob", "group.invite", group=world.group, users=["eve", "frank"])
    assert data["added"] == ["eve", "frank"]
    ev = await world.c["eve"].next_event("msg.new")
    assert ev["body"] == {"event": "member_invited", "actor": "bob", "users": ["eve", "frank"]}
    listed = (await world.req("eve", "group.list"))["groups"]
    assert [g["group"] for g in listed] == [world.group]


async def test_transfer_makes_old_owner_an_admin(world: World):
    await world.req("alice", "group.transfer", group=world.group, user="carol")
    roles = {
        m["user"]: m["role"]
        for m in (await world.req("carol", "group.members", group=world.group))["members"]
    }
    assert roles["carol"] == "owner" and roles["alice"] == "admin"
    assert (await world.req("carol", "group.info", group=world.group))["group"]["owner"] == "carol"
    await world.req("alice", "group.leave", group=world.group)  # no longer the owner
    await world.fails("carol", "group.leave", "forbidden", group=world.group)


async def test_kicked_member_invited_back_sees_from_the_new_join(world: World):
    await world.say("alice", "secret while away")
    kick = await world.req("alice", "group.kick", group=world.group, user="carol")
    await world.say("alice", "also while away")
    back = await world.req("alice", "group.invite", group=world.group, users=["carol"])
    hist = await world.req("carol", "msg.history", conv=world.conv, limit=100)
    assert [m["seq"] for m in hist["messages"]] == [back["seq"]]
    assert back["seq"] == kick["seq"] + 2
    await world.say("carol", "I'm back")


async def test_member_limit_refuses_groups_joins_and_invites_beyond_it(
    any_node: Node, tmp_path: Path
):
    node = await start_node(any_node.config.store, tmp_path / "small", group_member_limit=3)
    try:
        alice = await node.client("alice")
        with pytest.raises(ClientError) as e:
            await alice.request("group.create", name="Big", members=["bob", "carol", "dave"])
        assert e.value.code == "conflict" and e.value.data.get("limit") == 3
        made = await alice.request("group.create", name="S", members=["bob"], join_policy="open")
        g = made["group"]
        w = World(node, g, made["conv"], {u: await node.client(u) for u in ("alice", "eve", "zed")})
        await w.req("eve", "group.join", group=g)
        err = await w.fails("zed", "group.join", "conflict", group=g)
        assert err.data.get("limit") == 3
        await w.fails("alice", "group.invite", "conflict", group=g, users=["zed"])
        assert (await w.req("alice", "group.info", group=g))["group"]["member_count"] == 3
    finally:
        await node.stop()


async def test_offline_member_catches_up_on_notices_in_order_with_chat(world: World):
    await world.c["dave"].close()
    await world.say("alice", "before")
    await world.req("alice", "group.invite", group=world.group, users=["eve"])
    await world.say("eve", "hello")
    dave = await world.node.client("dave", "d2")
    convs = {c["conv"]: c for c in (await dave.request("conv.list"))["conversations"]}
    assert convs[world.conv]["unread"] >= 3
    hist = await dave.request("msg.history", conv=world.conv, limit=3)
    said = [(m["kind"], m["body"].get("text") or m["body"].get("event")) for m in hist["messages"]]
    assert said == [("text", "before"), ("notice", "member_invited"), ("text", "hello")]
