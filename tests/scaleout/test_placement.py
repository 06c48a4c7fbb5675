"""The relay placement port: the same behaviour from LocalPlacement (one process) and
RedisPlacement (relay nodes registered in Redis); what only Redis has: relay death."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest

from media.placement import LocalPlacement, Placement
from signaling.redis_placement import NoRelay, RedisPlacement, RelayRegistration
from tests.scaleout.redis_server import RedisServer
from tests.support import until


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.redis)])
async def placement(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> AsyncIterator[Placement]:
    """Two relays, ``r1`` and ``r2``, behind each implementation."""
    if request.param == "local":
        yield LocalPlacement(["r1", "r2"])
        return
    prefix = f"p{secrets.token_hex(3)}:"
    regs = [RelayRegistration(redis_server.url, r, prefix=prefix) for r in ("r1", "r2")]
    p = RedisPlacement(redis_server.url, prefix=prefix)
    try:
        for reg in regs:
            await reg.start()
        yield p
    finally:
        await p.close()
        for reg in regs:
            await reg.close()


async def test_a_room_stays_on_the_relay_it_was_placed_on(placement: Placement) -> None:
    first = await placement.place("room-a")
    assert await placement.place("room-a") == first
    assert await placement.lookup("room-a") == first


async def test_new_rooms_go_to_the_least_loaded_relay(placement: Placement) -> None:
    a = await placement.place("room-a")
    b = await placement.place("room-b")
    assert {a, b} == {"r1", "r2"}
    await placement.release("room-a")
    assert await placement.lookup("room-a") is None
    assert await placement.place("room-c") == a  # a's relay holds nothing now


@pytest.mark.redis
async def test_a_dead_relays_rooms_move_to_a_live_one_when_joined_again(
    redis_server: RedisServer,
) -> None:
    prefix = f"p{secrets.token_hex(3)}:"
    r1 = RelayRegistration(redis_server.url, "r1", prefix=prefix, heartbeat_s=0.2)
    r2 = RelayRegistration(redis_server.url, "r2", prefix=prefix, heartbeat_s=0.2)
    p = RedisPlacement(redis_server.url, prefix=prefix, relay_ttl_s=1.0)
    try:
        await r1.start()
        await r2.start()
        room = "room-a"
        first = await p.place(room)
        dying, survivor = (r1, r2) if first == "r1" else (r2, r1)
        await dying.close(deregister=False)  # as if killed: it just stops heartbeating

        async def moved_off() -> bool:
            return await p.lookup(room) is None

        await until(moved_off, 5)  # its participants are told the room ended
        assert await p.place(room) == survivor.relay_id
        assert (await p.load()).get(survivor.relay_id) == 1
        await survivor.close()
        with pytest.raises(NoRelay):
            await p.place("room-b")
    finally:
        await p.close()
        for reg in (r1, r2):
            await reg.close()  # idempotent
