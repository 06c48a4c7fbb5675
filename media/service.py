"""The interface the signaling layer calls, whether the relay runs in-process or in workers.

:class:`media.relay.Relay` (one process) and :class:`media.pool.RelayPool` (rooms spread over
worker processes through the placement port) both implement :class:`RelayService`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

Event = dict[str, Any]
Emit = Callable[[Event], Awaitable[None] | None]
DropCallback = Callable[[str, str, str], Awaitable[None] | None]
RoomClosedCallback = Callable[[str], Awaitable[None] | None]


class RelayService(Protocol):
    """Rooms of devices whose media the relay forwards (see media.relay for the events)."""

    async def join(
        self,
        room_id: str,
        participant_id: str,
        *,
        user: str,
        device: str,
        publish_audio: bool,
        publish_video: bool,
        emit: Emit,
    ) -> dict[str, Any]:
        """Add a device; the relay's offer follows as a ``room.sdp`` event through ``emit``."""
        ...

    async def on_sdp(
        self, room_id: str, participant_id: str, sdp: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Apply the device's answer (-> ``None``) or offer (-> the relay's answer)."""
        ...

    async def on_ice(
        self, room_id: str, participant_id: str, candidate: dict[str, Any] | None
    ) -> None:
        """Add a trickled ICE candidate (``None``: end of candidates)."""
        ...

    async def leave(self, room_id: str, participant_id: str) -> None:
        """Remove a device from its room."""
        ...

    async def start_recording(self, room_id: str, directory: str) -> list[str]:
        """Record the room's publishers (as forwarded, no decoding) into ``directory``."""
        ...

    async def stop_recording(self, room_id: str) -> list[str]:
        """Stop recording; returns the finished files."""
        ...

    def participants(self, room_id: str) -> list[dict[str, Any]]:
        """The room's participants: ``{participant, user, device, media}`` each."""
        ...

    async def close(self) -> None:
        """Stop everything."""
        ...
