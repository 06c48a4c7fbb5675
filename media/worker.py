"""A relay worker process: one :class:`media.relay.Relay` driven over stdin/stdout.

Started by :class:`media.pool.RelayPool` as ``python -m media.worker '<json config>'``.
Each line is one JSON object. In: ``{"id", "op", "args"}``. Out: replies ``{"id", "ok",
"result" | "error"}`` and unsolicited ``{"event", "room", "participant"}``,
``{"dropped": [room, participant, reason]}``, ``{"room_closed": room}``. Requests about one
participant are applied in the order they arrive; different participants run concurrently.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

from im_bridge.errors import Internal, TalkbridgeError
from media.eventloop import new_event_loop
from media.relay import Relay

logger = logging.getLogger("media.worker")


class WorkerServer:
    """Reads requests, calls the relay, writes replies and events."""

    def __init__(self, config: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._relay = Relay(
            config["host_addresses"],
            config.get("ice_servers") or [],
            on_dropped=self._on_dropped,
            on_room_closed=self._on_room_closed,
            **config.get("options", {}),
        )
        self._queues: dict[tuple[str, str], asyncio.Queue[dict[str, Any] | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _send(self, obj: dict[str, Any]) -> None:
        self._writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")

    def _on_dropped(self, room: str, participant: str, reason: str) -> None:
        self._send({"dropped": [room, participant, reason]})

    def _on_room_closed(self, room: str) -> None:
        self._send({"room_closed": room})

    def submit(self, msg: dict[str, Any]) -> None:
        """Queue a request behind earlier ones for the same participant."""
        args = msg.get("args", {})
        key = (str(args.get("room_id", "")), str(args.get("participant_id", "")))
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = asyncio.Queue()
            task = asyncio.ensure_future(self._drain(key, queue))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        queue.put_nowait(msg)

    async def _drain(
        self, key: tuple[str, str], queue: asyncio.Queue[dict[str, Any] | None]
    ) -> None:
        while True:
            msg = await queue.get()
            if msg is None:
                return
            await self._handle(msg)
            if queue.empty():
                self._queues.pop(key, None)
                return

    async def _handle(self, msg: dict[str, Any]) -> None:
        op, args, rid = msg.get("op"), msg.get("args", {}), msg.get("id")
        try:
            result: Any
            if op == "join":
                room, pid = args["room_id"], args["participant_id"]

                def emit(event: dict[str, Any], room: str = room, pid: str = pid) -> None:
                    self._send({"event": event, "room": room, "participant": pid})

                result = await self._relay.join(
                    room, pid, user=args["user"], device=args["device"],
                    publish_audio=args["publish_audio"], publish_video=args["publish_video"],
                    emit=emit,
                )
            elif op == "on_sdp":
                result = await self._relay.on_sdp(
                    args["room_id"], args["participant_id"], args["sdp"]
                )
            elif op == "on_ice":
                await self._relay.on_ice(args["room_id"], args["participant_id"], args["candidate"])
                result = None
            elif op == "leave":
                await self._relay.leave(args["room_id"], args["participant_id"])
                result = None
            elif op == "start_recording":
                result = await self._relay.start_recording(args["room_id"], args["directory"])
            elif op == "stop_recording":
                result = await self._relay.stop_recording(args["room_id"])
            elif op == "stats":
                result = self._relay.stats(args["room_id"])
            elif op == "close":
                await self._relay.close()
                result = None
            else:
                raise Internal(f"unknown op {op!r}")
            self._send({"id": rid, "ok": True, "result": result})
        except TalkbridgeError as exc:
            self._send({"id": rid, "ok": False, "error": exc.to_wire()})
        except Exception as exc:
            logger.exception("worker request %s failed", op)
            self._send({"id": rid, "ok": False, "error": Internal(str(exc)).to_wire()})
        await self._writer.drain()


async def serve(config: dict[str, Any]) -> None:
    """Serve requests from stdin until it closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 22)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, sys.stdout
    )
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    server = WorkerServer(config, writer)
    while line := await reader.readline():
        server.submit(json.loads(line))
    await server._relay.close()


def main() -> None:
    """Entry point: ``python -m media.worker '<json config>'``."""
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(serve(json.loads(sys.argv[1])))


if __name__ == "__main__":
    main()
