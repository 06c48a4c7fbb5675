"""The Bus port on Redis: node-addressed delivery and a presence registry shared by nodes.

Layout in Redis (every key under ``prefix``, default ``tb:``):

- ``ch:<node>``: the pub/sub channel of one node; only that node subscribes to it.
- ``p:<user>``: hash ``device -> "<node> <session>"``, the user's connected devices. Its TTL
  is refreshed by the heartbeat of every node holding one of them, so a key whose nodes all
  died goes away by itself.
- ``nu:<node>``: set of ``"<user> <device>"`` a node registered (what to refresh or reap).
- ``nodes``: sorted set ``node -> last heartbeat (ms, Redis clock)``. A node whose heartbeat
  is older than ``node_ttl`` is dead: readers ignore its entries at once, and the next
  heartbeat of any live node reaps them (compare-and-delete, so a device that moved on to
  another node is never removed).

Delivery runs as Lua scripts, so one round trip looks the recipients up and publishes:
``publish_users`` groups the recipients by the node that holds them and publishes ONE frame
per node (a 500-member group on three nodes costs two publishes, not 500). The local node's
share never touches Redis. Publishes go through an outbox drained by one task in pipelines:
order is kept per node, and what could not be published while Redis was away is published
after it comes back (duplicates are harmless: clients keep one copy per ``(conv, seq)``).

Pub/sub is fire-and-forget, so a node that lost its Redis connection may have missed
frames. When it reconnects it drops its own presence entries and closes its sessions with
1012 (``server.resync``): the clients reconnect and sync from the store, which holds every
acknowledged message. Meanwhile ``ping()`` is false and ``/readyz`` answers 503.

One Redis server (or a Sentinel/replicated primary), not Redis Cluster: the scripts touch
keys they compute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from signaling.bus import Bus
from signaling.codec import encode
from signaling.hub import Hub
from signaling.session import Session

log = logging.getLogger(__name__)

CLOSE_RESYNC = 1012  # "service restart": the client reconnects and syncs

# Everything below runs inside Redis. TIME is the Redis clock, so nodes on machines whose
# clocks disagree still agree on who is alive.
_LUA_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_LUA_ALIVE = """
local alive_cache = {}
local function alive(node)
  local a = alive_cache[node]
  if a == nil then
    local s = redis.call('ZSCORE', KEYS[1], node)
    a = (s ~= false and s ~= nil and tonumber(s) >= now - ttl_ms)
    alive_cache[node] = a
  end
  return a
