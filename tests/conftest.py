"""Shared fixtures. Tests marked ``netns`` must run inside scripts/netns-run (make test does)."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from im_bridge.store import Store, open_store
from media.eventloop import new_event_loop
from media.host_addresses import restrict_host_addresses
from tests.support import Node, fresh_store, running_node


def only_loopback() -> bool:
    """True when this process sits in a network namespace whose only interface is ``lo``."""
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.strip()]
    return names == ["lo"]


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
    """Async tests run on the loop the server and the relay run on (media/eventloop.py)."""
    return {"media-loop": new_event_loop}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any(item.get_closest_marker("netns") for item in items) and not only_loopback():
        skip = pytest.mark.skip(reason="WebRTC/browser test: run it through scripts/netns-run")
        for item in items:
            if item.get_closest_marker("netns"):
                item.add_marker(skip)


@pytest.fixture
def loopback_only() -> Iterator[None]:
    """aiortc gathers host candidates on 127.0.0.1 only (for the WebRTC tests)."""
    restrict_host_addresses(["127.0.0.1"])
    yield
    restrict_host_addresses(None)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh store of each kind: an SQLite file, then a new PostgreSQL database."""
    async with fresh_store(request.param, tmp_path) as url:
        yield url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """An open store of each kind (see ``store_url``), closed after the test."""
    s = open_store(store_url)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    """A node on SQLite (the embedded default)."""
    async with running_node(f"sqlite:///{tmp_path / 'store.sqlite3'}", tmp_path) as n:
        yield n


@pytest.fixture
async def any_node(store_url: str, tmp_path: Path) -> AsyncIterator[Node]:
    """A node on each store backend (the same test runs against SQLite and PostgreSQL)."""
    async with running_node(store_url, tmp_path) as n:
        yield n
