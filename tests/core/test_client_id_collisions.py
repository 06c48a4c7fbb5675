"""One sender's client_msg_id used twice at the same moment, in two conversations.

On PostgreSQL the two sends land in two group-commit lanes (two concurrent transactions),
each with other users' sends in its batch. Neither may cost the others their sends: the
second send is a retry, and gets what a retry gets (docs/PROTOCOL.md, msg.send): the first
message, created=False, nothing stored. Run on SQLite (one writer: one batch) and
PostgreSQL.
"""

from __future__ import annotations

import asyncio

import pytest

from im_bridge.ids import dm_conv, group_conv
from im_bridge.messages import ChatService, Sent
from im_bridge.models import SendRequest
from im_bridge.store import Store, group_ops, ops
from im_bridge.store.groupcommit import lane_index
from im_bridge.store.postgres import LANES, PostgresStore


def lane(conv: str) -> int:
    """The group-commit lane of a conversation on PostgreSQL."""
    return lane_index(conv, LANES)


def peers_in_lanes(sender: str, lanes: list[int], prefix: str) -> list[str]:
    """One peer of ``sender`` per lane of ``lanes``, whose dm conversation hashes there."""
    out: list[str] = []
    n = 0
    for want in lanes:
        while True:
            n += 1
            peer = f"{prefix}{n}"
            if lane(dm_conv(sender, peer)) == want:
                out.append(peer)
                break
    return out


async def warm_up(chat: ChatService) -> None:
    """A send in every lane at once: on PostgreSQL the pool then holds a connection per
    lane, and no lane's batch starts late, waiting for a new connection."""
    await asyncio.gather(*(
        chat.send("w", "d1", {"user": peer}, None, "text", {"text": "w"})
        for peer in peers_in_lanes("w", list(range(LANES)), "w")
    ))


async def assert_gap_free(store: Store, convs: set[str]) -> None:
    """Every conversation's messages are exactly 1..last_seq."""
    for conv in convs:
        last = await store.read(ops.last_seq(conv))
        msgs, _ = await store.read(ops.history(conv, 1, None, None, None, 1000))
        assert [m.seq for m in msgs] == list(range(1, last + 1)), conv


