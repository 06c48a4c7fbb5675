"""``connect``: a connection storm, then an idle hold.

Opens every client's connection at ``--connect-rate`` per second (over all workers), each
authenticated, then holds them idle for ``--hold`` seconds (or until the run ends, whichever
is later) and counts the ones the server dropped. The analyzer turns the server's RSS at the
peak connection count into RSS per connection when the server is local.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from loadtest.scenarios.base import Context, Scenario, register
from loadtest.wire import ConnectError, SioConn, WsConn


@register
class Connect(Scenario):
    """Connection storm and idle hold."""

    name = "connect"
    help = "open authenticated connections at a rate, hold them idle"
    clients_per_unit = 1
    transports = ("ws", "socketio")
    baseline_ok = True
    headline = ("connected", "connect")

    def __init__(self, ctx: Context, units: list[int], first_client: int, total_units: int) -> None:
        super().__init__(ctx, units, first_client, total_units)
        self.conns: list[WsConn | SioConn] = []
        self.failed = 0

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Storm rate and hold time."""
        parser.add_argument(
            "--connect-rate",
            type=float,
            default=1000.0,
            help="connect: new connections per second over all workers (0 = as fast as possible)",
        )
        parser.add_argument(
            "--hold", type=float, default=5.0, help="connect: seconds to hold them idle"
        )
        parser.add_argument(
            "--connections", type=int, default=0, help="connect: number of connections"
        )

    @classmethod
    def fixed_clients(cls, opts: argparse.Namespace) -> int:
        """``--connections`` fixes the count regardless of the mix."""
        return int(getattr(opts, "connections", 0) or 0)

    @classmethod
    def checks(cls, counts: dict[str, int], errors: dict[str, int]) -> dict[str, Any]:
        """Every connection opened and was still open at the end of the hold."""
        connected, held = counts.get("connected", 0), counts.get("held", 0)
        return {
            "connected": connected,
            "held": held,
            "dropped": counts.get("dropped", 0),
            "ok": connected > 0 and held == connected and not errors,
        }

    async def run(self, stop_at: float) -> None:
        """Open all connections at the configured rate, then hold."""
        loop = asyncio.get_running_loop()
        rate = float(self.opts.connect_rate)
        start = loop.time()
        sem = asyncio.Semaphore(int(self.opts.connect_concurrency))
        tasks: list[asyncio.Task[None]] = []

        async def one(index: int) -> None:
            async with sem:
                try:
                    conn = await self.connect(index)
                except ConnectError:
                    self.failed += 1
                    return
            conn.start()
            self.conns.append(conn)

        for n, unit in enumerate(self.units):
            if rate > 0:
                # Global schedule: unit u opens at u / rate, whichever worker owns it.
                due = start + unit / rate
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            tasks.append(loop.create_task(one(self.client_index(unit, 0))))
            if n % 256 == 255:
                await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        # One sample per worker: the analyzer takes the longest as the storm's duration.
        self.rec.latency("storm", (loop.time() - start) * 1e6)
        hold_until = max(stop_at, loop.time() + float(self.opts.hold))
        while loop.time() < hold_until:  # noqa: ASYNC110
            await asyncio.sleep(min(0.5, max(0.0, hold_until - loop.time())))

    def finish(self) -> dict[str, Any]:
        """How many are still open after the hold."""
        held = sum(1 for c in self.conns if not c.closed)
        self.rec.count("held", held)
        self.rec.count("dropped", len(self.conns) - held)
        return {"opened": len(self.conns), "failed": self.failed, "held": held}
