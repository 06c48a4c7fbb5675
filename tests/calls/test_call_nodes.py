"""1:1 calls between users connected to different nodes sharing Redis (and one store).

Two talkbridge processes, a real redis-server started for the module, one SQLite file.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from signaling.client import Client, ClientError
from tests.calls.server import RunningServer, free_port, run_redis, run_talkbridge
from tests.calls.wire import ANSWER, AUDIO, OFFER, Inbox, cand, connect

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with run_redis(tmp_path_factory.mktemp("redis"), free_port()) as url:
        yield url


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, redis_url: str
          ) -> Iterator[tuple[RunningServer, RunningServer]]:
    base = tmp_path_factory.mktemp("nodes")
    store = f"sqlite:///{base / 'shared.sqlite3'}"
    settings = {"redis": redis_url, "store": store, "call_grace": "1.0"}
    with run_talkbridge(base / "n1", node_id="n1", **settings) as n1, \
            run_talkbridge(base / "n2", node_id="n2", **settings) as n2:
        yield n1, n2


def new_id() -> str:
    return uuid.uuid4().hex


async def invite(client: Any, call_id: str, to: str) -> dict[str, Any]:
    return dict(await client.request("call.invite", call_id=call_id, to={"user": to},
                                     media=AUDIO, sdp=OFFER))


async def test_a_call_between_two_nodes_goes_through_end_to_end(nodes):
    n1, n2 = nodes
    a, b = f"alice-{new_id()[:6]}", f"bob-{new_id()[:6]}"
    async with connect(n1.ws_url, n1.token(a), "a1") as (alice, a_in), \
            connect(n2.ws_url, n2.token(b), "b1") as (bob, b_in):
        cid = new_id()
        await invite(alice, cid, b)
        await alice.request("call.ice", call_id=cid, candidate=cand(1))
        assert (await b_in.wait("call.invite"))["from"] == a
        await bob.request("call.ringing", call_id=cid)
        assert (await a_in.wait("call.ringing"))["device"] == "b1"
        await bob.request("call.accept", call_id=cid, sdp=ANSWER)
        assert (await a_in.wait("call.accepted"))["sdp"] == ANSWER
        assert (await b_in.wait("call.ice"))["candidate"] == cand(1)
        for n in range(2, 6):  # order is kept across the hop between nodes
            await bob.request("call.ice", call_id=cid, candidate=cand(n))
        await a_in.wait("call.ice", lambda e: e["candidate"] == cand(5))
        assert [e["candidate"] for e in a_in.of("call.ice")] == [cand(n) for n in range(2, 6)]
        reply = await bob.request("call.hangup", call_id=cid)
        assert reply["reason"] == "hangup"
        assert (await a_in.wait("call.ended"))["reason"] == "hangup"
        conv = "dm:" + ":".join(sorted((a, b)))
        await b_in.wait("msg.new")
        history = await bob.request("msg.history", conv=conv)
        assert [m["body"]["outcome"] for m in history["messages"]] == ["completed"]


async def test_errors_come_back_from_the_node_holding_the_call(nodes):
    n1, n2 = nodes
    a, b = f"alice-{new_id()[:6]}", f"bob-{new_id()[:6]}"
    async with connect(n1.ws_url, n1.token(a), "a1") as (alice, _), \
            connect(n2.ws_url, n2.token(b), "b1") as (bob, _), \
            connect(n2.ws_url, n2.token("carol"), "c1") as (carol, _):
        cid = new_id()
        await invite(alice, cid, b)
        await alice.request("call.cancel", call_id=cid)
        with pytest.raises(ClientError) as err:
            await bob.request("call.accept", call_id=cid, sdp=ANSWER)
        assert (err.value.code, err.value.data.get("reason")) == ("conflict", "cancelled")
        with pytest.raises(ClientError) as err:
            await carol.request("call.hangup", call_id=cid)
        assert err.value.code == "not_found"


async def test_a_callee_in_a_call_on_another_node_is_busy(nodes):
    n1, n2 = nodes
    a, b, c = (f"{u}-{new_id()[:6]}" for u in ("alice", "bob", "carol"))
    async with connect(n1.ws_url, n1.token(a), "a1") as (alice, _), \
            connect(n2.ws_url, n2.token(b), "b1") as (bob, _), \
            connect(n2.ws_url, n2.token(c), "c1") as (carol, c_in):
        cid = new_id()
        await invite(alice, cid, b)
        await bob.request("call.accept", call_id=cid, sdp=ANSWER)
        reply = await invite(carol, new_id(), b)  # carol and bob share node 2; the call is on 1
        assert (reply["state"], reply["reason"]) == ("ended", "busy")
        assert (await c_in.wait("call.ended"))["reason"] == "busy"
        await alice.request("call.hangup", call_id=cid)


async def test_glare_between_nodes_leaves_one_call(nodes):
    n1, n2 = nodes
    a, b = f"alice-{new_id()[:6]}", f"bob-{new_id()[:6]}"
    async with connect(n1.ws_url, n1.token(a), "a1") as (alice, a_in), \
            connect(n2.ws_url, n2.token(b), "b1") as (bob, b_in):
        small, big = sorted([new_id(), new_id()])
        await invite(alice, big, b)  # rings first, on node 1
        reply = await invite(bob, small, a)  # from node 2: decided on node 1
        assert reply["state"] == "ringing"
        assert (await b_in.wait("call.ended", lambda e: e["call_id"] == big))["replaced_by"] \
            == small
        await a_in.wait("call.invite", lambda e: e["call_id"] == small)
        await alice.request("call.accept", call_id=small, sdp=ANSWER)
        assert (await b_in.wait("call.accepted"))["call_id"] == small
        await bob.request("call.hangup", call_id=small)


async def test_a_callee_connecting_to_another_node_gets_the_pending_invite(nodes):
    n1, n2 = nodes
    a, b = f"alice-{new_id()[:6]}", f"bob-{new_id()[:6]}"
    async with connect(n1.ws_url, n1.token(a), "a1") as (alice, a_in):
        cid = new_id()
        await invite(alice, cid, b)
        async with connect(n2.ws_url, n2.token(b), "phone") as (bob, b_in):
            first = await b_in.wait("call.invite")
            assert b_in.events[0] is first and first["call_id"] == cid
            await bob.request("call.accept", call_id=cid, sdp=ANSWER)
            assert (await a_in.wait("call.accepted"))["device"] == "phone"
        # bob's device went away on node 2: node 1 ends the call after the grace period
        assert (await a_in.wait("call.ended", timeout=8))["reason"] == "failed"



def ready(server: RunningServer) -> bool:
    try:
        with urllib.request.urlopen(f"{server.http_url}/readyz", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


async def test_calls_between_nodes_work_again_after_redis_restarts(tmp_path: Path):
    port = free_port()
    store = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    with run_redis(tmp_path / "r1", port) as url:
        settings = {"redis": url, "store": store}
        with run_talkbridge(tmp_path / "n1", node_id="n1", **settings) as n1, \
                run_talkbridge(tmp_path / "n2", node_id="n2", **settings) as n2:
            pass_redis = run_redis(tmp_path / "r2", port)
            # stop Redis under the running nodes, then bring it back on the same port
            await asyncio.to_thread(subprocess.run, ["redis-cli", "-p", str(port), "shutdown",
                                                     "nosave"], capture_output=True)
            await asyncio.sleep(1.0)
            with pass_redis:
                deadline = time.monotonic() + 20
                while not (await asyncio.to_thread(ready, n1)
                           and await asyncio.to_thread(ready, n2)):
                    assert time.monotonic() < deadline, "nodes did not become ready again"
                    await asyncio.sleep(0.2)
                async with connect(n1.ws_url, n1.token("alice"), "a1") as (alice, a_in), \
                        connect(n2.ws_url, n2.token("bob"), "b1") as (bob, b_in):
                    cid = new_id()
                    await invite(alice, cid, "bob")
                    await b_in.wait("call.invite")
                    await bob.request("call.accept", call_id=cid, sdp=ANSWER)
                    assert (await a_in.wait("call.accepted"))["device"] == "b1"
                    await bob.request("call.hangup", call_id=cid)
                    assert (await a_in.wait("call.ended"))["reason"] == "hangup"


async def test_when_the_node_holding_a_call_dies_its_users_can_be_called_again(tmp_path: Path):
    store = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    with run_redis(tmp_path / "redis", free_port()) as url:
        settings = {"redis": url, "store": store}
        with run_talkbridge(tmp_path / "n1", node_id="n1", **settings) as n1, \
                run_talkbridge(tmp_path / "n2", node_id="n2", **settings) as n2:
            async with connect(n2.ws_url, n2.token("bob"), "b1") as (bob, b_in), \
                    connect(n2.ws_url, n2.token("carol"), "c1") as (carol, _):
                async with connect(n1.ws_url, n1.token("alice"), "a1") as (alice, _):
                    lost = new_id()
                    await invite(alice, lost, "bob")
                    await bob.request("call.accept", call_id=lost, sdp=ANSWER)
                    os.kill(n1.pid, signal.SIGKILL)  # node 1 held the call
                # bob is no longer busy: carol's invite rings him (decided on node 2)
                cid = new_id()
                reply = await carol.request("call.invite", call_id=cid, to={"user": "bob"},
                                            media=AUDIO, sdp=OFFER, timeout=15)
                assert reply["state"] == "ringing"
                assert (await b_in.wait("call.invite", lambda e: e["call_id"] == cid))
                # The lost call can still be hung up (node 2 takes it over), once: then it
                # has ended, like any call.
                ended = await bob.request("call.hangup", call_id=lost, timeout=15)
                assert (ended["state"], ended["reason"]) == ("ended", "hangup")
                with pytest.raises(ClientError) as err:
                    await bob.request("call.hangup", call_id=lost, timeout=15)
                assert (err.value.code, err.value.data.get("reason")) == ("conflict", "hangup")
                await carol.request("call.cancel", call_id=cid)


async def test_a_node_restarted_under_its_id_forwards_requests_again(tmp_path: Path):
    # Node 1 remembers the ids of the requests it served; node 2's first forwarded request
    # after a restart must not look like the one before it.
    store = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    with run_redis(tmp_path / "redis", free_port()) as url:
        settings = {"redis": url, "store": store}
        with run_talkbridge(tmp_path / "n1", node_id="n1", **settings) as n1:
            async with connect(n1.ws_url, n1.token("alice"), "a1") as (alice, a_in):
                for _ in range(2):
                    with run_talkbridge(tmp_path / "n2", node_id="n2", **settings) as n2:
                        await _bob_on_node_2_answers_a_call_node_1_holds(alice, a_in, n2)


async def _bob_on_node_2_answers_a_call_node_1_holds(alice: Client, a_in: Inbox,
                                                    n2: RunningServer) -> None:
    async with connect(n2.ws_url, n2.token("bob"), "b1") as (bob, b_in):
        cid = new_id()
        await invite(alice, cid, "bob")  # node 1 holds the call
        await b_in.wait("call.invite", lambda e: e["call_id"] == cid)
        # node 2's first request to node 1 since it started
        reply = await bob.request("call.accept", call_id=cid, sdp=ANSWER, timeout=15)
        assert reply["state"] == "connected"
        await a_in.wait("call.accepted", lambda e: e["call_id"] == cid)
        await bob.request("call.hangup", call_id=cid, timeout=15)
        await a_in.wait("call.ended", lambda e: e["call_id"] == cid)


@dataclass
class Parties:
    """Two nodes sharing Redis and a store; alice's client knows both and starts on node 1
    (so node 1 holds the calls she places); bob stays on node 2."""

    n1: RunningServer
    n2: RunningServer
    redis_url: str
    alice: Client
    a_in: Inbox
    bob: Client
    b_in: Inbox


@asynccontextmanager
async def _alice_on_node_1_bob_on_node_2(tmp_path: Path, **settings: str
                                         ) -> AsyncIterator[Parties]:
    store = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    with run_redis(tmp_path / "redis", free_port()) as url:
        settings = {"redis": url, "store": store, **settings}
        with run_talkbridge(tmp_path / "n1", node_id="n1", **settings) as n1, \
                run_talkbridge(tmp_path / "n2", node_id="n2", **settings) as n2:
            alice = Client([n1.ws_url, n2.ws_url], n1.token("alice"), device="a1",
                           max_backoff=0.3)
            await alice.connect()
            a_in = Inbox(alice)
            try:
                async with connect(n2.ws_url, n2.token("bob"), "b1") as (bob, b_in):
                    yield Parties(n1, n2, url, alice, a_in, bob, b_in)
            finally:
                await a_in.close()
                await alice.close()


@asynccontextmanager
async def _call_ringing_on_node_1(tmp_path: Path, **settings: str
                                  ) -> AsyncIterator[tuple[Parties, str, dict[str, Any]]]:
    """alice calls bob; node 1 holds the call, which rings bob's device on node 2. Yields
    the parties, the call id and the invite's reply."""
    async with _alice_on_node_1_bob_on_node_2(tmp_path, **settings) as p:
        cid = new_id()
        invited = await invite(p.alice, cid, "bob")
        assert await p.b_in.wait("call.invite", lambda e: e["call_id"] == cid)
        yield p, cid, invited


