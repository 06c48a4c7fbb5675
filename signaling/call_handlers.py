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
import random
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

from im_bridge.bridge import CallBridge
from im_bridge.errors import (
    BadRequest,
    Conflict,
    Internal,
    NotFound,
    TalkbridgeError,
    error_from_wire,
)
from im_bridge.ids import dm_conv
from im_bridge.push import PushNotification
from signaling.calls import Call, CallLog, CallManager, CallSettings
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


@dataclass
class _Sent:
    """A request published to another node, and the future its answer sets."""

    node: str
    message: bytes
    call_id: str | None
    answer: asyncio.Future[dict[str, Any]]


class _Moved(Exception):
    """Another node holds the call now (``node``); None: no node does, take it where you are."""

    def __init__(self, node: str | None) -> None:
        super().__init__(node)
        self.node = node


# KEYS: own:<call>, rec:<call>. ARGV: this node, ttl, the node it may take the call from, "1"
# when a call no node holds may be taken too. Takes the call (its owner becomes this node)
# when the record exists and the owner is as expected, in one step, so that of several
# nodes trying only one takes it. Returns {owner, record} ({owner or "", ""}: not taken).
_TAKE = """
local rec = redis.call('GET', KEYS[2])
local cur = redis.call('GET', KEYS[1])
if rec and (cur == ARGV[1] or cur == ARGV[3] or (not cur and ARGV[4] == '1')) then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return {ARGV[1], rec}
end
return {cur or '', ''}
"""

