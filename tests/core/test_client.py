"""The Python client library (signaling/client.py) beyond what the messaging tests use."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.support import Node


async def test_a_request_cancelled_in_the_turn_its_reply_arrives_stays_cancelled(node: Node):
    """An app's loop that sends requests until it is cancelled must stop when cancelled,
    even if the cancel lands in the same turn of the event loop as a reply (on Python
    3.11, asyncio.wait_for returned the reply and dropped the cancel there)."""
    client = await node.client("alice")
    task: asyncio.Task[None] | None = None

    class CancelOnReply(dict[str, Any]):
        """Cancels the app's task from the reply future's first callback, which runs in
        the turn the reply arrives, before the waiting request resumes."""

        def __setitem__(self, rid: str, fut: asyncio.Future[Any]) -> None:
            assert task is not None
            fut.add_done_callback(lambda _: task.cancel())  # type: ignore[union-attr]
            super().__setitem__(rid, fut)

    async def app_loop() -> None:
        while True:
            await client.request("conv.list")
            await asyncio.sleep(0.01)

    client._pending = CancelOnReply()
    task = asyncio.create_task(app_loop())
    done, _ = await asyncio.wait([task], timeout=5)
    assert done and task.cancelled()


async def test_joining_a_group_with_history_leaves_no_gap_to_fill(node: Node):
    """A member who joins a group late cannot read what came before: the client counts
    those seqs as done, so its watermark follows the live messages and it does not fetch
    history again for each one (it used to, every message, from seq 0 on)."""
    alice = await node.client("alice")
    await alice.request("group.create", group="g1", name="g1", join_policy="open")
    for i in range(3):
        await alice.request("msg.send", to={"group": "g1"}, kind="text", body={"text": f"{i}"})
    dave = await node.client("dave")
    history_requests = 0
    request = dave.request

    async def counting(ftype: str, **fields: Any) -> dict[str, Any]:
        nonlocal history_requests
        history_requests += ftype == "msg.history"
        return await request(ftype, **fields)

    dave.request = counting  # type: ignore[method-assign,assignment]
    joined = (await dave.request("group.join", group="g1"))["seq"]  # seq 5: 1 created, 2-4 text
    first = await dave.next_event("msg.new", where=lambda e: e["seq"] == joined)
    assert first["body"]["event"] == "member_joined"
    for i in range(5):
        sent = await alice.request(
            "msg.send", to={"group": "g1"}, kind="text", body={"text": f"live {i}"}
        )
        seq: int = sent["seq"]

        def this_one(e: dict[str, Any], seq: int = seq) -> bool:
            return bool(e["seq"] == seq)

        ev = await dave.next_event("msg.new", where=this_one)
        assert "synced" not in ev  # handed out as it arrived, not by a history fill
    assert dave.watermark["g:g1"] == seq
    assert history_requests <= 1  # the one fill that learns where dave's history begins


async def test_a_replaced_device_stops_and_says_so_instead_of_taking_the_device_back(
    node: Node,
):
    """Close code 4409: a newer connection of the same device took over. A client that
    reconnected on it replaced the newer one, which reconnected in turn: two clients of one
    device replaced each other over a thousand times in three seconds."""
    old = await node.client("alice", "phone")
    new = await node.client("alice", "phone")
    assert (await old.next_event("session.replaced"))["session"]
    assert (await old.next_event("client.disconnected"))["code"] == 4409
    assert await old.next_event("client.replaced") == {"type": "client.replaced", "code": 4409}
    await asyncio.sleep(0.5)
    assert (old.connected, old.reconnects) == (False, 0)
    assert (new.connected, new.reconnects) == (True, 0)
    assert not [e for e in new.pending_events() if e["type"].startswith(("client.", "session."))]
