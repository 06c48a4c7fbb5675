"""The Bus port's behaviour, the same tests against MemoryBus (one node) and RedisBus (two
in-process nodes sharing Redis and PostgreSQL): who gets a published event, presence, order."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from signaling.bus import MemoryBus
from signaling.client import Client
from signaling.codec import encode
from signaling.redis_bus import RedisBus, parse_redis_url
from tests.scaleout.cluster import BUS_PARAMS
from tests.scaleout.redis_server import RedisServer
from tests.support import Node, fresh_pg_database, start_node, until


@asynccontextmanager
async def two_redis_nodes(redis_server: RedisServer, workdir: Path) -> AsyncIterator[list[Node]]:
    """Two in-process nodes sharing ``redis_server`` (own key prefix) and a fresh database."""
    url = f"{redis_server.url}?{BUS_PARAMS}&prefix=b{secrets.token_hex(3)}:"
    async with fresh_pg_database() as db:
        started: list[Node] = []
        try:
            for name in ("a", "b"):
                started.append(await start_node(db, workdir / name, redis=url, node_id=name))
            assert all(isinstance(n.state.bus, RedisBus) for n in started)
            yield started
        finally:
            for n in started:
                await n.stop()


@pytest.fixture(params=["memory", pytest.param("redis", marks=[pytest.mark.redis,
                                                               pytest.mark.postgres])])
async def nodes(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer
) -> AsyncIterator[list[Node]]:
    """Two places a device can connect: the same node twice (memory), two nodes (Redis)."""
    if request.param == "redis":
        async with two_redis_nodes(redis_server, tmp_path) as pair:
            yield pair
        return
    node = await start_node(f"sqlite:///{tmp_path / 's.sqlite3'}", tmp_path)
    try:
        assert isinstance(node.state.bus, MemoryBus)
        yield [node, node]
    finally:
        await node.stop()


@pytest.fixture
async def redis_nodes(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[list[Node]]:
    """Two nodes on Redis (for what only a multi-node bus has)."""
    async with two_redis_nodes(redis_server, tmp_path) as pair:
        yield pair


def event(n: int) -> bytes:
    return encode({"type": "test.event", "n": n})


async def no_more(c: Client, type: str = "test.event") -> bool:
    try:
        await c.next_event(type, timeout=0.3)
    except TimeoutError:
        return True
    return False


async def test_publish_users_reaches_every_device_but_the_excluded_session(
    nodes: list[Node],
) -> None:
    a, b = nodes
    alice1 = await a.client("alice", "d1")
    alice2 = await b.client("alice", "d2")
    bob = await b.client("bob", "d1")
    carol = await a.client("carol", "d1")
    await a.state.bus.publish_users(["alice", "bob"], event(1), alice1.auth_ok["session"])
    for c in (alice2, bob):
        assert (await c.next_event("test.event"))["n"] == 1
    await a.state.bus.publish_users(["alice"], event(2))
    # the excluded session's first event is the second publish; carol got neither
    assert (await alice1.next_event("test.event"))["n"] == 2
    assert (await alice2.next_event("test.event"))["n"] == 2
    assert await no_more(carol)


async def test_publish_device_reaches_only_that_device(nodes: list[Node]) -> None:
    a, b = nodes
    phone = await a.client("dora", "phone")
    laptop = await b.client("dora", "laptop")
    await a.state.bus.publish_device("dora", "laptop", event(7))
    assert (await laptop.next_event("test.event"))["n"] == 7
    await b.state.bus.publish_device("dora", "phone", event(8))
    assert (await phone.next_event("test.event"))["n"] == 8
    assert await no_more(phone) and await no_more(laptop)


async def test_online_devices_span_nodes_and_forget_disconnected(nodes: list[Node]) -> None:
    a, b = nodes
    assert await a.state.bus.online_devices("erin") == []
    phone = await a.client("erin", "phone")
    await b.client("erin", "laptop")
    for node in (a, b):
        assert sorted(await node.state.bus.online_devices("erin")) == ["laptop", "phone"]
    await phone.close()

    async def phone_gone() -> bool:
        return await b.state.bus.online_devices("erin") == ["laptop"]

    await until(phone_gone, 5)


async def test_events_to_a_device_keep_their_order(nodes: list[Node]) -> None:
    a, b = nodes
    frank = await b.client("frank", "d1")
    for n in range(300):
        await a.state.bus.publish_users(["frank"], event(n))
    got = [(await frank.next_event("test.event"))["n"] for _ in range(300)]
    assert got == list(range(300))


@pytest.mark.redis
@pytest.mark.postgres
async def test_a_device_connecting_to_another_node_replaces_its_older_session(
    redis_nodes: list[Node],
) -> None:
    a, b = redis_nodes
    old = await a.client("gina", "phone", reconnect=False)
    new = await b.client("gina", "phone")
    ev = await old.next_event("session.replaced")
    assert ev["session"] == old.auth_ok["session"]
    gone = await old.next_event("client.disconnected")
    assert gone["code"] == 4409
    assert await a.state.bus.online_devices("gina") == ["phone"]
    await a.state.bus.publish_users(["gina"], event(1))
    assert (await new.next_event("test.event"))["n"] == 1


@pytest.mark.redis
@pytest.mark.postgres
async def test_redis_outage_makes_the_node_unready_then_its_clients_resync(
    redis_nodes: list[Node], redis_server: RedisServer
) -> None:
    a, b = redis_nodes
    hank = await b.client("hank", "d1")
    ivy = await a.client("ivy", "d1")
    sent = await ivy.send_text("before", user="hank")
    await hank.next_event("msg.new")
    redis_server.stop()
    try:
        async def both_down() -> bool:
            return not await a.state.bus.ping() and not await b.state.bus.ping()

        await until(both_down, 10)
        # Chat goes on (PostgreSQL); the event to hank's node is lost with pub/sub down.
        during = await ivy.send_text("during", user="hank")
        assert during["seq"] == sent["seq"] + 1
    finally:
        redis_server.start()

    async def both_up() -> bool:
        return await a.state.bus.ping() and await b.state.bus.ping()

    await until(both_up, 15)
    # hank's node closed his session to make him resync: he has the message now
    await hank.next_event("client.reconnected", timeout=10)
    ev = await hank.next_event("msg.new", timeout=10)
    assert ev["body"] == {"text": "during"}


def test_bus_settings_ride_on_the_redis_url() -> None:
    url, s = parse_redis_url("redis://h:6380/2?heartbeat=0.5&node_ttl=4&prefix=x:&db=2")
    assert url == "redis://h:6380/2?db=2"
    assert (s.heartbeat_s, s.node_ttl_s, s.prefix) == (0.5, 4.0, "x:")


@pytest.mark.redis
@pytest.mark.postgres
async def test_a_node_started_while_redis_is_down_serves_once_it_is_back(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    url = f"{redis_server.url}?{BUS_PARAMS}&prefix=s{secrets.token_hex(3)}:"
    async with fresh_pg_database() as db:
        redis_server.stop()
        late: Node | None = None
        other: Node | None = None
        try:
            late = await start_node(db, tmp_path / "late", redis=url, node_id="late")
            assert not await late.state.bus.ping()
            jill = await late.client("jill", "d1")  # chat works without Redis, alone
        finally:
            redis_server.start()
        try:
            other = await start_node(db, tmp_path / "other", redis=url, node_id="other")

            async def ready() -> bool:
                return await late.state.bus.ping()

            await until(ready, 15)
            # jill connected while her node could not register her: she is made to resync,
            # then reachable from the other node like anyone else
            await jill.next_event("client.reconnected", timeout=10)

            async def registered() -> bool:
                return await other.state.bus.online_devices("jill") == ["d1"]

            await until(registered, 5)
            kim = await other.client("kim", "d1")
            await kim.send_text("found you", user="jill")
            ev = await jill.next_event("msg.new", where=lambda e: e["from"] == "kim")
            assert ev["body"] == {"text": "found you"}
        finally:
            for n in (late, other):
                if n is not None:
                    await n.stop()
