"""Handlers of the messaging frames: msg.*, conv.*, receipt.*, typing, block.*."""

from __future__ import annotations

from typing import Any

from im_bridge.errors import BadRequest
from im_bridge.ids import parse_conv
from signaling.codec import opt_int, opt_str, req_bool, req_int, req_str, str_list
from signaling.delivery import deliver_message, publish
from signaling.dispatch import RequestContext, handler


def _conv(req: dict[str, Any]) -> str:
    conv = req_str(req, "conv", max_len=200)
    parse_conv(conv)
    return conv


@handler("msg.send")
async def msg_send(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    s, state = ctx.session, ctx.state
    client_msg_id = opt_str(req, "client_msg_id", max_len=128)
    kind = req.get("kind", "text")
    if not isinstance(kind, str):
        raise BadRequest("'kind' must be a string", field="kind")
    sent = await state.chat.send(
        s.user,
        s.device,
        req.get("to"),
        client_msg_id,
        kind,
        req.get("body"),
        str_list(req, "mentions", max_items=500),
    )
    msg = sent.message
    if sent.created:
        state.metrics.messages.labels(msg.kind).inc()
        await deliver_message(state, msg, sent.members, exclude_session=s.session_id)
    return {"conv": msg.conv, "seq": msg.seq, "msg_id": msg.msg_id, "ts": msg.ts}


@handler("msg.history")
async def msg_history(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    conv = _conv(req)
    limit = opt_int(req, "limit", minimum=1, maximum=100) or 50
    msgs, has_more = await ctx.state.chat.history(
        ctx.session.user, conv, opt_int(req, "before_seq"), opt_int(req, "after_seq"), limit
    )
    return {"messages": [m.to_wire() for m in msgs], "has_more": has_more}


@handler("conv.list")
async def conv_list(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    convs = await ctx.state.chat.conversations(ctx.session.user)
    return {"conversations": [c.to_wire() for c in convs]}


@handler("conv.mute")
async def conv_mute(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    conv = _conv(req)
    on = req_bool(req, "on")
    await ctx.state.chat.set_muted(ctx.session.user, conv, on)
    return {"conv": conv, "muted": on}


@handler("msg.recall")
async def msg_recall(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    conv, seq = _conv(req), req_int(req, "seq", minimum=1)
    _, members = await ctx.state.chat.recall(ctx.session.user, conv, seq)
    await publish(
        ctx.state,
        members,
        {"type": "msg.recalled", "conv": conv, "seq": seq, "by": ctx.session.user},
    )
    return {"conv": conv, "seq": seq}


async def _receipt(ctx: RequestContext, req: dict[str, Any], kind: str) -> dict[str, Any]:
    conv, seq = _conv(req), req_int(req, "seq", minimum=0)
    user = ctx.session.user
    new, members = await ctx.state.chat.mark(user, conv, kind, seq)
    if new is not None:
        # The other members learn the position; the user's other devices too (unread sync).
        await publish(
            ctx.state,
            members,
            {"type": "receipt", "conv": conv, "user": user, "kind": kind, "seq": new},
            exclude_session=ctx.session.session_id,
        )
    return {"conv": conv, "seq": new if new is not None else seq, "changed": new is not None}


@handler("receipt.delivered")
async def receipt_delivered(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    return await _receipt(ctx, req, "delivered")


@handler("receipt.read")
async def receipt_read(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    return await _receipt(ctx, req, "read")


@handler("typing")
async def typing(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    conv = _conv(req)
    user = ctx.session.user
    members = await ctx.state.chat.typing(user, conv)
    await publish(
        ctx.state, [m for m in members if m != user], {"type": "typing", "conv": conv, "user": user}
    )
    return {}


@handler("block.add")
async def block_add(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    await ctx.state.chat.block(ctx.session.user, req.get("user"))
    return {"user": req["user"], "blocked": True}


@handler("block.remove")
async def block_remove(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    removed = await ctx.state.chat.unblock(ctx.session.user, req.get("user"))
    return {"user": req["user"], "blocked": False, "removed": removed}


@handler("block.list")
async def block_list(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    return {"users": await ctx.state.chat.blocked(ctx.session.user)}
