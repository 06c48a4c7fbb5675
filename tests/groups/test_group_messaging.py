"""Group messages over the real server (SQLite and PostgreSQL): fan-out, mentions,
receipts, pushes and storage."""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any

import pytest

from signaling.client import ClientError
from tests.groups.world import World
from tests.support import Node


async def test_message_reaches_every_device_of_every_member_but_the_sending_one(world: World):
    carol2 = await world.node.client("carol", "c2")
    alice2 = await world.node.client("alice", "a2")
    sent = await world.say("alice", "hello team")
    for c in (world.c["bob"], world.c["carol"], carol2, world.c["dave"], alice2):
        ev = await c.next_event("msg.new", where=lambda e: e["seq"] == sent["seq"])
        assert ev["body"] == {"text": "hello team"} and ev["from"] == "alice"
    await asyncio.sleep(0.1)
    for c in (world.c["alice"], world.c["eve"]):
        assert not [e for e in c.pending_events() if e.get("seq") == sent["seq"]]


async def test_membership_changes_take_effect_on_the_very_next_message(world: World):
    await world.req("alice", "group.kick", group=world.group, user="carol")
    await world.req("alice", "group.invite", group=world.group, users=["eve"])
    sent = await world.say("bob", "who hears this")
    ev = await world.c["eve"].next_event("msg.new", where=lambda e: e["seq"] == sent["seq"])
    assert ev["body"]["text"] == "who hears this"
    await world.c["dave"].next_event("msg.new", where=lambda e: e["seq"] == sent["seq"])
    await asyncio.sleep(0.1)
    assert not [e for e in world.c["carol"].pending_events() if e.get("seq") == sent["seq"]]


async def test_mentions_show_on_msg_new_and_in_conv_list_until_read(world: World):
    sent = await world.say("dave", "@carol look", mentions=["carol"])
    ev = await world.c["carol"].next_event("msg.new", where=lambda e: e["seq"] == sent["seq"])
    assert ev["mentions"] == ["carol"]

    async def mentioned(user: str) -> bool:
        convs = (await world.req(user, "conv.list"))["conversations"]
        return bool(next(c for c in convs if c["conv"] == world.conv)["mentioned"])

    assert await mentioned("carol") and not await mentioned("bob")
    await world.req("carol", "receipt.read", conv=world.conv, seq=sent["seq"])
    assert not await mentioned("carol")


async def test_at_all_mentions_every_member_but_the_sender(world: World):
    sent = await world.say("bob", "@all standup", mentions=["@all"])
    for user in ("alice", "carol", "dave"):
        convs = (await world.req(user, "conv.list"))["conversations"]
        assert next(c for c in convs if c["conv"] == world.conv)["mentioned"], user
        ev = await world.c[user].next_event("msg.new", where=lambda e: e["seq"] == sent["seq"])
        assert ev["mentions"] == ["@all"]
    convs = (await world.req("bob", "conv.list"))["conversations"]
    assert not next(c for c in convs if c["conv"] == world.conv)["mentioned"]


async def test_read_receipts_reach_the_sender_coalesced_and_nobody_else(world: World):
    bob2 = await world.node.client("bob", "b2")
    sent = await world.say("alice", "did you read this")
    for user in ("bob", "carol", "dave"):
        await world.req(user, "receipt.read", conv=world.conv, seq=sent["seq"])
    ev = await world.c["alice"].next_event("receipt", timeout=3)
    assert ev["conv"] == world.conv and ev["kind"] == "read"
    assert sorted(r["user"] for r in ev["receipts"]) == ["bob", "carol", "dave"]
    assert {r["seq"] for r in ev["receipts"]} == {sent["seq"]}
    # bob's other device learns bob's own position at once (unread counts across devices).
    own = await bob2.next_event("receipt")
    assert (own["user"], own["seq"]) == ("bob", sent["seq"])
    await asyncio.sleep(1.3)
    assert not [e for e in world.c["alice"].pending_events() if e["type"] == "receipt"]
    for user in ("carol", "dave"):  # no members x members storm
        assert not [e for e in world.c[user].pending_events() if e["type"] == "receipt"]


