"""Group calls: rooms bound to groups, carried by the media relay.

The relay (media/) knows rooms and participants by opaque ids; this module ties them to
groups and devices. Only current members of an active group join its room; a member who
is removed mid-call is dropped from it; a device whose signaling socket drops keeps its
media (ICE does not depend on the socket) for ``call_grace`` seconds and, once it is back,
receives the relay's events again, since they are addressed to the device, not to its
socket. Starting, leaving and ending a call are ``notice`` messages in the group timeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from im_bridge.errors import BadRequest, Conflict, Forbidden, NotFound, TalkbridgeError
from im_bridge.ids import group_conv, new_id, now_ms
from media.service import RelayService
from signaling.codec import encode
from signaling.delivery import deliver_message, publish
from signaling.session import Session
from signaling.state import AppState

if TYPE_CHECKING:
    from signaling.room_cluster import RoomCluster

log = logging.getLogger(__name__)


class Device(Protocol):
    """Who makes a room request: a local session, or a device of another node."""

    @property
    def user(self) -> str: ...

    @property
    def device(self) -> str: ...


@dataclass
class ActiveRoom:
    """A running group call, or the room of a 1:1 call whose media goes through the relay."""

    room: str
    group: str | None
    started_by: str
    started_at: float
    participants: dict[str, tuple[str, str]] = field(default_factory=dict)  # pid -> (user, dev)
    joined_users: list[str] = field(default_factory=list)  # everyone who took part, in order
    recording: bool = False
    call_id: str | None = None

    @property
    def conv(self) -> str:
        assert self.group is not None
        return group_conv(self.group)


def participant_id(user: str, device: str) -> str:
    """The relay's id for a device (one participation per device)."""
    return f"{user}/{device}"