async def test_one_client_id_in_two_conversations_at_once_is_a_retry(store: Store):
    chat = ChatService(store)
    await warm_up(chat)
    # alice's two peers are in lanes 0 and 1, dave's in 1 and 0 (two batches that both
    # hold two colliding sends: neither may wait for the other forever). Every lane also
    # carries other users' sends, before and after theirs in the batch's key order.
    peers = {"alice": peers_in_lanes("alice", [0, 1], "p"),
             "dave": peers_in_lanes("dave", [1, 0], "q")}
    sends: list[tuple[str, str, str]] = []
    for k in range(3):
        for want in range(LANES):
            for sender, prefix in ((f"a{k}", "x"), (f"z{k}", "y")):
                (peer,) = peers_in_lanes(sender, [want], f"{prefix}{want}k{k}n")
                sends.append((sender, peer, f"own-{sender}-{peer}"))
    colliding = [(user, peer, "same") for user, two in peers.items() for peer in two]
    sends[len(sends) // 2 : len(sends) // 2] = colliding

    async def send(i: int, s: tuple[str, str, str]) -> Sent:
        return await chat.send(s[0], "d1", {"user": s[1]}, s[2], "text", {"text": f"m{i}"})

    # Queued in one turn of the loop: one batch per lane, all lanes committing at once.
    results = await asyncio.gather(
        *(send(i, s) for i, s in enumerate(sends)), return_exceptions=True
    )
    errors = [(s, r) for s, r in zip(sends, results, strict=True) if isinstance(r, BaseException)]
    assert errors == []
    sent = {s: r for s, r in zip(sends, results, strict=True) if isinstance(r, Sent)}
    for s, r in sent.items():
        if s not in colliding:
            assert r.created and r.message.client_msg_id == s[2]
    convs = {r.message.conv for r in sent.values()}
    for user, (one, two) in peers.items():
        first, second = sent[(user, one, "same")], sent[(user, two, "same")]
        assert sorted([first.created, second.created]) == [False, True]
        assert first.message == second.message
        # One message stored for the two sends, in the conversation of the one that won.
        stored = []
        for peer in (one, two):
            convs.add(dm_conv(user, peer))
            msgs, _ = await store.read(ops.history(dm_conv(user, peer), 1, None, None, None, 10))
            stored += msgs
        assert stored == [first.message]
        # The retry's answer stays the same afterwards, from either conversation.
        for peer in (one, two):
            again = await chat.send(user, "d1", {"user": peer}, "same", "text", {"text": "x"})
            assert (again.message, again.created) == (first.message, False)
    await assert_gap_free(store, convs)


async def test_one_client_id_in_a_group_and_a_dm_at_once_is_a_retry(store: Store):
    chat = ChatService(store)
    # A group whose conversation is in another lane than alice's dm with bob.
    group = next(g for g in (f"grp{n}" for n in range(100)) if lane(group_conv(g)) == 2)
    (bob,) = peers_in_lanes("alice", [3], "q")
    await store.write(
        group_ops.create(group, "G", "alice", ["bob", "cat"], "open", "", "", 1, 100),
        key=group_conv(group),
    )
    await warm_up(chat)
    # Others' sends in every lane: in the group's lane after alice's (a dm would run
    # before it, in key order, and leave the other lane time to commit: no race).
    others = [chat.send("cat", "d1", {"group": group}, "cat-1", "text", {"text": "c"})]
    for want in (0, 1, 3):
        (peer,) = peers_in_lanes("fay", [want], f"r{want}n")
        others.append(chat.send("fay", "d1", {"user": peer}, f"fay-{peer}", "text", {"text": "f"}))
    results = await asyncio.gather(
        chat.send("alice", "d1", {"group": group}, "same", "text", {"text": "g"}),
        chat.send("alice", "d1", {"user": bob}, "same", "text", {"text": "b"}),
        *others,
        return_exceptions=True,
    )
    assert [r for r in results if isinstance(r, BaseException)] == []
    to_group, to_bob = results[0], results[1]
    assert isinstance(to_group, Sent) and isinstance(to_bob, Sent)
    assert sorted([to_group.created, to_bob.created]) == [False, True]
    assert to_group.message == to_bob.message
    in_dm, _ = await store.read(ops.history(dm_conv("alice", bob), 1, None, None, None, 10))
    in_group, _ = await store.read(ops.history(group_conv(group), 1, None, None, None, 10))
    assert [m for m in in_dm + in_group if m.client_msg_id == "same"] == [to_group.message]
    convs = {dm_conv("alice", bob), group_conv(group)}
    convs |= {r.message.conv for r in results if isinstance(r, Sent)}
    await assert_gap_free(store, convs)


async def test_one_client_id_on_two_nodes_at_once_is_a_retry(store: Store):
    """The same send on two nodes sharing PostgreSQL (a client retrying on another node
    while the first attempt is still in flight), each with other users' sends."""
    if not isinstance(store, PostgresStore):
        pytest.skip("one SQLite file serves one node")
    other = PostgresStore(store.url)
    await other.open()
    try:
        chats = [ChatService(store), ChatService(other)]
        sends = []
        for n, chat in enumerate(chats):
            sends.append(chat.send("alice", f"d{n}", {"user": "bob"}, "same", "text",
                                   {"text": f"n{n}"}))
            sends += [
                chat.send(f"u{n}{k}", "d1", {"user": f"v{n}{k}"}, "own", "text", {"text": "o"})
                for k in range(20)
            ]
        results = await asyncio.gather(*sends, return_exceptions=True)
    finally:
        await other.close()
    assert [r for r in results if isinstance(r, BaseException)] == []
    first, second = results[0], results[21]
    assert isinstance(first, Sent) and isinstance(second, Sent)
    assert sorted([first.created, second.created]) == [False, True]
    assert first.message == second.message
    msgs, _ = await store.read(ops.history("dm:alice:bob", 1, None, None, None, 10))
    assert msgs == [first.message]
    await assert_gap_free(store, {r.message.conv for r in results if isinstance(r, Sent)})


def test_every_op_that_stores_a_client_id_names_it():
    """The PostgreSQL store locks each (sender, client_msg_id) a batch may insert before
    the batch's first row lock; it must find it in every op that can insert one."""
    from im_bridge.store.postgres import client_id

    def req(conv: str, check: str, cid: str | None) -> SendRequest:
        return SendRequest(conv=conv, sender="alice", sender_device="d", kind="text",
                           body={"text": "x"}, client_msg_id=cid, check=check, peer="bob")

    dm_send = ops.append_message(req("dm:alice:bob", "dm", "c1"), 1)
    assert client_id(dm_send) == ("alice", "c1")
    assert client_id(ops.append_message(req("g:g1", "group", "c2"), 1)) == ("alice", "c2")
    call_log = ops.append_message(req("dm:alice:bob", "system", "call:x"), 1)
    assert client_id(call_log) == ("alice", "call:x")
    assert client_id(ops.append_message(req("g:g1", "group", None), 1)) is None
    notice = group_ops.leave("g1", "alice", 1)
    assert client_id(notice) is None
    assert client_id(ops.mark("dm:alice:bob", "alice", "read", 3)) is None
