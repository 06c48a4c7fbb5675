"""The authorization matrix of docs/GROUPS.md, row by row, on SQLite and PostgreSQL.

Cast: alice owner, bob admin, carol and dave members, eve outsider (approval group).
A row that is allowed appends exactly one notice; a refused row changes nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.groups.world import World, make_world
from tests.support import Node, fresh_store, running_node

# Each test makes its own group on a node shared by the module (one per store backend):
# groups are independent, and a fresh database per row would dominate the run time.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(
    scope="module",
    loop_scope="module",
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
async def shared_node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Node]:
    tmp: Path = tmp_path_factory.mktemp("authz")
    async with fresh_store(request.param, tmp) as url, running_node(url, tmp, rate_limit=0) as n:
        yield n


@pytest_asyncio.fixture(loop_scope="module")
async def world(shared_node: Node) -> AsyncIterator[World]:
    """A new group (alice owner, bob admin, carol and dave members; eve outside)."""
    w = await make_world(shared_node)
    try:
        yield w
    finally:
        for c in w.c.values():
            await c.close()


FUTURE = 4_000_000_000_000  # ms, year 2096

# (frame, actor, fields, expected: a notice event when allowed, else the error code)
MATRIX: list[tuple[str, str, dict[str, Any], str]] = [
    # update: owner/admin
    ("group.update", "alice", {"name": "A"}, "updated"),
    ("group.update", "bob", {"announcement": "hi"}, "updated"),
    ("group.update", "carol", {"name": "C"}, "forbidden"),
    ("group.update", "eve", {"name": "E"}, "forbidden"),
    # kick: owner anyone, admin plain members only
    ("group.kick", "alice", {"user": "bob"}, "member_kicked"),
    ("group.kick", "alice", {"user": "carol"}, "member_kicked"),
    ("group.kick", "bob", {"user": "carol"}, "member_kicked"),
    ("group.kick", "bob", {"user": "alice"}, "forbidden"),
    ("group.kick", "carol", {"user": "dave"}, "forbidden"),
    ("group.kick", "eve", {"user": "dave"}, "forbidden"),
    ("group.kick", "alice", {"user": "eve"}, "not_found"),
    # mute: like kick
    ("group.mute", "alice", {"user": "bob", "until_ts": FUTURE}, "muted"),
    ("group.mute", "bob", {"user": "carol", "until_ts": FUTURE}, "muted"),
    ("group.mute", "bob", {"user": "alice", "until_ts": FUTURE}, "forbidden"),
    ("group.mute", "carol", {"user": "dave", "until_ts": FUTURE}, "forbidden"),
    ("group.mute", "alice", {"user": "eve", "until_ts": FUTURE}, "not_found"),
    # mute_all: owner/admin
    ("group.mute_all", "alice", {"on": True}, "mute_all"),
    ("group.mute_all", "bob", {"on": True}, "mute_all"),
    ("group.mute_all", "carol", {"on": True}, "forbidden"),
    # roles: owner only
    ("group.set_role", "alice", {"user": "carol", "role": "admin"}, "role_changed"),
    ("group.set_role", "alice", {"user": "bob", "role": "member"}, "role_changed"),
    ("group.set_role", "bob", {"user": "carol", "role": "admin"}, "forbidden"),
    ("group.set_role", "carol", {"user": "dave", "role": "admin"}, "forbidden"),
    ("group.set_role", "alice", {"user": "eve", "role": "admin"}, "not_found"),
    # transfer: owner only, to a current member
    ("group.transfer", "alice", {"user": "carol"}, "owner_transferred"),
    ("group.transfer", "bob", {"user": "carol"}, "forbidden"),
    ("group.transfer", "alice", {"user": "eve"}, "not_found"),
    # invite: owner/admin add; a member of an approval group files requests
    ("group.invite", "alice", {"users": ["eve"]}, "member_invited"),
    ("group.invite", "bob", {"users": ["eve"]}, "member_invited"),
    ("group.invite", "carol", {"users": ["eve"]}, "invite_requested"),
    ("group.invite", "eve", {"users": ["frank"]}, "forbidden"),
    # join (approval group): a request, announced in the timeline
    ("group.join", "eve", {}, "join_requested"),
    ("group.join", "carol", {}, "conflict"),
    # requests: owner/admin
    ("group.requests", "carol", {}, "forbidden"),
    ("group.requests", "eve", {}, "forbidden"),
    # leave: anyone but the owner
    ("group.leave", "carol", {}, "member_left"),
    ("group.leave", "bob", {}, "member_left"),
    ("group.leave", "alice", {}, "forbidden"),
    ("group.leave", "eve", {}, "forbidden"),
    # dissolve: owner only
    ("group.dissolve", "alice", {}, "dissolved"),
    ("group.dissolve", "bob", {}, "forbidden"),
    ("group.dissolve", "carol", {}, "forbidden"),
]


def _row_id(row: tuple[str, str, dict[str, Any], str]) -> str:
    frame, actor, fields, expected = row
    target = fields.get("user") or ",".join(fields.get("users", []))
    return f"{frame.removeprefix('group.')}-{actor}{'->' + target if target else ''}-{expected}"


@pytest.mark.parametrize("row", MATRIX, ids=[_row_id(r) for r in MATRIX])
async def test_authorization_matrix(world: World, row: tuple[str, str, dict[str, Any], str]):
    frame, actor, fields, expected = row
    before = await world.snapshot()
    if expected in ("forbidden", "not_found", "conflict"):
        await world.fails(actor, frame, expected, group=world.group, **fields)
        assert await world.snapshot() == before
        return
    data = await world.req(actor, frame, group=world.group, **fields)
    assert data["seq"] == before["last_seq"] + 1
    watcher = world.c["dave"]
    ev = await watcher.next_event("msg.new", where=lambda e: e["seq"] == data["seq"])
    assert ev["kind"] == "notice" and ev["body"]["event"] == expected
    assert ev["body"]["actor"] == actor


@pytest.mark.parametrize("actor", ["alice", "bob"])
async def test_owner_and_admin_see_and_settle_requests(world: World, actor: str):
    await world.req("eve", "group.join", group=world.group, message="let me in")
    reqs = (await world.req(actor, "group.requests", group=world.group))["requests"]
    assert [(r["user"], r["message"]) for r in reqs] == [("eve", "let me in")]
    await world.req(actor, "group.approve", group=world.group, user="eve")
    assert (await world.req(actor, "group.requests", group=world.group))["requests"] == []
    members = (await world.req("eve", "group.members", group=world.group))["members"]
    assert "eve" in [m["user"] for m in members]


async def test_member_cannot_approve_or_reject(world: World):
    await world.req("eve", "group.join", group=world.group)
    before = await world.snapshot()
    await world.fails("carol", "group.approve", "forbidden", group=world.group, user="eve")
    await world.fails("carol", "group.reject", "forbidden", group=world.group, user="eve")
    assert await world.snapshot() == before


async def test_muted_member_cannot_send_until_unmuted(world: World):
    await world.req("bob", "group.mute", group=world.group, user="carol", until_ts=FUTURE)
    await world.fails(
        "carol",
        "msg.send",
        "forbidden",
        to={"group": world.group},
        kind="text",
        body={"text": "hi"},
    )
    await world.req(
        "dave",
        "msg.send",
        to={"group": world.group},
        kind="text",
        body={"text": "others still talk"},
    )
    await world.req("bob", "group.mute", group=world.group, user="carol", until_ts=0)
    await world.c["carol"].send_text("back", group=world.group)


async def test_admin_muted_by_the_owner_cannot_send_until_unmuted(world: World):
    """The owner may mute an admin (the matrix): that mute must silence them, as it does a
    member (only mute_all exempts the owner and admins)."""
    await world.req("alice", "group.mute", group=world.group, user="bob", until_ts=FUTURE)
    before = await world.last_seq()
    await world.cannot_say("bob", "forbidden", "still talking?")
    await world.cannot_say("bob", "forbidden", "@all listen", mentions=["@all"])
    assert await world.last_seq() == before
    await world.req("alice", "group.mute", group=world.group, user="bob", until_ts=0)
    await world.say("bob", "back")


async def test_mute_all_silences_members_but_not_owner_or_admins(world: World):
    await world.req("bob", "group.mute_all", group=world.group, on=True)
    for member in ("carol", "dave"):
        await world.fails(
            member,
            "msg.send",
            "forbidden",
            to={"group": world.group},
            kind="text",
            body={"text": "hi"},
        )
    await world.c["alice"].send_text("owner speaks", group=world.group)
    await world.c["bob"].send_text("admin speaks", group=world.group)
    await world.req("alice", "group.mute_all", group=world.group, on=False)
    await world.c["carol"].send_text("free again", group=world.group)


async def test_at_all_is_for_owner_and_admins(world: World):
    await world.fails(
        "carol",
        "msg.send",
        "forbidden",
        to={"group": world.group},
        kind="text",
        body={"text": "@all hi"},
        mentions=["@all"],
    )
    await world.req(
        "bob",
        "msg.send",
        to={"group": world.group},
        kind="text",
        body={"text": "@all hi"},
        mentions=["@all"],
    )


async def test_outsider_cannot_send_read_or_list_members(world: World):
    await world.fails(
        "eve", "msg.send", "forbidden", to={"group": world.group}, kind="text", body={"text": "hi"}
    )
    await world.fails("eve", "msg.history", "forbidden", conv=world.conv)
    await world.fails("eve", "group.members", "forbidden", group=world.group)


async def test_kicked_member_reads_up_to_the_kick_only_and_cannot_send(world: World):
    await world.c["alice"].send_text("before", group=world.group)
    kick = await world.req("bob", "group.kick", group=world.group, user="carol")
    await world.c["alice"].send_text("after", group=world.group)
    hist = await world.req("carol", "msg.history", conv=world.conv, limit=100)
    seqs = [m["seq"] for m in hist["messages"]]
    assert seqs[-1] == kick["seq"]
    assert hist["messages"][-1]["body"]["event"] == "member_kicked"
    assert "after" not in [m["body"].get("text") for m in hist["messages"]]
    newer = await world.req("carol", "msg.history", conv=world.conv, after_seq=kick["seq"])
    assert newer["messages"] == []
    await world.fails(
        "carol",
        "msg.send",
        "forbidden",
        to={"group": world.group},
        kind="text",
        body={"text": "let me back"},
    )
    conv = next(
        c
        for c in (await world.req("carol", "conv.list"))["conversations"]
        if c["conv"] == world.conv
    )
    assert conv["left"] and conv["last_seq"] == kick["seq"]
    await world.fails("carol", "group.members", "forbidden", group=world.group)


async def test_departed_member_reads_up_to_departure_only(world: World):
    left = await world.req("dave", "group.leave", group=world.group)
    await world.c["alice"].send_text("after", group=world.group)
    hist = await world.req("dave", "msg.history", conv=world.conv, limit=100)
    assert hist["messages"][-1]["seq"] == left["seq"]
    await world.fails(
        "dave", "msg.send", "forbidden", to={"group": world.group}, kind="text", body={"text": "hi"}
    )


async def test_after_dissolve_nobody_sends_ops_are_not_found_history_stays(world: World):
    await world.c["carol"].send_text("last words", group=world.group)
    gone = await world.req("alice", "group.dissolve", group=world.group)
    for user in ("alice", "bob", "carol"):
        await world.fails(
            user,
            "msg.send",
            "not_found",
            to={"group": world.group},
            kind="text",
            body={"text": "anyone?"},
        )
    after: list[tuple[str, dict[str, Any]]] = [
        ("group.info", {}),
        ("group.members", {}),
        ("group.update", {"name": "x"}),
        ("group.invite", {"users": ["eve"]}),
        ("group.kick", {"user": "carol"}),
        ("group.dissolve", {}),
    ]
    for frame, fields in after:
        await world.fails("alice", frame, "not_found", group=world.group, **fields)
    await world.fails("eve", "group.join", "not_found", group=world.group)
    for user in ("alice", "carol"):
        hist = await world.req(user, "msg.history", conv=world.conv, limit=100)
        assert hist["messages"][-1]["seq"] == gone["seq"]
        assert "last words" in [m["body"].get("text") for m in hist["messages"]]
    assert world.group not in [
        g["group"] for g in (await world.req("carol", "group.list"))["groups"]
    ]
    await world.fails("eve", "msg.history", "forbidden", conv=world.conv)