@asynccontextmanager
async def _call_held_by_node_1(tmp_path: Path) -> AsyncIterator[tuple[Parties, str]]:
    """As _call_ringing_on_node_1, and bob has answered: the call is connected."""
    async with _call_ringing_on_node_1(tmp_path) as (p, cid, _):
        await p.bob.request("call.accept", call_id=cid, sdp=ANSWER)
        await p.a_in.wait("call.accepted")
        yield p, cid


async def _bob_hangs_up_and_alice_is_told(p: Parties, cid: str) -> dict[str, Any]:
    """bob hangs up through node 2; alice hears of it; returns the call log alice gets."""
    ended = await p.bob.request("call.hangup", call_id=cid, timeout=15)
    assert (ended["state"], ended["reason"]) == ("ended", "hangup")
    ev = await p.a_in.wait("call.ended", lambda e: e["call_id"] == cid, timeout=10)
    assert ev["reason"] == "hangup"
    return await p.a_in.wait("msg.new", lambda e: e["kind"] == "call", timeout=10)


async def _call_logs(client: Client) -> list[dict[str, Any]]:
    history = await client.request("msg.history", conv="dm:alice:bob")
    return [m for m in history["messages"] if m["kind"] == "call"]


async def test_a_call_whose_node_died_can_still_be_hung_up_and_is_logged(tmp_path: Path):
    async with _call_held_by_node_1(tmp_path) as (p, cid):
        os.kill(p.n1.pid, signal.SIGKILL)
        await p.a_in.wait("client.reconnected", timeout=15)  # now on node 2
        log = await _bob_hangs_up_and_alice_is_told(p, cid)
        assert (log["body"]["call_id"], log["body"]["outcome"]) == (cid, "completed")


