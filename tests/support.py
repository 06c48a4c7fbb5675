"""Test helpers: a real talkbridge node on 127.0.0.1, tokens, clients, throwaway databases."""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web

from loadtest.servers import create_database, drop_database
from signaling.app import create_app
from signaling.client import Client
from signaling.config import Config, load_config
from signaling.keys import STATE
from signaling.state import AppState

SECRET = "talkbridge-test-secret-0123456789abcdef"
REPO = Path(__file__).resolve().parent.parent


async def until(check: Callable[[], bool | Awaitable[bool]], timeout: float,
                every: float = 0.1) -> None:
    """Poll ``check`` until it holds; TimeoutError after ``timeout``."""
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await asyncio.sleep(every)


def token(user: str, ttl: int = 3600, secret: str = SECRET, **claims: Any) -> str:
    """An HS256 token for ``user``."""
    payload = {"sub": user, "exp": int(time.time()) + ttl, **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def fresh_pg_database() -> AsyncIterator[str]:
    """A new, empty PostgreSQL database (dropped afterwards); yields its URL."""
    url = await create_database("tb_test_")
    try:
        yield url
    finally:
        await drop_database(url)


@asynccontextmanager
async def fresh_store(backend: str, tmp: Path) -> AsyncIterator[str]:
    """A new store of ``backend``: "sqlite" (a file in ``tmp``) or "postgres" (a database)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp / 'store.sqlite3'}"
    else:
        async with fresh_pg_database() as url:
            yield url


@dataclass
class Node:
    """A running in-process talkbridge node."""

    config: Config
    runner: web.AppRunner
    port: int
    clients: list[Client] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def state(self) -> AppState:
        return self.runner.app[STATE]

    def token(self, user: str, **claims: Any) -> str:
        return token(user, **claims)

    async def settled(self) -> None:
        """Wait for the work requests left running after their replies (pushes)."""
        while tasks := list(self.state.extras.get("inflight", ())):
            await asyncio.gather(*tasks, return_exceptions=True)

    async def client(self, user: str, device: str | None = None, **kw: Any) -> Client:
        """A connected client of ``user`` (closed when the node stops)."""
        c = Client(self.ws_url, token(user), device=device, **kw)
        await c.connect()
        self.clients.append(c)
        return c

    async def stop(self) -> None:
        for c in self.clients:
            await c.close()
        await self.runner.cleanup()


async def start_node(store_url: str, data_dir: Path, **settings: Any) -> Node:
    """Start a node on a free loopback port with the test secret."""
    overrides = {"store": store_url, "data_dir": str(data_dir), "jwt_secret": SECRET, **settings}
    config = load_config(env={}, overrides=overrides)
    app = create_app(config)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return Node(config, runner, port)


@asynccontextmanager
async def running_node(store_url: str, data_dir: Path, **settings: Any) -> AsyncIterator[Node]:
    """:func:`start_node`, stopped on the way out."""
    node = await start_node(store_url, data_dir, **settings)
    try:
        yield node
    finally:
        await node.stop()


@dataclass
class ServerProcess:
    """A talkbridge node as a real subprocess (for crash, restart and signal tests)."""

    port: int
    data_dir: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "signaling", "serve", "--port", str(self.port)]
        cmd += ["--data-dir", str(self.data_dir)]
        with open(self.data_dir / "server.log", "ab") as log:
            return subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log, cwd=REPO)

    async def start(self) -> None:
        self.proc = self._spawn()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError((self.data_dir / "server.log").read_text()) from None
                await asyncio.sleep(0.05)
        raise TimeoutError("server did not start")

    def kill(self, sig: int) -> int:
        """Send ``sig`` and wait for the process to exit; returns its exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALKBRIDGE_")}
    env.update({"TALKBRIDGE_JWT_SECRET": SECRET, "TALKBRIDGE_LOG_LEVEL": "WARNING", **extra})
    return env
