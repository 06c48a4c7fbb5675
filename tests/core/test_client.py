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
