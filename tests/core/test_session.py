"""Session internals a user notices only when they go wrong: cancelling a close."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from signaling.session import HIGH_WATER, Session


class _StuckTransport:
    """A socket whose peer stopped reading: its buffer never drains."""

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return HIGH_WATER + 1


async def test_cancelling_a_close_that_waits_for_a_stuck_socket_cancels_it():
    async def close(**kw: Any) -> None:
        pass

    ws: Any = SimpleNamespace(closed=False, close=close)
    session = Session(ws, _StuckTransport(), "alice", "d1")
    session.send(b'{"type":"x"}')
    closing = asyncio.ensure_future(session.flush_and_close(1000, "bye"))
    await asyncio.sleep(0.05)  # waiting for the socket to drain (up to 2 s)
    closing.cancel()
    await asyncio.wait([closing], timeout=1)
    # The cancel ends the wait; it used to be swallowed, and the caller went on as if
    # nothing had happened.
    assert closing.cancelled()
