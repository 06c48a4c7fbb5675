"""The Python client's sync (signaling/client.py): recalls made while a device was offline,
its change watermark, and live messages that arrive during its first sync."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from signaling.client import Client
from tests.support import Node, until

DM = "dm:alice:bob"


def _count_requests(c: Client) -> dict[str, int]:
    """Count the requests ``c`` sends, by type (its own syncs included)."""
    counts: dict[str, int] = {}
    request = c.request

    async def counting(ftype: str, timeout: float | None = None, **fields: Any) -> Any:
        counts[ftype] = counts.get(ftype, 0) + 1
        return await request(ftype, timeout, **fields)

    c.request = counting  # type: ignore[method-assign,assignment]
    return counts


def _gate_reconnect(c: Client) -> asyncio.Event:
    """Hold ``c``'s reconnects until the returned event is set (the device stays offline)."""
    gate = asyncio.Event()
    real_open: Callable[[str], Awaitable[dict[str, Any]]] = c._open

    async def gated(url: str) -> dict[str, Any]:
        await gate.wait()
        return await real_open(url)

    c._open = gated  # type: ignore[method-assign]
    return gate


async def _drop(c: Client) -> None:
    """Drop ``c``'s connection (it reconnects by itself, once its gate opens)."""
    assert c._ws is not None
    await c._ws.close()
    await c.next_event("client.disconnected")


async def test_a_recall_made_while_offline_reaches_the_device_on_sync(any_node: Node):
    """The reviewer's reproducer: the device comes back with the seq watermark it kept
    (and no change watermark: everything it has is checked) and syncs."""
    alice = await any_node.client("alice")
    bob = await any_node.client("bob", "b1")
    sent = await alice.send_text("oops, wrong chat", user="bob")
    assert (await bob.next_event("msg.new"))["seq"] == 1
    watermark = dict(bob.watermark)
    await bob.close()  # offline
    await alice.request("msg.recall", conv=sent["conv"], seq=sent["seq"])
    await alice.send_text("anyway", user="bob")
    back = Client(any_node.ws_url, any_node.token("bob"), device="b1")
    back.watermark.update(watermark)
    await back.connect()
    any_node.clients.append(back)
    await asyncio.sleep(0.5)
    evs = back.pending_events()
    assert [e["seq"] for e in evs if e["type"] == "msg.new"] == [2]
    recalled = [e for e in evs if e["type"] == "msg.recalled"]
    assert recalled == [
        {
            "type": "msg.recalled",
            "conv": DM,
            "seq": 1,
            "by": "alice",
            "change_seq": 1,
            "synced": True,
        }
    ]
    assert back.change_watermark == {DM: 1}


async def test_a_restored_change_watermark_fetches_only_the_changes_after_it(any_node: Node):
    alice = await any_node.client("alice")
    bob = await any_node.client("bob", "b1")
    for i in range(3):
        await alice.send_text(f"m{i}", user="bob")
    await alice.request("msg.recall", conv=DM, seq=1)  # bob sees this one live
    await bob.next_event("msg.recalled")
    await until(lambda: bob.watermark.get(DM) == 3 and bob.change_watermark.get(DM) == 1, 5)
    kept = dict(bob.watermark), dict(bob.change_watermark)
    await bob.close()
    await alice.request("msg.recall", conv=DM, seq=3)
    back = Client(any_node.ws_url, any_node.token("bob"), device="b1")
    back.watermark.update(kept[0])
    back.change_watermark.update(kept[1])
    await back.connect()
    any_node.clients.append(back)
    evs = back.pending_events()
    assert [(e["type"], e["seq"]) for e in evs] == [("msg.recalled", 3)]
    assert back.change_watermark == {DM: 2}


