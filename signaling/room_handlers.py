"""Handlers of the group-call frames: room.join, room.sdp, room.ice, room.leave."""

from __future__ import annotations

from typing import Any

from im_bridge.errors import BadRequest, Forbidden
from im_bridge.ids import check_group_id
from signaling.codec import req_bool, req_obj, req_str
from signaling.dispatch import RequestContext, handler
from signaling.rooms import RoomManager
from signaling.state import AppState


def _rooms(ctx: RequestContext) -> RoomManager:
    rooms: RoomManager = ctx.state.rooms
    return rooms


# The relay's first offer may be ready before the reply: the device's events wait for the
# reply, so a client always knows the room id when the offer comes.
@handler("room.join", hold_events=True)
async def room_join(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    media = req_obj(req, "media")
    audio, video = media.get("audio", False), media.get("video", False)
    if not isinstance(audio, bool) or not isinstance(video, bool):
        raise BadRequest("'media.audio' and 'media.video' must be true or false", field="media")
    media_args = {"audio": audio, "video": video}
    if req.get("call") is not None:
        call_id = req_str(req, "call", max_len=128)
        joined: dict[str, Any] = await _rooms(ctx).request(
            "join_call", ctx.session, {"call": call_id, **media_args}
        )
        return joined
    group = check_group_id(req.get("group"))
    if await ctx.state.groups.role_of(group, ctx.session.user) is None:
        raise Forbidden("only members of the group join its call")  # before any placement
    data: dict[str, Any] = await _rooms(ctx).request(
        "join", ctx.session, {"group": group, **media_args}
    )
    return data


@handler("room.sdp")
async def room_sdp(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    args = {"room": req.get("room"), "sdp": req_obj(req, "sdp")}
    data: dict[str, Any] = await _rooms(ctx).request("sdp", ctx.session, args)
    return data


@handler("room.ice")
async def room_ice(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    candidate = req.get("candidate")
    if candidate is not None and not isinstance(candidate, dict):
        raise BadRequest("'candidate' must be an object or null", field="candidate")
    await _rooms(ctx).request("ice", ctx.session, {"room": req.get("room"), "candidate": candidate})
    return {}


@handler("room.leave")
async def room_leave(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    await _rooms(ctx).request("leave", ctx.session, {"room": req.get("room")})
    return {}


@handler("room.record")
async def room_record(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    args = {"room": req.get("room"), "on": req_bool(req, "on")}
    data: dict[str, Any] = await _rooms(ctx).request("record", ctx.session, args)
    return data


async def setup(state: AppState) -> None:
    """Attach the room manager; hook it to device sessions and group membership."""
    rooms = RoomManager(state)
    state.rooms = rooms
    if state.config.redis:
        from signaling.room_cluster import RoomCluster

        rooms.cluster = RoomCluster(state, rooms)
        await rooms.cluster.start()
    state.hub.on_connect.append(rooms.on_connect)
    state.hub.on_disconnect.append(rooms.on_disconnect)
    state.groups.on_members_changed.append(rooms.on_members_changed)


async def teardown(state: AppState) -> None:
    await state.rooms.close()
