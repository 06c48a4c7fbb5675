"""Fixtures for the TURN tests: a real coturn per test module, on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.turn.coturn import Coturn, run_coturn


@pytest.fixture(scope="module")
def coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    """A coturn with ``use-auth-secret`` listening on 127.0.0.1 (stopped by PID afterwards)."""
    workdir: Path = tmp_path_factory.mktemp("coturn")
    with run_coturn(workdir) as server:
        yield server
