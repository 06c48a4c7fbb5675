"""Several talkbridge node processes sharing one Redis and one PostgreSQL database."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from signaling.client import Client
from tests.support import ServerProcess, free_port, server_env, token, until

# Short heartbeats so a killed node's presence goes within seconds in tests.
BUS_PARAMS = "heartbeat=0.5&node_ttl=3&backoff_max=1"


@dataclass
class Cluster:
    """``n`` signaling nodes (``n1``…) on 127.0.0.1; clients are spread over them."""

    redis_url: str
    store_url: str
    workdir: Path
    n: int = 3
    prefix: str = field(default_factory=lambda: f"t{secrets.token_hex(3)}:")
    nodes: list[ServerProcess] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)  # more TALKBRIDGE_* for every node
    clients: list[Client] = field(default_factory=list)

    @property
    def bus_url(self) -> str:
        return f"{self.redis_url}?{BUS_PARAMS}&prefix={self.prefix}"

    def node_env(self, i: int) -> dict[str, str]:
        return server_env(
            TALKBRIDGE_REDIS=self.bus_url,
            TALKBRIDGE_STORE=self.store_url,
            TALKBRIDGE_NODE_ID=f"n{i + 1}",
            TALKBRIDGE_RATE_LIMIT="0",
            TALKBRIDGE_SHUTDOWN_GRACE="3",
            TALKBRIDGE_LOG_LEVEL=os.environ.get("TALKBRIDGE_TEST_LOG_LEVEL", "WARNING"),
            **self.settings,
        )

    async def start(self) -> None:
        """Start every node (concurrently) and wait until each is ready."""
        for i in range(self.n):
            d = self.workdir / f"n{i + 1}"
            d.mkdir(parents=True, exist_ok=True)
            self.nodes.append(ServerProcess(free_port(), d, self.node_env(i)))
        await asyncio.gather(*(node.start() for node in self.nodes))
        await asyncio.gather(*(self.wait_ready(i) for i in range(self.n)))

    async def restart(self, i: int) -> None:
        """Start node ``i`` again (same port, same node id) and wait until it is ready."""
        await self.nodes[i].start()
        await self.wait_ready(i)

    async def readyz(self, i: int) -> int:
        """The HTTP status of node ``i``'s /readyz (0 when it does not answer)."""
        try:
            async with aiohttp.ClientSession() as s, s.get(
                self.nodes[i].url + "/readyz", timeout=aiohttp.ClientTimeout(total=3)
            ) as resp:
                return resp.status
        except (aiohttp.ClientError, TimeoutError):
            return 0

    async def wait_ready(self, i: int, want: int = 200, timeout: float = 20) -> None:
        async def ready() -> bool:
            return await self.readyz(i) == want

        await until(ready, timeout)

    def urls_from(self, home: int) -> list[str]:
        """Every node's WebSocket URL, starting at ``home`` (the client fails over in order)."""
        return [self.nodes[(home + k) % self.n].ws_url for k in range(self.n)]

    async def client(self, user: str, device: str, home: int, **kw: Any) -> Client:
        """A connected client of ``user`` whose first node is ``home``."""
        kw.setdefault("max_backoff", 1.0)
        c = Client(self.urls_from(home), token(user), device=device, **kw)
        await c.connect()
        self.clients.append(c)
        return c

    def kill(self, i: int, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to node ``i`` and wait for it to exit."""
        return self.nodes[i].kill(sig)

    async def close(self) -> None:
        """Close clients, then stop every node process by PID."""
        await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)
        for node in self.nodes:
            node.stop()

    def logs(self) -> str:
        out = []
        for node in self.nodes:
            log = node.data_dir / "server.log"
            if log.exists():
                out.append(f"--- {node.data_dir.name}\n{log.read_text()[-4000:]}")
        return "\n".join(out)
