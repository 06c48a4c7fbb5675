"""Test helpers over signaling/client.py: an event log that keeps every event it sees."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from signaling.client import Client

Event = dict[str, Any]

OFFER_SDP = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
             "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n")
OFFER = {"type": "offer", "sdp": OFFER_SDP}
ANSWER = {"type": "answer", "sdp": OFFER_SDP.replace("o=- 1 1", "o=- 2 1")}
AUDIO = {"audio": True, "video": False}


def cand(n: int) -> dict[str, Any]:
    return {"candidate": f"candidate:{n} 1 udp 2130706431 127.0.0.1 {40000 + n} typ host",
            "sdpMid": "0", "sdpMLineIndex": 0}


class Inbox:
    """Every event a client receives, in order; waits never drop the ones they skip."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.events: list[Event] = []
        self._changed = asyncio.Condition()
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        async for ev in self.client.events():
            async with self._changed:
                self.events.append(ev)
                self._changed.notify_all()

    async def wait(self, type: str, where: Callable[[Event], bool] | None = None,
                   timeout: float = 5.0) -> Event:
        """The first event of ``type`` (matching ``where``) received so far or next."""
        def find() -> Event | None:
            for ev in self.events:
                if ev.get("type") == type and (where is None or where(ev)):
                    return ev
            return None

        async with asyncio.timeout(timeout), self._changed:
            while (found := find()) is None:
                await self._changed.wait()
            return found

    def of(self, prefix: str) -> list[Event]:
        """Events whose type starts with ``prefix`` (e.g. ``"call."``)."""
        return [e for e in self.events if str(e.get("type", "")).startswith(prefix)]

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def connect(
    url: str, token: str, device: str, reconnect: bool = False
) -> AsyncIterator[tuple[Client, Inbox]]:
    """A connected client and its inbox."""
    client = Client(url, token, device, reconnect=reconnect)
    await client.connect()
    inbox = Inbox(client)
    try:
        yield client, inbox
    finally:
        await inbox.close()
        await client.close()
