"""Fixtures for the browser tests: the real server, Debian's Chromium, and a coturn."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, async_playwright

from tests.browser.pages import launch
from tests.browser.server import Server, run_server
from tests.turn.coturn import Coturn, run_coturn


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A talkbridge node on 127.0.0.1 with a temporary SQLite data dir."""
    with run_server(tmp_path / "data") as srv:
        yield srv


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[Coturn]:
    """A real coturn with TURN REST auth on 127.0.0.1 (stopped by PID afterwards)."""
    with run_coturn(tmp_path / "coturn") as turn:
        yield turn


@pytest.fixture
def turn_server(tmp_path: Path, coturn: Coturn) -> Iterator[Server]:
    """A talkbridge node that hands out credentials for ``coturn``."""
    env = {"TALKBRIDGE_TURN_URLS": coturn.url, "TALKBRIDGE_TURN_SECRET": coturn.secret}
    with run_server(tmp_path / "data", env) as srv:
        yield srv


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Chromium with fake camera and microphone; closed after the test."""
    async with async_playwright() as pw:
        b = await launch(pw)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture(autouse=True)
def _server_log_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    rep: Any = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for name in ("server", "turn_server"):
            srv = request.node.funcargs.get(name)
            if isinstance(srv, Server):
                print(f"--- {name} log (tail) ---\n{srv.log()[-6000:]}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
