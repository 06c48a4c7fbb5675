"""Handlers of the messaging frames: msg.*, conv.*, receipt.*, typing, block.*."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from im_bridge.errors import BadRequest
from im_bridge.ids import parse_conv
from im_bridge.models import Message
from im_bridge.store import group_ops
from signaling.codec import opt_int, opt_str, req_bool, req_int, req_str, str_list
from signaling.delivery import deliver_message_now, publish
from signaling.dispatch import Reply, RequestContext, direct_handler, handler
from signaling.state import AppState

log = logging.getLogger(__name__)

RECEIPT_WINDOW_S = 1.0
# How far back (in seqs) a coalesced receipt looks for the senders it concerns.
RECEIPT_LOOKBACK = 1000


class ReceiptCoalescer:
    """Group receipts, coalesced: at most one ``receipt`` event per conversation per kind
    per window to each sender of a message the receipts cover (no members x members storm).

    The event lists every reader's new position: ``{type: "receipt", conv, kind,
    receipts: [{user, seq}]}`` (with ``user`` and ``seq`` also at top level when there is
    exactly one, the shape of a 1:1 receipt).
    """

    def __init__(self, state: AppState, window: float = RECEIPT_WINDOW_S) -> None:
        self.state = state
        self.window = window
        self._pending: dict[str, dict[tuple[str, str], int]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, conv: str, user: str, kind: str, seq: int) -> None:
        pending = self._pending.get(conv)
        if pending is None:
            pending = self._pending[conv] = {}
            loop = asyncio.get_running_loop()
            self._timers[conv] = loop.call_later(self.window, self._due, conv)
        if pending.get((kind, user), 0) < seq:
            pending[(kind, user)] = seq

    def _due(self, conv: str) -> None:
        self._timers.pop(conv, None)
        task = asyncio.get_running_loop().create_task(self.flush(conv))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self, conv: str) -> None:
        """Send what is pending for ``conv`` now."""
        pending = self._pending.pop(conv, None)
        if not pending:
            return
        by_kind: dict[str, dict[str, int]] = {}
        for (kind, user), seq in pending.items():
            by_kind.setdefault(kind, {})[user] = seq
        try:
            members = set(await self.state.chat.members(conv))
            for kind, entries in by_kind.items():
                hi = max(entries.values())
                senders = await self.state.store.read(
                    group_ops.senders_between(conv, max(0, hi - RECEIPT_LOOKBACK), hi)
                )
                for sender, first in senders.items():
                    if sender not in members:
                        continue
                    rec = [
                        {"user": u, "seq": s}
                        for u, s in entries.items()
                        if u != sender and s >= first
                    ]
                    if not rec:
                        continue
                    ev: dict[str, Any] = {
                        "type": "receipt",
                        "conv": conv,
                        "kind": kind,
                        "receipts": rec,
                    }
                    if len(rec) == 1:
                        ev.update(rec[0])
                    await publish(self.state, [sender], ev)
        except Exception:
            log.exception("coalesced receipts of %s failed", conv)

    async def close(self) -> None:
        """Send everything pending (at shutdown)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for conv in list(self._pending):
            await self.flush(conv)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def setup(state: AppState) -> None:
    """Attach the receipt coalescer."""
    state.extras["receipts"] = ReceiptCoalescer(state)


async def teardown(state: AppState) -> None:
    coalescer: ReceiptCoalescer | None = state.extras.get("receipts")
    if coalescer is not None:
        await coalescer.close()


def _conv(req: dict[str, Any]) -> str:
    conv = req_str(req, "conv", max_len=200)
    parse_conv(conv)
    return conv


