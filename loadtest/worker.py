"""One load-generating process: its share of every scenario's units, one event loop.

Talks to the coordinating process only through a multiprocessing queue (snapshots once a
second, phase changes) and two events (go, stop): no shared locks on the hot path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import traceback
from dataclasses import dataclass
from typing import Any

import aiohttp

from loadtest.recorder import Recorder
from loadtest.scenarios import load_all
from loadtest.scenarios.base import Context, Scenario
from loadtest.tokens import Users
from loadtest.wire import Target
from media.eventloop import new_event_loop
from signaling.cli import raise_fd_limit

LAG_PERIOD = 0.05


@dataclass
class Slice:
    """One scenario's share of the clients: which units exist and where its users start."""

    scenario: str
    units: int
    first_client: int


@dataclass
class WorkerPlan:
    """Everything a worker needs, picklable."""

    worker: int
    workers: int
    target: Target
    slices: list[Slice]
    opts: argparse.Namespace
    run_id: str
    duration: float
    drain: float


def entry(plan: WorkerPlan, queue: Any, go: Any, go_at: Any) -> None:
    """Process entry point."""
    raise_fd_limit()
    try:
        # The relay's loop: simulated call members read their UDP sockets as it does.
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(_main(plan, queue, go, go_at))
    except BaseException:
        queue.put(("failed", plan.worker, traceback.format_exc()))
        raise


async def _lag_monitor(rec: Recorder) -> None:
    """Records how late the loop wakes a sleeper: the generator's own saturation signal."""
    loop = asyncio.get_running_loop()
    while True:
        t = loop.time()
        await asyncio.sleep(LAG_PERIOD)
        rec.gen.latency("loop_lag", max(0.0, loop.time() - t - LAG_PERIOD) * 1e6)


async def _reporter(rec: Recorder, queue: Any) -> None:
    while True:
        await asyncio.sleep(1.0)
        queue.put(("snap", rec.snapshot()))


async def _main(plan: WorkerPlan, queue: Any, go: Any, go_at: Any) -> None:
    registry = load_all()
    rec = Recorder(plan.worker)
    users = Users(
        pattern=plan.opts.user_pattern,
        run=plan.run_id,
        secret=plan.opts.secret,
        tokens_file=plan.opts.tokens_file,
    )
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        ctx = Context(plan.worker, plan.workers, plan.target, rec, session, users, plan.opts)
        scenarios: list[Scenario] = []
        for sl in plan.slices:
            cls = registry[sl.scenario]
            mine = cls.units_for(plan.worker, plan.workers, sl.units)
            if mine:
                scenarios.append(cls(ctx, mine, sl.first_client, sl.units))
        reporter = loop.create_task(_reporter(rec, queue))
        lag = loop.create_task(_lag_monitor(rec))
        facts: dict[str, Any] = {}
        try:
            await asyncio.gather(*(s.setup() for s in scenarios))
            _phase(rec, queue, "ready")
            await loop.run_in_executor(None, go.wait)
            # All workers start together at the coordinator's wall-clock instant.
            wait = go_at.value - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
            _phase(rec, queue, "run")
            stop_at = loop.time() + plan.duration
            await asyncio.gather(*(s.run(stop_at) for s in scenarios))
            # A worker that only receives (or finished early) still listens until the end.
            if loop.time() < stop_at:
                await asyncio.sleep(stop_at - loop.time())
            _phase(rec, queue, "drain")
            deadline = loop.time() + plan.drain
            await asyncio.gather(*(s.drain(deadline) for s in scenarios))
            for s in scenarios:
                facts.setdefault(s.name, []).append(s.finish())
            _phase(rec, queue, "close")
            await ctx.close_all()
        finally:
            reporter.cancel()
            lag.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            with contextlib.suppress(asyncio.CancelledError):
                await lag
        queue.put(("done", plan.worker, rec.snapshot(), facts))


def _phase(rec: Recorder, queue: Any, phase: str) -> None:
    """Close the interval under the old phase so every count is tagged with its phase."""
    queue.put(("snap", rec.snapshot()))
    rec.phase = phase
    queue.put(("phase", rec.worker, phase, time.time()))
