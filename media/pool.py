"""Rooms spread over relay worker processes (one per core by default).

:class:`RelayPool` implements the same :class:`media.service.RelayService` interface as the
in-process :class:`media.relay.Relay`: the signaling layer does not care which it has. Each
room lives in one worker, chosen through the placement port (:mod:`media.placement`).
Forwarding is CPU-bound Python, so processes (not threads) are what use more than one core.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import sys
from typing import Any

from im_bridge.errors import Forbidden, Internal, NotFound, TalkbridgeError, error_from_wire
from media.placement import LocalPlacement, Placement
from media.service import DropCallback, Emit, RoomClosedCallback

logger = logging.getLogger(__name__)

class _Worker:
    """One worker process and its pending requests."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.next_id = 0
        self.reader: asyncio.Task[None] | None = None


class RelayPool:
    """A :class:`~media.service.RelayService` over ``workers`` relay processes.

    Arguments are those of :class:`media.relay.Relay` (extra keyword options are passed to
    each worker's relay) plus ``workers`` (default: one per core) and ``placement``
    (default :class:`~media.placement.LocalPlacement`). Call :meth:`start` first.
    """

    def __init__(
        self,
        host_addresses: list[str],
        ice_servers: list[dict[str, Any]] | None = None,
        *,
        workers: int | None = None,
        placement: Placement | None = None,
        on_dropped: DropCallback | None = None,
        on_room_closed: RoomClosedCallback | None = None,
        **relay_options: Any,
    ) -> None:
        self._config = {
            "host_addresses": host_addresses,
            "ice_servers": ice_servers or [],
            "options": relay_options,
        }
        self._count = workers or os.cpu_count() or 1
        self._names = [f"w{i}" for i in range(self._count)]
        self._placement: Placement = placement or LocalPlacement(self._names)
        self._on_dropped = on_dropped
        self._on_room_closed = on_room_closed
        self._workers: dict[str, _Worker] = {}
        self._emits: dict[tuple[str, str], Emit] = {}
        self._members: dict[str, dict[str, dict[str, Any]]] = {}
        self._closing = False
        self._callbacks: dict[Any, asyncio.Queue[tuple[Any, Any]]] = {}
        self._callback_tasks: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        """Start the worker processes."""
        for name in self._names:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "media.worker", json.dumps(self._config),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                limit=1 << 22,
            )
            worker = _Worker(name, proc)
            worker.reader = asyncio.ensure_future(self._read(worker))
            self._workers[name] = worker

    def worker_pids(self) -> dict[str, int]:
        """Process id of each worker (for operators and tests)."""
        return {name: w.proc.pid for name, w in self._workers.items()}

    async def worker_of(self, room_id: str) -> str | None:
        """The worker holding ``room_id``."""
        return await self._placement.lookup(room_id)

    # ----- RelayService -------------------------------------------------------------------

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
        """See :meth:`media.relay.Relay.join`."""
        worker = await self._placement.place(room_id)
        self._emits[(room_id, participant_id)] = emit
        try:
            result: dict[str, Any] = await self._call(worker, "join", {
                "room_id": room_id, "participant_id": participant_id, "user": user,
                "device": device, "publish_audio": publish_audio, "publish_video": publish_video,
            })
        except BaseException:
            self._emits.pop((room_id, participant_id), None)
            if not self._members.get(room_id):
                await self._placement.release(room_id)
            raise
        self._members.setdefault(room_id, {})[participant_id] = {
            "participant": participant_id, "user": user, "device": device,
            "media": {"audio": publish_audio, "video": publish_video},
        }
        return result

    async def on_sdp(
        self, room_id: str, participant_id: str, sdp: dict[str, Any]
    ) -> dict[str, Any] | None:
        """See :meth:`media.relay.Relay.on_sdp`."""
        worker = await self._worker_for(room_id, participant_id)
        result: dict[str, Any] | None = await self._call(worker, "on_sdp", {
            "room_id": room_id, "participant_id": participant_id, "sdp": sdp})
        return result

    async def on_ice(
        self, room_id: str, participant_id: str, candidate: dict[str, Any] | None
    ) -> None:
        """See :meth:`media.relay.Relay.on_ice`."""
        worker = await self._worker_for(room_id, participant_id)
        await self._call(worker, "on_ice", {
            "room_id": room_id, "participant_id": participant_id, "candidate": candidate})

    async def leave(self, room_id: str, participant_id: str) -> None:
        """See :meth:`media.relay.Relay.leave`."""
        worker = await self._worker_for(room_id, participant_id)
        await self._call(worker, "leave", {"room_id": room_id, "participant_id": participant_id})
        self._forget(room_id, participant_id)

    def participants(self, room_id: str) -> list[dict[str, Any]]:
        """See :meth:`media.relay.Relay.participants`."""
        return list(self._members.get(room_id, {}).values())

    async def start_recording(self, room_id: str, directory: str) -> list[str]:
        """See :meth:`media.relay.Relay.start_recording`."""
        worker = await self._placement.lookup(room_id)
        if worker is None:
            raise NotFound(f"no room {room_id}")
        result: list[str] = await self._call(worker, "start_recording", {
            "room_id": room_id, "directory": str(directory)})
        return result

    async def stop_recording(self, room_id: str) -> list[str]:
        """See :meth:`media.relay.Relay.stop_recording`."""
        worker = await self._placement.lookup(room_id)
        if worker is None:
            return []
        result: list[str] = await self._call(worker, "stop_recording", {"room_id": room_id})
        return result

    async def stats(self, room_id: str) -> dict[str, Any]:
        """Forwarding counters of a room (from its worker)."""
        worker = await self._placement.lookup(room_id)
        if worker is None:
            return {}
        result: dict[str, Any] = await self._call(worker, "stats", {"room_id": room_id})
        return result

    async def close(self) -> None:
        """Close every worker's relay and stop the processes."""
        self._closing = True
        for worker in self._workers.values():
            try:
                async with asyncio.timeout(10):
                    await self._call(worker.name, "close", {})
            except (TalkbridgeError, TimeoutError, ConnectionError):
                pass
            if worker.proc.stdin is not None:
                worker.proc.stdin.close()
            try:
                async with asyncio.timeout(5):
                    await worker.proc.wait()
            except TimeoutError:
                worker.proc.kill()
                await worker.proc.wait()
            if worker.reader is not None:
                await worker.reader
        if self._callback_tasks:
            await asyncio.wait(self._callback_tasks, timeout=5)

    # ----- plumbing -----------------------------------------------------------------------

    async def _worker_for(self, room_id: str, participant_id: str) -> str:
        worker = await self._placement.lookup(room_id)
        if worker is None or participant_id not in self._members.get(room_id, {}):
            raise Forbidden(f"not in room {room_id}")
        return worker

    def _forget(self, room_id: str, participant_id: str) -> None:
        self._emits.pop((room_id, participant_id), None)
        members = self._members.get(room_id)
        if members is not None:
            members.pop(participant_id, None)

    async def _call(self, worker_name: str, op: str, args: dict[str, Any]) -> Any:
        worker = self._workers.get(worker_name)
        if worker is None or worker.proc.stdin is None or worker.proc.returncode is not None:
            raise Internal(f"relay worker {worker_name} is not running")
        worker.next_id += 1
        rid = worker.next_id
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        worker.pending[rid] = fut
        line = json.dumps({"id": rid, "op": op, "args": args}, separators=(",", ":"))
        worker.proc.stdin.write(line.encode() + b"\n")
        await worker.proc.stdin.drain()
        return await fut

    async def _read(self, worker: _Worker) -> None:
        assert worker.proc.stdout is not None
        while line := await worker.proc.stdout.readline():
            msg = json.loads(line)
            if "id" in msg:
                fut = worker.pending.pop(msg["id"], None)
                if fut is not None and not fut.done():
                    if msg["ok"]:
                        fut.set_result(msg.get("result"))
                    else:
                        fut.set_exception(error_from_wire(msg["error"]))
            elif "event" in msg:
                emit = self._emits.get((msg["room"], msg["participant"]))
                if emit is not None:
                    await self._call_back(emit, msg["event"], key=(msg["room"], msg["participant"]))
            elif "dropped" in msg:
                room, pid, reason = msg["dropped"]
                self._forget(room, pid)
                if self._on_dropped is not None:
                    await self._call_back(self._on_dropped, room, pid, reason)
            elif "room_closed" in msg:
                room = msg["room_closed"]
                self._members.pop(room, None)
                await self._placement.release(room)
                if self._on_room_closed is not None:
                    await self._call_back(self._on_room_closed, room)
        # The worker is gone: fail what waits on it, and drop its rooms' devices.
        for fut in worker.pending.values():
            if not fut.done():
                fut.set_exception(Internal(f"relay worker {worker.name} exited"))
        worker.pending.clear()
        if self._closing:
            return
        logger.error("relay worker %s exited", worker.name)
        for room in list(self._members):
            if await self._placement.lookup(room) != worker.name:
                continue
            for pid in list(self._members.get(room, {})):
                emit = self._emits.get((room, pid))
                if emit is not None:
                    await self._call_back(
                        emit, {"type": "room.dropped", "room": room, "reason": "relay_failed"},
                        key=(room, pid),
                    )
                self._forget(room, pid)
                if self._on_dropped is not None:
                    await self._call_back(self._on_dropped, room, pid, "relay_failed")
            self._members.pop(room, None)
            await self._placement.release(room)

    async def _call_back(self, fn: Any, *args: Any, key: Any = None) -> None:
        """Run a callback outside the reader loop (it may call back into the pool and wait
        for a reply), keeping callbacks with the same ``key`` in order."""
        queue = self._callbacks.get(key)
        if queue is None:
            queue = self._callbacks[key] = asyncio.Queue()
            task = asyncio.ensure_future(self._run_callbacks(key, queue))
            self._callback_tasks.add(task)
            task.add_done_callback(self._callback_tasks.discard)
        queue.put_nowait((fn, args))

    async def _run_callbacks(self, key: Any, queue: asyncio.Queue[tuple[Any, Any]]) -> None:
        while not queue.empty():
            fn, args = queue.get_nowait()
            try:
                result = fn(*args)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("relay pool callback failed")
        self._callbacks.pop(key, None)