@direct_handler("msg.send")
def msg_send(ctx: RequestContext, req: dict[str, Any], reply: Reply) -> None:
    """Check and queue the message now; reply and fan out from its commit (see dispatch)."""
    s, state = ctx.session, ctx.state
    client_msg_id = opt_str(req, "client_msg_id", max_len=128)
    kind = req.get("kind", "text")
    if not isinstance(kind, str):
        raise BadRequest("'kind' must be a string", field="kind")
    send = state.chat.prepare_send(
        s.user,
        s.device,
        req.get("to"),
        client_msg_id,
        kind,
        req.get("body"),
        str_list(req, "mentions", max_items=500),
    )

    def stored(result: Any) -> None:
        if isinstance(result, BaseException):
            reply.fail(result)
            return
        msg, created = result
        try:
            members = state.chat.members_now(msg.conv)
            if members is None:  # a group whose member list is not cached: read it first
                state.spawn(_sent_after_read(ctx, reply, msg, created))
            else:
                _sent(ctx, reply, msg, created, members)
        except Exception as exc:  # never leave the request without its reply
            reply.fail(exc)

    state.chat.send_nowait(send, stored)


async def _sent_after_read(
    ctx: RequestContext, reply: Reply, msg: Message, created: bool
) -> None:
    try:
        _sent(ctx, reply, msg, created, await ctx.state.chat.members(msg.conv))
    except Exception as exc:
        reply.fail(exc)


def _sent(
    ctx: RequestContext, reply: Reply, msg: Message, created: bool, members: list[str]
) -> None:
    """A committed send: ``msg.new`` to the members' devices, the reply, then any push.

    A retry (created=False) is delivered again without a push: the first attempt may have
    died between its commit and its fan-out (a node crash); clients keep one copy per
    (conv, seq).
    """
    state = ctx.state
    if created:
        state.metrics.message_stored(msg.kind)
    pushing = deliver_message_now(
        state, msg, members, exclude_session=ctx.session.session_id, push=created
    )
    reply.ok({"conv": msg.conv, "seq": msg.seq, "msg_id": msg.msg_id, "ts": msg.ts})
    if pushing is not None:
        state.spawn(pushing)


@handler("msg.history")
async def msg_history(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    conv = _conv(req)
    limit = opt_int(req, "limit", minimum=1, maximum=100) or 50
    msgs, has_more = await ctx.state.chat.history(
        ctx.session.user, conv, opt_int(req, "before_seq"), opt_int(req, "after_seq"), limit
    )
    return {"messages": [m.to_wire() for m in msgs], "has_more": has_more}


@handler("msg.changes")
async def msg_changes(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    """The conversation's messages changed (recalled) after ``after_change``, in change
    order: how a device that was offline learns of changes to messages it already has."""
    conv = _conv(req)
    after = req_int(req, "after_change", minimum=0)
    limit = opt_int(req, "limit", minimum=1, maximum=100) or 50
    msgs, has_more = await ctx.state.chat.changes(ctx.session.user, conv, after, limit)
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
    msg, members = await ctx.state.chat.recall(ctx.session.user, conv, seq)
    await publish(
        ctx.state,
        members,
        {
            "type": "msg.recalled",
            "conv": conv,
            "seq": seq,
            "by": ctx.session.user,
            "change_seq": msg.change_seq,
        },
    )
    return {"conv": conv, "seq": seq}


async def _receipt(ctx: RequestContext, req: dict[str, Any], kind: str) -> dict[str, Any]:
    conv, seq = _conv(req), req_int(req, "seq", minimum=0)
    user = ctx.session.user
    marked = await ctx.state.chat.mark(user, conv, kind, seq)
    new = marked.seq
    if marked.changed and conv.startswith("g:"):
        # The user's other devices learn it at once (unread counts); senders get it coalesced.
        await publish(
            ctx.state,
            [user],
            {"type": "receipt", "conv": conv, "user": user, "kind": kind, "seq": new},
            exclude_session=ctx.session.session_id,
        )
        coalescer: ReceiptCoalescer = ctx.state.extras["receipts"]
        coalescer.add(conv, user, kind, new)
    elif marked.changed:
        # The other member learns the position; the user's other devices too (unread sync).
        await publish(
            ctx.state,
            marked.members,
            {"type": "receipt", "conv": conv, "user": user, "kind": kind, "seq": new},
            exclude_session=ctx.session.session_id,
        )
    return {"conv": conv, "seq": new, "changed": marked.changed}


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
