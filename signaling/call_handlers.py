"""The ``call.*`` request handlers and the call machine's environment on a running node.

Wires :class:`signaling.calls.CallManager` to the bus (delivery, presence), the pusher
(offline callees), the call bridge (blocks, call logs) and the hub's connect/disconnect
hooks. The state machine itself lives in signaling/calls.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

from im_bridge.bridge import CallBridge
from im_bridge.errors import (
    BadRequest,
    Conflict,
    Internal,
    TalkbridgeError,
    error_from_wire,
)
from im_bridge.ids import dm_conv
from im_bridge.push import PushNotification
from signaling.calls import Call, CallLog, CallManager, CallSettings, Outcome
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

    async def call_changed(self, call: Call) -> None:
        router: CallRouter | None = self.state.extras.get("call_router")
        if router is not None:
            await router.call_changed(call)
        if call.state == "ended" and call.via == "relay":
            await self.state.rooms.end_call(call.call_id)

    async def write_call_log(self, entry: CallLog) -> None:
        self.ended.labels(entry.outcome).inc()
        sent = await self.bridge.record_call(
            entry.caller, entry.callee, entry.call_id, entry.media, entry.outcome,
            entry.duration_s)
        if sent.created:
            # A missed call is worth a push to an offline callee; other outcomes they saw.
            await deliver_message(self.state, sent.message, sent.members,
                                  push=entry.outcome == "missed")


async def _run(ctx: RequestContext, op: str, req: dict[str, Any]) -> dict[str, Any]:
    """Run ``op`` here, or on the node that holds the call when nodes share Redis."""
    user, device = ctx.session.user, ctx.session.device
    router: CallRouter | None = ctx.state.extras.get("call_router")
    if router is not None:
        return await router.route(op, user, device, req)
    return await run_local(ctx.state.calls, op, user, device, req)


@handler("call.invite")
async def call_invite(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    """Ring the callee's devices with an SDP offer."""
    return await _run(ctx, "invite", req)