def _redis(talkbridge_url: str) -> aioredis.Redis:
    """A client of the Redis that a talkbridge ``redis`` URL names (without its options)."""
    return aioredis.Redis.from_url(talkbridge_url.split("?")[0])


@asynccontextmanager
async def _requests_to(redis_url: str, node: str
                       ) -> AsyncIterator[Callable[[str], Awaitable[bytes]]]:
    """Listen on ``node``'s call-request channel; yields ``seen(op)``, which waits for the
    next request of that op published there and returns it as published. The listener is
    gone (Redis counts it no more) once the block ends."""
    channel = f"tb:calls:rpc:{node}"
    r = _redis(redis_url)
    pubsub: Any = r.pubsub()
    await pubsub.subscribe(channel)

    async def seen(op: str) -> bytes:
        async with asyncio.timeout(10):
            async for msg in pubsub.listen():
                if msg["type"] == "message" and json.loads(msg["data"]).get("op") == op:
                    return bytes(msg["data"])
        raise AssertionError("unreachable")

    try:
        yield seen
        await pubsub.unsubscribe(channel)
        async with asyncio.timeout(10):
            async for msg in pubsub.listen():
                if msg["type"] == "unsubscribe":
                    break
    finally:
        await pubsub.aclose()
        await r.aclose()


