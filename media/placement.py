"""The media relay placement port: which relay worker holds a room.

``LocalPlacement`` is the embedded default (one process, a dict); a Redis implementation
(relay nodes registered in Redis, least-loaded wins) belongs to the scale-out work and
implements the same :class:`Placement` protocol.
"""

from __future__ import annotations

from typing import Protocol


class Placement(Protocol):
    """Maps rooms to relay workers; new rooms go to the least-loaded worker."""

    async def place(self, room_id: str) -> str:
        """The worker holding ``room_id``, choosing (and recording) one if it has none."""
        ...

    async def release(self, room_id: str) -> None:
        """Forget ``room_id`` (its last participant left)."""
        ...

    async def lookup(self, room_id: str) -> str | None:
        """The worker holding ``room_id``, or ``None``."""
        ...


class LocalPlacement:
    """In-process placement over a fixed set of workers, by number of rooms held."""

    def __init__(self, workers: list[str]) -> None:
        if not workers:
            raise ValueError("placement needs at least one worker")
        self._load = dict.fromkeys(workers, 0)
        self._rooms: dict[str, str] = {}

    async def place(self, room_id: str) -> str:
        """See :meth:`Placement.place`."""
        worker = self._rooms.get(room_id)
        if worker is None:
            worker = min(self._load, key=lambda w: (self._load[w], w))
            self._rooms[room_id] = worker
            self._load[worker] += 1
        return worker

    async def release(self, room_id: str) -> None:
        """See :meth:`Placement.release`."""
        worker = self._rooms.pop(room_id, None)
        if worker is not None:
            self._load[worker] -= 1

    async def lookup(self, room_id: str) -> str | None:
        """See :meth:`Placement.lookup`."""
        return self._rooms.get(room_id)
