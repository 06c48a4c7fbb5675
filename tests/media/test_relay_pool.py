"""Rooms spread over relay worker processes behind the placement port."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import pytest

from im_bridge.errors import BadRequest, Forbidden
from media.placement import LocalPlacement
from media.pool import RelayPool
from tests.media.peers import Peer, wait_for

pytestmark = pytest.mark.netns


@pytest.fixture
async def pool() -> AsyncIterator[RelayPool]:
    p = RelayPool(["127.0.0.1"], [], workers=2, ice_timeout=5.0)
    await p.start()
    try:
        yield p
    finally:
        pids = list(p.worker_pids().values())
        await p.close()
        for pid in pids:  # stopped and reaped
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


async def test_two_rooms_run_in_different_workers_and_both_carry_media(pool: RelayPool) -> None:
    peers = [Peer(pool, room, name) for room in ("a", "b") for name in ("alice", "bob")]
    try:
        for p in peers:
            await p.join()
        assert {await pool.worker_of("a"), await pool.worker_of("b")} == {"w0", "w1"}
        ok = await wait_for(
            lambda: all(p.frames[(o, k)] >= 10 for p in peers for o in ("alice", "bob")
                        if o != p.name for k in ("audio", "video")),
            20,
        )
        assert ok, {f"{p.room}/{p.name}": dict(p.frames) for p in peers}
        assert [m["participant"] for m in pool.participants("a")] == ["alice", "bob"]
        stats = await pool.stats("a")
        assert stats["alice"]["published"]["video"]["frames"] > 0
    finally:
        for p in peers:
            await p.close()


async def test_errors_cross_the_process_boundary_with_their_codes(pool: RelayPool) -> None:
    peer = Peer(pool, "c", "carol", answer=False)
    try:
        await peer.join()
        with pytest.raises(BadRequest):
            await pool.on_sdp("c", "carol", {"type": "answer", "sdp": "nonsense"})
        with pytest.raises(Forbidden):
            await pool.on_ice("c", "mallory", None)
        await pool.leave("c", "carol")
        assert await wait_for(lambda: not pool.participants("c"), 2)
        assert await pool.worker_of("c") is None
    finally:
        await peer.close()


async def test_placement_puts_a_new_room_on_the_least_loaded_worker() -> None:
    placement = LocalPlacement(["w0", "w1"])
    assert await placement.place("r1") == "w0"
    assert await placement.place("r2") == "w1"
    assert await placement.place("r1") == "w0"
    await placement.release("r1")
    assert await placement.place("r3") == "w0"
    assert await placement.lookup("r2") == "w1"


async def test_a_crashed_worker_drops_only_its_rooms(pool: RelayPool) -> None:
    dropped: list[tuple[str, str, str]] = []
    pool._on_dropped = lambda room, pid, reason: dropped.append((room, pid, reason))
    peers = [Peer(pool, room, name) for room in ("a", "b") for name in ("alice", "bob")]
    try:
        for p in peers:
            await p.join()
        assert await wait_for(lambda: all(p.frames[(o, "video")] > 5 for p in peers
                                          for o in ("alice", "bob") if o != p.name), 20)
        victim = await pool.worker_of("a")
        assert victim is not None
        os.kill(pool.worker_pids()[victim], signal.SIGKILL)
        assert await wait_for(lambda: len(dropped) == 2, 5), dropped
        assert sorted(dropped) == [("a", "alice", "relay_failed"), ("a", "bob", "relay_failed")]
        assert all(p.of_kind("room.dropped") for p in peers[:2])
        assert pool.participants("a") == [] and await pool.worker_of("a") is None
        survivors = peers[2:]

        def video() -> list[int]:
            return [p.frames[(o, "video")] for p in survivors for o in ("alice", "bob")
                    if o != p.name]

        before = video()
        await asyncio.sleep(1.0)
        after = video()
        assert all(b > a + 10 for a, b in zip(before, after, strict=True)), (before, after)
    finally:
        for p in peers:
            await p.close()
