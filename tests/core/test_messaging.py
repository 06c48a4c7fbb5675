"""1:1 messaging over the real server, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest

from signaling.client import ClientError
from tests.support import Node


async def test_message_reaches_every_device_of_recipient_and_other_sender_devices(any_node: Node):
    alice1 = await any_node.client("alice", "a1")
    alice2 = await any_node.client("alice", "a2")
    bob1 = await any_node.client("bob", "b1")
    bob2 = await any_node.client("bob", "b2")
    data = await alice1.send_text("hi bob", user="bob", client_msg_id="m1")
    assert data["conv"] == "dm:alice:bob" and data["seq"] == 1
    for c in (bob1, bob2, alice2):
        ev = await c.next_event("msg.new")
        assert ev["body"] == {"text": "hi bob"} and ev["from"] == "alice"
        assert ev["from_device"] == "a1" and ev["seq"] == 1 and ev["client_msg_id"] == "m1"
    await asyncio.sleep(0.1)
    assert not [e for e in alice1.pending_events() if e["type"] == "msg.new"]


async def test_retry_with_same_client_msg_id_returns_first_message_and_stores_nothing(
    any_node: Node,
):
    alice = await any_node.client("alice")
    bob = await any_node.client("bob")
    first = await alice.send_text("once", user="bob", client_msg_id="same")
    again = await alice.send_text("once", user="bob", client_msg_id="same")
    assert again == first
    await bob.next_event("msg.new")
    hist = await bob.request("msg.history", conv="dm:alice:bob")
    assert [m["seq"] for m in hist["messages"]] == [1]
    await asyncio.sleep(0.1)
    assert not [e for e in bob.pending_events() if e["type"] == "msg.new"]


async def test_concurrent_senders_get_gap_free_increasing_sequence(any_node: Node):
    alice = await any_node.client("alice")
    bob = await any_node.client("bob")
    sends = [alice.send_text(f"a{i}", user="bob") for i in range(60)]
    sends += [bob.send_text(f"b{i}", user="alice") for i in range(60)]
    results = await asyncio.gather(*sends)
    assert sorted(r["seq"] for r in results) == list(range(1, 121))
    hist = await alice.request("msg.history", conv="dm:alice:bob", after_seq=0, limit=100)
    assert [m["seq"] for m in hist["messages"]] == list(range(1, 101)) and hist["has_more"]


async def test_pipelined_sends_from_one_device_keep_their_order(any_node: Node):
    alice = await any_node.client("alice")
    results = await asyncio.gather(*(alice.send_text(str(i), user="bob") for i in range(50)))
    assert [r["seq"] for r in results] == list(range(1, 51))


async def test_history_pages_backwards_and_forwards(any_node: Node):
    alice = await any_node.client("alice")
    for i in range(25):
        await alice.send_text(f"m{i}", user="bob")
    latest = await alice.request("msg.history", conv="dm:alice:bob", limit=10)
    assert [m["seq"] for m in latest["messages"]] == list(range(16, 26)) and latest["has_more"]
    older = await alice.request("msg.history", conv="dm:alice:bob", before_seq=16, limit=10)
    assert [m["seq"] for m in older["messages"]] == list(range(6, 16))
    oldest = await alice.request("msg.history", conv="dm:alice:bob", before_seq=6, limit=10)
    assert [m["seq"] for m in oldest["messages"]] == [1, 2, 3, 4, 5] and not oldest["has_more"]
    newer = await alice.request("msg.history", conv="dm:alice:bob", after_seq=20)
    assert [m["seq"] for m in newer["messages"]] == [21, 22, 23, 24, 25]


async def test_outsider_cannot_read_or_write_a_direct_conversation(any_node: Node):
    alice = await any_node.client("alice")
    eve = await any_node.client("eve")
    await alice.send_text("secret", user="bob")
    with pytest.raises(ClientError) as e:
        await eve.request("msg.history", conv="dm:alice:bob")
    assert e.value.code == "forbidden"
    for kind in ("receipt.read", "msg.recall"):
        with pytest.raises(ClientError) as e:
            await eve.request(kind, conv="dm:alice:bob", seq=1)
        assert e.value.code == "forbidden"
    with pytest.raises(ClientError) as e:
        await eve.request("typing", conv="dm:alice:bob")
    assert e.value.code == "forbidden"


async def test_conv_list_counts_unread_until_read_receipt(any_node: Node):
    alice = await any_node.client("alice")
    bob = await any_node.client("bob")
    for i in range(3):
        await alice.send_text(f"m{i}", user="bob")
    convs = (await bob.request("conv.list"))["conversations"]
    assert len(convs) == 1
    c = convs[0]
    assert (c["conv"], c["last_seq"], c["read_seq"], c["unread"]) == ("dm:alice:bob", 3, 0, 3)
    assert c["last_message"]["body"]["text"] == "m2"
    mine = (await alice.request("conv.list"))["conversations"][0]
    assert mine["unread"] == 0  # one's own messages are read
    await bob.request("receipt.read", conv="dm:alice:bob", seq=2)
    assert (await bob.request("conv.list"))["conversations"][0]["unread"] == 1


async def test_receipts_reach_the_other_member_and_never_go_backwards(any_node: Node):
    alice = await any_node.client("alice")
    bob = await any_node.client("bob")
    for i in range(3):
        await alice.send_text(f"m{i}", user="bob")
    await bob.request("receipt.delivered", conv="dm:alice:bob", seq=3)
    ev = await alice.next_event("receipt")
    assert ev == {
        "type": "receipt",
        "conv": "dm:alice:bob",
        "user": "bob",
        "kind": "delivered",
        "seq": 3,
    }
    await bob.request("receipt.read", conv="dm:alice:bob", seq=2)
    ev = await alice.next_event("receipt")
    assert (ev["kind"], ev["seq"]) == ("read", 2)
    back = await bob.request("receipt.read", conv="dm:alice:bob", seq=1)
    assert back["changed"] is False
    beyond = await bob.request("receipt.read", conv="dm:alice:bob", seq=99)
    assert beyond["seq"] == 3  # clamped to the last message


async def test_a_receipt_that_changes_nothing_replies_with_the_position_reached(
    any_node: Node,
):
    """Not the seq asked for: after reading up to 3, `read seq=99` used to answer
    `{seq: 99, changed: false}`, a position no message has."""
    alice = await any_node.client("alice")
    bob = await any_node.client("bob")
    for i in range(3):
        await alice.send_text(f"m{i}", user="bob")
    read = await bob.request("receipt.read", conv="dm:alice:bob", seq=99)
    assert read == {"conv": "dm:alice:bob", "seq": 3, "changed": True}
    for kind, seq in (("read", 99), ("read", 1), ("delivered", 2), ("delivered", 99)):
        again = await bob.request(f"receipt.{kind}", conv="dm:alice:bob", seq=seq)
        assert again == {"conv": "dm:alice:bob", "seq": 3, "changed": False}, (kind, seq)
    await alice.send_text("m3", user="bob")
    delivered = await bob.request("receipt.delivered", conv="dm:alice:bob", seq=99)
    assert delivered == {"conv": "dm:alice:bob", "seq": 4, "changed": True}
    read = await bob.request("receipt.read", conv="dm:alice:bob", seq=0)
    assert read == {"conv": "dm:alice:bob", "seq": 3, "changed": False}


async def test_typing_reaches_the_other_member_only(any_node: Node):
    alice = await any_node.client("alice")
    alice2 = await any_node.client("alice", "a2")
    bob = await any_node.client("bob")
    await alice.send_text("hi", user="bob")
    await alice.request("typing", conv="dm:alice:bob")
    ev = await bob.next_event("typing")
    assert ev == {"type": "typing", "conv": "dm:alice:bob", "user": "alice"}
    await asyncio.sleep(0.1)
    assert not [e for e in alice2.pending_events() if e["type"] == "typing"]


async def test_sender_recalls_within_window_and_members_are_told(any_node: Node):
    alice = await any_node.client("alice")
    bob = await any_node.client("bob")
    sent = await alice.send_text("oops", user="bob")
    await bob.next_event("msg.new")
    with pytest.raises(ClientError) as e:
        await bob.request("msg.recall", conv=sent["conv"], seq=sent["seq"])
    assert e.value.code == "forbidden"
    await alice.request("msg.recall", conv=sent["conv"], seq=sent["seq"])
    ev = await bob.next_event("msg.recalled")
    assert ev == {
        "type": "msg.recalled", "conv": "dm:alice:bob", "seq": 1, "by": "alice", "change_seq": 1
    }
    hist = await bob.request("msg.history", conv="dm:alice:bob")
    assert hist["messages"][0]["recalled"]["by"] == "alice"
    assert hist["messages"][0]["body"] == {}
    with pytest.raises(ClientError) as e:
        await alice.request("msg.recall", conv=sent["conv"], seq=sent["seq"])
    assert e.value.code == "conflict"


async def test_recall_after_window_is_forbidden(tmp_path):
    from tests.support import start_node

    n = await start_node(f"sqlite:///{tmp_path / 's.db'}", tmp_path, recall_window=0)
    try:
        alice = await n.client("alice")
        sent = await alice.send_text("late", user="bob")
        await asyncio.sleep(0.05)
        with pytest.raises(ClientError) as e:
            await alice.request("msg.recall", conv=sent["conv"], seq=sent["seq"])
        assert e.value.code == "forbidden" and "window" in e.value.message
    finally:
        await n.stop()


async def test_blocked_user_cannot_message_the_blocker_until_unblocked(any_node: Node):
    alice = await any_node.client("alice")
    bob = await any_node.client("bob")
    await alice.request("block.add", user="bob")
    assert (await alice.request("block.list"))["users"] == ["bob"]
    with pytest.raises(ClientError) as e:
        await bob.send_text("hello?", user="alice")
    assert e.value.code == "forbidden"
    await alice.send_text("I can still write", user="bob")  # the blocker is not blocked
    await alice.request("block.remove", user="bob")
    await bob.send_text("hello again", user="alice")
    hist = await alice.request("msg.history", conv="dm:alice:bob")
    assert [m["body"]["text"] for m in hist["messages"]] == ["I can still write", "hello again"]


async def test_a_blocked_users_typing_and_receipts_do_not_reach_the_blocker(any_node: Node):
    """Typing is refused as a message is; a receipt still moves the blocked user's own
    position (their other devices sync unread counts) but the blocker is not told."""
    alice = await any_node.client("alice")
    bob = await any_node.client("bob")
    bob2 = await any_node.client("bob", "b2")
    await alice.send_text("hi", user="bob")
    await alice.request("block.add", user="bob")
    await alice.send_text("I can still write", user="bob")
    with pytest.raises(ClientError) as e:
        await bob.request("typing", conv="dm:alice:bob")
    assert e.value.code == "forbidden"
    read = await bob.request("receipt.read", conv="dm:alice:bob", seq=2)
    assert read == {"conv": "dm:alice:bob", "seq": 2, "changed": True}
    assert (await bob2.next_event("receipt"))["seq"] == 2
    await alice.request("typing", conv="dm:alice:bob")  # the blocker is not blocked
    assert (await bob.next_event("typing"))["user"] == "alice"
    await asyncio.sleep(0.2)
    assert not [e for e in alice.pending_events() if e["type"] in ("typing", "receipt")]
    await alice.request("block.remove", user="bob")
    await bob.request("typing", conv="dm:alice:bob")
    assert (await alice.next_event("typing"))["user"] == "bob"


async def test_at_all_in_a_direct_message_is_forbidden_and_nothing_is_stored(any_node: Node):
    """`@all` is a group owner's or admin's; in a dm anyone could send it."""
    alice = await any_node.client("alice")
    await alice.send_text("hi", user="bob", mentions=["bob"])  # a user id is fine
    with pytest.raises(ClientError) as e:
        await alice.send_text("everyone!", user="bob", mentions=["@all"])
    assert e.value.code == "forbidden"
    hist = await alice.request("msg.history", conv="dm:alice:bob")
    assert [m["body"]["text"] for m in hist["messages"]] == ["hi"]
    bob = await any_node.client("bob")
    assert (await bob.request("conv.list"))["conversations"][0]["mentioned"] is False


async def test_custom_and_file_kinds_are_stored_and_server_kinds_refused(any_node: Node):
    alice = await any_node.client("alice")
    await alice.request("msg.send", to={"user": "bob"}, kind="custom", body={"card": {"x": 1}})
    await alice.request(
        "msg.send",
        to={"user": "bob"},
        kind="file",
        body={"url": "https://files.example/a.png", "name": "a.png", "size": 10},
    )
    for kind in ("notice", "call"):
        with pytest.raises(ClientError) as e:
            await alice.request("msg.send", to={"user": "bob"}, kind=kind, body={})
        assert e.value.code == "bad_request"
    hist = await alice.request("msg.history", conv="dm:alice:bob")
    assert [m["kind"] for m in hist["messages"]] == ["custom", "file"]


async def test_offline_recipient_is_pushed_and_sender_never(node: Node):
    alice = await node.client("alice")
    await alice.send_text("are you there", user="bob")
    sent = node.state.pusher.sent  # type: ignore[attr-defined]
    await node.settled()  # the push follows the sender's reply
    assert [(p.user, p.kind, p.conv) for p in sent] == [("bob", "message", "dm:alice:bob")]
    assert sent[0].preview == "are you there"
    bob = await node.client("bob")
    await alice.send_text("now you are", user="bob")
    await bob.next_event("msg.new")
    assert len(sent) == 1


async def test_a_retried_send_is_delivered_again_and_the_client_keeps_one_copy(node: Node):
    import json

    import aiohttp

    from tests.support import token

    alice = await node.client("alice")
    bob = await node.client("bob")
    async with aiohttp.ClientSession() as http:
        raw = await http.ws_connect(
            node.ws_url,
            headers={"Authorization": f"Bearer {token('bob')}"},
            params={"device": "raw"},
        )
        assert json.loads((await raw.receive()).data)["type"] == "auth.ok"
        await alice.send_text("once", user="bob", client_msg_id="same")
        await alice.send_text("once", user="bob", client_msg_id="same")
        # On the wire the retry re-sends the event (a crash may have lost the first fan-out)
        seen = [json.loads((await raw.receive(timeout=5)).data) for _ in range(2)]
        assert [(e["type"], e["seq"]) for e in seen] == [("msg.new", 1), ("msg.new", 1)]
        await raw.close()
    # ... and the client hands the message out once.
    assert (await bob.next_event("msg.new"))["seq"] == 1
    await asyncio.sleep(0.2)
    assert not [e for e in bob.pending_events() if e["type"] == "msg.new"]


async def test_a_fan_out_failure_after_the_commit_still_answers_and_a_retry_delivers(
    node: Node, monkeypatch: pytest.MonkeyPatch
):
    alice = await node.client("alice")
    bob = await node.client("bob")
    real = node.state.bus.post_users
    failures = [RuntimeError("bus down")]

    def post_users(*args: object, **kwargs: object) -> None:
        if failures:
            raise failures.pop()
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(node.state.bus, "post_users", post_users)
    with pytest.raises(ClientError) as err:
        await alice.send_text("lost fan-out", user="bob", client_msg_id="m1")
    assert err.value.code == "internal"  # answered, not left hanging
    # The message was committed; the app's retry (same id) delivers it, stored once.
    again = await alice.send_text("lost fan-out", user="bob", client_msg_id="m1")
    got = await bob.next_event("msg.new")
    assert again["seq"] == got["seq"] == 1
    assert got["body"]["text"] == "lost fan-out"
