"""What a scenario is and what it gets from its worker.

A scenario owns ``units`` (a pair, a group, a single connection...) of ``clients_per_unit``
clients each. Units are dealt round-robin to the workers; each worker builds one scenario
instance for its units and drives it through setup -> run -> drain -> finish -> close.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Coroutine
from typing import Any, ClassVar

import aiohttp

from loadtest.recorder import Recorder, Stats
from loadtest.tokens import Users
from loadtest.wire import ConnectError, SioConn, Target, WsConn, connect


async def request(
    conn: WsConn | SioConn, frame: dict[str, Any], timeout: float = 15.0
) -> dict[str, Any]:
    """Send a request and wait for its reply (set-up only: it wraps the connection's handler).

    Frames that are not this reply still reach the handler that was in place.
    """
    fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    inner = conn.handler
    rid = frame["id"]

    def catch(f: dict[str, Any]) -> None:
        if f.get("type") == "reply" and f.get("id") == rid and not fut.done():
            fut.set_result(f)
        else:
            inner(f)

    conn.handler = catch
    try:
        await conn.send(frame)
        async with asyncio.timeout(timeout):
            return await fut
    finally:
        conn.handler = inner


_background: set[asyncio.Task[None]] = set()


def fire(stats: Stats, coro: Coroutine[Any, Any, None]) -> None:
    """Run a send in the background; a failure is counted as ``send:<exception>``."""
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)  # keep a reference until it is done

    def done(t: asyncio.Task[None]) -> None:
        _background.discard(t)
        if not t.cancelled() and t.exception() is not None:
            stats.error(f"send:{type(t.exception()).__name__}")

    task.add_done_callback(done)


class Context:
    """A worker's shared means: recorder, HTTP session, target, users, options."""

    def __init__(
        self,
        worker: int,
        workers: int,
        target: Target,
        rec: Recorder,
        session: aiohttp.ClientSession,
        users: Users,
        opts: argparse.Namespace,
    ) -> None:
        self.worker = worker
        self.workers = workers
        self.target = target
        self.rec = rec
        self.session = session
        self.users = users
        self.opts = opts
        self.conns: list[WsConn | SioConn] = []

    async def connect(self, stats: Stats, index: int, device: str = "d1") -> WsConn | SioConn:
        """Connect and authenticate client ``index``; counted, timed, errors by code."""
        ident = self.users.identity(index, device)
        t = time.perf_counter()
        try:
            conn = await connect(self.session, self.target, ident.user, ident.device, ident.token)
        except ConnectError as exc:
            stats.error(f"connect:{exc.code}")
            raise
        stats.latency("connect", (time.perf_counter() - t) * 1e6)
        stats.count("connected")
        self.rec.connections += 1
        conn.stats = stats
        if isinstance(conn, WsConn):
            conn.on_close = self._closed
        self.conns.append(conn)
        return conn

    def _closed(self, conn: WsConn) -> None:
        self.rec.connections -= 1
        if not conn.closing:
            conn.stats.error(f"disconnect:{conn.close_code}")

    async def close_all(self) -> None:
        """Close every connection this worker opened."""
        for conn in self.conns:
            conn.closing = True
        await asyncio.gather(*(c.close() for c in self.conns), return_exceptions=True)
        for conn in self.conns:
            if isinstance(conn, SioConn):
                self.rec.connections -= 1
        self.conns.clear()


class Scenario:
    """Base class of scenario plugins; subclasses register with ``@register``."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    clients_per_unit: ClassVar[int] = 1
    transports: ClassVar[tuple[str, ...]] = ("ws",)
    # (counter, latency) shown in the live line and compared with baselines.
    headline: ClassVar[tuple[str, str]] = ("", "")
    # True when the baseline relays speak enough of the protocol for it (``--baseline``).
    baseline_ok: ClassVar[bool] = False

    def __init__(self, ctx: Context, units: list[int], first_client: int, total_units: int) -> None:
        self.ctx = ctx
        self.rec = ctx.rec.stats(self.name)
        self.opts = ctx.opts
        self.units = units
        self.first_client = first_client
        self.total_units = total_units

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this scenario's own options (prefix them with the scenario name)."""

    @classmethod
    def unit_count(cls, clients: int, opts: argparse.Namespace) -> int:
        """How many units ``clients`` clients make."""
        return max(1, clients // cls.per_unit(opts))

    @classmethod
    def units_for(cls, worker: int, workers: int, total_units: int) -> list[int]:
        """The units a worker takes part in: dealt round-robin by default."""
        return [u for u in range(total_units) if u % workers == worker]

    @classmethod
    def per_unit(cls, opts: argparse.Namespace) -> int:
        """Clients in one unit (may depend on options, e.g. group size)."""
        return cls.clients_per_unit

    def client_index(self, unit: int, member: int) -> int:
        """Global client index of ``member`` of ``unit``."""
        return self.first_client + unit * self.per_unit(self.opts) + member

    def ramp_delay(self, unit: int) -> float:
        """Seconds after the run starts at which ``unit`` starts (linear ramp-up)."""
        ramp = float(getattr(self.opts, "ramp", 0.0) or 0.0)
        return ramp * unit / max(1, self.total_units)

    async def connect(self, index: int, device: str = "d1") -> WsConn | SioConn:
        """Connect client ``index`` for this scenario."""
        return await self.ctx.connect(self.rec, index, device)

    @classmethod
    def fixed_clients(cls, opts: argparse.Namespace) -> int:
        """Clients this scenario wants whatever the mix says (0 = its share of --clients)."""
        return 0

    @classmethod
    def checks(cls, counts: dict[str, int], errors: dict[str, int]) -> dict[str, Any]:
        """Consistency checks over the run's totals; ``ok`` false means something went wrong."""
        return {"ok": not errors}

    async def setup(self) -> None:
        """Connect clients and prepare state (not part of the measured run)."""

    async def run(self, stop_at: float) -> None:
        """Generate load until the event loop's clock reaches ``stop_at``."""

    async def drain(self, deadline: float) -> None:
        """Wait (until ``deadline``) for what is still in flight."""

    def finish(self) -> dict[str, Any]:
        """Count what never arrived (into the recorder) and return scenario facts for the report."""
        return {}


REGISTRY: dict[str, type[Scenario]] = {}


def register(cls: type[Scenario]) -> type[Scenario]:
    """Class decorator: make a scenario available by its ``name``."""
    REGISTRY[cls.name] = cls
    return cls
