"""Handlers of the group frames (group.*) and ``msg.receipts``.

Each change's ``notice`` reaches every member's devices as ``msg.new`` (the acting device
included: the notice is how its timeline learns of the change). Join requests are also
announced to the owner and admins as ``group.request`` events, and their outcome to the
requester as ``group.request_resolved``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from im_bridge.groups import Change, GroupService
from signaling.codec import opt_int, req_bool, req_int, req_str
from signaling.delivery import deliver_message, publish
from signaling.dispatch import RequestContext, handler
from signaling.state import AppState


async def setup(state: AppState) -> None:
    """Attach the group service and route group fan-out through its member cache."""
    groups = GroupService(state.store, member_limit=state.config.group_member_limit)
    state.groups = groups
    state.chat.group_members = groups.members
    state.chat.group_members_cached = groups.cached
    _share_membership_changes(state, groups)


MEMBERS_CHANGED = b"members-changed "


def _share_membership_changes(state: AppState, groups: GroupService) -> None:
    """Keep every node's member cache in step: a change here is broadcast to the other
    nodes, which drop their cached list and run their own hooks (e.g. rooms dropping a
    removed member). A node that misses a broadcast (Redis outage) resyncs its sessions.
    """
    tasks: set[asyncio.Task[None]] = set()
    from_remote = False

    def announce(conv: str) -> None:
        if from_remote:
            return  # it came from another node: do not echo it back
        task = asyncio.get_running_loop().create_task(
            state.bus.broadcast(MEMBERS_CHANGED + conv.encode())
        )
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def on_node_message(message: bytes) -> None:
        nonlocal from_remote
        if message.startswith(MEMBERS_CHANGED):
            from_remote = True
            try:
                groups.invalidate(message[len(MEMBERS_CHANGED) :].decode())
            finally:
                from_remote = False

    groups.on_members_changed.append(announce)
    state.bus.on_node_message.append(on_node_message)


def _svc(ctx: RequestContext) -> GroupService:
    svc: GroupService = ctx.state.groups
    return svc


def _group(req: dict[str, Any]) -> str:
    return req_str(req, "group", max_len=64)


async def _announce(state: AppState, change: Change) -> None:
    if change.notice is not None:
        state.metrics.message_stored("notice")
        await deliver_message(state, change.notice, change.audience, push=False)


def _notice_data(change: Change) -> dict[str, Any]:
    out: dict[str, Any] = {"group": change.group.id, "conv": change.group.conv}
    if change.notice is not None:
        out["seq"] = change.notice.seq
    return out


@handler("group.create")
async def group_create(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    change = await _svc(ctx).create(
        ctx.session.user,
        req.get("name"),
        req.get("members"),
        req.get("join_policy", "approval"),
        group=req.get("group"),
        announcement=req.get("announcement", ""),
        avatar=req.get("avatar", ""),
    )
    await _announce(ctx.state, change)
    return {**_notice_data(change), "info": change.group.to_wire()}


@handler("group.info")
async def group_info(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    g, n, role = await _svc(ctx).info(ctx.session.user, _group(req))
    data = g.to_wire()
    if role is None:
        # What a non-member may see of a group they can join or ask to join.
        data = {k: data[k] for k in ("group", "conv", "name", "avatar", "join_policy")}
    data["member_count"] = n
    data["my_role"] = role
    return {"group": data, "my_role": role}


@handler("group.members")
async def group_members(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    limit = opt_int(req, "limit", minimum=1, maximum=500) or 100
    cursor = req.get("cursor")
    page, nxt = await _svc(ctx).member_page(ctx.session.user, _group(req), cursor, limit)
    return {"members": [m.to_wire() for m in page], "next_cursor": nxt}


@handler("group.list")
async def group_list(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    groups = await _svc(ctx).my_groups(ctx.session.user)
    out = []
    for g, role, n in groups:
        out.append({**g.to_wire(), "role": role, "member_count": n})
    return {"groups": out}


@handler("group.update")
async def group_update(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    fields = {k: req.get(k) for k in ("name", "announcement", "avatar", "join_policy")}
    change = await _svc(ctx).update(ctx.session.user, _group(req), fields)
    await _announce(ctx.state, change)
    return {**_notice_data(change), **change.data, "info": change.group.to_wire()}


async def _tell_admins_of_requests(
    state: AppState, change: Change, users: list[str], message: str, by: str | None
) -> None:
    admins = await _svc_state(state).privileged(change.group.conv)
    ts = change.notice.ts if change.notice is not None else 0
    for u in users:
        ev: dict[str, Any] = {
            "type": "group.request",
            "group": change.group.id,
            "user": u,
            "message": message,
            "ts": ts,
        }
        if by is not None:
            ev["invited_by"] = by
        await publish(state, admins, ev)


def _svc_state(state: AppState) -> GroupService:
    svc: GroupService = state.groups
    return svc


@handler("group.invite")
async def group_invite(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    change = await _svc(ctx).invite(ctx.session.user, _group(req), req.get("users"))
    await _announce(ctx.state, change)
    if change.data.get("requested"):
        await _tell_admins_of_requests(
            ctx.state, change, change.data["requested"], "", ctx.session.user
        )
    return {**_notice_data(change), **change.data}


@handler("group.join")
async def group_join(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    change = await _svc(ctx).join(ctx.session.user, _group(req), req.get("message"))
    await _announce(ctx.state, change)
    if change.data.get("status") == "pending":
        message = change.notice.body.get("message", "") if change.notice is not None else ""
        await _tell_admins_of_requests(ctx.state, change, [ctx.session.user], message, None)
    return {**_notice_data(change), **change.data}


@handler("group.requests")
async def group_requests(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    reqs = await _svc(ctx).requests(ctx.session.user, _group(req))
    return {"requests": [r.to_wire() for r in reqs]}


async def _resolved(ctx: RequestContext, change: Change, user: str, outcome: str) -> None:
    admins = await _svc(ctx).privileged(change.group.conv)
    ev = {
        "type": "group.request_resolved",
        "group": change.group.id,
        "user": user,
        "outcome": outcome,
        "by": ctx.session.user,
    }
    await publish(ctx.state, list(dict.fromkeys([user, *admins])), ev)


@handler("group.approve")
async def group_approve(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    user = req.get("user")
    change = await _svc(ctx).approve(ctx.session.user, _group(req), user)
    await _announce(ctx.state, change)
    await _resolved(ctx, change, str(user), "approved")
    return _notice_data(change)


@handler("group.reject")
async def group_reject(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    user = req.get("user")
    change = await _svc(ctx).reject(ctx.session.user, _group(req), user)
    await _announce(ctx.state, change)
    await _resolved(ctx, change, str(user), "rejected")
    return _notice_data(change)


@handler("group.kick")
async def group_kick(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    change = await _svc(ctx).kick(ctx.session.user, _group(req), req.get("user"))
    await _announce(ctx.state, change)
    return _notice_data(change)


@handler("group.leave")
async def group_leave(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    change = await _svc(ctx).leave(ctx.session.user, _group(req))
    await _announce(ctx.state, change)
    return _notice_data(change)


@handler("group.dissolve")
async def group_dissolve(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    change = await _svc(ctx).dissolve(ctx.session.user, _group(req))
    await _announce(ctx.state, change)
    return _notice_data(change)


@handler("group.set_role")
async def group_set_role(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    change = await _svc(ctx).set_role(
        ctx.session.user, _group(req), req.get("user"), req.get("role")
    )
    await _announce(ctx.state, change)
    return _notice_data(change)


@handler("group.transfer")
async def group_transfer(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    change = await _svc(ctx).transfer(ctx.session.user, _group(req), req.get("user"))
    await _announce(ctx.state, change)
    return _notice_data(change)


@handler("group.mute")
async def group_mute(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    group = _group(req)
    until = req_int(req, "until_ts", minimum=0)
    change = await _svc(ctx).mute(ctx.session.user, group, req.get("user"), until)
    await _announce(ctx.state, change)
    return {**_notice_data(change), **change.data}


@handler("group.mute_all")
async def group_mute_all(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    group = _group(req)
    on = req_bool(req, "on")
    change = await _svc(ctx).mute_all(ctx.session.user, group, on)
    await _announce(ctx.state, change)
    return {**_notice_data(change), "on": on}


@handler("msg.receipts")
async def msg_receipts(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    conv = req_str(req, "conv", max_len=200)
    seq = req_int(req, "seq", minimum=1)
    read, unread = await _svc(ctx).receipts(ctx.session.user, conv, seq)
    return {"conv": conv, "seq": seq, "read": read, "unread_count": unread}