end
"""

# KEYS: nodes, p:<user>, nu:<node>. ARGV: device, node, session, key_ttl_s, prefix, user
# Returns the replaced "<node> <session>" if another node held this device (it is told).
_REGISTER = """
local old = redis.call('HGET', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('SADD', KEYS[3], ARGV[6] .. ' ' .. ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[4])
if old then
  local sp = string.find(old, ' ', 1, true)
  local onode = string.sub(old, 1, sp - 1)
  if onode ~= ARGV[2] then
    redis.call('PUBLISH', ARGV[5] .. 'ch:' .. onode,
      'K' .. ARGV[6] .. '\\n' .. ARGV[1] .. '\\n' .. string.sub(old, sp + 1))
    return old
  end
end
return false
"""

# KEYS: p:<user>, nu:<node>. ARGV: device, "<node> <session>", "<user> <device>"
_UNREGISTER = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('SREM', KEYS[2], ARGV[3])
return 1
"""

# KEYS: nodes, nu:<node>. ARGV: node, key_ttl_s, prefix, refresh (1: renew the TTL of the
# node's presence keys too). Returns 1 if the node was absent from the registry (first beat,
# or reaped by its peers while it could not reach Redis).
_HEARTBEAT = (
    _LUA_NOW
    + """
local added = redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
if ARGV[4] ~= '1' then return added end
local seen = {}
for _, m in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local user = string.sub(m, 1, string.find(m, ' ', 1, true) - 1)
  if not seen[user] then
    seen[user] = true
    redis.call('EXPIRE', ARGV[3] .. 'p:' .. user, ARGV[2])
  end
end
return added
"""
)

# KEYS: nodes. ARGV: node_ttl_ms, prefix, [node to forget]. Removes the presence entries of
# dead nodes (or of the named node) and the nodes themselves; returns the nodes removed.
_REAP = (
    _LUA_NOW
    + """
local ttl_ms = tonumber(ARGV[1])
local prefix = ARGV[2]
local victims
if ARGV[3] then
  victims = {ARGV[3]}
else
  victims = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - ttl_ms))
end
for _, node in ipairs(victims) do
  local nu = prefix .. 'nu:' .. node
  for _, m in ipairs(redis.call('SMEMBERS', nu)) do
    local sp = string.find(m, ' ', 1, true)
    local pkey = prefix .. 'p:' .. string.sub(m, 1, sp - 1)
    local dev = string.sub(m, sp + 1)
    local v = redis.call('HGET', pkey, dev)
    if v and string.sub(v, 1, #node + 1) == node .. ' ' then
      redis.call('HDEL', pkey, dev)
    end
  end
  redis.call('DEL', nu)
  redis.call('ZREM', KEYS[1], node)
end
return victims
"""
)

# KEYS: nodes. ARGV: self node, node_ttl_ms, prefix, exclude session, data, users...
# One PUBLISH per other live node holding any of the users; returns the publish count.
_PUBLISH_USERS = (
    _LUA_NOW
    + """
local ttl_ms = tonumber(ARGV[2])
"""
    + _LUA_ALIVE
    + """
local me, prefix = ARGV[1], ARGV[3]
local per_node, order = {}, {}
for i = 6, #ARGV do
  local user = ARGV[i]
  local vals = redis.call('HVALS', prefix .. 'p:' .. user)
  for _, v in ipairs(vals) do
    local node = string.sub(v, 1, string.find(v, ' ', 1, true) - 1)
    if node ~= me and alive(node) then
      local list = per_node[node]
      if list == nil then
        list = {users = {}, seen = {}}
        per_node[node] = list
        order[#order + 1] = node
      end
      if not list.seen[user] then
        list.seen[user] = true
        list.users[#list.users + 1] = user
      end
    end
  end
end
for _, node in ipairs(order) do
  redis.call('PUBLISH', prefix .. 'ch:' .. node,
    'U' .. ARGV[4] .. '\\n' .. table.concat(per_node[node].users, ',') .. '\\n' .. ARGV[5])
end
return #order
"""
)

# KEYS: nodes, p:<user>. ARGV: self node, node_ttl_ms, prefix, user, device, data
_PUBLISH_DEVICE = (
    _LUA_NOW
    + """
local ttl_ms = tonumber(ARGV[2])
"""
    + _LUA_ALIVE
    + """
local v = redis.call('HGET', KEYS[2], ARGV[5])
if not v then return 0 end
local node = string.sub(v, 1, string.find(v, ' ', 1, true) - 1)
if node == ARGV[1] or not alive(node) then return 0 end
redis.call('PUBLISH', ARGV[3] .. 'ch:' .. node,
  'D' .. ARGV[4] .. '\\n' .. ARGV[5] .. '\\n' .. ARGV[6])
return 1
"""
)

# KEYS: nodes. ARGV: node_ttl_ms, prefix, users... Returns per user a flat list
# [user, device, node, user, device, node, ...] of devices on live nodes.
_ONLINE = (
    _LUA_NOW
    + """
local ttl_ms = tonumber(ARGV[1])
"""
    + _LUA_ALIVE
    + """
local out = {}
for i = 3, #ARGV do
  local h = redis.call('HGETALL', ARGV[2] .. 'p:' .. ARGV[i])
  for j = 1, #h, 2 do
    local v = h[j + 1]
    local node = string.sub(v, 1, string.find(v, ' ', 1, true) - 1)
    if alive(node) then
      out[#out + 1] = ARGV[i]
      out[#out + 1] = h[j]
      out[#out + 1] = node
    end
  end
end
return out
"""
)


_SCRIPTS = {
    "register": _REGISTER,
    "unregister": _UNREGISTER,
    "heartbeat": _HEARTBEAT,
    "reap": _REAP,
    "publish_users": _PUBLISH_USERS,
    "publish_device": _PUBLISH_DEVICE,
    "online": _ONLINE,
}


@dataclass
class RedisBusSettings:
    """Timings of the Redis bus (defaults suit a LAN; tests shorten them)."""

    prefix: str = "tb:"
    heartbeat_s: float = 2.0  # how often a node says it is alive and refreshes its keys
    node_ttl_s: float = 10.0  # silence after which a node's sessions count as gone
    key_ttl_s: int = 60  # TTL of presence keys (refreshed each heartbeat by their nodes)
    command_timeout_s: float = 3.0
    connect_timeout_s: float = 2.0
    backoff_min_s: float = 0.1
    backoff_max_s: float = 5.0
    outbox_limit: int = 100_000  # publishes kept while Redis is unreachable
    batch: int = 256  # publishes per pipeline


@dataclass
class _Outgoing:
    """One queued publish: a script and its arguments (script "" is a plain PUBLISH)."""

    script: str
    keys: list[str]
    args: list[Any]


@dataclass
class RedisBusStats:
    """Counters a benchmark or test can read."""

    publishes: int = 0  # PUBLISH calls made by scripts (per remote node, not per user)
    remote_frames_in: int = 0
    outbox_dropped: int = 0
    reconnects: int = 0
    resync_closes: int = 0
    node_deaths_seen: list[str] = field(default_factory=list)


class RedisBus(Bus):
    """Delivery to users' devices on any node through Redis; presence in Redis hashes."""

    def __init__(
        self, url: str, hub: Hub, node_id: str, settings: RedisBusSettings | None = None
    ) -> None:
        super().__init__()
        self.url = url
        self.hub = hub
        self.node_id = node_id
        self.settings = settings or RedisBusSettings()
        self.stats = RedisBusStats()
        p = self.settings.prefix
        self._k_nodes = p + "nodes"
        self._k_nu = f"{p}nu:{node_id}"
        self._channel = f"{p}ch:{node_id}".encode()
        self._all_channel = f"{p}ch:*all".encode()  # node messages for every node
        self._redis: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._shas: dict[str, str] = {}
        self._ready = asyncio.Event()
        self._failed = asyncio.Event()
        self._closed = False
        self._outbox: deque[_Outgoing] = deque()
        self._wake = asyncio.Event()
        # Lookups and presence updates: concurrent calls share one pipeline per round trip,
        # so a connect storm or a burst of sends needs a couple of connections, not hundreds.
        self._calls: deque[tuple[_Outgoing, asyncio.Future[Any]]] = deque()
        self._calls_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._had_connection = False
        self._connected_long_enough = False
        self._serving = False
        hub.on_connect.append(self._on_connect)
        hub.on_disconnect.append(self._on_disconnect)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect (in the background, with backoff); wait briefly for the first success."""
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._supervise(), name="redis-bus-supervisor"),
            loop.create_task(self._flusher(), name="redis-bus-flusher"),
            loop.create_task(self._caller(), name="redis-bus-caller"),
        ]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await self._ready.wait()
        if not self._ready.is_set():
            log.warning("Redis at %s not reachable yet; retrying in the background", self.url)

    async def close(self) -> None:
        """Publish what is queued, remove this node's presence, disconnect."""
        if self._ready.is_set() and self._outbox:
            self._wake.set()
            for _ in range(40):
                if not self._outbox:
                    break
                await asyncio.sleep(0.05)
        self._closed = True
        if self._ready.is_set() and self._redis is not None:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await self._script("reap")(
                    keys=[self._k_nodes],
                    args=[self._ttl_ms, self.settings.prefix, self.node_id],
                    client=self._redis,
                )
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self._drop_client()

    async def ping(self) -> bool:
        """True when connected and subscribed, and Redis answers a PING now."""
        r = self._redis
        if not self._ready.is_set() or r is None:
            return False
        try:
            async with asyncio.timeout(1.0):
                return bool(await r.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    @property
    def _ttl_ms(self) -> int:
        return int(self.settings.node_ttl_s * 1000)

    def _script(self, name: str) -> Any:
        return self._scripts[name]

    def _queue_on(self, pipe: Any, item: _Outgoing) -> None:
        if not item.script:
            pipe.publish(item.keys[0], item.args[0])
            return
        pipe.evalsha(self._shas[item.script], len(item.keys), *item.keys, *item.args)

    def _new_client(self) -> aioredis.Redis:
        s = self.settings
        # No silent retries: an error must reach the supervisor, which knows that pub/sub
        # frames may have been lost and makes the clients resync.
        return aioredis.Redis.from_url(
            self.url,
            socket_timeout=s.command_timeout_s,
            socket_connect_timeout=s.connect_timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )

    async def _drop_client(self) -> None:
        r, self._redis = self._redis, None
        if r is not None:
            with contextlib.suppress(Exception):
                await r.aclose()

    # ------------------------------------------------------------ connection supervisor

    async def _supervise(self) -> None:
        delay = self.settings.backoff_min_s
        while not self._closed:
            try:
                await self._connect_and_serve()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                if self._serving:
                    log.warning("lost Redis (%r): not ready; reconnecting", exc)
                else:
                    log.info("Redis unreachable (%r); retrying in %.1fs", exc, delay)
            self._serving = False
            self._ready.clear()
            await self._drop_client()
            if self._closed:
                return
            if self._had_connection and self._connected_long_enough:
                delay = self.settings.backoff_min_s
            # Jitter, so that nodes (and their clients' resyncs) do not come back in step.
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, self.settings.backoff_max_s)

    async def _connect_and_serve(self) -> None:
        self._connected_long_enough = False
        r = self._new_client()
        self._redis = r
        self._scripts = {name: r.register_script(src) for name, src in _SCRIPTS.items()}
        await r.ping()
        # Loaded once per connection: pipelines then send bare EVALSHAs (redis-py would ask
        # SCRIPT EXISTS before every pipeline). A restarted Redis means a new connection.
        self._shas = {name: await r.script_load(src) for name, src in _SCRIPTS.items()}
        pubsub = r.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._channel, self._all_channel)
            if self._had_connection:
                self.stats.reconnects += 1
            # Entries left by an earlier life of this node id (a crash and restart, or an
            # outage) point at sessions that are gone: start clean. Node ids must be unique.
            await self._script("reap")(
                keys=[self._k_nodes],
                args=[self._ttl_ms, self.settings.prefix, self.node_id],
            )
            await self._beat(refresh=True)
            self._failed.clear()
            self._ready.set()
            self._serving = True
            if self._had_connection or len(self.hub):
                # Sessions here may have missed frames (or were never registered, if they
                # came while Redis was away): they reconnect and sync.
                log.warning("Redis is back: node %s resumes", self.node_id)
                self._resync_sessions("bus reconnected")
            self._had_connection = True
            self._wake.set()  # publish what queued up meanwhile
            listener = asyncio.get_running_loop().create_task(self._listen(pubsub))
            beater = asyncio.get_running_loop().create_task(self._heartbeat_loop())
            failed = asyncio.get_running_loop().create_task(self._failed.wait())
            try:
                done, _ = await asyncio.wait(
                    {listener, beater, failed}, return_when=asyncio.FIRST_COMPLETED
                )
                for t in done:
                    if t is not failed:
                        t.result()  # re-raise the Redis error
                raise RedisError("a Redis command failed or the subscription ended")
            finally:
                for t in (listener, beater, failed):
                    t.cancel()
                for t in (listener, beater, failed):
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
        finally:
            self._ready.clear()
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _resync_sessions(self, why: str) -> None:
        """Close every local session with 1012: each client reconnects and syncs.

        Spread over up to 3 s (a second per 1,000 sessions), so that thousands of clients
        do not reconnect and sync in the same instant. Until its turn a session misses
        nothing it will not sync.
        """
        sessions = self.hub.sessions()
        notice = encode({"type": "server.resync", "reason": why, "reconnect_after_ms": 200})
        spread = min(3.0, len(sessions) / 1000)
        loop = asyncio.get_running_loop()

        def close(s: Session) -> None:
            s.send(notice)
            s.close_soon(CLOSE_RESYNC, why)

        for s in sessions:
            self.stats.resync_closes += 1
            if spread:
                loop.call_later(random.uniform(0, spread), close, s)
            else:
                close(s)

    async def _beat(self, refresh: bool) -> None:
        assert self._redis is not None
        s = self.settings
        added = await self._script("heartbeat")(
            keys=[self._k_nodes, self._k_nu],
            args=[self.node_id, s.key_ttl_s, s.prefix, "1" if refresh else "0"],
        )
        if added and self._ready.is_set() and len(self.hub):
            # Another node reaped us (we were silent too long): our entries are gone.
            log.warning("node %s was reaped by its peers; sessions resync", self.node_id)
            self._resync_sessions("presence expired")
        reaped = await self._script("reap")(
            keys=[self._k_nodes], args=[self._ttl_ms, s.prefix]
        )
        for node in reaped or ():
            name = node.decode() if isinstance(node, bytes) else str(node)
            log.warning("node %s stopped heartbeating: its presence entries were removed", name)
            self.stats.node_deaths_seen.append(name)

    async def _heartbeat_loop(self) -> None:
        ticks = 0
        # Presence key TTLs are renewed a few times per key TTL, not on every beat: that walk
        # is O(sessions on this node) inside Redis.
        every = max(1, int(self.settings.key_ttl_s / 4 / self.settings.heartbeat_s))
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            ticks += 1
            await self._beat(refresh=ticks % every == 0)
            if ticks >= 2:
                self._connected_long_enough = True

    async def _listen(self, pubsub: Any) -> None:
        async for msg in pubsub.listen():
            if msg.get("type") != "message":
                continue
            try:
                if msg.get("channel") == self._all_channel:
                    self._on_node_message(msg["data"])
                    continue
                self._on_remote(msg["data"])
            except Exception:
                log.exception("bad bus frame dropped")

    def _on_node_message(self, raw: bytes) -> None:
        sender, _, message = raw.partition(b"\n")
        if sender.decode() != self.node_id:
            self._node_message(message)

    async def send_to_node(self, node: str, message: bytes) -> None:
        """On the node's own channel, so it keeps its place among that node's frames."""
        if node == self.node_id:
            self._node_message(message)
            return
        p = self.settings.prefix
        self._enqueue(_Outgoing("", [f"{p}ch:{node}"], [b"N\n\n" + message]))

    async def broadcast(self, message: bytes) -> None:
        """To every other node over the shared channel (queued like any publish)."""
        payload = self.node_id.encode() + b"\n" + message
        self._enqueue(_Outgoing("", [self._all_channel.decode()], [payload]))

    def _on_remote(self, raw: bytes) -> None:
        self.stats.remote_frames_in += 1
        kind = raw[:1]
        a = raw.index(b"\n", 1)
        b = raw.index(b"\n", a + 1)
        head = raw[1:a].decode()
        mid = raw[a + 1 : b].decode()
        data = raw[b + 1 :]
        if kind == b"U":
            self.hub.deliver_local(mid.split(","), data, head or None)
        elif kind == b"D":
            self.hub.deliver_local_device(head, mid, data)
        elif kind == b"N":
            self._node_message(data)
        elif kind == b"K":
            # The device connected to another node: drop our older session of it.
            s = self.hub.session(head, mid)
            session_id = data.decode()
            if s is not None and s.session_id == session_id:
                s.send_obj({"type": "session.replaced", "session": session_id})
                s.close_soon(4409, "replaced by a newer connection of this device")

    # ------------------------------------------------------------ outbox

    def _enqueue(self, item: _Outgoing) -> None:
        if len(self._outbox) >= self.settings.outbox_limit:
            self._outbox.popleft()
            self.stats.outbox_dropped += 1
        self._outbox.append(item)
        self._wake.set()

    async def _flusher(self) -> None:
        outbox = self._outbox
        while True:
            await self._wake.wait()
            self._wake.clear()
            while outbox and self._ready.is_set() and self._redis is not None:
                n = min(len(outbox), self.settings.batch)
                batch = [outbox[i] for i in range(n)]
                pipe = self._redis.pipeline(transaction=False)
                for item in batch:
                    self._queue_on(pipe, item)
                try:
                    results = await pipe.execute(raise_on_error=False)
                except (RedisError, OSError, TimeoutError) as exc:
                    # Kept in the outbox; the supervisor reconnects and we publish again.
                    log.warning("publish failed (%s); kept %d frames for later", exc, len(outbox))
                    self._failed.set()
                    break
                if any(isinstance(x, NoScriptError) for x in results):
                    # SCRIPT FLUSH behind our back: reconnect (reloads them), publish again.
                    self._failed.set()
                    break
                for _ in range(n):
                    outbox.popleft()
                for x in results:
                    if isinstance(x, int):
                        self.stats.publishes += x
                    elif isinstance(x, Exception):
                        log.error("bus publish script failed: %s", x)  # a bug, not an outage

    async def _call(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """Run one script in the next shared pipeline and return its result."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls.append((_Outgoing(script, keys, args), fut))
        self._calls_wake.set()
        return await fut

    async def _caller(self) -> None:
        calls = self._calls
        while True:
            await self._calls_wake.wait()
            self._calls_wake.clear()
            while calls:
                n = min(len(calls), self.settings.batch)
                batch = [calls.popleft() for _ in range(n)]
                r = self._redis
                if not self._ready.is_set() or r is None:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(RedisError("not connected to Redis"))
                    continue
                pipe = r.pipeline(transaction=False)
                for item, _ in batch:
                    self._queue_on(pipe, item)
                try:
                    results = await pipe.execute(raise_on_error=False)
                except (RedisError, OSError, TimeoutError) as exc:
                    self._failed.set()
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, fut), res in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(res, Exception):
                        if isinstance(res, NoScriptError):
                            self._failed.set()
                        fut.set_exception(res)
                    else:
                        fut.set_result(res)

    # ------------------------------------------------------------ presence hooks

    async def _on_connect(self, session: Session) -> None:
        if not self._ready.is_set() or self._redis is None:
            return  # registered by the resync after Redis comes back
        p = self.settings.prefix
        await self._call(
            "register",
            [self._k_nodes, f"{p}p:{session.user}", self._k_nu],
            [session.device, self.node_id, session.session_id, self.settings.key_ttl_s, p,
             session.user],
        )

    async def _on_disconnect(self, session: Session) -> None:
        if not self._ready.is_set() or self._redis is None:
            return  # the reap after reconnecting removes it
        p = self.settings.prefix
        await self._call(
            "unregister",
            [f"{p}p:{session.user}", self._k_nu],
            [session.device, f"{self.node_id} {session.session_id}",
             f"{session.user} {session.device}"],
        )

    # ------------------------------------------------------------ the Bus port

    def post_users(
        self, users: Sequence[str], data: bytes, exclude_session: str | None = None
    ) -> None:
        """Local devices now; other nodes through one publish per node holding any user."""
        if not users:
            return
        self.hub.deliver_local(users, data, exclude_session)
        args: list[Any] = [self.node_id, self._ttl_ms, self.settings.prefix,
                           exclude_session or "", data, *dict.fromkeys(users)]
        self._enqueue(_Outgoing("publish_users", [self._k_nodes], args))

    async def publish_device(self, user: str, device: str, data: bytes) -> None:
        """To one device: locally if it is here, else to the node the registry names."""
        if self.hub.session(user, device) is not None:
            self.hub.deliver_local_device(user, device, data)
            return
        p = self.settings.prefix
        self._enqueue(
            _Outgoing(
                "publish_device",
                [self._k_nodes, f"{p}p:{user}"],
                [self.node_id, self._ttl_ms, p, user, device, data],
            )
        )

    async def online_devices(self, user: str) -> list[str]:
        """The user's devices on live nodes (this node's alone while Redis is away)."""
        found = await self.online_many([user])
        return [device for _, device, _ in found]

    async def online_many(self, users: Sequence[str]) -> list[tuple[str, str, str]]:
        """``(user, device, node)`` for every connected device of ``users`` in one lookup."""
        r = self._redis
        if not self._ready.is_set() or r is None:
            return self._local_devices(users)
        try:
            flat = await self._call(
                "online", [self._k_nodes], [self._ttl_ms, self.settings.prefix, *users]
            )
        except (RedisError, OSError, TimeoutError) as exc:
            # An outage: the caller already set _failed; answer from this node meanwhile.
            log.debug("presence lookup failed (%r)", exc)
            return self._local_devices(users)
        out = [_str(x) for x in flat]
        return [(out[i], out[i + 1], out[i + 2]) for i in range(0, len(out), 3)]

    def _local_devices(self, users: Sequence[str]) -> list[tuple[str, str, str]]:
        return [(s.user, s.device, self.node_id) for u in users for s in self.hub.sessions_of(u)]

    async def online_users(self, users: Sequence[str]) -> set[str]:
        """Which of ``users`` have at least one connected device (one round trip)."""
        return {u for u, _, _ in await self.online_many(users)}

    def outbox_len(self) -> int:
        return len(self._outbox)


def _str(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


_URL_SETTINGS = {
    "heartbeat": "heartbeat_s",
    "node_ttl": "node_ttl_s",
    "key_ttl": "key_ttl_s",
    "prefix": "prefix",
    "outbox": "outbox_limit",
    "backoff_max": "backoff_max_s",
}


def parse_redis_url(url: str) -> tuple[str, RedisBusSettings]:
    """Split talkbridge's own query parameters off a ``TALKBRIDGE_REDIS`` URL.

    ``redis://host:6379/0?heartbeat=2&node_ttl=10&prefix=tb:`` keeps every bus setting in the
    one documented setting; the other parameters go to redis-py untouched.
    """
    parts = urlsplit(url)
    settings = RedisBusSettings()
    rest = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        attr = _URL_SETTINGS.get(key)
        if attr is None:
            rest.append((key, value))
            continue
        current = getattr(settings, attr)
        setattr(settings, attr, type(current)(value))
    return urlunsplit(parts._replace(query=urlencode(rest))), settings