async def test_a_request_a_node_took_with_it_when_it_died_is_answered_all_the_same(
        tmp_path: Path):
    # Redis drops a killed node's subscription some ms after the kill: a request published
    # meanwhile is counted delivered, and lost.
    async with _call_held_by_node_1(tmp_path) as (p, cid):
        try:
            async with _requests_to(p.redis_url, "n1") as seen:
                os.kill(p.n1.pid, signal.SIGSTOP)  # subscribed still, but it reads nothing
                hangup = asyncio.create_task(p.bob.request("call.hangup", call_id=cid,
                                                           timeout=15))
                await seen("hangup")  # handed to node 1, which never reads it
        finally:
            os.kill(p.n1.pid, signal.SIGKILL)
        ended = await hangup  # node 2 took the call over and ran it
        assert (ended["state"], ended["reason"]) == ("ended", "hangup")
        await p.a_in.wait("client.reconnected", timeout=15)
        ev = await p.a_in.wait("call.ended", lambda e: e["call_id"] == cid, timeout=10)
        assert ev["reason"] == "hangup"
        log = await p.a_in.wait("msg.new", lambda e: e["kind"] == "call", timeout=10)
        assert (log["body"]["call_id"], log["body"]["outcome"]) == (cid, "completed")
        assert len(await _call_logs(p.bob)) == 1


