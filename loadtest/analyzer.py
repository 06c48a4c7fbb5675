"""Turns raw run records (worker snapshots, phases, server samples) into the report.

The report's schema is documented in loadtest/README.md; ``SCHEMA`` names its version.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from typing import Any

from hdrh.histogram import HdrHistogram

from loadtest.recorder import new_histogram
from loadtest.scenarios import load_all

SCHEMA = "talkbridge-load/1"
# A worker above this share of one core during the run was limiting the load it offered.
CPU_SATURATED = 0.85
LAG_P99_MS = 20.0
# Below this share of a core, a lagging worker was waiting for a CPU rather than busy.
CPU_LAG_BUSY = 0.6
# CPU pressure (share of the run some task waited for a CPU) that marks a shared machine.
PSI_DISTURBED = 0.2


def _decode(encoded: str) -> HdrHistogram:
    return HdrHistogram.decode(encoded.encode("ascii") if isinstance(encoded, str) else encoded)


def _add(h: HdrHistogram, encoded: str) -> None:
    h.add(_decode(encoded))


def _merge(into: dict[str, HdrHistogram], name: str, interval: HdrHistogram) -> None:
    h = into.get(name)
    if h is None:
        h = into[name] = new_histogram()
    h.add(interval)


def summarize(h: HdrHistogram) -> dict[str, float | int]:
    """Count and percentiles (milliseconds) of a microsecond histogram."""
    n = h.get_total_count()
    if not n:
        return {"count": 0}

    def ms(v: float) -> float:
        return round(v / 1000.0, 3)

    return {
        "count": n,
        "min": ms(h.get_min_value()),
        "mean": ms(h.get_mean_value()),
        "p50": ms(h.get_value_at_percentile(50)),
        "p90": ms(h.get_value_at_percentile(90)),
        "p95": ms(h.get_value_at_percentile(95)),
        "p99": ms(h.get_value_at_percentile(99)),
        "p999": ms(h.get_value_at_percentile(99.9)),
        "max": ms(h.get_max_value()),
    }


class Live:
    """Running totals for the live progress line."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.meta = meta
        self.last: dict[int, dict[str, Any]] = {}
        self.totals: dict[str, Counter[str]] = defaultdict(Counter)
        self.errors: Counter[str] = Counter()
        self.server: dict[str, Any] | None = None
        self.started = time.time()

    def add(self, snap: dict[str, Any]) -> None:
        """Take one worker snapshot."""
        self.last[snap["worker"]] = snap
        for name, s in snap["scenarios"].items():
            self.totals[name].update(s["counts"])
            self.errors.update(s["errors"])

    def connections(self) -> int:
        """Open connections as last reported by the workers."""
        return sum(s["connections"] for s in self.last.values())

    def line(self, now: float) -> str:
        """One status line: phase, connections, headline rate and latency, errors, CPU."""
        phases = sorted({s["phase"] for s in self.last.values()}) or ["start"]
        parts = [f"[{'/'.join(phases)} {now - self.started:5.0f}s]", f"conns {self.connections()}"]
        for name, info in self.meta["scenarios"].items():
            counter, lat = info["headline"]
            rate = 0.0
            h = new_histogram()
            for s in self.last.values():
                sc = s["scenarios"].get(name)
                if sc is None:
                    continue
                span = max(s["t1"] - s["t0"], 1e-3)
                rate += sc["counts"].get(counter, 0) / span
                if lat in sc["hists"]:
                    _add(h, sc["hists"][lat])
            text = f"{name}: {counter} {rate:,.0f}/s"
            if h.get_total_count():
                text += (
                    f" {lat} p50 {h.get_value_at_percentile(50) / 1000:.1f}"
                    f" p99 {h.get_value_at_percentile(99) / 1000:.1f}ms"
                )
            parts.append(text)
        parts.append(f"errors {sum(self.errors.values())}")
        if self.last:
            cpu = max(s["cpu"] for s in self.last.values())
            parts.append(f"gen cpu {cpu * 100:.0f}%")
        if self.server is not None:
            cpu_s = self.server.get("cpu")
            srv = f"server rss {self.server['rss_kb'] / 1024:.0f}MB"
            if cpu_s is not None:
                srv += f" cpu {cpu_s * 100:.0f}%"
            parts.append(srv)
        return " | ".join(parts)


