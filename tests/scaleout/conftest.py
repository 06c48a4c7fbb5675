"""Fixtures of the scale-out tests: a Redis server per module, a fresh database per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.scaleout.cluster import Cluster
from tests.scaleout.redis_server import RedisServer
from tests.support import fresh_pg_database


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server (no persistence) on a free port, stopped by PID afterwards."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A new PostgreSQL database for this test."""
    async with fresh_pg_database() as url:
        yield url


@pytest.fixture
async def cluster(
    redis_server: RedisServer, pg_url: str, tmp_path: Path
) -> AsyncIterator[Cluster]:
    """Three node processes sharing ``redis_server`` and a fresh database."""
    c = Cluster(redis_server.url, pg_url, tmp_path)
    try:
        await c.start()
        yield c
    finally:
        await c.close()
        if not redis_server.ping():  # a test that stopped Redis leaves it running again
            redis_server.start()
