"""1:1 calls across three node processes sharing Redis and PostgreSQL: stopping the nodes
one by one (SIGTERM, then start again) while calls ring and talk ends none of them."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from signaling.client import Client, ClientError, ConnectionLost
from tests.calls.wire import ANSWER, AUDIO, OFFER, Inbox, cand
from tests.scaleout.cluster import Cluster
from tests.scaleout.redis_server import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

MAX_EARLY = 30  # candidates a caller trickles before the answer (the server keeps 100)


@dataclass
class Party:
    """One device of a call and everything it received."""

    client: Client
    inbox: Inbox
    resumed: int = 0  # reconnects it has resumed its call after


@dataclass
class Pair:
    """caller<i> calls callee<i>; their first nodes differ."""

    call_id: str
    caller: Party
    callee: Party
    answered: bool
    early_acked: list[dict[str, Any]] = field(default_factory=list)  # buffered by the server


def _is_candidate(candidate: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    return lambda event: bool(event["candidate"] == candidate)


@contextlib.asynccontextmanager
async def _cluster(redis_server: RedisServer, pg_url: str, tmp_path: Path
                   ) -> AsyncIterator[Cluster]:
    # Ringing calls must outlast three restarts on a busy machine.
    c = Cluster(redis_server.url, pg_url, tmp_path, settings={"TALKBRIDGE_CALL_TIMEOUT": "300"})
    try:
        await c.start()
        yield c
    finally:
        await c.close()


async def _party(cluster: Cluster, user: str, home: int) -> Party:
    client = await cluster.client(user, "d1", home=home)
    return Party(client, Inbox(client))


async def _request(party: Party, failures: list[str], type: str, **fields: Any) -> bool:
    """Send as an app does: a request lost with its connection is not an error (the app
    sends again once reconnected); any error reply is. True when it was answered ok."""
    try:
        await party.client.request(type, timeout=15, **fields)
        return True
    except ConnectionLost:
        await asyncio.sleep(0.2)
        return False
    except (ClientError, TimeoutError) as exc:
        failures.append(f"{party.client.user} {type} {fields.get('call_id')}: {exc!r}")
        return False


async def _trickle(pair: Pair, failures: list[str]) -> None:
    """Candidates all along: the caller's wait for the answer, then both sides trickle."""
    n = 0
    while True:
        senders = [pair.caller, pair.callee] if pair.answered else [pair.caller]
        if not pair.answered and n >= MAX_EARLY:
            senders = []
        for party in senders:
            n += 1
            if await _request(party, failures, "call.ice", call_id=pair.call_id,
                              candidate=cand(n)) and party is pair.caller and not pair.answered:
                pair.early_acked.append(cand(n))
        await asyncio.sleep(0.25)


async def _resume_after_reconnects(pair: Pair, failures: list[str]) -> None:
    """What the web demo does: back after a reconnect, a device resumes its call."""
    while True:
        for party in (pair.caller, pair.callee):
            if party.client.reconnects > party.resumed and party.client.connected:
                if await _request(party, failures, "call.resume", call_id=pair.call_id):
                    party.resumed = party.client.reconnects
        await asyncio.sleep(0.1)


async def test_a_rolling_restart_while_calls_ring_and_talk_drops_none(
    redis_server: RedisServer, pg_url: str, tmp_path: Path
) -> None:
    async with _cluster(redis_server, pg_url, tmp_path) as cluster:
        pairs: list[Pair] = []
        for i in range(6):
            caller = await _party(cluster, f"caller{i}", home=i % 3)
            callee = await _party(cluster, f"callee{i}", home=(i + 1) % 3)
            cid = f"call-{i}"
            await caller.client.request("call.invite", call_id=cid, to={"user": f"callee{i}"},
                                        media=AUDIO, sdp=OFFER)
            await callee.inbox.wait("call.invite")
            answered = i % 2 == 0
            if answered:
                await callee.client.request("call.accept", call_id=cid, sdp=ANSWER)
                await caller.inbox.wait("call.accepted")
            pairs.append(Pair(cid, caller, callee, answered))
        failures: list[str] = []
        tasks = [asyncio.create_task(job(pair, failures)) for pair in pairs
                 for job in (_trickle, _resume_after_reconnects)]
        try:
            await asyncio.sleep(1)
            for i in range(3):  # every call is held by a node that stops at some point
                assert cluster.kill(i, signal.SIGTERM) == 0
                await cluster.restart(i)
                await asyncio.sleep(1.5)
            for pair in pairs:  # every device is back and has resumed its call
                for party in (pair.caller, pair.callee):
                    await party.client.request("call.resume", call_id=pair.call_id,
                                               timeout=15)
        finally:
            for task in tasks:
                task.cancel()
            stopped = await asyncio.gather(*tasks, return_exceptions=True)
        assert failures == [], f"{failures}\n{cluster.logs()}"
        assert all(isinstance(e, asyncio.CancelledError) for e in stopped), stopped
        for pair in pairs:
            assert not pair.caller.inbox.of("call.ended") and not pair.callee.inbox.of(
                "call.ended"), cluster.logs()
            if pair.answered:  # renegotiation still goes both ways
                await pair.callee.client.request("call.sdp", call_id=pair.call_id, sdp=OFFER,
                                                 timeout=15)
                await pair.caller.inbox.wait("call.sdp", timeout=10)
                await pair.caller.client.request("call.sdp", call_id=pair.call_id,
                                                 sdp=ANSWER, timeout=15)
                await pair.callee.inbox.wait("call.sdp", timeout=10)
            else:  # answered now, with every candidate the caller trickled meanwhile
                await pair.callee.client.request("call.accept", call_id=pair.call_id,
                                                 sdp=ANSWER, timeout=15)
                await pair.caller.inbox.wait("call.accepted", timeout=10)
                await pair.callee.inbox.wait("call.ice", _is_candidate(pair.early_acked[-1]),
                                             timeout=10)
                got = [e["candidate"] for e in pair.callee.inbox.of("call.ice")]
                assert [c for c in got if c in pair.early_acked] == pair.early_acked
            hung_up = await pair.caller.client.request("call.hangup", call_id=pair.call_id,
                                                     timeout=15)
            assert hung_up["reason"] == "hangup"
            assert (await pair.callee.inbox.wait("call.ended", timeout=10))["reason"] \
                == "hangup"
        for i, pair in enumerate(pairs):
            log = await pair.callee.inbox.wait("msg.new", lambda e: e["kind"] == "call",
                                               timeout=10)
            assert log["body"]["outcome"] == "completed"
            history = await pair.callee.client.request("msg.history",
                                                       conv=f"dm:callee{i}:caller{i}")
            assert len([m for m in history["messages"] if m["kind"] == "call"]) == 1
        for pair in pairs:
            for party in (pair.caller, pair.callee):
                await party.inbox.close()
