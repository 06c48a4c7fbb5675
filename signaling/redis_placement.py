"""The media relay placement port (media/placement.py) on Redis: rooms pinned to relay nodes.

Relay nodes register themselves with heartbeats (:class:`RelayRegistration`); a new room
goes to the live relay holding the fewest rooms, and stays there while that relay lives.
Any signaling node can ask where a room is. A relay that stops heartbeating for
``relay_ttl`` seconds is dead: :meth:`RedisPlacement.lookup` answers ``None`` for its rooms
(their participants must be told the room ended) and :meth:`RedisPlacement.place` puts a
room that is joined again on a live relay.

Keys (under ``prefix``): ``relays:seen`` (sorted set relay -> last heartbeat, Redis clock,
ms), ``relays:load`` (hash relay -> rooms held), ``relays:rooms`` (hash room -> relay).
Each decision is one Lua script, so two signaling nodes placing the same room at once get
the same relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as aioredis

log = logging.getLogger(__name__)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function alive(relay)
  local s = redis.call('ZSCORE', KEYS[1], relay)
  return s ~= false and s ~= nil and tonumber(s) >= now - tonumber(ARGV[2])
end
"""

# KEYS: seen, load, rooms. ARGV: room, relay_ttl_ms. Returns the relay, or false if none.
_PLACE = (
    _NOW
    + """
local cur = redis.call('HGET', KEYS[3], ARGV[1])
if cur and alive(cur) then return cur end
if cur then redis.call('HINCRBY', KEYS[2], cur, -1) end
local best, best_load = false, nil
for _, relay in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[2]), '+inf')) do
  local load = tonumber(redis.call('HGET', KEYS[2], relay) or '0')
  if best_load == nil or load < best_load or (load == best_load and relay < best) then
    best, best_load = relay, load
  end
end
if not best then return false end
redis.call('HSET', KEYS[3], ARGV[1], best)
redis.call('HINCRBY', KEYS[2], best, 1)
return best
"""
)

# KEYS: seen, load, rooms. ARGV: room, relay_ttl_ms
_LOOKUP = (
    _NOW
    + """
local cur = redis.call('HGET', KEYS[3], ARGV[1])
if cur and alive(cur) then return cur end
return false
"""
)

# KEYS: seen, load, rooms. ARGV: room
_RELEASE = """
local cur = redis.call('HGET', KEYS[3], ARGV[1])
if not cur then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
if tonumber(redis.call('HINCRBY', KEYS[2], cur, -1)) < 0 then
  redis.call('HSET', KEYS[2], cur, 0)
end
return 1
"""

# KEYS: seen. ARGV: relay
_BEAT = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[1])
return 1
"""


class NoRelay(Exception):
    """No relay node is alive to take a room."""


class RedisPlacement:
    """:class:`media.placement.Placement` over relay nodes registered in Redis."""

    def __init__(self, url: str, prefix: str = "tb:", relay_ttl_s: float = 10.0) -> None:
        self.redis: aioredis.Redis = aioredis.Redis.from_url(url, socket_timeout=3)
        self._keys = [f"{prefix}relays:seen", f"{prefix}relays:load", f"{prefix}relays:rooms"]
        self._ttl_ms = int(relay_ttl_s * 1000)
        self._place = self.redis.register_script(_PLACE)
        self._lookup = self.redis.register_script(_LOOKUP)
        self._release = self.redis.register_script(_RELEASE)

    async def place(self, room_id: str) -> str:
        """The live relay holding ``room_id``; a new room goes to the least-loaded one."""
        relay = await self._place(keys=self._keys, args=[room_id, self._ttl_ms])
        if not relay:
            raise NoRelay("no relay node is alive")
        return _str(relay)

    async def release(self, room_id: str) -> None:
        """Forget ``room_id`` (its last participant left)."""
        await self._release(keys=self._keys, args=[room_id])

    async def lookup(self, room_id: str) -> str | None:
        """The live relay holding ``room_id``, or ``None`` (none, or its relay died)."""
        relay = await self._lookup(keys=self._keys, args=[room_id, self._ttl_ms])
        return _str(relay) if relay else None

    async def load(self) -> dict[str, int]:
        """Rooms held per relay (live or not), for dashboards and tests."""
        raw: dict[Any, Any] = await self.redis.hgetall(self._keys[1])
        return {_str(k): int(v) for k, v in raw.items()}

    async def close(self) -> None:
        await self.redis.aclose()


class RelayRegistration:
    """A relay node's heartbeat: while it runs, rooms may be placed on ``relay_id``."""

    def __init__(self, url: str, relay_id: str, prefix: str = "tb:",
                 heartbeat_s: float = 2.0) -> None:
        self.redis: aioredis.Redis = aioredis.Redis.from_url(url, socket_timeout=3)
        self.relay_id = relay_id
        self.heartbeat_s = heartbeat_s
        self._key = f"{prefix}relays:seen"
        self._beat_script = self.redis.register_script(_BEAT)
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def beat(self) -> None:
        """Say this relay is alive now."""
        await self._beat_script(keys=[self._key], args=[self.relay_id])

    async def start(self) -> None:
        """Register now and keep heartbeating (errors are logged and retried)."""
        await self.beat()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.beat()
            except Exception as exc:  # Redis away: placement treats us as dead meanwhile
                log.warning("relay heartbeat failed: %r", exc)

    async def close(self, deregister: bool = True) -> None:
        """Stop heartbeating; by default leave the registry at once (graceful stop)."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if deregister:
            with contextlib.suppress(Exception):
                await self.redis.zrem(self._key, self.relay_id)
        await self.redis.aclose()


def _str(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x