async def test_msg_receipts_lists_readers_and_counts_the_rest(world: World):
    sent = await world.say("alice", "count me")
    await world.req("carol", "receipt.read", conv=world.conv, seq=sent["seq"])
    data = await world.req("alice", "msg.receipts", conv=world.conv, seq=sent["seq"])
    assert data["read"] == ["carol"] and data["unread_count"] == 2  # bob, dave
    await world.req("bob", "receipt.read", conv=world.conv, seq=sent["seq"] + 5)  # clamped
    data = await world.req("dave", "msg.receipts", conv=world.conv, seq=sent["seq"])
    assert data["read"] == ["bob", "carol"] and data["unread_count"] == 1
    await world.fails("eve", "msg.receipts", "forbidden", conv=world.conv, seq=sent["seq"])
    await world.fails("alice", "msg.receipts", "not_found", conv=world.conv, seq=999)


async def test_offline_members_are_pushed_muted_ones_only_when_mentioned(node: Node):
    alice = await node.client("alice")
    made = await alice.request("group.create", name="P", members=["bob", "carol"])
    conv, group = made["conv"], made["group"]
    carol = await node.client("carol", "c1")
    await carol.request("conv.mute", conv=conv, on=True)
    await carol.close()
    sent = node.state.pusher.sent  # type: ignore[attr-defined]
    sent.clear()

    async def pushed_for(text: str, **extra: Any) -> list[tuple[str, bool]]:
        sent.clear()
        await alice.send_text(text, group=group, **extra)
        await node.settled()  # pushes follow the sender's reply
        return sorted((p.user, p.mentioned) for p in sent)

    assert await pushed_for("plain") == [("bob", False)]
    assert await pushed_for("@carol", mentions=["carol"]) == [("bob", False), ("carol", True)]
    assert await pushed_for("@all", mentions=["@all"]) == [("bob", True), ("carol", True)]
    sent.clear()
    await alice.request("group.update", group=group, name="Renamed")  # notices never push
    assert sent == []


def _count_rows(conv: str) -> Generator[Any, Any, tuple[int, int]]:
    msgs = yield ("SELECT COUNT(*) FROM messages WHERE conv = ?", (conv,), "one")
    members = yield ("SELECT COUNT(*) FROM conv_members WHERE conv = ?", (conv,), "one")
    return int(msgs[0]), int(members[0])


async def test_storage_is_one_row_per_message_whatever_the_group_size(any_node: Node):
    alice = await any_node.client("alice")
    users = [f"m{i:03d}" for i in range(200)]
    made = await alice.request("group.create", name="Wide", members=users)
    for i in range(10):
        await alice.send_text(f"n{i}", group=made["group"])
    msgs, members = await any_node.state.store.read(_count_rows(made["conv"]))
    assert (msgs, members) == (11, 201)  # the creation notice and ten messages


async def test_a_muted_direct_conversation_is_not_pushed_even_for_a_mention(node: Node):
    """A mention pushes through a muted group; a dm's mention of its own peer means
    nothing, so it does not (it did, as `@all` did, which a dm now refuses)."""
    alice = await node.client("alice")
    bob = await node.client("bob")
    await alice.send_text("first", user="bob")
    await bob.request("conv.mute", conv="dm:alice:bob", on=True)
    await bob.close()
    sent = node.state.pusher.sent  # type: ignore[attr-defined]
    await node.settled()  # pushes follow the sender's reply
    sent.clear()
    await alice.send_text("while muted", user="bob")
    await alice.send_text("@bob buy now", user="bob", mentions=["bob"])
    await node.settled()
    assert sent == []
    with pytest.raises(ClientError) as e:
        await alice.send_text("@all buy now", user="bob", mentions=["@all"])
    assert e.value.code == "forbidden"
    await node.settled()
    assert sent == []
