"""A RelayService that goes through a talkbridge server: ``room.*`` frames over the client.

Lets tests/media/peers.Peer (a real aiortc device) take part in a group call exactly as an
app would: join by group, answer the relay's offers, trickle nothing (aiortc puts its
candidates in the SDP).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from signaling.client import Client


class WireRelay:
    """The relay as seen by one device through the server."""

    def __init__(self, client: Client, group: str | None = None, call: str | None = None) -> None:
        self.client = client
        # What the room belongs to: a group (group call) or a 1:1 call through the relay.
        self.where = {"group": group} if group is not None else {"call": call}
        self.room = ""
        self.reply: dict[str, Any] = {}
        self._pump: asyncio.Task[None] | None = None

    async def join(
        self,
        room_id: str,
        participant_id: str,
        *,
        user: str,
        device: str,
        publish_audio: bool,
        publish_video: bool,
        emit: Any,
    ) -> dict[str, Any]:
        self._pump = asyncio.ensure_future(self._forward(emit))
        self.reply = await self.client.request(
            "room.join", **self.where, media={"audio": publish_audio, "video": publish_video}
        )
        self.room = self.reply["room"]
        return self.reply

    async def _forward(self, emit: Any) -> None:
        async for event in self.client.events():
            if event["type"].startswith("room."):
                emit(event)

    async def on_sdp(self, room_id: str, participant_id: str, sdp: dict[str, Any]) -> Any:
        data = await self.client.request("room.sdp", room=self.room, sdp=sdp)
        return data.get("sdp")

    async def on_ice(self, room_id: str, participant_id: str, candidate: Any) -> None:
        await self.client.request("room.ice", room=self.room, candidate=candidate)

    async def leave(self, room_id: str, participant_id: str) -> None:
        await self.client.request("room.leave", room=self.room)

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