async def test_a_reconnect_sync_hands_out_the_recalls_it_missed(any_node: Node):
    """The same client object, offline for a while: its own reconnect syncs the changes."""
    alice = await any_node.client("alice")
    bob = await any_node.client("bob", "b1", max_backoff=0.2)
    for i in range(130):
        await alice.send_text(f"m{i}", user="bob")
    await until(lambda: bob.watermark.get(DM) == 130, 10)
    bob.pending_events()
    gate = _gate_reconnect(bob)
    await _drop(bob)
    # recalls below bob's watermark, more than the client's page of 100 changes (from
    # alice's other device: each connection may send 200 frames in a burst)
    recalled = [*range(1, 101), *range(102, 131, 2)]
    alice2 = await any_node.client("alice")
    for seq in recalled:
        await alice2.request("msg.recall", conv=DM, seq=seq)
    later = await alice.send_text("while away", user="bob")
    await alice.request("msg.recall", conv=DM, seq=later["seq"])  # above bob's watermark
    gate.set()
    await bob.next_event("client.reconnected")
    await until(lambda: bob.change_watermark.get(DM) == len(recalled) + 1, 5)
    evs = bob.pending_events()
    assert [e["seq"] for e in evs if e["type"] == "msg.recalled"] == recalled
    [new] = [e for e in evs if e["type"] == "msg.new"]  # comes by history, already recalled
    assert new["seq"] == later["seq"] and new["recalled"]["by"] == "alice" and new["synced"]


async def test_a_live_recall_moves_the_change_watermark_and_the_next_sync_fetches_nothing(
    any_node: Node,
):
    alice = await any_node.client("alice")
    bob = await any_node.client("bob", "b1", max_backoff=0.2)
    for i in range(3):
        await alice.send_text(f"m{i}", user="bob")
    await until(lambda: bob.watermark.get(DM) == 3, 5)
    for seq in (2, 1):
        await alice.request("msg.recall", conv=DM, seq=seq)
    await until(lambda: bob.change_watermark.get(DM) == 2, 5)
    bob.pending_events()
    counts = _count_requests(bob)
    await _drop(bob)
    await bob.next_event("client.reconnected")
    await until(lambda: counts.get("conv.list") == 1, 5)
    await asyncio.sleep(0.3)  # the sync's requests, if it made any
    assert "msg.changes" not in counts and "msg.history" not in counts
    assert not [e for e in bob.pending_events() if e["type"] == "msg.recalled"]


async def test_a_live_recall_that_skips_a_change_leaves_the_watermark_for_the_sync(
    any_node: Node,
):
    """Change 1 happened while bob was away; change 2 comes live: the watermark stays at 0
    (change 1 is still unknown), and the next sync fetches both."""
    alice = await any_node.client("alice")
    bob = await any_node.client("bob", "b1", max_backoff=0.2)
    for i in range(2):
        await alice.send_text(f"m{i}", user="bob")
    await until(lambda: bob.watermark.get(DM) == 2, 5)
    gate = _gate_reconnect(bob)
    await _drop(bob)
    await alice.request("msg.recall", conv=DM, seq=1)
    # bob's app hears of change 2 first (as if the sync were slower than the live event)
    bob._on_frame({"type": "msg.recalled", "conv": DM, "seq": 2, "by": "alice", "change_seq": 2})
    assert bob.change_watermark.get(DM, 0) == 0
    await alice.request("msg.recall", conv=DM, seq=2)
    gate.set()
    await bob.next_event("client.reconnected")
    await until(lambda: bob.change_watermark.get(DM) == 2, 5)
    synced = [e["seq"] for e in bob.pending_events() if e.get("synced")]
    assert synced == [1, 2]


async def test_a_first_connect_adopts_the_change_counter(any_node: Node):
    """No local state: old recalls are not news (backlog=True hands the messages out
    already marked recalled)."""
    alice = await any_node.client("alice")
    await alice.send_text("one", user="bob")
    await alice.send_text("two", user="bob")
    await alice.request("msg.recall", conv=DM, seq=1)
    bob = await any_node.client("bob", "b1")
    assert bob.change_watermark == {DM: 1}
    assert bob.pending_events() == []
    bob2 = await any_node.client("bob", "b2", backlog=True)
    assert bob2.change_watermark == {DM: 1}
    evs = bob2.pending_events()
    assert [(e["type"], e["seq"], "recalled" in e) for e in evs] == [
        ("msg.new", 1, True),
        ("msg.new", 2, False),
    ]


# ---------------------------------------------------------------- first connect race