@handler("call.ringing")
async def call_ringing(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    """A callee device rings: tell the caller."""
    return await _run(ctx, "ringing", req)


@handler("call.accept")
async def call_accept(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    """Answer with an SDP answer (the first device to answer wins)."""
    return await _run(ctx, "accept", req)


@handler("call.reject")
async def call_reject(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    """Decline (or say busy) on behalf of every callee device."""
    return await _run(ctx, "reject", req)


@handler("call.cancel")
async def call_cancel(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    """The caller gives up before an answer."""
    return await _run(ctx, "cancel", req)


@handler("call.hangup")
async def call_hangup(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    """Either side ends the call."""
    return await _run(ctx, "hangup", req)


@handler("call.ice")
async def call_ice(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    """Trickle one ICE candidate (or null: end of candidates) to the other party."""
    return await _run(ctx, "ice", req)


@handler("call.sdp")
async def call_sdp(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    """Renegotiate mid-call (adding video, ICE restart)."""
    return await _run(ctx, "sdp", req)


@handler("call.resume")
async def call_resume(ctx: RequestContext, req: dict[str, Any]) -> dict[str, Any]:
    """A device back after a disconnect takes its call up again within the grace period."""
    return await _run(ctx, "resume", req)



OPS = ("invite", "ringing", "accept", "reject", "cancel", "hangup", "ice", "sdp", "resume")


async def run_local(calls: CallManager, op: str, user: str, device: str,
                    req: dict[str, Any]) -> dict[str, Any]:
    """Run one ``call.<op>`` request on this node's call manager."""
    if op not in OPS:
        raise BadRequest(f"unknown call operation {op!r}")
    method: Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any]]] = getattr(calls, op)
    return await method(user, device, req)


class _NodeGone(Exception):
    """Nobody listens on a node's channel: the node is gone."""


class CallRouter:
    """Calls across nodes that share Redis: every request about a call runs on its node.

    A call lives on the node that took its invite (its timers and state are there); the
    node is recorded under ``<prefix>calls:own:<call_id>``, and the live calls of each user
    under ``<prefix>calls:user:<user>`` (call id -> node). A node that gets a request for a
    call it does not hold forwards it over pub/sub (``<prefix>calls:rpc:<node>``) and relays
    the answer; events reach the devices through the bus wherever they are connected. An
    invite to a user who is in a call on another node goes to that node, so busy and glare
    are decided where the other call is. Device connects and disconnects are passed to the
    nodes holding that user's calls (pending invites, grace periods).

    Requests from one device are forwarded in the order they came (one lock per device),
    and each node serves forwarded requests in the order they arrive.
    """

    def __init__(self, url: str, prefix: str, node_id: str, calls: CallManager,
                 rpc_timeout: float = 5.0) -> None:
        # A bounded pool that makes commands wait for a connection under load (the default
        # pool raises "too many connections" instead).
        self.redis: aioredis.Redis = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                url, max_connections=32, timeout=rpc_timeout))
        self.node = node_id
        self.calls = calls
        self.p = f"{prefix}calls:"
        self.rpc_timeout = rpc_timeout
        self.own_ttl = 24 * 3600  # a call's node record outlives any call; dropped at the end
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        # (user, device) -> (lock, requests using it); dropped when unused
        self._device_locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}
        # call id -> the other node holding it (it never moves): saves a Redis round trip
        # per forwarded request. Bounded; oldest first out.
        self._owners: OrderedDict[str, str] = OrderedDict()
        self.max_cached_owners = 50_000
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    def _channel(self, node: str) -> str:
        return f"{self.p}rpc:{node}"

    async def start(self) -> None:
        """Start listening on this node's channel (waits a moment for the subscription)."""
        self._listener = asyncio.get_running_loop().create_task(self._supervise())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), 3.0)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def _supervise(self) -> None:
        """Keep the subscription up across Redis outages (the bus resyncs the clients)."""
        delay = 0.1
        while True:
            pubsub: Any = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel(self.node))
                self._subscribed.set()
                delay = 0.1
                await self._listen(pubsub)
            except (RedisError, OSError) as exc:
                log.warning("call routing lost Redis (%s); retrying", exc)
            finally:
                self._subscribed.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    # --- routing requests ------------------------------------------------------------------

    async def route(self, op: str, user: str, device: str,
                    req: dict[str, Any]) -> dict[str, Any]:
        """Answer ``call.<op>`` from ``user``/``device``, wherever the call lives."""
        call_id = req.get("call_id")
        if not isinstance(call_id, str) or self.calls.get(call_id) is not None:
            return await run_local(self.calls, op, user, device, req)
        key = (user, device)
        lock, users = self._device_locks.get(key, (asyncio.Lock(), 0))
        self._device_locks[key] = (lock, users + 1)
        try:
            async with lock:
                # Under the device's lock until the request is published: its next request
                # cannot overtake it.
                try:
                    node = await self._node_for(op, call_id, req)
                except RedisError as exc:
                    if op != "invite":
                        raise Internal("calls on other nodes are unreachable now") from exc
                    # Without Redis an invite is decided here (calls within this node work).
                    log.warning("call routing without Redis: %s", exc)
                    node = None
                if node is None or node == self.node:
                    fut = None
                else:
                    try:
                        fut = await self._send_request(node, op, user, device, req)
                    except _NodeGone:
                        ended = await self._node_gone(node, op, call_id, req, user)
                        if ended is not None:
                            return ended
                        fut = None
        finally:
            lock, users = self._device_locks[key]
            if users == 1:
                del self._device_locks[key]  # nobody else queued: do not keep it
            else:
                self._device_locks[key] = (lock, users - 1)
        if fut is None:
            return await self._run_here(op, user, device, req)
        try:
            answer = await asyncio.wait_for(fut, self.rpc_timeout)
        except TimeoutError:
            raise Internal("the node holding this call did not answer") from None
        if answer.get("ok"):
            data: dict[str, Any] = answer.get("data") or {}
            return data
        raise error_from_wire(answer.get("error") or {})

    async def _node_for(self, op: str, call_id: str, req: dict[str, Any]) -> str | None:
        """The node to run this request on (None: here)."""
        cached = self._owners.get(call_id)
        if cached is not None:
            return cached
        owner = await self.redis.get(self.p + "own:" + call_id)
        if owner is not None:
            return self._remember(call_id, _s(owner))
        if op != "invite":
            return None  # nobody holds it: the local answer is not_found
        callee = (req.get("to") or {}).get("user") if isinstance(req.get("to"), dict) else None
        if isinstance(callee, str):
            nodes = {_s(n) for n in await self.redis.hvals(self.p + "user:" + callee)}
            nodes.discard(self.node)
            if nodes:
                # Decided where the callee's call is; that node claims the id.
                return self._remember(call_id, sorted(nodes)[0])
        # Claim the id for this node; a lost race means another node has it.
        if await self.redis.set(self.p + "own:" + call_id, self.node, nx=True,
                                ex=self.own_ttl):
            return None
        owner = await self.redis.get(self.p + "own:" + call_id)
        return self._remember(call_id, _s(owner)) if owner is not None else None

    def _remember(self, call_id: str, node: str) -> str:
        if node != self.node:
            self._owners[call_id] = node
            while len(self._owners) > self.max_cached_owners:
                self._owners.popitem(last=False)
        return node

    async def _send_request(self, node: str, op: str, user: str, device: str,
                            req: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        # The answer comes on our own channel: be subscribed before asking.
        try:
            await asyncio.wait_for(self._subscribed.wait(), self.rpc_timeout)
        except TimeoutError:
            raise Internal("call routing is not connected to Redis") from None
        rid = f"{self.node}:{next(self._ids)}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        fut.add_done_callback(lambda _: self._waiting.pop(rid, None))
        message = encode({"k": "req", "id": rid, "reply": self.node, "op": op, "user": user,
                          "device": device, "req": req})
        if not await self._publish(node, message):
            fut.cancel()
            raise _NodeGone(node)
        return fut

    async def _node_gone(self, node: str, op: str, call_id: str,
                         req: dict[str, Any], user: str) -> dict[str, Any] | None:
        """``node`` does not listen any more (it died): forget what it held, then go on.

        Its calls' state is lost, but not their media (peer to peer). A hangup, cancel or
        reject of one of them ends it here: the other party is told and the call is logged.
        An invite that was to be decided there is decided here (None: run it locally); other
        requests about one of its calls are told it failed.
        """
        log.warning("node %s holds calls but does not listen: forgetting them", node)
        for cid in [c for c, n in self._owners.items() if n == node]:
            del self._owners[cid]
        own = self.p + "own:" + call_id
        if _s(await self.redis.get(own) or b"") == node:
            await self.redis.delete(own)
        if op in ("hangup", "cancel", "reject"):
            ended = await self._end_orphan(call_id, op, user, req)
            if ended is not None:
                return ended
        callee = (req.get("to") or {}).get("user") if isinstance(req.get("to"), dict) else None
        if op != "invite" or not isinstance(callee, str):
            raise Conflict("the call was lost with the node that held it", reason="failed")
        key = self.p + "user:" + callee
        stale = [f for f, n in (await self.redis.hgetall(key)).items() if _s(n) == node]
        if stale:
            await self.redis.hdel(key, *stale)
        await self.redis.set(own, self.node, nx=True, ex=self.own_ttl)
        return None

    async def _run_here(self, op: str, user: str, device: str,
                        req: dict[str, Any]) -> dict[str, Any]:
        """Run a request on this node; a hangup/cancel/reject of a call no node holds any
        more (its node stopped or died and left its record) ends it from the record."""
        call_id = req.get("call_id")
        if (op in ("hangup", "cancel", "reject") and isinstance(call_id, str)
                and self.calls.get(call_id) is None):
            ended = await self._end_orphan(call_id, op, user, req)
            if ended is not None:
                return ended
        return await run_local(self.calls, op, user, device, req)

    async def release(self, calls: list[Call]) -> None:
        """This node stops: its connected calls go on, held by no node (ended from their
        records by whichever node gets their hangup)."""
        if calls:
            await self.redis.delete(*(self.p + "own:" + c.call_id for c in calls))

    async def _end_orphan(self, call_id: str, op: str, user: str,
                          req: dict[str, Any]) -> dict[str, Any] | None:
        """End a call whose node died, from its record: tell the other party, log it."""
        raw = await self.redis.getdel(self.p + "rec:" + call_id)
        if raw is None:
            return None
        rec = json.loads(raw)
        if user not in (rec["caller"], rec["callee"]):
            await self.redis.set(self.p + "rec:" + call_id, raw, ex=self.own_ttl)
            return None  # not a party: it learns nothing
        answered = rec["answered_at"] is not None
        if op == "reject":
            reason = "busy" if req.get("reason") == "busy" else "declined"
        else:
            reason = "hangup" if answered else "cancelled"
        outcome: Outcome = "completed" if answered else (
            "declined" if reason == "declined" else "busy" if reason == "busy" else "cancelled")
        other = rec["callee"] if user == rec["caller"] else rec["caller"]
        other_device = rec["callee_device"] if other == rec["callee"] else rec["caller_device"]
        event = {"type": "call.ended", "call_id": call_id, "reason": reason}
        env = self.calls.env
        if other_device is not None:
            await env.send(other, other_device, event)
        else:  # still ringing: every device of the callee
            for device in await env.online_devices(other):
                await env.send(other, device, event)
        now = env.now()
        duration = int(now - rec["answered_at"]) if answered else 0
        await env.write_call_log(CallLog(
            call_id=call_id, caller=rec["caller"], callee=rec["callee"], media=rec["media"],
            outcome=outcome, duration_s=duration, started_at=rec["created_at"], ended_at=now))
        for party in (rec["caller"], rec["callee"]):
            await self.redis.hdel(self.p + "user:" + party, call_id)
        return {"call_id": call_id, "state": "ended", "reason": reason}

    async def _publish(self, node: str, message: bytes) -> bool:
        """Publish to ``node``'s channel, retrying while nobody listens (it is resubscribing
        after a Redis outage); False when it never did within ``rpc_timeout``."""
        deadline = time.monotonic() + self.rpc_timeout
        while True:
            if await self.redis.publish(self._channel(node), message) > 0:
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)

    # --- serving other nodes ---------------------------------------------------------------

    async def _listen(self, pubsub: Any) -> None:
        async for msg in pubsub.listen():
            try:
                body = json.loads(msg["data"])
            except ValueError:
                continue
            kind = body.get("k")
            if kind == "res":
                fut = self._waiting.get(str(body.get("id")))
                if fut is not None and not fut.done():
                    fut.set_result(body)
            elif kind in ("req", "hook"):
                # Tasks start in arrival order, and the call manager's lock is FIFO.
                task = asyncio.get_running_loop().create_task(self._serve(body))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _serve(self, body: dict[str, Any]) -> None:
        user, device = str(body.get("user")), str(body.get("device"))
        if body["k"] == "hook":
            try:
                if body.get("op") == "connected":
                    await self.calls.device_connected(user, device)
                else:
                    await self.calls.device_disconnected(user, device)
            except Exception:
                log.exception("device %s of a call's user on another node", body.get("op"))
            return
        answer: dict[str, Any] = {"k": "res", "id": body.get("id")}
        try:
            req = body.get("req")
            if body.get("op") == "invite" and isinstance(req, dict):
                call_id = req.get("call_id")
                if isinstance(call_id, str):
                    await self.redis.set(self.p + "own:" + call_id, self.node, nx=True,
                                         ex=self.own_ttl)
            data = await self._run_here(str(body.get("op")), user, device,
                                        req if isinstance(req, dict) else {})
            answer.update(ok=True, data=data)
        except TalkbridgeError as err:
            answer.update(ok=False, error=err.to_wire())
        except Exception:
            log.exception("forwarded call request failed")
            answer.update(ok=False, error=Internal("internal error").to_wire())
        try:
            delivered = await self._publish(str(body.get("reply")), encode(answer))
        except RedisError as exc:
            log.warning("answer to a forwarded call request not sent: %s", exc)
            return
        if not delivered:
            log.warning("node %s did not take the answer to a forwarded call request",
                        body.get("reply"))

    # --- keeping the registry --------------------------------------------------------------

    async def call_changed(self, call: Call) -> None:
        """Record a call that rings (where it lives) or forget one that ended."""
        keys = [self.p + "user:" + call.caller, self.p + "user:" + call.callee]
        record = self.p + "rec:" + call.call_id
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                if call.state == "ended":
                    pipe.hdel(key, call.call_id)
                else:
                    pipe.hset(key, call.call_id, self.node)
                    pipe.expire(key, self.own_ttl)
            if call.state == "ended":
                # Late requests still reach the node that answers them with conflict.
                pipe.expire(self.p + "own:" + call.call_id, 300)
                pipe.delete(record)
            else:
                # Who the parties are, so that another node can end the call for the other
                # party if this node dies (see _end_orphan).
                pipe.set(record, encode({
                    "caller": call.caller, "caller_device": call.caller_device,
                    "callee": call.callee, "callee_device": call.callee_device,
                    "media": call.media, "created_at": call.created_at,
                    "answered_at": call.answered_at}), ex=self.own_ttl)
            await pipe.execute()

    async def device_event(self, op: str, user: str, device: str) -> None:
        """Tell the nodes holding ``user``'s calls that one of their devices came or went."""
        nodes = {_s(n) for n in await self.redis.hvals(self.p + "user:" + user)}
        nodes.discard(self.node)
        for node in sorted(nodes):
            await self.redis.publish(self._channel(node), encode({
                "k": "hook", "op": op, "user": user, "device": device}))


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


