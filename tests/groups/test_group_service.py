"""The group service straight over each store (SQLite and PostgreSQL): concurrency,
group-commit safety and the member cache."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from im_bridge.errors import TalkbridgeError
from im_bridge.groups import GroupService
from im_bridge.messages import ChatService
from im_bridge.store import Store, open_store
from im_bridge.store.ops import Op

T = TypeVar("T")


async def test_concurrent_changes_and_refusals_leave_a_gap_free_timeline(store: Store):
    svc = GroupService(store)
    chat = ChatService(store)
    chat.group_members = svc.members
    users = [f"u{i}" for i in range(30)]
    made = await svc.create("owner", "G", users[:10], "open", group="g1")
    conv = made.group.conv
    ops: list[Awaitable[object]] = [svc.join(u, "g1") for u in users[10:]]  # 20 joins
    ops += [svc.kick("u0", "g1", u) for u in users[1:6]]  # refused: u0 is a plain member
    ops += [svc.invite("owner", "g1", [u]) for u in users[1:4]]  # refused: already members
    ops += [chat.send(u, "d", {"group": "g1"}, None, "text", {"text": u}) for u in users[:10]]
    results = await asyncio.gather(*ops, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 8 and all(isinstance(e, TalkbridgeError) for e in errors)
    assert {e.code for e in errors if isinstance(e, TalkbridgeError)} == {"forbidden", "conflict"}
    hist, _ = await chat.history("owner", conv, None, 0, 100)
    assert [m.seq for m in hist] == list(range(1, 32))  # creation + 20 joins + 10 messages
    assert sorted(await svc.members(conv)) == sorted(["owner", *users])


class SlowReads(Store):
    """A real store whose reads hand their result back only when ``gate`` opens."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.url = inner.url
        self.gate = asyncio.Event()
        self.gate.set()

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def write(self, op: Op[T], key: str = "") -> T:
        return await self.inner.write(op, key)

    def write_nowait(self, op: Op[Any], key: str, done: Callable[[Any], None]) -> None:
        self.inner.write_nowait(op, key, done)

    async def read(self, op: Op[T]) -> T:
        result = await self.inner.read(op)
        await self.gate.wait()
        return result

    async def ping(self) -> bool:
        return await self.inner.ping()


async def test_a_fill_that_races_an_invalidation_is_not_kept(store: Store):
    slow = SlowReads(store)
    svc = GroupService(slow)
    await svc.create("owner", "G", ["a"], "open", group="g2")
    slow.gate.clear()
    reading = asyncio.get_running_loop().create_task(svc.members("g:g2"))
    await asyncio.sleep(0.2)  # the read has its (soon stale) answer and waits at the gate
    await svc.join("b", "g2")  # commits and invalidates meanwhile
    slow.gate.set()
    assert await reading == ["a", "owner"]  # that caller asked before the join: fine
    assert svc.cached("g:g2") is None  # but the stale list was not kept
    assert await svc.members("g:g2") == ["a", "b", "owner"]


async def test_membership_changes_drop_the_cached_list(store: Store):
    svc = GroupService(store)
    await svc.create("owner", "G", ["a", "b"], "open", group="g3")
    assert await svc.members("g:g3") == ["a", "b", "owner"]
    assert svc.cached("g:g3") == ["a", "b", "owner"]
    await svc.kick("owner", "g3", "a")
    assert svc.cached("g:g3") is None
    assert await svc.members("g:g3") == ["b", "owner"]
    await svc.update("owner", "g3", {"name": "H"})  # not a membership change
    assert svc.cached("g:g3") == ["b", "owner"]


async def test_role_of_answers_for_current_members_of_active_groups_only(store: Store):
    svc = GroupService(store)
    await svc.create("owner", "G", ["a", "b"], "open", group="g4")
    await svc.set_role("owner", "g4", "a", "admin")
    await svc.leave("b", "g4")
    roles = [await svc.role_of("g4", u) for u in ("owner", "a", "b", "nobody")]
    assert roles == ["owner", "admin", None, None]
    await svc.dissolve("owner", "g4")
    assert await svc.role_of("g4", "owner") is None
    assert await svc.role_of("nosuch", "owner") is None
    assert GroupService.group_of("g:g4") == "g4" and GroupService.conv_of("g4") == "g:g4"


async def test_a_group_may_start_with_more_members_than_one_invite_carries(store: Store):
    svc = GroupService(store, member_limit=700)
    made = await svc.create("owner", "Big", [f"u{i:03d}" for i in range(600)], "open")
    assert len(await svc.members(made.group.conv)) == 601


async def _two_nodes(store_url: str) -> tuple[Store, Store]:
    """Two stores over one database: what two nodes of a cluster share."""
    a, b = open_store(store_url), open_store(store_url)
    await a.open()
    await b.open()
    return a, b


async def test_one_request_approved_on_two_nodes_at_once_joins_once(store_url: str):
    a, b = await _two_nodes(store_url)
    try:
        one, two = GroupService(a), GroupService(b)
        await one.create("owner", "G", ["adm"], "approval", group="g5")
        await one.set_role("owner", "g5", "adm", "admin")
        users = [f"r{i}" for i in range(6)]
        for u in users:
            await one.join(u, "g5")
        for u in users:
            results = await asyncio.gather(
                one.approve("owner", "g5", u), two.approve("adm", "g5", u), return_exceptions=True
            )
            codes = sorted(r.code if isinstance(r, TalkbridgeError) else "ok" for r in results)
            assert codes == ["not_found", "ok"], (u, results)
        chat = ChatService(a)
        hist, _ = await chat.history("owner", "g:g5", None, 0, 100)
        joined = [m.body["users"] for m in hist if m.body.get("event") == "member_joined"]
        assert joined == [[u] for u in users]
    finally:
        await a.close()
        await b.close()


async def test_joins_on_two_nodes_at_once_stop_at_the_member_limit(store_url: str):
    a, b = await _two_nodes(store_url)
    try:
        one, two = GroupService(a, member_limit=3), GroupService(b, member_limit=3)
        for i in range(4):
            g = f"lim{i}"
            await one.create("owner", "G", ["m"], "open", group=g)
            results = await asyncio.gather(
                one.join("x", g), two.join("y", g), return_exceptions=True
            )
            codes = sorted(r.code if isinstance(r, TalkbridgeError) else "ok" for r in results)
            assert codes == ["conflict", "ok"], (g, results)
            assert len(await one.members(f"g:{g}")) == 3
    finally:
        await a.close()
        await b.close()


async def test_one_group_id_created_on_two_nodes_at_once_is_a_conflict_not_internal(
    store_url: str,
):
    a, b = await _two_nodes(store_url)
    try:
        one, two = GroupService(a), GroupService(b)
        for i in range(4):
            g = f"same{i}"
            results = await asyncio.gather(
                one.create("u1", "A", [], "open", group=g),
                two.create("u2", "B", [], "open", group=g),
                return_exceptions=True,
            )
            codes = sorted(r.code if isinstance(r, TalkbridgeError) else "ok" for r in results)
            assert codes == ["conflict", "ok"], (g, results)
    finally:
        await a.close()
        await b.close()
