"""``talkbridge-load figures``: the issue's figures table, one run per row, in one command.

Starts talkbridge (SQLite in a temp dir) and the baseline relays itself and runs:
chat (100 pairs x 8 in flight) with bare and socket.io ratios, 500-member group fan-out,
call setups, idle connections with server RSS per connection (talkbridge and the bare
relay), and group calls of growing size through the relay (frame delay p95 and delivered
share per size). Prints a Markdown table; ``--json`` writes the rows too. The media rows
use loopback ICE candidates only; run it inside scripts/netns-run to be sure no packet
leaves the host.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from typing import Any

from loadtest import servers
from signaling.cli import raise_fd_limit


def _run(argv: list[str]) -> dict[str, Any]:
    """One ``talkbridge-load run`` in-process."""
    from loadtest.cli import build_parser, run_command

    return run_command(build_parser().parse_args(["run", *argv]))


def _row(what: str, report: dict[str, Any], scenario: str, unit: str) -> dict[str, Any]:
    s = report["scenarios"][scenario]
    h = s["headline"]
    lat = h["steady_latency_ms"]
    gen = report["generator"]
    return {
        "what": what,
        "rate": h["steady_per_s"],
        "unit": unit,
        "latency": h["latency"],
        "p50_ms": lat.get("p50"),
        "p99_ms": lat.get("p99"),
        "max_ms": lat.get("max"),
        "ok": s["checks"].get("ok"),
        "errors": sum(s["errors"].values()),
        "server_cpu": (report.get("server") or {}).get("cpu_avg"),
        "generator_cpu": gen["cpu_avg_per_worker"],
        "noise_cores": gen.get("other_processes_cores"),
        "cpu_pressure": gen.get("cpu_pressure"),
        "generator_limited": gen["reasons"],
        "disturbed": gen.get("disturbed", []),
    }


def main(argv: list[str] | None = None) -> int:
    """Run every row; exit 1 if any run failed its checks."""
    p = argparse.ArgumentParser(prog="talkbridge-load figures", description=__doc__)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--idle", type=int, default=10_000)
    p.add_argument("--group-size", type=int, default=500)
    p.add_argument("--call-pairs", type=int, default=100)
    p.add_argument("--store", default=None, help="TALKBRIDGE_STORE for talkbridge")
    p.add_argument("--media-sizes", default="3,6,9",
                   help="media: call sizes to try, one call each ('' to skip)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    p.add_argument("--out", default=os.path.join("loadtest-out", f"figures-{stamp}"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    raise_fd_limit()
    secret = secrets.token_hex(16)
    common = ["--secret", secret, "--workers", str(args.workers), "--quiet"]
    rows: list[dict[str, Any]] = []

    def out(name: str) -> list[str]:
        return ["--out", os.path.join(args.out, name)]

    common_tb = [*common, "--label", "talkbridge"]

    def fresh() -> servers.Server:
        return servers.start_talkbridge(secret, store=args.store)

    with fresh() as tb:
        print("-- chat 100x8 (+ bare, socketio)", file=sys.stderr, flush=True)
        rep = _run(["chat", "--url", tb.url, "--server-pid", str(tb.pid), "--pairs", "100",
                    "--window", "8", "--duration", str(args.duration), "--ramp", "2",
                    "--baseline", "socketio", *common_tb, *out("chat")])
    row = _row("chat, 100 pairs x 8 in flight", rep, "chat", "msgs/s")
    for kind, b in rep["baselines"].items():
        base = b["scenarios"]["chat"]["headline"]["steady_per_s"]
        row[f"ratio_{kind}"] = round(row["rate"] / base, 3) if base else None
        rows.append(_row(f"chat on the {kind} relay", b, "chat", "msgs/s"))
    rows.insert(len(rows) - len(rep["baselines"]), row)

    with fresh() as tb:
        print(f"-- group fan-out, {args.group_size} members", file=sys.stderr, flush=True)
        rep = _run(["group", "--url", tb.url, "--server-pid", str(tb.pid), "--groups", "1",
                    "--group-size", str(args.group_size), "--window", "8",
                    "--duration", str(args.duration), *common_tb, *out("group")])
    what = f"group fan-out, {args.group_size} members, 1 sender x 8 in flight"
    rows.append(_row(what, rep, "group", "deliveries/s"))

    with fresh() as tb:
        print(f"-- calls, {args.call_pairs} pairs", file=sys.stderr, flush=True)
        rep = _run(["calls", "--url", tb.url, "--server-pid", str(tb.pid),
                    "--clients", str(2 * args.call_pairs), "--duration", str(args.duration),
                    "--ramp", "1", *common_tb, *out("calls")])
    rows.append(_row(f"call setups, {args.call_pairs} caller/callee pairs, 4 ICE each way",
                     rep, "calls", "calls/s"))

    media: list[dict[str, Any]] = []
    for size in [int(x) for x in args.media_sizes.split(",") if x.strip()]:
        # Relay and participants gather loopback candidates only (no STUN anywhere).
        srv = servers.start_talkbridge(
            secret, store=args.store, extra_env={"TALKBRIDGE_RELAY_ADDRESSES": "127.0.0.1"}
        )
        with srv:
            print(f"-- media, one call of {size}", file=sys.stderr, flush=True)
            rep = _run(["media", "--url", srv.url, "--server-pid", str(srv.pid),
                        "--media-size", str(size), "--clients", str(size),
                        "--duration", str(min(args.duration, 10.0)), *common_tb,
                        *out(f"media-{size}")])
        s = rep["scenarios"]["media"]
        c, fd = s["checks"], s["latency_ms"].get("frame_delay", {})
        delivery = c.get("video_delivery_ratio") or 0.0
        media.append({
            "size": size, "streams": c.get("expected_video_streams"),
            "receiving": c.get("video_streams_receiving"), "p50_ms": fd.get("p50"),
            "p95_ms": fd.get("p95"), "delivery": delivery, "loss": c.get("video_loss"),
            "within": bool(fd.get("p95") is not None and fd["p95"] <= 200 and delivery >= 0.99
                           and (c.get("video_loss") or 0) <= 0.01),
            "noise_cores": rep["generator"].get("other_processes_cores"),
            "cpu_pressure": rep["generator"].get("cpu_pressure"),
            "ok": c.get("ok"),
        })

    idle: dict[str, Any] = {}
    for kind in ("talkbridge", "bare"):
        srv = fresh() if kind == "talkbridge" else servers.start_baseline("bare", secret)
        with srv:
            print(f"-- idle {args.idle} connections on {kind}", file=sys.stderr, flush=True)
            rep = _run(["connect", "--url", srv.url, "--server-pid", str(srv.pid),
                        "--connections", str(args.idle), "--hold", "5", "--connect-rate", "2000",
                        "--duration", "1", *common, "--label", kind, *out(f"idle-{kind}")])
        s = rep["scenarios"]["connect"]
        idle[kind] = {
            "held": s["counts"].get("held", 0),
            "rss_per_connection_kb": (rep.get("server") or {}).get("rss_per_connection_kb"),
            "connect_p99_ms": s["latency_ms"].get("connect", {}).get("p99"),
            "ok": s["checks"].get("ok"),
        }

    print("\n| row | rate | p50 ms | p99 ms | max ms | vs bare | vs socket.io | noise | psi |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['what']} | {r['rate']:,.0f} {r['unit']} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['max_ms']} | {r.get('ratio_bare', '')} | {r.get('ratio_socketio', '')} | "
              f"{r['noise_cores']} | {r['cpu_pressure']} |")
    tb_idle, bare_idle = idle["talkbridge"], idle["bare"]
    ratio = ""
    if tb_idle["rss_per_connection_kb"] and bare_idle["rss_per_connection_kb"]:
        ratio = f"{tb_idle['rss_per_connection_kb'] / bare_idle['rss_per_connection_kb']:.2f}"
    print(f"| idle connections held | {tb_idle['held']:,} | connect p99 "
          f"{tb_idle['connect_p99_ms']} ms | RSS/conn {tb_idle['rss_per_connection_kb']} KB | "
          f"bare relay {bare_idle['rss_per_connection_kb']} KB | {ratio} | | | |")
    for m in media:
        verdict = "within" if m["within"] else "beyond"
        print(f"| media: one call of {m['size']} ({m['streams']} relayed video streams, "
              f"{m['receiving']} arriving) | {m['delivery'] * 100:.1f}% of frames delivered | "
              f"{m['p50_ms']} | p95 {m['p95_ms']} | | {verdict} p95 200 ms / loss 1% | | "
              f"{m['noise_cores']} | {m['cpu_pressure']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "idle": idle, "media": media, "cpus": os.cpu_count()}, f,
                      indent=1)
    ok = (all(r["ok"] for r in rows) and all(v["ok"] for v in idle.values())
          and all(m["ok"] for m in media))
    return 0 if ok else 1