async def test_a_node_slow_to_answer_keeps_its_call_and_serves_a_request_once(tmp_path: Path):
    async with _call_held_by_node_1(tmp_path) as (p, cid):
        async with _requests_to(p.redis_url, "n1") as seen:
            os.kill(p.n1.pid, signal.SIGSTOP)
            try:
                ice = asyncio.create_task(p.bob.request("call.ice", call_id=cid,
                                                        candidate=cand(7), timeout=15))
                request = await seen("ice")
                # The same request reaches node 1 twice (as when node 2 sends it again
                # because node 1 seemed gone).
                async with _redis(p.redis_url) as r:
                    assert await r.publish("tb:calls:rpc:n1", request) == 2
                await asyncio.sleep(1.0)  # node 2 looks several times whether node 1 listens
            finally:
                os.kill(p.n1.pid, signal.SIGCONT)
        await ice
        await p.bob.request("call.ice", call_id=cid, candidate=cand(8))
        await p.a_in.wait("call.ice", lambda e: e["candidate"] == cand(8), timeout=10)
        assert [e["candidate"] for e in p.a_in.of("call.ice")] == [cand(7), cand(8)]
        async with _redis(p.redis_url) as r:
            assert await r.get(f"tb:calls:own:{cid}") == b"n1"  # not taken over
        log = await _bob_hangs_up_and_alice_is_told(p, cid)
        assert log["body"]["outcome"] == "completed"


async def test_a_rolling_restart_drops_no_call(tmp_path: Path):
    async with _call_held_by_node_1(tmp_path) as (p, cid):
        os.kill(p.n1.pid, signal.SIGTERM)  # node 1 stops gracefully
        await _exited(p.n1.pid)
        await p.a_in.wait("client.reconnected", timeout=15)
        # Nobody was told the call ended, and nothing was logged.
        await asyncio.sleep(0.5)
        assert not [e for e in p.a_in.events + p.b_in.events
                    if e.get("type") in ("call.ended", "msg.new")]
        log = await _bob_hangs_up_and_alice_is_told(p, cid)
        assert log["body"]["outcome"] == "completed"
        assert len(await _call_logs(p.alice)) == 1  # one log, not a "failed" one from the stop


async def test_a_call_ringing_on_a_stopping_node_can_still_be_answered(tmp_path: Path):
    async with _call_ringing_on_node_1(tmp_path) as (p, cid, invited):
        await p.alice.request("call.ice", call_id=cid, candidate=cand(1))  # held for the answer
        os.kill(p.n1.pid, signal.SIGTERM)
        await _exited(p.n1.pid)
        await p.a_in.wait("client.reconnected", timeout=15)  # now on node 2
        resumed = await p.alice.request("call.resume", call_id=cid, timeout=15)
        assert (resumed["state"], resumed["expires_at"]) == ("ringing", invited["expires_at"])
        await p.bob.request("call.accept", call_id=cid, sdp=ANSWER, timeout=15)
        accepted = await p.a_in.wait("call.accepted", timeout=10)
        assert (accepted["call_id"], accepted["device"], accepted["sdp"]) == (cid, "b1", ANSWER)
        assert (await p.b_in.wait("call.ice"))["candidate"] == cand(1)
        await p.bob.request("call.ice", call_id=cid, candidate=cand(2))
        assert (await p.a_in.wait("call.ice"))["candidate"] == cand(2)
        assert not p.a_in.of("call.ended") and not p.b_in.of("call.ended")
        log = await _bob_hangs_up_and_alice_is_told(p, cid)
        assert log["body"]["outcome"] == "completed"
        assert len(await _call_logs(p.bob)) == 1


async def test_a_call_ringing_on_a_stopping_node_can_still_be_cancelled(tmp_path: Path):
    async with _call_ringing_on_node_1(tmp_path) as (p, cid, _):
        os.kill(p.n1.pid, signal.SIGTERM)
        await _exited(p.n1.pid)
        await p.a_in.wait("client.reconnected", timeout=15)
        reply = await p.alice.request("call.cancel", call_id=cid, timeout=15)
        assert (reply["state"], reply["reason"]) == ("ended", "cancelled")
        await p.b_in.wait("call.ended", timeout=10)
        assert [e["reason"] for e in p.b_in.of("call.ended")] == ["cancelled"]
        log = await p.b_in.wait("msg.new", lambda e: e["kind"] == "call", timeout=10)
        assert log["body"]["outcome"] == "cancelled"
        assert len(await _call_logs(p.bob)) == 1