class RoomManager:
    """The rooms of this node and the relay that carries their media."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self._relay: RelayService | None = None
        self._relay_lock = asyncio.Lock()
        self.by_room: dict[str, ActiveRoom] = {}
        self.by_group: dict[str, ActiveRoom] = {}
        self.by_call: dict[str, ActiveRoom] = {}
        self._grace: dict[str, asyncio.TimerHandle] = {}  # pid -> pending leave
        self._tasks: set[asyncio.Task[Any]] = set()
        self.cluster: RoomCluster | None = None  # set when nodes share Redis

    # ------------------------------------------------------------ routing

    async def request(self, op: str, who: Device, args: dict[str, Any]) -> Any:
        """Run a room request here, or on the node that hosts the room (several nodes)."""
        cluster = self.cluster
        if cluster is not None:
            host = await self._host_for(cluster, op, args)
            if host is not None and host != cluster.node:
                data = await cluster.call(host, op, who.user, who.device, args)
                if op == "join":
                    cluster.joined_remote(data["room"], host, args["group"], who.user, who.device)
                elif op == "leave":
                    cluster.left_remote(args["room"], who.user, who.device)
                return data
        return await self.run_local(op, who, args)

    async def _host_for(self, cluster: RoomCluster, op: str, args: dict[str, Any]) -> str | None:
        if op == "join":
            if args["group"] in self.by_group:
                return cluster.node
            return await cluster.host_of_group(args["group"])
        room_id = args.get("room")
        if op == "join_call" or not isinstance(room_id, str) or room_id in self.by_room:
            return None  # 1:1 relay calls stay on the node that holds the call
        return await cluster.host_of_room(room_id)

    async def run_local(self, op: str, who: Device, args: dict[str, Any]) -> Any:
        """A room request for a room of this node (from a local device or forwarded)."""
        if op == "join":
            return await self.join(who, args["group"], args["audio"], args["video"])
        if op == "join_call":
            return await self.join_call(who, args["call"], args["audio"], args["video"])
        if op == "sdp":
            return await self.sdp(who, args["room"], args["sdp"])
        if op == "ice":
            await self.ice(who, args["room"], args["candidate"])
            return {}
        if op == "leave":
            await self.leave(who, args["room"])
            return {}
        if op == "record":
            return await self.record(who, args["room"], args["on"])
        if op == "disconnected":
            self._device_gone(who.user, who.device)
            return {}
        if op == "connected":
            self._cancel_grace(participant_id(who.user, who.device))
            return {}
        raise BadRequest(f"unknown room operation {op!r}")

    # ------------------------------------------------------------ the relay

    def relay_addresses(self) -> list[str]:
        """Where the relay gathers ICE candidates: as configured, else loopback for a
        node that only listens on loopback (single-machine demos), else every interface."""
        cfg = self.state.config
        if cfg.relay_addresses:
            return list(cfg.relay_addresses)
        return ["127.0.0.1"] if cfg.host in ("127.0.0.1", "localhost") else []

    async def relay(self) -> RelayService:
        """The relay service, started on first use (worker processes cost a second or two)."""
        async with self._relay_lock:
            if self._relay is None:
                cfg = self.state.config
                callbacks: dict[str, Any] = {
                    "on_dropped": self._on_dropped,
                    "on_room_closed": self._on_room_closed,
                }
                if cfg.relay_in_process:
                    from media.relay import Relay

                    self._relay = Relay(self.relay_addresses(), [], **callbacks)
                else:
                    from media.pool import RelayPool

                    pool = RelayPool(
                        self.relay_addresses(), [], workers=cfg.relay_workers or None, **callbacks
                    )
                    await pool.start()
                    self._relay = pool
            return self._relay

    async def close(self) -> None:
        for handle in self._grace.values():
            handle.cancel()
        for room in list(self.by_room.values()):
            await self._end(room)
        if self._relay is not None:
            await self._relay.close()
        if self.cluster is not None:
            await self.cluster.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ requests

    async def join(self, session: Device, group: str, audio: bool, video: bool) -> dict[str, Any]:
        """``room.join``: join (or start) the group's call."""
        user = session.user
        if await self.state.groups.role_of(group, user) is None:
            raise Forbidden("only members of the group join its call")
        room = self.by_group.get(group)
        started = room is None
        if room is None:
            room = ActiveRoom(new_id("room_"), group, user, time.time())
            self.by_room[room.room] = room
            self.by_group[group] = room
            if self.cluster is not None:
                await self.cluster.room_started(room.room)
        return await self._join(session, room, started, audio, video)

    async def join_call(
        self, session: Device, call_id: str, audio: bool, video: bool
    ) -> dict[str, Any]:
        """``room.join {call}``: a party's device joins the room of a 1:1 call via the relay."""
        user, device = session.user, session.device
        calls = self.state.calls
        call = calls.get(call_id)
        if call is None or not call.is_party(user):
            raise NotFound("no such call")
        if call.via != "relay":
            raise BadRequest("this call is peer to peer: it has no room", field="call")
        if call.state != "connected":
            raise Conflict(f"the call is {call.state}: join its room once it is answered")
        if not call.is_participant(user, device):
            raise Forbidden("another device of yours took this call")
        room = self.by_call.get(call_id)
        started = room is None
        if room is None:
            room = ActiveRoom(new_id("room_"), None, call.caller, time.time(), call_id=call_id)
            self.by_room[room.room] = room
            self.by_call[call_id] = room
        return await self._join(session, room, started, audio, video)

    async def _join(
        self, session: Device, room: ActiveRoom, started: bool, audio: bool, video: bool
    ) -> dict[str, Any]:
        user, device = session.user, session.device
        pid = participant_id(user, device)
        self._cancel_grace(pid)
        relay = await self.relay()
        try:
            result = await relay.join(
                room.room, pid, user=user, device=device, publish_audio=audio,
                publish_video=video, emit=self._emitter(user, device),
            )
        except TalkbridgeError:
            if started:
                self._forget(room)
            raise
        room.participants[pid] = (user, device)
        if user not in room.joined_users:
            room.joined_users.append(user)
        if started and room.group is not None:
            await self._notice(room, user, {"event": "call_started", "room": room.room})
            members = await self.state.groups.members(room.conv)
            await publish(
                self.state, [m for m in members if m != user],
                {"type": "room.started", "group": room.group, "room": room.room, "by": user},
            )
        where = {"group": room.group} if room.group is not None else {"call": room.call_id}
        return {
            "room": room.room,
            **where,
            "participants": result.get("participants", []),
            "ice_servers": self.state.ice_servers(user),
        }

    def get(self, room_id: Any, session: Device) -> tuple[ActiveRoom, str]:
        """The room and the device's participant id, or an error (``room.*`` frames)."""
        if not isinstance(room_id, str) or not room_id:
            raise BadRequest("'room' must be a room id", field="room")
        room = self.by_room.get(room_id)
        if room is None:
            raise NotFound("no such room (the call may have ended)")
        pid = participant_id(session.user, session.device)
        if pid not in room.participants:
            raise Forbidden("you are not in this room")
        return room, pid

    async def sdp(self, session: Device, room_id: Any, sdp: Any) -> dict[str, Any]:
        room, pid = self.get(room_id, session)
        answer = await (await self.relay()).on_sdp(room.room, pid, sdp)
        return {"room": room.room, "sdp": answer} if answer else {"room": room.room}

    async def ice(self, session: Device, room_id: Any, candidate: Any) -> None:
        room, pid = self.get(room_id, session)
        await (await self.relay()).on_ice(room.room, pid, candidate)

    async def leave(self, session: Device, room_id: Any) -> None:
        room, pid = self.get(room_id, session)
        await self._leave(room, pid, "left")

    async def record(self, session: Device, room_id: Any, on: bool) -> dict[str, Any]:
        """``room.record``: an owner or admin turns recording of the room on or off.

        Files go under ``<data dir>/recordings/<room>/`` (WebM: VP8 + Opus as forwarded,
        nothing decoded). Everyone in the room and the timeline are told: recording is
        never silent.
        """
        room, _ = self.get(room_id, session)
        if room.group is None:
            raise Forbidden("1:1 calls are not recorded")
        if await self.state.groups.role_of(room.group, session.user) not in ("owner", "admin"):
            raise Forbidden("only the group's owner or an admin may record its calls")
        relay = await self.relay()
        if on:
            directory = Path(self.state.config.data_dir) / "recordings" / room.room
            files = await relay.start_recording(room.room, str(directory))
        else:
            files = await relay.stop_recording(room.room)
        room.recording = on
        event = {"type": "room.recording", "room": room.room, "on": on, "by": session.user}
        users = list(dict.fromkeys(u for u, _ in room.participants.values()))
        await publish(self.state, users, event)
        await self._notice(
            room, session.user, {"event": "recording_started" if on else "recording_stopped",
                                 "room": room.room},
        )
        return {"room": room.room, "recording": on, "files": files}

    # ------------------------------------------------------------ membership and sessions

    async def _leave(self, room: ActiveRoom, pid: str, why: str) -> None:
        """Take a device out of its room; the room ends with its last participant."""
        entry = room.participants.pop(pid, None)
        self._cancel_grace(pid)
        if entry is None:
            return
        last = not room.participants
        with contextlib.suppress(TalkbridgeError):
            await (await self.relay()).leave(room.room, pid)
        user = entry[0]
        still_here = any(u == user for u, _ in room.participants.values())
        if not last and not still_here and room.group is not None:
            await self._notice(room, user, {"event": "call_left", "room": room.room, "reason": why})
        if last:
            await self._end(room)

    async def _end(self, room: ActiveRoom) -> None:
        if self.by_room.get(room.room) is not room:
            return
        self._forget(room)
        for pid in list(room.participants):
            with contextlib.suppress(TalkbridgeError):
                await (await self.relay()).leave(room.room, pid)
        room.participants.clear()
        if room.group is None:
            return  # a 1:1 call's room: the call log in the dm says it all
        if self.cluster is not None:
            await self.cluster.room_ended(room.room, room.group)
        duration = max(0, round(time.time() - room.started_at))
        await self._notice(
            room, room.started_by,
            {
                "event": "call_ended", "room": room.room, "started_by": room.started_by,
                "participants": room.joined_users, "duration_s": duration,
            },
        )
        members = await self.state.groups.members(room.conv)
        ended = {"type": "room.ended", "group": room.group, "room": room.room}
        await publish(self.state, members, ended)

    def _forget(self, room: ActiveRoom) -> None:
        self.by_room.pop(room.room, None)
        if room.group is not None and self.by_group.get(room.group) is room:
            del self.by_group[room.group]
        if room.call_id is not None and self.by_call.get(room.call_id) is room:
            del self.by_call[room.call_id]

    async def end_call(self, call_id: str) -> None:
        """A 1:1 call through the relay ended: close its room."""
        room = self.by_call.get(call_id)
        if room is not None:
            await self._end(room)

    async def on_disconnect(self, session: Session) -> None:
        """A device's socket closed: keep its media for the grace period, then leave."""
        self._device_gone(session.user, session.device)
        self._tell_hosts("disconnected", session)

    def _tell_hosts(self, op: str, session: Session) -> None:
        """Pass a local device's coming and going on to nodes hosting rooms it is in."""
        if self.cluster is None:
            return
        for entry in list(self.cluster.remote.values()):
            if (session.user, session.device) in entry.devices:
                self._spawn(
                    self.cluster.call(entry.owner, op, session.user, session.device, {})
                )

    def _device_gone(self, user: str, device: str) -> None:
        pid = participant_id(user, device)
        for room in list(self.by_room.values()):
            if pid in room.participants:
                self._cancel_grace(pid)
                self._grace[pid] = asyncio.get_running_loop().call_later(
                    self.state.config.call_grace, self._grace_expired, room, pid
                )

    def _grace_expired(self, room: ActiveRoom, pid: str) -> None:
        self._grace.pop(pid, None)
        self._spawn(self._leave(room, pid, "disconnected"))

    async def on_connect(self, session: Session) -> None:
        """The device is back: its relay events reach it again, so the grace timer stops."""
        self._cancel_grace(participant_id(session.user, session.device))
        self._tell_hosts("connected", session)

    def _cancel_grace(self, pid: str) -> None:
        handle = self._grace.pop(pid, None)
        if handle is not None:
            handle.cancel()

    def on_members_changed(self, conv: str) -> None:
        """Group membership changed: drop participants who are no longer members."""
        if not conv.startswith("g:"):
            return
        room = self.by_group.get(conv[2:])
        if room is not None:
            self._spawn(self._check_members(room))

    async def _check_members(self, room: ActiveRoom) -> None:
        assert room.group is not None
        for pid, (user, device) in list(room.participants.items()):
            if await self.state.groups.role_of(room.group, user) is None:
                await self.state.bus.publish_device(
                    user, device,
                    encode({"type": "room.dropped", "room": room.room, "reason": "removed"}),
                )
                await self._leave(room, pid, "removed")

    # ------------------------------------------------------------ relay callbacks

    def _emitter(self, user: str, device: str) -> Any:
        async def emit(event: dict[str, Any]) -> None:
            await self.state.bus.publish_device(user, device, encode(event))

        return emit

    async def _on_dropped(self, room_id: str, pid: str, reason: str) -> None:
        room = self.by_room.get(room_id)
        if room is not None and pid in room.participants:
            await self._leave(room, pid, reason)

    async def _on_room_closed(self, room_id: str) -> None:
        room = self.by_room.get(room_id)
        if room is not None and not room.participants:
            await self._end(room)

    async def _notice(self, room: ActiveRoom, actor: str, body: dict[str, Any]) -> None:
        sent = await self.state.chat.post_system(
            room.conv, "notice", {**body, "actor": actor, "ts": now_ms()}, actor=actor
        )
        if sent.created:
            await deliver_message(self.state, sent.message, sent.members, push=False)