class _HeldConvList:
    """bob's conv.list held up until the test lets it go: ``under_way`` is set once it has
    started (read_first: once it has read the store, so that its answer misses what is
    sent meanwhile; else before, so that its answer includes it)."""

    def __init__(self, node: Node, monkeypatch: pytest.MonkeyPatch, read_first: bool) -> None:
        self.under_way = asyncio.Event()
        self.go_on = asyncio.Event()
        real = node.state.chat.conversations

        async def held(user: str) -> Any:
            if user != "bob":  # only bob's first sync is held up
                return await real(user)
            if read_first:
                convs = await real(user)
                self.under_way.set()
                await self.go_on.wait()
                return convs
            self.under_way.set()
            await self.go_on.wait()
            return await real(user)

        monkeypatch.setattr(node.state.chat, "conversations", held)


async def _connect_during(
    node: Node, held: _HeldConvList, backlog: bool, action: Callable[[Client], Awaitable[None]]
) -> Client:
    """bob connects (first time); ``action`` runs while his conv.list is on its way. (What
    it sends reaches bob's socket before the conv.list reply: the server writes it when the
    send commits, and the reply only after ``action`` is done.)"""
    bob = Client(node.ws_url, node.token("bob"), device="b1", backlog=backlog)
    node.clients.append(bob)
    connecting = asyncio.create_task(bob.connect())
    await held.under_way.wait()
    await action(bob)
    held.go_on.set()
    await connecting
    await asyncio.sleep(0.5)  # anything handed out twice or late would show by now
    return bob


async def _connect_while_alice_writes(
    node: Node, held: _HeldConvList, backlog: bool
) -> tuple[list[int], int]:
    """A message comes live while bob's first conv.list is on its way: the seqs bob's
    client hands out as msg.new, and its watermark."""
    alice = await node.client("alice")

    async def alice_writes(_bob: Client) -> None:
        await alice.send_text("new", user="bob")

    bob = await _connect_during(node, held, backlog, alice_writes)
    return [e["seq"] for e in bob.pending_events() if e["type"] == "msg.new"], bob.watermark[DM]


async def _twenty_old_messages(node: Node) -> None:
    alice = await node.client("alice")
    for i in range(20):
        await alice.send_text(f"old {i}", user="bob")


@pytest.mark.parametrize("read_first", [False, True])
async def test_first_connect_without_backlog_hands_out_no_old_history(
    node: Node, monkeypatch: pytest.MonkeyPatch, read_first: bool
):
    """The reviewer's reproducer: a message arriving live while the first conv.list is on
    its way must not make the client dump the whole history as synced events."""
    await _twenty_old_messages(node)
    held = _HeldConvList(node, monkeypatch, read_first)
    assert await _connect_while_alice_writes(node, held, backlog=False) == ([21], 21)


@pytest.mark.parametrize("read_first", [False, True])
async def test_first_connect_with_backlog_hands_out_everything_once_in_order(
    node: Node, monkeypatch: pytest.MonkeyPatch, read_first: bool
):
    await _twenty_old_messages(node)
    held = _HeldConvList(node, monkeypatch, read_first)
    got = await _connect_while_alice_writes(node, held, backlog=True)
    assert got == (list(range(1, 22)), 21)


async def test_a_live_message_of_a_conversation_the_first_sync_did_not_list(
    node: Node, monkeypatch: pytest.MonkeyPatch
):
    """The conversation's first message is sent after conv.list read the store: held, then
    handed out after the sync."""
    held = _HeldConvList(node, monkeypatch, read_first=True)
    assert await _connect_while_alice_writes(node, held, backlog=False) == ([1], 1)


@pytest.mark.parametrize("read_first", [False, True])
async def test_an_own_send_during_the_first_sync_hands_out_no_old_history(
    node: Node, monkeypatch: pytest.MonkeyPatch, read_first: bool
):
    await _twenty_old_messages(node)
    held = _HeldConvList(node, monkeypatch, read_first)

    async def bob_writes(bob: Client) -> None:
        assert (await bob.send_text("mine", user="alice"))["seq"] == 21

    bob = await _connect_during(node, held, False, bob_writes)
    assert [e for e in bob.pending_events() if e["type"] == "msg.new"] == []
    assert bob.watermark == {DM: 21}
