"""Group calls across signaling nodes that share Redis.

Every node runs a media relay and registers it (:class:`RelayRegistration`); a group's room
is placed on the least-loaded live node (:class:`RedisPlacement`, key ``g:<group>``) and
lives there entirely. Other nodes forward ``room.*`` requests of their devices to it as
node messages on the bus, and the relay's events reach devices wherever they are connected
through ``bus.publish_device``. Node messages and event frames for one node share its
channel, so a forwarded ``room.join`` reply still reaches the device before the relay's
offer (the gateway holds the device's events until then).

If the hosting node dies, the placement stops naming it: a watchdog on each forwarding node
tells its devices ``room.dropped {reason: "relay_failed"}``, and joining again places the
group's room on a live node.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import redis.asyncio as aioredis

from im_bridge.errors import Internal, TalkbridgeError, Unsupported, error_from_wire
from signaling.codec import encode
from signaling.redis_bus import parse_redis_url
from signaling.redis_placement import NoRelay, RedisPlacement, RelayRegistration

if TYPE_CHECKING:
    from signaling.rooms import RoomManager
    from signaling.state import AppState

log = logging.getLogger(__name__)

REQUEST = b"room-rpc? "
REPLY = b"room-rpc! "
RPC_TIMEOUT = 10.0
WATCH_EVERY = 2.0


@dataclass(frozen=True)
class Who:
    """A device on another node, as the hosting node's room manager sees it."""

    user: str
    device: str


@dataclass
class RemoteRoom:
    """A room hosted elsewhere that devices of this node joined through this node."""

    owner: str
    key: str
    devices: set[tuple[str, str]] = field(default_factory=set)


class RoomCluster:
    """Placement of rooms on nodes, and forwarding of ``room.*`` to the hosting node."""

    def __init__(self, state: AppState, rooms: RoomManager) -> None:
        url, settings = parse_redis_url(state.config.redis)
        self.state = state
        self.rooms = rooms
        self.node = state.config.node_id
        self.prefix = settings.prefix
        self.placement = RedisPlacement(url, settings.prefix)
        self.registration = RelayRegistration(url, self.node, settings.prefix)
        self.redis: aioredis.Redis = aioredis.Redis.from_url(url, socket_timeout=3)
        self._rooms_key = f"{settings.prefix}rooms:node"
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.remote: dict[str, RemoteRoom] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watchdog: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.state.config.relay_host:
            with contextlib.suppress(Exception):  # Redis away: heartbeats retry meanwhile
                await self.registration.start()
        self.state.bus.on_node_message.append(self._on_message)
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        await self.registration.close()
        await self.placement.close()
        await self.redis.aclose()

    # ------------------------------------------------------------ where rooms live

    async def host_of_group(self, group: str) -> str:
        """The node hosting (or chosen to host) the group's room."""
        try:
            return await self.placement.place(f"g:{group}")
        except NoRelay:
            if self.state.config.relay_host:
                return self.node  # no registry yet (Redis just came back): host it here
            raise Unsupported("no relay node is running: group calls are unavailable") from None

    async def host_of_room(self, room_id: str) -> str | None:
        remote = self.remote.get(room_id)
        if remote is not None:
            return remote.owner
        node = await self.redis.hget(self._rooms_key, room_id)
        return node.decode() if isinstance(node, bytes) else node

    async def room_started(self, room_id: str) -> None:
        await self.redis.hset(self._rooms_key, room_id, self.node)

    async def room_ended(self, room_id: str, group: str) -> None:
        with contextlib.suppress(Exception):
            await self.redis.hdel(self._rooms_key, room_id)
            await self.placement.release(f"g:{group}")

    def joined_remote(self, room_id: str, owner: str, group: str, user: str, device: str) -> None:
        entry = self.remote.setdefault(room_id, RemoteRoom(owner, f"g:{group}"))
        entry.devices.add((user, device))

    def left_remote(self, room_id: str, user: str, device: str) -> None:
        entry = self.remote.get(room_id)
        if entry is not None:
            entry.devices.discard((user, device))
            if not entry.devices:
                del self.remote[room_id]

    # ------------------------------------------------------------ forwarding

    async def call(self, node: str, op: str, user: str, device: str, args: dict[str, Any]) -> Any:
        """Run ``op`` for a device on the node hosting the room; its reply or its error."""
        rid = f"{self.node}:{next(self._ids)}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        message = {"id": rid, "from": self.node, "op": op, "user": user, "device": device,
                   "args": args}
        try:
            await self.state.bus.send_to_node(node, REQUEST + encode(message))
            async with asyncio.timeout(RPC_TIMEOUT):
                reply = await fut
        except TimeoutError:
            raise Internal("the node hosting this call did not answer; join again") from None
        finally:
            self._pending.pop(rid, None)
        if reply.get("ok"):
            return reply.get("data")
        err = reply.get("error") or {}
        raise error_from_wire(err)

    def _on_message(self, message: bytes) -> None:
        if message.startswith(REPLY):
            reply = msgspec.json.decode(message[len(REPLY):])
            fut = self._pending.get(reply.get("id", ""))
            if fut is not None and not fut.done():
                fut.set_result(reply)
        elif message.startswith(REQUEST):
            task = asyncio.get_running_loop().create_task(
                self._serve(msgspec.json.decode(message[len(REQUEST):]))
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, req: dict[str, Any]) -> None:
        who = Who(req["user"], req["device"])
        reply: dict[str, Any] = {"id": req["id"]}
        try:
            reply["data"] = await self.rooms.run_local(req["op"], who, req["args"])
            reply["ok"] = True
        except TalkbridgeError as err:
            reply.update(ok=False, error=err.to_wire())
        except Exception:
            log.exception("forwarded %s failed", req.get("op"))
            reply.update(ok=False, error=Internal("internal error").to_wire())
        await self.state.bus.send_to_node(req["from"], REPLY + encode(reply))

    # ------------------------------------------------------------ hosting node lost

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_EVERY)
            for room_id, entry in list(self.remote.items()):
                try:
                    alive = await self.placement.lookup(entry.key) == entry.owner
                except Exception:
                    continue  # Redis away: say nothing rather than something wrong
                if alive:
                    continue
                self.remote.pop(room_id, None)
                dropped = {"type": "room.dropped", "room": room_id, "reason": "relay_failed"}
                for user, device in entry.devices:
                    await self.state.bus.publish_device(user, device, encode(dropped))