async def setup(state: AppState) -> None:
    """Create the node's call manager and hook it to device connects and disconnects."""
    env = NodeCallEnv(state, CallBridge(state.chat))
    calls = CallManager(env, CallSettings.from_config(state.config))
    state.calls = calls
    state.extras["call_env"] = env
    Gauge("talkbridge_calls_live", "1:1 calls ringing or connected on this node",
          registry=state.metrics.registry).set_function(calls.live_count)

    router: CallRouter | None = None
    if state.config.redis:
        from signaling.redis_bus import parse_redis_url

        url, bus_settings = parse_redis_url(state.config.redis)
        router = CallRouter(url, bus_settings.prefix, state.config.node_id, calls)
        await router.start()
        state.extras["call_router"] = router

    async def on_connect(session: Session) -> None:
        # The hub runs this right after auth.ok was queued: pending invites come next.
        await calls.device_connected(session.user, session.device)
        if router is not None:
            await router.device_event("connected", session.user, session.device)

    async def on_disconnect(session: Session) -> None:
        await calls.device_disconnected(session.user, session.device)
        if router is not None:
            await router.device_event("disconnected", session.user, session.device)

    state.hub.on_connect.append(on_connect)
    state.hub.on_disconnect.append(on_disconnect)


async def teardown(state: AppState) -> None:
    """Stop every call timer; end the calls still up (logged as failed), except, with
    several nodes, connected calls: they go on and any node can end them later."""
    router: CallRouter | None = state.extras.get("call_router")
    kept = await state.calls.close(keep_connected=router is not None)
    if router is not None:
        try:
            await router.release(kept)
        except RedisError as exc:
            log.warning("releasing %d calls at shutdown failed: %s", len(kept), exc)
        await router.close()
    env: NodeCallEnv | None = state.extras.get("call_env")
    if env is not None:
        for task in list(env.tasks):
            task.cancel()