async def test_a_call_handed_over_at_a_stop_times_out_at_its_original_deadline(
        tmp_path: Path):
    ring = 8
    async with _call_ringing_on_node_1(tmp_path, call_timeout=str(ring)) as (p, cid, invited):
        await asyncio.sleep(3)  # a ring restarted by the hand-over would end 3 s late
        stopped_at_ms = time.time() * 1000
        os.kill(p.n1.pid, signal.SIGTERM)
        ended = await p.b_in.wait("call.ended", timeout=20)
        assert (ended["call_id"], ended["reason"]) == (cid, "timeout")
        assert (await p.a_in.wait("call.ended", timeout=10))["reason"] == "timeout"
        log = await p.b_in.wait("msg.new", lambda e: e["kind"] == "call", timeout=10)
        assert log["body"]["outcome"] == "missed"
        # Logged once the original deadline passed, before a restarted ring could end.
        assert invited["expires_at"] <= log["ts"] < stopped_at_ms + ring * 1000


async def test_a_call_ringing_on_a_node_that_died_can_still_be_answered(tmp_path: Path):
    async with _call_ringing_on_node_1(tmp_path) as (p, cid, _):
        os.kill(p.n1.pid, signal.SIGKILL)
        await p.a_in.wait("client.reconnected", timeout=15)  # now on node 2
        connected = await p.bob.request("call.accept", call_id=cid, sdp=ANSWER, timeout=15)
        assert connected["state"] == "connected"
        accepted = await p.a_in.wait("call.accepted", timeout=10)
        assert (accepted["call_id"], accepted["sdp"]) == (cid, ANSWER)
        log = await _bob_hangs_up_and_alice_is_told(p, cid)
        assert log["body"]["outcome"] == "completed"


async def test_after_its_node_died_a_call_relays_renegotiation_between_its_parties_only(
        tmp_path: Path):
    async with _call_held_by_node_1(tmp_path) as (p, cid):
        os.kill(p.n1.pid, signal.SIGKILL)
        await p.a_in.wait("client.reconnected", timeout=15)  # now on node 2, as bob
        restart = {"type": "offer", "sdp": OFFER["sdp"].replace("o=- 1 1", "o=- 3 2")}
        await p.bob.request("call.sdp", call_id=cid, sdp=restart, timeout=15)
        got = await p.a_in.wait("call.sdp", timeout=10)
        assert (got["call_id"], got["from_device"], got["sdp"]) == (cid, "b1", restart)
        await p.alice.request("call.sdp", call_id=cid, sdp=ANSWER, timeout=15)
        assert (await p.b_in.wait("call.sdp", timeout=10))["sdp"] == ANSWER
        await p.alice.request("call.ice", call_id=cid, candidate=cand(1), timeout=15)
        assert (await p.b_in.wait("call.ice", timeout=10))["candidate"] == cand(1)
        async with connect(p.n2.ws_url, p.n2.token("carol"), "c1") as (carol, c_in), \
                connect(p.n2.ws_url, p.n2.token("bob"), "b2") as (bob2, b2_in):
            for client, code in ((carol, "not_found"), (bob2, "conflict")):
                with pytest.raises(ClientError) as err:
                    await client.request("call.sdp", call_id=cid, sdp=restart, timeout=15)
                assert err.value.code == code
                with pytest.raises(ClientError) as err:
                    await client.request("call.ice", call_id=cid, candidate=cand(9),
                                         timeout=15)
                assert err.value.code == code
            await p.bob.request("call.ice", call_id=cid, candidate=cand(2), timeout=15)
            await p.a_in.wait("call.ice", lambda e: e["candidate"] == cand(2), timeout=10)
            # alice got bob's frames only; the outsiders got nothing of the call.
            assert [e["from_device"] for e in p.a_in.of("call.sdp") + p.a_in.of("call.ice")] \
                == ["b1", "b1"]
            assert not c_in.of("call.") and not b2_in.of("call.")
        log = await _bob_hangs_up_and_alice_is_told(p, cid)
        assert log["body"]["outcome"] == "completed"


async def _exited(pid: int, within: float = 20.0) -> None:
    """Wait for a child process to exit (it stays a zombie until its fixture reaps it)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if _process_state(pid) in (None, "Z"):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"process {pid} still running")


def _process_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return None