def analyze(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge raw records into the report (see README: report schema)."""
    registry = load_all()
    meta = next(r for r in records if r["kind"] == "meta")
    snaps = [r for r in records if r["kind"] == "snap"]
    phases = [r for r in records if r["kind"] == "phase"]
    server = [r for r in records if r["kind"] == "server"]
    failures = [r["message"] for r in records if r["kind"] == "failure"]
    go = next((r["t"] for r in records if r["kind"] == "go"), None)
    if go is None:
        go = min((s["t0"] for s in snaps), default=meta["t"])
    drain_starts = [p["t"] for p in phases if p["phase"] == "drain"]
    close_starts = [p["t"] for p in phases if p["phase"] == "close"]
    setup_end = max((p["t"] for p in phases if p["phase"] == "ready"), default=go)
    run_end = max(drain_starts) if drain_starts else max((s["t1"] for s in snaps), default=go)
    drain_end = max(close_starts) if close_starts else run_end
    run_s = max(run_end - go, 1e-6)
    steady_from = go + float(meta["ramp"] or 0)
    if steady_from >= run_end - 0.5:
        steady_from = go  # no steady window after the ramp: use the whole run
    steady_s = max(run_end - steady_from, 1e-6)

    scen: dict[str, Any] = {}
    for name, info in meta["scenarios"].items():
        counts: Counter[str] = Counter()
        run_counts: Counter[str] = Counter()
        steady_counts: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        hists: dict[str, HdrHistogram] = {}
        # The same, from the intervals at full load only (after the ramp, before the drain).
        steady_hists: dict[str, HdrHistogram] = {}
        for s in snaps:
            sc = s["scenarios"].get(name)
            if sc is None:
                continue
            counts.update(sc["counts"])
            errors.update(sc["errors"])
            frac = 0.0
            if s["phase"] == "run":
                run_counts.update(sc["counts"])
                # Intervals are ~1 s; weigh one that straddles the ramp end by its overlap.
                frac = _overlap(s["t0"], s["t1"], steady_from, run_end)
                if frac:
                    for k, v in sc["counts"].items():
                        steady_counts[k] += v * frac
            for k, enc in sc["hists"].items():
                interval = _decode(enc)
                _merge(hists, k, interval)
                # A histogram cannot be split: an interval straddling the ramp's end
                # counts as steady when most of it is.
                if frac >= 0.5:
                    _merge(steady_hists, k, interval)
        cls = registry.get(name)
        checks = cls.checks(dict(counts), dict(errors)) if cls else {}
        if "storm" in hists and hists["storm"].get_max_value():
            # connect: connections per second while the storm lasted (slowest worker).
            checks["storm_s"] = round(hists["storm"].get_max_value() / 1e6, 3)
            checks["storm_connects_per_s"] = round(
                counts.get("connected", 0) / (hists["storm"].get_max_value() / 1e6), 1
            )
        counter, lat = info["headline"]
        latency = {k: summarize(h) for k, h in sorted(hists.items())}
        steady_latency = {k: summarize(h) for k, h in sorted(steady_hists.items())}
        none: dict[str, float | int] = {"count": 0}
        scen[name] = {
            "clients": info["clients"],
            "units": info["units"],
            "weight": info["weight"],
            "counts": dict(sorted(counts.items())),
            "errors": dict(sorted(errors.items())),
            "rates": {k: round(v / run_s, 1) for k, v in sorted(run_counts.items())},
            "steady_rates": {k: round(v / steady_s, 1) for k, v in sorted(steady_counts.items())},
            "latency_ms": latency,
            "steady_latency_ms": steady_latency,
            "headline": {
                "counter": counter,
                "per_s": round(run_counts.get(counter, 0) / run_s, 1),
                "steady_per_s": round(steady_counts.get(counter, 0) / steady_s, 1),
                "latency": lat,
                "latency_ms": latency.get(lat, none),
                # At full load, as the steady rate: the ramp's lightly loaded seconds and
                # the drain's last replies would otherwise pull the percentiles down.
                "steady_latency_ms": steady_latency.get(lat, latency.get(lat, none)),
            },
            "checks": checks,
            "facts": _facts(records, name),
        }

    report: dict[str, Any] = {
        "schema": SCHEMA,
        "label": meta["label"],
        "run_id": meta["run_id"],
        "started_at": _iso(meta["t"]),
        "target": meta["target"],
        "config": {
            "workers": meta["workers"],
            "duration_s": meta["duration"],
            "ramp_s": meta["ramp"],
            "drain_s": meta["drain"],
            "options": meta["options"],
        },
        "machine": {
            "cpus": meta["cpus"],
            "loadavg_1m_before": next(
                (r.get("loadavg") for r in records if r["kind"] == "machine"), None
            ),
            "listen_overflows": _listen_overflows(records),
            "cpu_speed_ms": _cpu_speed(records),
        },
        "phases_s": {
            "setup": round(setup_end - meta["t"], 3),
            "run": round(run_s, 3),
            "drain": round(max(drain_end - run_end, 0.0), 3),
        },
        "scenarios": scen,
        "errors": _all_errors(scen),
        "connections": {
            "peak": max((r.get("connections", 0) for r in _conn_series(snaps)), default=0),
        },
        "server": _server_summary(server, meta),
        "generator": _generator_summary(snaps, server, meta, records, go, run_end),
        "timeseries": _timeseries(snaps, server, go, meta),
        "failures": failures,
    }
    report["ok"] = not failures and all(s["checks"].get("ok", True) for s in scen.values())
    return report


def _overlap(t0: float, t1: float, a: float, b: float) -> float:
    span = t1 - t0
    if span <= 0:
        return 1.0 if a <= t1 <= b else 0.0
    return max(0.0, min(t1, b) - max(t0, a)) / span


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _facts(records: list[dict[str, Any]], name: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in records:
        if r["kind"] != "facts":
            continue
        for f in r["facts"].get(name, []):
            for k, v in f.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[k] = out.get(k, 0) + v
                else:
                    out[k] = v
    return out


def _all_errors(scen: dict[str, Any]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for name, s in scen.items():
        for code, n in s["errors"].items():
            total[f"{name}/{code}"] += n
    return dict(sorted(total.items()))


def _conn_series(snaps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Total open connections after each snapshot (latest value per worker)."""
    latest: dict[int, int] = {}
    out = []
    for s in sorted(snaps, key=lambda s: s["t1"]):
        latest[s["worker"]] = s["connections"]
        out.append({"t": s["t1"], "connections": sum(latest.values())})
    return out


def _server_summary(server: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any] | None:
    if not server:
        return None
    start = server[0]
    peak_conn = max(server, key=lambda r: (r["connections"], r["t"]))
    cpus = [r["cpu"] for r in server if r.get("cpu") is not None]
    out: dict[str, Any] = {
        "pid": meta["target"]["server_pid"],
        "rss_kb_start": start["rss_kb"],
        "rss_kb_peak": max(r["rss_kb"] for r in server),
        "peak_connections": peak_conn["connections"],
        "rss_kb_at_peak_connections": peak_conn["rss_kb"],
        "rss_per_connection_kb": None,
        "cpu_avg": round(sum(cpus) / len(cpus), 3) if cpus else None,
        "cpu_max": round(max(cpus), 3) if cpus else None,
    }
    gained = peak_conn["connections"] - start["connections"]
    if gained > 0:
        out["rss_per_connection_kb"] = round((peak_conn["rss_kb"] - start["rss_kb"]) / gained, 2)
    return out


def _generator_summary(
    snaps: list[dict[str, Any]],
    server: list[dict[str, Any]],
    meta: dict[str, Any],
    records: list[dict[str, Any]],
    go: float,
    run_end: float,
) -> dict[str, Any]:
    run = [s for s in snaps if s["phase"] == "run"]
    # (cpu seconds, wall seconds) per worker: weighted, so a snapshot taken right after a
    # phase change (a few ms long) cannot swing the average.
    per_worker: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    lag = new_histogram()
    for s in run:
        span = max(0.0, s["t1"] - s["t0"])
        per_worker[s["worker"]][0] += s["cpu"] * span
        per_worker[s["worker"]][1] += span
        enc = s["generator"]["hists"].get("loop_lag")
        if enc:
            _add(lag, enc)
    cpu_avg = {w: round(v[0] / v[1], 3) for w, v in per_worker.items() if v[1] > 0}
    lag_summary = summarize(lag)
    reasons = []  # the generator itself limited the load it offered
    disturbed = []  # the machine was shared: figures are lower bounds
    for w, c in sorted(cpu_avg.items()):
        if c >= CPU_SATURATED:
            reasons.append(f"worker {w} used {c * 100:.0f}% of a core during the run")
    lagging = bool(lag_summary.get("count")) and float(lag_summary["p99"]) > LAG_P99_MS
    machine = None
    srv_cpu = [r["cpu"] for r in server if r.get("cpu") is not None]
    if srv_cpu and cpu_avg:
        total = sum(cpu_avg.values()) + sum(srv_cpu) / len(srv_cpu)
        machine = round(total / max(1, meta["cpus"] or 1), 3)
        if machine >= 0.9:
            disturbed.append(
                f"server and generator together used {machine * 100:.0f}% of the machine's "
                f"{meta['cpus']} cores: they compete, figures are a lower bound"
            )
    other = _other_load(records, go, run_end, sum(cpu_avg.values()), srv_cpu)
    pressure = _cpu_pressure(records, go, run_end)
    if lagging:
        text = f"event-loop lag p99 {lag_summary['p99']} ms > {LAG_P99_MS} ms"
        busy = max(cpu_avg.values(), default=0.0)
        if busy < CPU_LAG_BUSY and pressure is not None and pressure >= PSI_DISTURBED:
            # Workers were mostly idle and waited for a CPU: the lag is the machine's.
            disturbed.append(f"{text} while the workers used at most {busy * 100:.0f}% of a core")
        else:
            reasons.append(text)
    if pressure is not None and pressure >= PSI_DISTURBED:
        disturbed.append(
            f"runnable tasks waited for a CPU {pressure * 100:.0f}% of the run (CPU pressure)"
        )
    if other is not None and other >= 0.25:
        disturbed.append(
            f"other processes used {other:.2f} cores during the run: the figures are disturbed"
        )
    return {
        "workers": meta["workers"],
        "cpu_avg_per_worker": {str(w): c for w, c in sorted(cpu_avg.items())},
        "other_processes_cores": other,
        "cpu_pressure": pressure,
        "loop_lag_ms": lag_summary,
        "machine_cpu_share": machine,
        "bottleneck": bool(reasons),
        "reasons": reasons,
        "disturbed": disturbed,
    }


def _other_load(
    records: list[dict[str, Any]], go: float, run_end: float, gen: float, srv_cpu: list[float]
) -> float | None:
    """Cores busy during the run with neither the server nor the generator (noise)."""
    machine = [r for r in records if r["kind"] == "machine" and go <= r["t"] <= run_end + 0.5]
    if len(machine) < 2:
        return None
    span = machine[-1]["t"] - machine[0]["t"]
    if span <= 0:
        return None
    busy = (machine[-1]["busy"] - machine[0]["busy"]) / span
    # The coordinator itself is small but not nothing; it counts as generator.
    srv = sum(srv_cpu) / len(srv_cpu) if srv_cpu else 0.0
    return round(max(0.0, float(busy) - gen - srv), 3)


def _cpu_speed(records: list[dict[str, Any]]) -> dict[str, float] | None:
    """``{before, after}``: the machine's speed (procstat.cpu_speed_ms) either side of the run."""
    speeds = [r["ms"] for r in records if r["kind"] == "speed"]
    return {"before": speeds[0], "after": speeds[-1]} if speeds else None


def _listen_overflows(records: list[dict[str, Any]]) -> int | None:
    """Listen-queue overflows on this host during the whole run (dropped SYNs/handshakes)."""
    vals = [
        r["listen_overflows"] for r in records
        if r["kind"] == "machine" and r.get("listen_overflows") is not None
    ]
    return int(vals[-1] - vals[0]) if len(vals) >= 2 else None


def _cpu_pressure(records: list[dict[str, Any]], go: float, run_end: float) -> float | None:
    """Share of the run during which some runnable task waited for a CPU (PSI ``some``)."""
    machine = [
        r for r in records
        if r["kind"] == "machine" and r.get("psi_us") is not None and go <= r["t"] <= run_end + 0.5
    ]
    if len(machine) < 2 or machine[-1]["t"] <= machine[0]["t"]:
        return None
    stalled = float(machine[-1]["psi_us"] - machine[0]["psi_us"]) / 1e6
    return round(stalled / float(machine[-1]["t"] - machine[0]["t"]), 3)


def _timeseries(
    snaps: list[dict[str, Any]], server: list[dict[str, Any]], go: float, meta: dict[str, Any]
) -> list[dict[str, Any]]:
    buckets: dict[int, dict[str, Any]] = {}

    def bucket(t: float) -> dict[str, Any]:
        k = math.floor(t - go)
        b = buckets.get(k)
        if b is None:
            b = buckets[k] = {
                "t": k,
                "phase": None,
                "counts": defaultdict(Counter),
                "errors": Counter(),
                "hists": defaultdict(dict),
                "conns": {},
                "gen_cpu": {},
            }
        return b

    for s in snaps:
        b = bucket(s["t1"])
        b["phase"] = s["phase"]
        b["conns"][s["worker"]] = s["connections"]
        b["gen_cpu"][s["worker"]] = s["cpu"]
        for name, sc in s["scenarios"].items():
            b["counts"][name].update(sc["counts"])
            b["errors"].update({f"{name}/{k}": v for k, v in sc["errors"].items()})
            for k, enc in sc["hists"].items():
                _merge(b["hists"][name], k, _decode(enc))
    srv_by: dict[int, dict[str, Any]] = {}
    for r in server:
        k = math.floor(r["t"] - go)
        if r.get("cpu") is not None or k not in srv_by:
            srv_by[k] = r
    out = []
    conns: dict[int, int] = {}
    for k in sorted(set(buckets) | set(srv_by)):
        bk = buckets.get(k)
        row: dict[str, Any] = {"t": k, "phase": None, "scenarios": {}, "errors": {}}
        if bk is not None:
            conns.update(bk["conns"])
            row["phase"] = bk["phase"]
            row["errors"] = dict(bk["errors"])
            row["generator_cpu_max"] = round(max(bk["gen_cpu"].values()), 3)
            for name in set(bk["counts"]) | set(bk["hists"]):
                row["scenarios"][name] = {
                    "counts": dict(bk["counts"][name]),
                    "latency_ms": {
                        lk: {kk: v for kk, v in summarize(h).items() if kk in ("p50", "p99", "max")}
                        for lk, h in bk["hists"][name].items()
                    },
                }
        row["connections"] = sum(conns.values())
        srv = srv_by.get(k)
        if srv is not None:
            row["server_rss_kb"] = srv["rss_kb"]
            row["server_cpu"] = None if srv.get("cpu") is None else round(srv["cpu"], 3)
        out.append(row)
    return out


def compare(target: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Ratios of the target's headline figures to a baseline's, per scenario both ran."""
    out: dict[str, Any] = {}
    for name, s in target["scenarios"].items():
        b = baseline["scenarios"].get(name)
        if b is None:
            continue
        th, bh = s["headline"], b["headline"]
        ratio = None
        # After the ramp: both runs at full load.
        if bh["steady_per_s"]:
            ratio = round(th["steady_per_s"] / bh["steady_per_s"], 3)
        lat = {}
        for q in ("p50", "p99", "max"):
            tv, bv = th["steady_latency_ms"].get(q), bh["steady_latency_ms"].get(q)
            if tv is not None and bv:
                lat[q] = round(float(tv) / float(bv), 3)
        out[name] = {
            "counter": th["counter"],
            "target_per_s": th["steady_per_s"],
            "baseline_per_s": bh["steady_per_s"],
            "throughput_ratio": ratio,
            "latency_ratio": lat,
        }
    return out
