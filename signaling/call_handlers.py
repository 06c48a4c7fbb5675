"""The ``call.*`` request handlers and the call machine's environment on a running node.

Wires :class:`signaling.calls.CallManager` to the bus (delivery, presence), the pusher
(offline callees), the call bridge (blocks, call logs) and the hub's connect/disconnect
hooks. The state machine itself lives in signaling/calls.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from prometheus_client import Counter, Gauge

from im_bridge.bridge import CallBridge
from im_bridge.ids import dm_conv
from im_bridge.push import PushNotification
from signaling.calls import CallLog, CallManager, CallSettings
from signaling.codec import encode
from signaling.delivery import deliver_message
from signaling.dispatch import RequestContext, handler
from signaling.session import Session
from signaling.state import AppState

log = logging.getLogger(__name__)


class _LoopTimer:
    """``loop.call_later`` that runs an async callback as a tracked task."""

    def __init__(self, delay: float, callback: Callable[[], Awaitable[None]],
                 tasks: set[asyncio.Task[None]]) -> None:
        self._callback = callback
        self._tasks = tasks
        self._handle = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        task = asyncio.get_running_loop().create_task(self._run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self) -> None:
        try:
            await self._callback()
        except Exception:
            log.exception("call timer failed")

    def cancel(self) -> None:
        self._handle.cancel()


class NodeCallEnv:
    """The call machine's outside world on a talkbridge node."""

    def __init__(self, state: AppState, bridge: CallBridge) -> None:
        self.state = state
        self.bridge = bridge
        self.tasks: set[asyncio.Task[None]] = set()
        self.ended = Counter("talkbridge_calls_ended", "1:1 calls ended, by log outcome",
                             ["outcome"], registry=state.metrics.registry)

    def now(self) -> float:
        return time.time()

    def call_later(self, delay: float, callback: Callable[[], Awaitable[None]]) -> _LoopTimer:
        return _LoopTimer(delay, callback, self.tasks)

    async def send(self, user: str, device: str, event: dict[str, Any]) -> None:
        await self.state.bus.publish_device(user, device, encode(event))

    async def online_devices(self, user: str) -> Collection[str]:
        return await self.state.bus.online_devices(user)

    async def push_call(self, user: str, invite: dict[str, Any]) -> None:
        caller = str(invite["from"])
        await self.state.pusher.push(PushNotification(
            user=user, kind="call", conv=dm_conv(caller, user), sender=caller,
            preview="incoming video call" if invite["media"].get("video")
            else "incoming call",
            data={k: v for k, v in invite.items() if k != "type"},
        ))

    async def check_may_call(self, caller: str, callee: str) -> None:
        await self.bridge.check_may_call(caller, callee)

    async def write_call_log(self, entry: CallLog) -> None:
        self.ended.labels(entry.outcome).inc()
        sent = await self.bridge.record_call(
            entry.caller, entry.callee, entry.call_id, entry.media, entry.outcome,
            entry.duration_s)
        if sent.created:
            # A missed call is worth a push to an offline callee; other outcomes they saw.
            await deliver_message(self.state, sent.message, sent.members,
                                  push=entry.outcome == "missed")


def _calls(ctx: RequestContext) -> CallManager:
    calls: CallManager = ctx.state.calls
    return calls


@handler("call.invite")
async def call_invite(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    """Ring the callee's devices with an SDP offer."""
    return await _calls(ctx).invite(ctx.session.user, ctx.session.device, req)


@handler("call.ringing")
async def call_ringing(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    """A callee device rings: tell the caller."""
    return await _calls(ctx).ringing(ctx.session.user, ctx.session.device, req)


@handler("call.accept")
async def call_accept(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    """Answer with an SDP answer (the first device to answer wins)."""
    return await _calls(ctx).accept(ctx.session.user, ctx.session.device, req)


@handler("call.reject")
async def call_reject(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    """Decline (or say busy) on behalf of every callee device."""
    return await _calls(ctx).reject(ctx.session.user, ctx.session.device, req)


@handler("call.cancel")
async def call_cancel(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    """The caller gives up before an answer."""
    return await _calls(ctx).cancel(ctx.session.user, ctx.session.device, req)


@handler("call.hangup")
async def call_hangup(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    """Either side ends the call."""
    return await _calls(ctx).hangup(ctx.session.user, ctx.session.device, req)


@handler("call.ice")
async def call_ice(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    """Trickle one ICE candidate (or null: end of candidates) to the other party."""
    return await _calls(ctx).ice(ctx.session.user, ctx.session.device, req)


@handler("call.sdp")
async def call_sdp(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    """Renegotiate mid-call (adding video, ICE restart)."""
    return await _calls(ctx).sdp(ctx.session.user, ctx.session.device, req)


@handler("call.resume")
async def call_resume(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    """A device back after a disconnect takes its call up again within the grace period."""
    return await _calls(ctx).resume(ctx.session.user, ctx.session.device, req)


async def setup(state: AppState) -> None:
    """Create the node's call manager and hook it to device connects and disconnects."""
    env = NodeCallEnv(state, CallBridge(state.chat))
    calls = CallManager(env, CallSettings.from_config(state.config))
    state.calls = calls
    state.extras["call_env"] = env
    Gauge("talkbridge_calls_live", "1:1 calls ringing or connected on this node",
          registry=state.metrics.registry).set_function(calls.live_count)

    async def on_connect(session: Session) -> None:
        # The hub runs this right after auth.ok was queued: pending invites come next.
        await calls.device_connected(session.user, session.device)

    async def on_disconnect(session: Session) -> None:
        await calls.device_disconnected(session.user, session.device)

    state.hub.on_connect.append(on_connect)
    state.hub.on_disconnect.append(on_disconnect)


async def teardown(state: AppState) -> None:
    """End the calls still up (logged as failed) and stop every call timer."""
    calls: CallManager | None = state.calls
    if calls is not None:
        await calls.close()
    env: NodeCallEnv | None = state.extras.get("call_env")
    if env is not None:
        for task in list(env.tasks):
            task.cancel()
