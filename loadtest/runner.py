"""The coordinator: plans the run, starts workers, samples the server, shows live progress.

It records everything it receives (worker snapshots, phase changes, server samples) as raw
records; the analyzer turns those into the report, so a run's raw file can be re-analysed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue as queue_mod
import sys
import time
import uuid
from typing import Any, TextIO

from loadtest import procstat
from loadtest.analyzer import Live
from loadtest.scenarios import load_all
from loadtest.wire import Target
from loadtest.worker import Slice, WorkerPlan, entry


def parse_mix(spec: str) -> list[tuple[str, float]]:
    """``chat=70,group=20`` -> [("chat", 70.0), ("group", 20.0)]; a bare name weighs 1."""
    out: list[tuple[str, float]] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition("=")
        out.append((name.strip(), float(weight) if weight else 1.0))
    registry = load_all()
    for name, _ in out:
        if name not in registry:
            raise SystemExit(f"unknown scenario {name!r}; known: {', '.join(sorted(registry))}")
    return out


def plan_slices(mix: list[tuple[str, float]], opts: argparse.Namespace) -> list[Slice]:
    """Split clients over scenarios by weight; each slice gets its own block of user indices."""
    registry = load_all()
    total_w = sum(w for _, w in mix) or 1.0
    slices: list[Slice] = []
    first = 0
    for name, weight in mix:
        cls = registry[name]
        fixed = cls.fixed_clients(opts)
        clients = fixed or round(opts.clients * weight / total_w)
        units = cls.unit_count(clients, opts)
        slices.append(Slice(name, units, first))
        first += units * cls.per_unit(opts)
    return slices


class Run:
    """One run of a mix against one target."""

    def __init__(
        self,
        opts: argparse.Namespace,
        target: Target,
        server_pid: int | None,
        label: str = "target",
        out: TextIO | None = None,
    ) -> None:
        self.opts = opts
        self.target = target
        self.server_pid = server_pid
        self.label = label
        self.out = out if out is not None else sys.stderr
        self.run_id = opts.run_id or uuid.uuid4().hex[:6]
        self.mix = parse_mix(opts.mix)
        self.slices = plan_slices(self.mix, opts)
        self.records: list[dict[str, Any]] = []
        registry = load_all()
        for sl in self.slices:
            if target.transport not in registry[sl.scenario].transports:
                raise SystemExit(f"scenario {sl.scenario} cannot run over {target.transport}")

    def meta(self) -> dict[str, Any]:
        """What the analyzer needs to know about the run's set-up."""
        registry = load_all()
        return {
            "label": self.label,
            "run_id": self.run_id,
            "target": {
                "url": self.target.url,
                "transport": self.target.transport,
                "auth": self.target.auth,
                "server_pid": self.server_pid,
            },
            "workers": self.opts.workers,
            "duration": self.opts.duration,
            "ramp": self.opts.ramp,
            "drain": self.opts.drain,
            "cpus": os.cpu_count(),
            "scenarios": {
                sl.scenario: {
                    "units": sl.units,
                    "clients": sl.units * registry[sl.scenario].per_unit(self.opts),
                    "weight": dict(self.mix)[sl.scenario],
                    "headline": list(registry[sl.scenario].headline),
                }
                for sl in self.slices
            },
            "options": {
                k: v
                for k, v in vars(self.opts).items()
                if k not in ("secret", "func")
                and isinstance(v, (str, int, float, bool, type(None)))
            },
        }

    def execute(self) -> list[dict[str, Any]]:
        """Run the workers to completion and return the raw records."""
        live = Live(self.meta())
        self.records.append({"kind": "meta", **self.meta(), "t": time.time()})
        # Before any worker exists: the server's RSS with none of our connections.
        last_cpu = self._sample_server(time.time(), None, live)
        self.records.append({"kind": "speed", "t": time.time(), "ms": procstat.cpu_speed_ms()})
        self.records.append(
            {"kind": "machine", "t": time.time(), "busy": procstat.machine_busy_seconds(),
             "psi_us": procstat.cpu_pressure_us(), "loadavg": os.getloadavg()[0],
             "listen_overflows": procstat.listen_overflows()}
        )
        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        go = ctx.Event()
        go_at = ctx.Value("d", 0.0)
        procs = []
        for w in range(self.opts.workers):
            plan = WorkerPlan(
                worker=w,
                workers=self.opts.workers,
                target=self.target,
                slices=self.slices,
                opts=self.opts,
                run_id=self.run_id,
                duration=float(self.opts.duration),
                drain=float(self.opts.drain),
            )
            p = ctx.Process(target=entry, args=(plan, q, go, go_at), daemon=True)
            p.start()
            procs.append(p)
        ready: set[int] = set()
        done: set[int] = set()
        failures: list[str] = []
        last_sample = time.time()
        setup_deadline = last_sample + float(self.opts.setup_timeout)
        peak = 0
        hard_deadline = None
        try:
            while len(done) + len(failures) < len(procs):
                try:
                    msg = q.get(timeout=0.2)
                except queue_mod.Empty:
                    msg = None
                now = time.time()
                if msg is not None:
                    kind = msg[0]
                    if kind == "snap":
                        self.records.append({"kind": "snap", **msg[1]})
                        live.add(msg[1])
                        if live.connections() > peak:
                            # RSS at every new connection peak, so a short hold is not missed.
                            peak = live.connections()
                            self._sample_rss(now, live)
                    elif kind == "phase":
                        self.records.append(
                            {"kind": "phase", "worker": msg[1], "phase": msg[2], "t": msg[3]}
                        )
                        if msg[2] == "ready":
                            ready.add(msg[1])
                            if len(ready) == len(procs):
                                go_at.value = time.time() + 0.2
                                self.records.append({"kind": "go", "t": go_at.value})
                                go.set()
                                hard_deadline = (
                                    go_at.value + self.opts.duration + self.opts.drain + 120
                                )
                    elif kind == "done":
                        self.records.append({"kind": "snap", **msg[2]})
                        self.records.append({"kind": "facts", "worker": msg[1], "facts": msg[3]})
                        live.add(msg[2])
                        done.add(msg[1])
                    elif kind == "failed":
                        failures.append(f"worker {msg[1]}:\n{msg[2]}")
                if now - last_sample >= 1.0:
                    last_sample = now
                    self.records.append(
                        {"kind": "machine", "t": now, "busy": procstat.machine_busy_seconds(),
                         "psi_us": procstat.cpu_pressure_us(),
                         "listen_overflows": procstat.listen_overflows()}
                    )
                    last_cpu = self._sample_server(now, last_cpu, live)
                    self._progress(live, now)
                    for i, p in enumerate(procs):
                        if not p.is_alive() and i not in done and p.exitcode not in (0, None):
                            if not any(f.startswith(f"worker {i}:") for f in failures):
                                failures.append(f"worker {i}: exited with {p.exitcode}")
                if hard_deadline is None and now > setup_deadline:
                    failures.append(f"set-up not done after {self.opts.setup_timeout} s")
                    break
                if hard_deadline is not None and now > hard_deadline:
                    failures.append("run did not finish in time; workers killed")
                    break
                if len(ready) + len(failures) >= len(procs) and failures and not go.is_set():
                    go.set()
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
            self._newline()
        self.records.append({"kind": "speed", "t": time.time(), "ms": procstat.cpu_speed_ms()})
        for f in failures:
            self.records.append({"kind": "failure", "message": f})
        return self.records

    def _sample_rss(self, now: float, live: Live) -> None:
        if self.server_pid is None:
            return
        rss = procstat.rss_kb(self.server_pid)
        if rss is not None:
            self.records.append({"kind": "server", "t": now, "rss_kb": rss, "cpu": None,
                                 "connections": live.connections()})

    def _sample_server(
        self, now: float, last: tuple[float, float] | None, live: Live
    ) -> tuple[float, float] | None:
        if self.server_pid is None:
            return None
        rss = procstat.rss_kb(self.server_pid)
        # The whole tree: a server may run its media relay in worker processes.
        cpu = procstat.tree_cpu_seconds(self.server_pid)
        if rss is None or cpu is None:
            return last
        load = None
        if last is not None and now > last[0]:
            # A descendant that exited takes its CPU seconds with it: never below zero.
            load = max(0.0, (cpu - last[1]) / (now - last[0]))
        rec = {
            "kind": "server",
            "t": now,
            "rss_kb": rss,
            "cpu": load,
            "connections": live.connections(),
        }
        self.records.append(rec)
        live.server = rec
        return (now, cpu)

    def _progress(self, live: Live, now: float) -> None:
        line = live.line(now)
        if self.out.isatty():
            self.out.write("\r\033[K" + line)
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def _newline(self) -> None:
        if self.out.isatty():
            self.out.write("\n")
            self.out.flush()


def save_raw(path: str, records: list[dict[str, Any]]) -> None:
    """Write raw records as JSON lines (``talkbridge-load analyze`` reads them back)."""
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def load_raw(path: str) -> list[dict[str, Any]]:
    """Read raw records written by ``save_raw``."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
