"""Bad input to every group frame: the protocol's error code, and nothing changed.

Since no row may change anything, the rows share one group per store backend (a row that
did change something fails on its own snapshot check).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.groups.world import World, make_world
from tests.support import fresh_store, running_node

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(
    scope="module",
    loop_scope="module",
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
async def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    """One group (see tests/groups/world.py) per backend for the whole module (rate limit
    off: the rows follow each other faster than a person types)."""
    tmp: Path = tmp_path_factory.mktemp("bad-input")
    async with fresh_store(request.param, tmp) as url, running_node(url, tmp, rate_limit=0) as n:
        yield await make_world(n)


GROUP = object()  # stands for the world's group id

# (frame, actor, fields, code)
BAD: list[tuple[str, str, dict[str, Any], str]] = [
    ("group.create", "alice", {}, "bad_request"),
    ("group.create", "alice", {"name": "   "}, "bad_request"),
    ("group.create", "alice", {"name": 5}, "bad_request"),
    ("group.create", "alice", {"name": "x" * 101}, "bad_request"),
    ("group.create", "alice", {"name": "T", "members": "bob"}, "bad_request"),
    ("group.create", "alice", {"name": "T", "members": ["bad id!"]}, "bad_request"),
    ("group.create", "alice", {"name": "T", "join_policy": "anyone"}, "bad_request"),
    # No NUL in text stored in a column: PostgreSQL cannot hold one (see ids.no_nul).
    ("group.create", "alice", {"name": "a\x00b"}, "bad_request"),
    ("group.create", "alice", {"name": "T", "announcement": "\x00"}, "bad_request"),
    ("group.create", "alice", {"name": "T", "group": "no spaces"}, "bad_request"),
    ("group.create", "alice", {"name": "T", "group": GROUP}, "conflict"),
    ("group.info", "alice", {}, "bad_request"),
    ("group.info", "alice", {"group": 7}, "bad_request"),
    ("group.info", "alice", {"group": "nosuchgroup"}, "not_found"),
    ("group.members", "alice", {"group": GROUP, "limit": 0}, "bad_request"),
    ("group.members", "alice", {"group": GROUP, "limit": "ten"}, "bad_request"),
    ("group.members", "alice", {"group": GROUP, "cursor": 3}, "bad_request"),
    ("group.members", "alice", {"group": "nosuchgroup"}, "not_found"),
    ("group.update", "alice", {"group": GROUP}, "bad_request"),
    ("group.update", "alice", {"group": GROUP, "name": ""}, "bad_request"),
    ("group.update", "alice", {"group": GROUP, "join_policy": "everyone"}, "bad_request"),
    ("group.update", "alice", {"group": GROUP, "announcement": ["x"]}, "bad_request"),
    ("group.update", "alice", {"group": GROUP, "name": "a\x00b"}, "bad_request"),
    ("group.update", "alice", {"group": GROUP, "avatar": "https://x/\x00"}, "bad_request"),
    ("group.update", "alice", {"group": "nosuchgroup", "name": "x"}, "not_found"),
    ("group.invite", "alice", {"group": GROUP}, "bad_request"),
    ("group.invite", "alice", {"group": GROUP, "users": []}, "bad_request"),
    ("group.invite", "alice", {"group": GROUP, "users": "eve"}, "bad_request"),
    ("group.invite", "alice", {"group": GROUP, "users": ["eve", "b@d"]}, "bad_request"),
    ("group.invite", "alice", {"group": GROUP, "users": ["carol"]}, "conflict"),
    ("group.invite", "alice", {"group": GROUP, "users": ["eve", "carol"]}, "conflict"),
    ("group.invite", "alice", {"group": "nosuchgroup", "users": ["eve"]}, "not_found"),
    ("group.join", "eve", {}, "bad_request"),
    ("group.join", "eve", {"group": GROUP, "message": 12}, "bad_request"),
    ("group.join", "eve", {"group": GROUP, "message": "let me in\x00"}, "bad_request"),
    ("group.join", "eve", {"group": "nosuchgroup"}, "not_found"),
    ("group.requests", "alice", {"group": "nosuchgroup"}, "not_found"),
    ("group.approve", "alice", {"group": GROUP}, "bad_request"),
    ("group.approve", "alice", {"group": GROUP, "user": "eve"}, "not_found"),
    ("group.reject", "alice", {"group": GROUP, "user": "eve"}, "not_found"),
    ("group.reject", "alice", {"group": GROUP, "user": ""}, "bad_request"),
    ("group.kick", "alice", {"group": GROUP}, "bad_request"),
    ("group.kick", "alice", {"group": GROUP, "user": "alice"}, "bad_request"),
    ("group.kick", "alice", {"group": GROUP, "user": "eve"}, "not_found"),
    ("group.leave", "alice", {}, "bad_request"),
    ("group.leave", "carol", {"group": "nosuchgroup"}, "not_found"),
    ("group.dissolve", "alice", {"group": "nosuchgroup"}, "not_found"),
    ("group.set_role", "alice", {"group": GROUP, "user": "carol"}, "bad_request"),
    ("group.set_role", "alice", {"group": GROUP, "user": "carol", "role": "owner"}, "bad_request"),
    ("group.set_role", "alice", {"group": GROUP, "user": "bob", "role": "admin"}, "conflict"),
    ("group.set_role", "alice", {"group": GROUP, "user": "alice", "role": "admin"}, "bad_request"),
    ("group.transfer", "alice", {"group": GROUP}, "bad_request"),
    ("group.transfer", "alice", {"group": GROUP, "user": "alice"}, "bad_request"),
    ("group.transfer", "alice", {"group": GROUP, "user": "eve"}, "not_found"),
    ("group.mute", "alice", {"group": GROUP, "user": "carol"}, "bad_request"),
    ("group.mute", "alice", {"group": GROUP, "user": "carol", "until_ts": -1}, "bad_request"),
    ("group.mute", "alice", {"group": GROUP, "user": "carol", "until_ts": "soon"}, "bad_request"),
    ("group.mute", "alice", {"group": GROUP, "user": "alice", "until_ts": 0}, "bad_request"),
    ("group.mute_all", "alice", {"group": GROUP}, "bad_request"),
    ("group.mute_all", "alice", {"group": GROUP, "on": "yes"}, "bad_request"),
    ("group.mute_all", "alice", {"group": GROUP, "on": False}, "conflict"),
    ("msg.receipts", "alice", {"conv": "g:x y", "seq": 1}, "bad_request"),
    ("msg.receipts", "alice", {"conv": GROUP, "seq": 0}, "bad_request"),
    ("msg.receipts", "alice", {"conv": GROUP}, "bad_request"),
]


def _fill(world: World, fields: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in fields.items():
        if v is GROUP:
            v = world.conv if k == "conv" else world.group
        out[k] = v
    return out


def _id(row: tuple[str, str, dict[str, Any], str]) -> str:
    frame, _, fields, code = row
    shown = ",".join(f"{k}={'G' if v is GROUP else str(v)[:12]}" for k, v in fields.items())
    return f"{frame}({shown})-{code}"


@pytest.mark.parametrize("row", BAD, ids=[_id(r) for r in BAD])
async def test_bad_group_request_is_refused_and_changes_nothing(
    world: World, row: tuple[str, str, dict[str, Any], str]
):
    frame, actor, fields, code = row
    before = await world.snapshot()
    groups_before = await world.req(actor, "group.list")
    err = await world.fails(actor, frame, code, **_fill(world, fields))
    assert err.message
    assert await world.snapshot() == before
    assert await world.req(actor, "group.list") == groups_before
    # The connection stays up.
    assert (await world.req(actor, "group.info", group=world.group))["group"]["name"] == "Team"