# KEYS: own:<call>, rec:<call>. ARGV: this node, "keep" | "end". A stopping node settles a
# call that no node took, unless one took it meanwhile (its id is returned; "" otherwise):
# a connected call is left to whichever node takes it over later ("keep": it has no owner
# now), a ringing one ends on this node ("end": without its record nobody takes it any more).
_SETTLE = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return cur end
if ARGV[2] == 'keep' then redis.call('DEL', KEYS[1]) else redis.call('DEL', KEYS[2]) end
return ''
"""


class CallRouter:
    """Calls across nodes that share Redis: every request about a call runs on its node.

    A call lives on one node at a time (its timers and state are there): the node that took
    its invite, until that node stops or dies. The node is recorded under
    ``<prefix>calls:own:<call_id>``, the call itself (parties, state, deadline) under
    ``<prefix>calls:rec:<call_id>``, and the live calls of each user under
    ``<prefix>calls:user:<user>`` (call id -> node). A node that gets a request for a call it
    does not hold forwards it over pub/sub (``<prefix>calls:rpc:<node>``) and relays the
    answer; events reach the devices through the bus wherever they are connected. An invite
    to a user who is in a call on another node goes to that node, so busy and glare are
    decided where the other call is. Device connects and disconnects are passed to the nodes
    holding that user's calls (pending invites, grace periods).

    Calls move between nodes in two ways, both through those keys. A stopping node hands its
    live calls to a live node (:meth:`hand_over`), which takes them over from their records
    and becomes their owner; requests that reached the old node meanwhile are answered
    "moved" and sent after them. A call whose node died, or stopped with no node to take it,
    is taken over from its record by the first node that gets a request about it from one of
    its parties (:meth:`_take_over`).

    Requests from one device are forwarded in the order they came (one lock per device),
    and each node serves forwarded requests in the order they arrive. A request that a node
    took with it when it died runs on the asking node once that is noticed (see _answer):
    a later request of the same device may have overtaken it meanwhile.
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
        self.handover_timeout = max(rpc_timeout, 10.0)  # taking many calls over takes a while
        self.max_hops = 4  # a request follows a call that moves at most this often
        self.own_ttl = 24 * 3600  # a call's node record outlives any call; dropped at the end
        # Set when the node stops: it takes no call over and hands over what it holds.
        self.stopping = False
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        # Ids of the requests this node served lately: one sent again (its node did not
        # seem to listen any more, see _answer) is not served twice. Bounded.
        self._served: OrderedDict[str, None] = OrderedDict()
        self.max_served_ids = 10_000
        # (user, device) -> (lock, requests using it); dropped when unused
        self._device_locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}
        # call id -> the other node holding it: saves a Redis round trip per forwarded
        # request. Dropped when the call moves (the old node answers "moved") or the node
        # goes away. Bounded; oldest first out.
        self._owners: OrderedDict[str, str] = OrderedDict()
        self.max_cached_owners = 50_000
        # call id -> (node, caller, callee): calls this stopping node handed over
        self._moved: dict[str, tuple[str, str, str]] = {}
        self._take_lock = asyncio.Lock()  # one take-over at a time on this node
        self._take = self.redis.register_script(_TAKE)
        self._settle = self.redis.register_script(_SETTLE)
        # Request ids: unique across restarts of a node too (the serving nodes remember the
        # ids they served, see _listen).
        self._rid_prefix = f"{node_id}:{secrets.token_hex(4)}:"
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
            async with asyncio.timeout(3.0):
                await self._subscribed.wait()

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
        here = False
        for _ in range(self.max_hops):
            try:
                return await self._route_once(op, user, device, req, call_id, here)
            except _Moved as moved:
                # The call changed nodes (its node stopped and handed it over) meanwhile.
                self._owners.pop(call_id, None)
                here = moved.node in (None, self.node)
                if moved.node is not None:
                    self._remember(call_id, moved.node)
        raise Internal("the call kept moving between nodes; try again")

    async def _route_once(self, op: str, user: str, device: str, req: dict[str, Any],
                          call_id: str, here: bool) -> dict[str, Any]:
        """Send the request to the call's node, or run it here (``here``: told to)."""
        sent: _Sent | None = None
        if here:
            if op == "invite":
                await self.redis.set(self.p + "own:" + call_id, self.node, nx=True,
                                     ex=self.own_ttl)
        else:
            key = (user, device)
            lock, users = self._device_locks.get(key, (asyncio.Lock(), 0))
            self._device_locks[key] = (lock, users + 1)
            try:
                async with lock:
                    # Under the device's lock until the request is published: its next
                    # request cannot overtake it.
                    try:
                        node = await self._node_for(op, call_id, req)
                    except RedisError as exc:
                        if op != "invite":
                            raise Internal("calls on other nodes are unreachable now") from exc
                        # Without Redis an invite is decided here (calls within this node work).
                        log.warning("call routing without Redis: %s", exc)
                        node = None
                    if node is not None and node != self.node:
                        try:
                            sent = await self._send(node, {
                                "k": "req", "op": op, "user": user, "device": device,
                                "req": req}, call_id)
                        except _NodeGone:
                            await self._node_gone(node, op, call_id, req, user)
            finally:
                lock, users = self._device_locks[key]
                if users == 1:
                    del self._device_locks[key]  # nobody else queued: do not keep it
                else:
                    self._device_locks[key] = (lock, users - 1)
        if sent is None:
            return await self._run_here(op, user, device, req)
        try:
            answer = await self._answer(sent, self.rpc_timeout)
        except TimeoutError:
            raise Internal("the node holding this call did not answer") from None
        except _NodeGone:
            # It died with the request (Redis still counted it listening when it was sent).
            await self._node_gone(sent.node, op, call_id, req, user)
            return await self._run_here(op, user, device, req)
        if "moved" in answer:
            raise _Moved(str(answer["moved"]) or None)
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
            return None  # nobody holds it: taken over here if it has a record, else not_found
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

    async def _send(self, node: str, body: dict[str, Any],
                    call_id: str | None = None) -> _Sent:
        """Publish a request to ``node``; its answer comes through :meth:`_answer`."""
        # The answer comes on our own channel: be subscribed before asking.
        try:
            async with asyncio.timeout(self.rpc_timeout):
                await self._subscribed.wait()
        except TimeoutError:
            raise Internal("call routing is not connected to Redis") from None
        rid = f"{self._rid_prefix}{next(self._ids)}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        fut.add_done_callback(lambda _: self._waiting.pop(rid, None))
        sent = _Sent(node, encode({**body, "id": rid, "reply": self.node}), call_id, fut)
        try:
            delivered = await self._publish(node, sent.message, call_id)
        except BaseException:
            fut.cancel()
            raise
        if not delivered:
            fut.cancel()
            raise _NodeGone(node)
        return sent

    async def _answer(self, sent: _Sent, timeout: float) -> dict[str, Any]:
        """The answer to a request sent to another node; TimeoutError after ``timeout``.

        Redis drops a dead node's subscription some ms after the node died, and a request
        published meanwhile is lost with it. So while an answer takes long, look now and
        then whether the node still listens; when it does not, publish the request again
        as :meth:`_send` does (a node serves each request id once): _NodeGone when nobody
        listens, or _Moved when another node holds the call by now.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        probe = 0.1
        try:
            while True:
                await asyncio.wait([sent.answer], timeout=max(0.0, min(
                    probe, deadline - loop.time())))
                if sent.answer.done():
                    return sent.answer.result()
                if loop.time() >= deadline:
                    raise TimeoutError
                probe = min(probe * 2, 1.0)
                try:
                    listening = await self.redis.pubsub_numsub(self._channel(sent.node))
                except RedisError:
                    continue  # Redis is away: the node may be fine, wait on
                if sent.answer.done() or listening[0][1] > 0:
                    continue
                if not await self._publish(sent.node, sent.message, sent.call_id):
                    raise _NodeGone(sent.node)
                deadline = loop.time() + timeout
        finally:
            sent.answer.cancel()  # nothing when answered; else nobody waits any more

    async def _node_gone(self, node: str, op: str, call_id: str,
                         req: dict[str, Any], user: str) -> None:
        """``node`` does not listen any more (it died): forget what was cached of it, and
        let the request run here. A call of that node is taken over from its record first
        (see _take_over); an invite that was to be decided there is decided here."""
        log.warning("node %s holds calls but does not listen", node)
        for cid in [c for c, n in self._owners.items() if n == node]:
            del self._owners[cid]
        if op != "invite":
            await self._take_over(call_id, user, node)
            return
        own = self.p + "own:" + call_id
        if _s(await self.redis.get(own) or b"") == node:
            await self.redis.delete(own)
        callee = (req.get("to") or {}).get("user") if isinstance(req.get("to"), dict) else None
        if isinstance(callee, str):
            # The callee's calls there are not taken over by an invite: they can be called.
            key = self.p + "user:" + callee
            stale = [f for f, n in (await self.redis.hgetall(key)).items() if _s(n) == node]
            if stale:
                await self.redis.hdel(key, *stale)
        await self.redis.set(own, self.node, nx=True, ex=self.own_ttl)

    async def _run_here(self, op: str, user: str, device: str,
                        req: dict[str, Any]) -> dict[str, Any]:
        """Run a request on this node. A call no node holds any more is taken over first;
        a request for a call this node handed over is sent after it (_Moved)."""
        call_id = req.get("call_id")
        if isinstance(call_id, str) and self.calls.get(call_id) is None:
            if op != "invite":
                await self._take_over(call_id, user, self.node)
            elif self.stopping:
                # No new call on a stopping node: decided where the callee's call went, or
                # by the asking node.
                callee = req.get("to", {}).get("user") if isinstance(req.get("to"),
                                                                      dict) else None
                nodes = sorted(n for n, a, b in self._moved.values() if callee in (a, b))
                raise _Moved(nodes[0] if nodes else None)
        try:
            return await run_local(self.calls, op, user, device, req)
        except NotFound:
            moved = self._moved.get(call_id) if isinstance(call_id, str) else None
            if moved is not None:  # it waited for the hand-over and missed the call
                raise _Moved(moved[0]) from None
            raise

    async def _take_over(self, call_id: str, user: str, expected: str) -> bool:
        """Hold here a call that no node holds (its node died, or stopped with none to take
        it), from its Redis record; True when it is here now.

        Only a request of one of its parties moves it: anyone else learns nothing. The
        recorded owner must be ``expected``, this node or none; of several nodes trying at
        once one takes it and the others are sent there (_Moved). A stopping node takes
        nothing: it sends the request to the owner, or back to the asking node to take it.
        """
        own, rec = self.p + "own:" + call_id, self.p + "rec:" + call_id
        async with self._take_lock:
            if self.calls.get(call_id) is not None:
                return True
            if self.stopping:
                owner = await self.redis.get(own)
                if owner is not None and _s(owner) != self.node:
                    raise _Moved(_s(owner))
                if await self.redis.exists(rec):
                    raise _Moved(None)
                return False
            raw = await self.redis.get(rec)
            if raw is None or user not in _parties(raw):
                return False
            owner, raw = await self._take(keys=[own, rec],
                                          args=[self.node, self.own_ttl, expected, "1"])
            if not raw:
                if owner and _s(owner) != self.node:
                    raise _Moved(_s(owner))
                return False
            snap = json.loads(raw)
            await self._mark_away(snap)
            if await self.calls.adopt([snap]):
                log.info("took over call %s (its node %s is gone)", call_id, expected)
            return True

    async def _mark_away(self, snap: dict[str, Any]) -> None:
        """Before a take-over on request: devices that were away get their grace period
        afresh (nobody watched them meanwhile), and a party's device that is not connected
        now (it was on the dead node) is away from now, as after any disconnect."""
        env = self.calls.env
        now = env.now()
        away = {(a["user"], a["device"]): a for a in snap.get("away") or ()}
        for entry in away.values():
            entry["since"] = now
        devices = [(snap["caller"], snap["caller_device"])]
        if snap.get("callee_device") is not None:
            devices.append((snap["callee"], snap["callee_device"]))
        for user, device in devices:
            if (user, device) not in away and device not in await env.online_devices(user):
                away[(user, device)] = {"user": user, "device": device, "since": now,
                                        "held": []}
        snap["away"] = list(away.values())

    async def _publish(self, node: str, message: bytes, call_id: str | None = None) -> bool:
        """Publish to ``node``'s channel, retrying while nobody listens (it is resubscribing
        after a Redis outage); False when it never did within ``rpc_timeout``. A request
        about a call that another node holds by now follows it (_Moved)."""
        deadline = time.monotonic() + self.rpc_timeout
        check_owner = call_id is not None
        while True:
            if await self.redis.publish(self._channel(node), message) > 0:
                return True
            if check_owner:
                # A node that stopped handed its calls over: no need to wait for it.
                check_owner = False
                owner = await self.redis.get(self.p + "own:" + str(call_id))
                if owner is not None and _s(owner) != node:
                    raise _Moved(_s(owner))
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)

    # --- stopping: handing calls over ------------------------------------------------------

    async def hand_over(self, snapshots: list[dict[str, Any]]) -> set[str]:
        """This node stops: have live nodes take its live calls over; returns the ids taken.

        CallManager.close calls this with the snapshots of the node's live calls, and no
        request changes them until it returns. What no node takes is settled (see
        _SETTLE): connected calls are left for any node to take over later, ringing ones
        end here.
        """
        self.stopping = True
        if not snapshots:
            return set()
        by_id = {str(s["call_id"]): s for s in snapshots}
        try:
            # The full snapshots (buffered candidates, held events) go into the records: the
            # taking node reads them there, and so does one that takes a call over later.
            async with self.redis.pipeline(transaction=False) as pipe:
                for cid, snap in by_id.items():
                    pipe.set(self.p + "rec:" + cid, encode(snap), ex=self.own_ttl)
                await pipe.execute()
            nodes = await self._live_nodes()
        except RedisError as exc:
            log.warning("cannot hand %d calls over without Redis: %s", len(by_id), exc)
            return set()
        waiting = set(by_id)
        for node in nodes:
            if not waiting:
                break
            try:
                sent = await self._send(node, {"k": "adopt", "from": self.node,
                                               "ids": sorted(waiting)})
                answer = await self._answer(sent, self.handover_timeout)
            except (_NodeGone, TimeoutError, RedisError, Internal) as exc:
                log.warning("node %s did not take calls over: %r", node, exc)
                continue
            if not answer.get("ok"):
                continue
            for cid in (answer.get("data") or {}).get("adopted") or ():
                if cid in waiting:
                    waiting.discard(cid)
                    self._moved[cid] = (node, by_id[cid]["caller"], by_id[cid]["callee"])
        for cid in sorted(waiting):
            snap = by_id[cid]
            mode = "keep" if snap["state"] == "connected" else "end"
            try:
                owner = _s(await self._settle(keys=[self.p + "own:" + cid,
                                                    self.p + "rec:" + cid],
                                              args=[self.node, mode]))
            except RedisError as exc:
                log.warning("call %s not settled at stop: %s", cid, exc)
                continue
            if owner:  # a node that did not answer in time took it after all
                self._moved[cid] = (owner, snap["caller"], snap["callee"])
        moved = {cid for cid in by_id if cid in self._moved}
        log.info("handed %d of %d calls over to other nodes", len(moved), len(by_id))
        return moved

    async def _live_nodes(self) -> list[str]:
        """The other nodes listening for call requests now, in random order (the calls of
        stopping nodes spread over the others)."""
        prefix = self._channel("")
        pattern = re.sub(r"([\\*?\[\]])", r"\\\1", prefix) + "*"
        nodes = [_s(c)[len(prefix):] for c in await self.redis.pubsub_channels(pattern)]
        found = [n for n in nodes if n and n != self.node]
        random.shuffle(found)
        return found

    async def _serve_adopt(self, body: dict[str, Any]) -> dict[str, Any]:
        """Take over the calls of a stopping node, which holds them still until it hears
        which ones this node took."""
        if self.stopping:
            raise Conflict("this node is stopping too")
        source = str(body.get("from"))
        snaps: list[dict[str, Any]] = []
        async with self._take_lock:
            for cid in [str(c) for c in body.get("ids") or ()]:
                _, raw = await self._take(keys=[self.p + "own:" + cid, self.p + "rec:" + cid],
                                          args=[self.node, self.own_ttl, source, "0"])
                if raw:
                    snaps.append(json.loads(raw))
            await self.calls.adopt(snaps)
        taken = [s["call_id"] for s in snaps if self.calls.get(s["call_id"]) is not None]
        log.info("took over %d calls from stopping node %s", len(taken), source)
        return {"adopted": taken}

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
            elif kind in ("req", "hook", "adopt"):
                rid = body.get("id")
                if isinstance(rid, str):  # hooks have none
                    if rid in self._served:
                        continue  # sent again: served already (see _answer)
                    self._served[rid] = None
                    if len(self._served) > self.max_served_ids:
                        self._served.popitem(last=False)
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
                # A call this node handed over: the node holding it now hears of it too.
                for node in sorted({n for n, a, b in self._moved.values() if user in (a, b)}):
                    await self.redis.publish(self._channel(node), encode(body))
            except Exception:
                log.exception("device %s of a call's user on another node", body.get("op"))
            return
        answer: dict[str, Any] = {"k": "res", "id": body.get("id")}
        try:
            if body["k"] == "adopt":
                data = await self._serve_adopt(body)
            else:
                req = body.get("req")
                req = req if isinstance(req, dict) else {}
                call_id = req.get("call_id")
                if body.get("op") == "invite" and isinstance(call_id, str) and not self.stopping:
                    await self.redis.set(self.p + "own:" + call_id, self.node, nx=True,
                                         ex=self.own_ttl)
                data = await self._run_here(str(body.get("op")), user, device, req)
            answer.update(ok=True, data=data)
        except _Moved as moved:
            answer["moved"] = moved.node or ""
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
        """Record a call that rings or changed (where it lives, what it is) or forget one
        that ended."""
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
                # What another node needs to take the call over if this node dies, but for
                # events held for away devices (up to max_held each): only a stopping node
                # writes those, when it hands the call over.
                pipe.set(record, encode({**call.snapshot(), "away": []}), ex=self.own_ttl)
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


def _parties(record: bytes | str) -> tuple[str, str]:
    """The caller and callee of a call record."""
    rec = json.loads(record)
    return str(rec["caller"]), str(rec["callee"])


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
    """Stop every call timer. A single node ends the calls still up (logged ``failed``);
    with several nodes a live node takes them over (CallRouter.hand_over), and with none
    left connected calls go on (any node takes them over later) and ringing ones fail."""
    router: CallRouter | None = state.extras.get("call_router")
    if router is not None:
        router.stopping = True
    await state.calls.close(hand_over=router.hand_over if router is not None else None)
    if router is not None:
        await router.close()
    env: NodeCallEnv | None = state.extras.get("call_env")
    if env is not None:
        for task in list(env.tasks):
            task.cancel()
