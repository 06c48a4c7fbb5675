"""Per-conversation change counter: recalls bump ``change_seq``; ``msg.changes`` reads them.

A device that was offline during a recall learns of it on sync through ``msg.changes``
(see docs/PROTOCOL.md, "Reconnect sync"); these tests cover the server side, on both stores.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from im_bridge.errors import Conflict
from im_bridge.messages import ChatService
from im_bridge.store import Store, open_store, ops
from signaling.client import Client, ClientError
from tests.support import Node

DM = "dm:alice:bob"


async def _conv_item(c: Client, conv: str) -> dict[str, Any]:
    convs = (await c.request("conv.list"))["conversations"]
    return next(item for item in convs if item["conv"] == conv)


async def test_a_recall_bumps_the_conversations_change_seq_and_msg_changes_shows_it(
    any_node: Node,
):
    alice = await any_node.client("alice")
    bob = await any_node.client("bob")
    for i in range(3):
        await alice.send_text(f"m{i}", user="bob")
    assert (await _conv_item(bob, DM))["change_seq"] == 0
    await alice.request("msg.recall", conv=DM, seq=3)
    ev = await bob.next_event("msg.recalled")
    assert ev == {"type": "msg.recalled", "conv": DM, "seq": 3, "by": "alice", "change_seq": 1}
    await alice.request("msg.recall", conv=DM, seq=1)
    assert (await bob.next_event("msg.recalled"))["change_seq"] == 2
    for c in (alice, bob):
        assert (await _conv_item(c, DM))["change_seq"] == 2
    page = await bob.request("msg.changes", conv=DM, after_change=0)
    assert page["has_more"] is False
    got = [(m["seq"], m["change_seq"], m["body"], m["recalled"]["by"]) for m in page["messages"]]
    assert got == [(3, 1, {}, "alice"), (1, 2, {}, "alice")]
    # each item is the message as msg.history shows it, plus its change_seq
    hist = {m["seq"]: m for m in (await bob.request("msg.history", conv=DM))["messages"]}
    for m in page["messages"]:
        assert {k: v for k, v in m.items() if k != "change_seq"} == hist[m["seq"]]
    later = await bob.request("msg.changes", conv=DM, after_change=1)
    assert [m["seq"] for m in later["messages"]] == [1]
    assert (await bob.request("msg.changes", conv=DM, after_change=2))["messages"] == []


async def test_msg_changes_pages_in_change_order_while_has_more(any_node: Node):
    alice = await any_node.client("alice")
    bob = await any_node.client("bob")
    for i in range(5):
        await alice.send_text(f"m{i}", user="bob")
    order = [4, 2, 5, 1, 3]
    for seq in order:
        await alice.request("msg.recall", conv=DM, seq=seq)
    seen: list[int] = []
    after, pages = 0, []
    while True:
        page = await bob.request("msg.changes", conv=DM, after_change=after, limit=2)
        pages.append((len(page["messages"]), page["has_more"]))
        seen += [m["seq"] for m in page["messages"]]
        if not page["has_more"]:
            break
        after = page["messages"][-1]["change_seq"]
    assert seen == order
    assert pages == [(2, True), (2, True), (1, False)]
    default = await bob.request("msg.changes", conv=DM, after_change=0)
    assert len(default["messages"]) == 5 and default["has_more"] is False


async def test_a_non_member_gets_forbidden(any_node: Node):
    alice = await any_node.client("alice")
    carol = await any_node.client("carol")
    await alice.send_text("private", user="bob")
    await alice.request("msg.recall", conv=DM, seq=1)
    with pytest.raises(ClientError) as e:
        await carol.request("msg.changes", conv=DM, after_change=0)
    assert e.value.code == "forbidden"
    await alice.request("group.create", group="g1", name="g1", members=["bob"])
    with pytest.raises(ClientError) as e:
        await carol.request("msg.changes", conv="g:g1", after_change=0)
    assert e.value.code == "forbidden"


async def test_a_member_who_left_sees_changes_only_within_their_range(any_node: Node):
    """GROUPS.md: a former member reads the range they were a member for; a recall of a
    message within it still reaches them, one of a message after they left does not."""
    alice = await any_node.client("alice")
    bob = await any_node.client("bob")
    carol = await any_node.client("carol")
    g = await alice.request("group.create", group="g1", name="g1", members=["bob", "carol"])
    conv = g["conv"]
    before = await carol.send_text("while bob is in", group="g1")
    await bob.request("group.leave", group="g1")
    after = await carol.send_text("after bob left", group="g1")
    await carol.request("msg.recall", conv=conv, seq=after["seq"])  # change 1
    await alice.request("msg.recall", conv=conv, seq=before["seq"])  # change 2 (owner)
    mine = await bob.request("msg.changes", conv=conv, after_change=0)
    assert [(m["seq"], m["change_seq"]) for m in mine["messages"]] == [(before["seq"], 2)]
    assert mine["has_more"] is False
    theirs = await carol.request("msg.changes", conv=conv, after_change=0)
    assert [m["seq"] for m in theirs["messages"]] == [after["seq"], before["seq"]]
    # bob's conv.list shows the conversation's counter: his device adopts it after syncing
    assert (await _conv_item(bob, conv))["change_seq"] == 2


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"after_change": 0}, "conv"),
        ({"conv": "nonsense", "after_change": 0}, "conv"),
        ({"conv": DM}, "after_change"),
        ({"conv": DM, "after_change": "0"}, "after_change"),
        ({"conv": DM, "after_change": -1}, "after_change"),
        ({"conv": DM, "after_change": True}, "after_change"),
        ({"conv": DM, "after_change": 0, "limit": 0}, "limit"),
        ({"conv": DM, "after_change": 0, "limit": 101}, "limit"),
        ({"conv": DM, "after_change": 0, "limit": "5"}, "limit"),
    ],
)
async def test_bad_msg_changes_fields_get_bad_request(node: Node, fields: dict, field: str):
    alice = await node.client("alice")
    await alice.send_text("hi", user="bob")
    with pytest.raises(ClientError) as e:
        await alice.request("msg.changes", **fields)
    assert e.value.code == "bad_request"
    if field != "conv" or "conv" not in fields:
        assert e.value.data.get("field") == field


async def test_concurrent_recalls_get_distinct_change_seqs(store: Store):
    chat = ChatService(store)
    for i in range(6):
        await chat.send("alice", "a1", {"user": "bob"}, None, "text", {"text": f"m{i}"})
    recalled = await asyncio.gather(*(chat.recall("alice", DM, seq) for seq in range(1, 7)))
    assert sorted(m.change_seq or 0 for m, _ in recalled) == [1, 2, 3, 4, 5, 6]
    [summary] = await chat.conversations("bob")
    assert summary.change_seq == 6
    with pytest.raises(Conflict):  # a second recall changes nothing
        await chat.recall("alice", DM, 1)
    [summary] = await chat.conversations("bob")
    assert summary.change_seq == 6
    msgs, more = await chat.changes("bob", DM, 0, 100)
    assert [m.change_seq for m in msgs] == [1, 2, 3, 4, 5, 6] and not more


async def test_recalls_through_two_stores_at_once_get_distinct_numbers(store_url: str):
    """Two nodes' stores over one database: their recalls in one conversation take distinct
    numbers, and a message recalled by both at once is recalled (and counted) once."""
    stores = [open_store(store_url), open_store(store_url)]
    for s in stores:
        await s.open()
    try:
        a, b = (ChatService(s) for s in stores)
        for i in range(5):
            await a.send("alice", "a1", {"user": "bob"}, None, "text", {"text": f"m{i}"})
        done = await asyncio.gather(
            *(c.recall("alice", DM, seq) for c, seq in zip((a, b, a, b), (1, 2, 3, 4), strict=True))
        )
        assert sorted(m.change_seq or 0 for m, _ in done) == [1, 2, 3, 4]
        both = await asyncio.gather(
            a.recall("alice", DM, 5), b.recall("alice", DM, 5), return_exceptions=True
        )
        assert sum(isinstance(r, Conflict) for r in both) == 1, both
        [summary] = await a.conversations("bob")
        assert summary.change_seq == 5
        msgs, _ = await b.changes("bob", DM, 0, 100)
        assert [m.change_seq for m in msgs] == [1, 2, 3, 4, 5]
    finally:
        for s in stores:
            await s.close()


def test_a_recall_that_lost_the_race_gives_its_change_number_back():
    """The op's PostgreSQL path: the message was recalled by another node between the
    op's check and the conversation's lock; the op undoes its increment, then refuses."""
    op = ops.recall(DM, 1, "alice", now=1_000, window_ms=120_000)
    q = next(op)
    assert q[0].startswith(f"SELECT {ops.MSG_COLS} FROM messages")
    row = (DM, 1, "m1", "alice", "a1", None, "text", '{"text":"x"}', None, 1_000, None, None)
    q = op.send(row)
    assert q[0].startswith("UPDATE conversations SET change_seq = change_seq + 1")
    q = op.send((7,))
    assert q[0].startswith("UPDATE messages SET recalled_by") and q[2] == "count"
    q = op.send(0)  # no row: recalled meanwhile
    assert q == (
        "UPDATE conversations SET change_seq = change_seq - 1 WHERE conv = ?",
        (DM,),
        "exec",
    )
    with pytest.raises(Conflict):
        op.send(None)
