"""Fixtures of the group API tests: a group of five users on each store backend."""

from __future__ import annotations

import pytest

from tests.groups.world import World, make_world
from tests.support import Node


@pytest.fixture
async def world(any_node: Node) -> World:
    """alice (owner), bob (admin), carol and dave (members) in an approval group; eve outside."""
    return await make_world(any_node)
