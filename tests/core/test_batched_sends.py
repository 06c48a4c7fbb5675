"""1:1 sends that share a group-commit batch run as one op (store/ops.py: append_dms).

Each send must get exactly what it gets when the batch runs its ops one at a time (in the
batch's order): the same sequence numbers, the same answer to a retry or a block, the same
stored rows. Run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import functools
import random
from typing import Any

import pytest

from im_bridge.errors import BadRequest, Forbidden, TalkbridgeError
from im_bridge.messages import ChatService, Sent
from im_bridge.models import SendRequest
from im_bridge.store import Store, ops

# (sender, recipient, client_msg_id): recipients block some senders before the sends.
Send = tuple[str, str, str | None]


def scenario(seed: int, users: list[str], n: int) -> tuple[list[tuple[str, str]], list[Send]]:
    """Blocks and sends among ``users`` (u1..u5 at least): new and old conversations,
    retries of stored messages and of messages earlier in the same list, messages without
    a client id."""
    rnd = random.Random(seed)
    blocks = [("u4", "u1"), ("u2", "u5")]  # (blocker, blocked)
    sends: list[Send] = []
    for i in range(n):
        a, b = rnd.sample(users, 2)
        roll = rnd.random()
        if sends and roll < 0.15:
            sends.append(rnd.choice(sends))  # the same (sender, recipient, id) again
        elif i >= n // 3 and roll < 0.2:
            # An id reused in another conversation, from an earlier round (on PostgreSQL,
            # two conversations' batches commit in parallel: reused in the same round,
            # which of the two stores the message depends on timing, and the two runs
            # below could differ; test_client_id_collisions.py covers that case).
            prev = rnd.choice(sends[: i // (n // 3) * (n // 3)])
            sends.append((prev[0], b if b != prev[0] else a, prev[2]))
        else:
            sends.append((a, b, None if roll > 0.9 else f"c{i}"))
    return blocks, sends


def renamed(prefix: str, blocks: list[tuple[str, str]], sends: list[Send]) -> tuple[
    list[tuple[str, str]], list[Send]
]:
    return (
        [(prefix + x, prefix + y) for x, y in blocks],
        [(prefix + s, prefix + r, c) for s, r, c in sends],
    )


def outcome(result: Sent | BaseException) -> tuple[Any, ...]:
    """What a sender learns from a send, user names aside."""
    if isinstance(result, BaseException):
        return ("error", type(result).__name__)
    m = result.message
    return (m.conv.split(":", 1)[0], m.seq, result.created, m.body["text"])


async def run(chat: ChatService, blocks: list[tuple[str, str]], sends: list[Send]
              ) -> list[Sent | BaseException]:
    for blocker, blocked in blocks:
        await chat.block(blocker, blocked)

    async def one(i: int, s: Send) -> Sent:
        return await chat.send(s[0], "d1", {"user": s[1]}, s[2], "text", {"text": f"m{i}"})

    # Three rounds of sends queued in one turn of the loop each: every round is one batch
    # (so a round's retries find the rounds before it stored, and repeats inside it).
    out: list[Sent | BaseException] = []
    third = len(sends) // 3
    for part in (sends[:third], sends[third : 2 * third], sends[2 * third :]):
        base = len(out)
        out += await asyncio.gather(
            *(one(base + i, s) for i, s in enumerate(part)), return_exceptions=True
        )
    return out


async def stored_view(chat: ChatService, users: list[str]) -> list[Any]:
    """Every conversation of every user: counters and the messages, names stripped."""
    view = []
    for user in users:
        for c in await chat.conversations(user):
            msgs, _ = await chat.history(user, c.conv, None, None, 500)
            view.append((
                user[1:], c.last_seq, c.read_seq, c.unread,
                [(m.seq, m.sender[1:], m.body["text"], m.client_msg_id) for m in msgs],
            ))
    return sorted(view, key=repr)


# Five users: at most ten conversations a batch. Thirty, 200 sends a round: over a hundred
# conversations in one batch, whose sequences SQLite upserts many rows a statement.
@pytest.mark.parametrize(("seed", "n_users", "n"), [(1, 5, 120), (2, 5, 120), (3, 5, 120),
                                                    (4, 30, 600)])
async def test_sends_sharing_a_batch_get_what_one_op_at_a_time_gives(
    store: Store, seed: int, n_users: int, n: int, monkeypatch: pytest.MonkeyPatch
):
    chat = ChatService(store)
    users = [f"u{i}" for i in range(1, n_users + 1)]
    blocks, sends = scenario(seed, users, n)
    with monkeypatch.context() as m:
        m.setattr(ops, "MAX_RUN", 1)  # every send its own op
        alone = await run(chat, *renamed("a", blocks, sends))
    before = store.stats()
    together = await run(chat, *renamed("b", blocks, sends))
    after = store.stats()
    # Three rounds, each one batch per lane (PostgreSQL commits four lanes in parallel),
    # plus the two blocks: the sends did share batches.
    batches, ops_run = after["batches"] - before["batches"], after["ops"] - before["ops"]
    assert ops_run == len(sends) + len(blocks)
    assert batches <= 3 * 4 + len(blocks)

    assert [outcome(r) for r in together] == [outcome(r) for r in alone]
    assert any(isinstance(r, Forbidden) for r in together)
    assert any(not isinstance(r, BaseException) and not r.created for r in together)
    assert await stored_view(chat, ["b" + u for u in users]) == await stored_view(
        chat, ["a" + u for u in users]
    )


async def test_a_repeat_inside_one_batch_returns_the_first_message_and_stores_one(
    store: Store,
):
    chat = ChatService(store)
    first, again = await asyncio.gather(
        chat.send("alice", "d1", {"user": "bob"}, "same", "text", {"text": "one"}),
        chat.send("alice", "d2", {"user": "bob"}, "same", "text", {"text": "two"}),
    )
    assert (first.created, again.created) == (True, False)
    assert again.message.msg_id == first.message.msg_id
    msgs, _ = await chat.history("bob", first.message.conv, None, None, 10)
    assert [m.body["text"] for m in msgs] == ["one"]


def test_a_run_locks_each_conversations_rows_before_the_next_conversations():
    """Nodes sharing PostgreSQL cannot deadlock: every transaction takes row locks in the
    batch's key order, whole conversation by whole conversation (a receipt on one
    conversation and a send on another, in another node's batch, could otherwise wait for
    each other)."""
    convs = ["dm:ann:bob", "dm:bob:cat", "dm:cat:dan"]
    items = [
        ops.MessageAppend(
            SendRequest(conv=conv, sender=sender, sender_device="d1", kind="text",
                        body={"text": "hi"}, client_msg_id=f"{conv}-{sender}-{n}",
                        peer=conv.split(":")[2] if sender == conv.split(":")[1]
                        else conv.split(":")[1]),
            1,
        )
        for conv in convs
        for n, sender in enumerate(conv.split(":")[1:])
    ]
    op = ops.append_dms(items)
    locked: list[str] = []  # the conversation of each row-locking statement, in order
    q = next(op)
    try:
        while True:
            sql, args, _ = q
            result: Any = None
            if sql.startswith("WITH v"):
                result = []  # no retries, no blocks
            elif sql.startswith("INSERT INTO conversations"):
                locked.append(args[0])
                result = (args[0], 7)  # (conv, last_seq)
            elif sql.startswith("INSERT INTO conv_members"):
                locked += [row[0] for row in args]
            elif sql.startswith("UPDATE conv_members"):
                locked += [row[2] for row in args]
            q = op.send(result)
    except StopIteration as stop:
        assert [r[0].seq for r in stop.value] == [6, 7, 6, 7, 6, 7]
    assert locked == sorted(locked) and set(locked) == set(convs)


async def test_a_nul_in_one_client_id_costs_no_other_send_of_its_batch(store: Store):
    """PostgreSQL's TEXT cannot hold a NUL character: a client_msg_id with one used to
    reach the batch and roll it back, so every other user's send in it failed too (and
    again at each retry). It is refused when checked, as msg.send's handler checks."""
    chat = ChatService(store)
    await chat.send("bob", "b1", {"user": "alice"}, None, "text", {"text": "warm"})
    sends: list[Send] = [("bob", "alice", "ok-1"), ("alice", "bob", "bad\x00id"),
                         ("carol", "bob", "ok-2"), ("bob", "alice", "ok-3")]
    results: list[Any] = [None] * len(sends)
    left = len(sends)
    done = asyncio.Event()

    def settle(i: int, result: Any) -> None:
        nonlocal left
        results[i] = result
        left -= 1
        if not left:
            done.set()

    for i, (sender, to, cid) in enumerate(sends):  # one turn of the loop: one batch
        try:
            req = chat.prepare_send(sender, "d1", {"user": to}, cid, "text", {"text": f"m{i}"})
        except TalkbridgeError as exc:  # the request's reply
            settle(i, exc)
            continue
        chat.send_nowait(req, functools.partial(settle, i))
    async with asyncio.timeout(10):
        await done.wait()
    refused = results[1]
    assert isinstance(refused, BadRequest) and refused.details["field"] == "client_msg_id"
    assert [r[0].seq for r in results if not isinstance(r, BaseException)] == [2, 1, 3]
    msgs, _ = await chat.history("bob", "dm:alice:bob", None, None, 10)
    assert [m.client_msg_id for m in msgs] == [None, "ok-1", "ok-3"]
