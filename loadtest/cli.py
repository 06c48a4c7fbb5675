"""``talkbridge-load``: run scenarios against a talkbridge server, compare, analyse, profile.

talkbridge-load run chat --url ws://127.0.0.1:8080/ws --secret S --clients 200 --duration 30
talkbridge-load run --mix chat=70,connect=30 --start talkbridge --baseline bare,socketio
talkbridge-load profile chat --pairs 50 --duration 15          # flame graph of the server
talkbridge-load analyze loadtest-out/<run>/                     # re-analyse raw records
talkbridge-load serve-baseline bare --port 9001                 # just serve a relay
talkbridge-load figures                                         # the README's figures table
talkbridge-load list
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from loadtest import flame, procstat, servers
from loadtest.analyzer import analyze, compare
from loadtest.html_report import render
from loadtest.runner import Run, load_raw, save_raw
from loadtest.scenarios import load_all
from loadtest.wire import Target


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", nargs="?", default=None, help="scenario name (or use --mix)")
    p.add_argument("--mix", default=None, help="weighted mix, e.g. chat=70,group=20,calls=10")
    t = p.add_argument_group("target")
    t.add_argument(
        "--url", default="ws://127.0.0.1:8080/ws", help="server WebSocket URL (--connect)"
    )
    t.add_argument("--connect", dest="url", help="alias of --url")
    t.add_argument("--transport", choices=("ws", "socketio"), default=None)
    t.add_argument(
        "--auth",
        choices=("header", "frame"),
        default="header",
        help="bearer header on the upgrade, or a first auth frame",
    )
    t.add_argument(
        "--start",
        choices=("talkbridge", "bare", "socketio"),
        default=None,
        help="start this server locally (temp data dir, free port) and load it",
    )
    t.add_argument("--store", default=None, help="TALKBRIDGE_STORE for --start talkbridge")
    t.add_argument(
        "--server-pid",
        type=int,
        default=None,
        help="PID to sample RSS/CPU from (default: whoever listens on a loopback URL)",
    )
    t.add_argument(
        "--secret",
        default=os.environ.get("TALKBRIDGE_JWT_SECRET", ""),
        help="HS256 secret to mint tokens (default $TALKBRIDGE_JWT_SECRET)",
    )
    t.add_argument("--tokens-file", default=None, help="tokens to use instead of minting")
    t.add_argument(
        "--user-pattern", default="lt{run}-{i}", help="user ids; {run} and {i} filled in"
    )
    t.add_argument("--run-id", default="", help="fills {run} (default: random)")
    g = p.add_argument_group("load")
    g.add_argument("--clients", type=int, default=100, help="clients over the whole mix")
    g.add_argument("--workers", type=int, default=1, help="generator processes")
    g.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    g.add_argument("--ramp", type=float, default=0.0, help="seconds to start all senders")
    g.add_argument("--drain", type=float, default=5.0, help="seconds to wait for in-flight work")
    g.add_argument("--setup-timeout", type=float, default=600.0,
                   help="give up when connecting and set-up take longer (seconds)")
    g.add_argument(
        "--window", type=int, default=8, help="closed loop: messages in flight per sender"
    )
    g.add_argument(
        "--rate", type=float, default=0.0, help="open loop: total msgs/s (0 = closed loop)"
    )
    g.add_argument("--size", type=int, default=64, help="message body bytes")
    g.add_argument(
        "--msg-timeout",
        type=float,
        default=10.0,
        help="seconds before a message counts as timed out",
    )
    g.add_argument(
        "--connect-concurrency", type=int, default=200, help="connects in progress per worker"
    )
    registry = load_all()
    for name in sorted(registry):
        registry[name].add_arguments(p.add_argument_group(f"scenario {name}"))  # type: ignore[arg-type]
    o = p.add_argument_group("output")
    o.add_argument(
        "--baseline",
        nargs="?",
        const="bare",
        default=None,
        help="also run the baseline-capable scenarios against the bare relay "
        "(and the socket.io relay with --baseline socketio)",
    )
    o.add_argument("--out", default=None, help="report directory (default loadtest-out/<stamp>)")
    o.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    o.add_argument("--label", default=None, help="name of the target in reports")
    o.add_argument("--quiet", action="store_true", help="no live progress line")


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="talkbridge-load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a scenario or mix")
    _add_run_options(run)
    prof = sub.add_parser("profile", help="run against a server started under a sampling profiler")
    _add_run_options(prof)
    prof.add_argument("--profiler", choices=("py-spy", "pyinstrument"), default="py-spy")
    prof.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    an = sub.add_parser("analyze", help="re-analyse a run directory or raw.jsonl")
    an.add_argument("path")
    an.add_argument("--out", default=None)
    sb = sub.add_parser("serve-baseline", help="serve a baseline relay in the foreground")
    sb.add_argument("kind", choices=("bare", "socketio"))
    sb.add_argument("--host", default="127.0.0.1")
    sb.add_argument("--port", type=int, default=9001)
    sb.add_argument("--secret", default=os.environ.get("TALKBRIDGE_JWT_SECRET", ""))
    sub.add_parser("list", help="list scenarios")
    sub.add_parser("figures", help="the figures table: chat, group, calls, idle (see --help)")
    return parser


def _mix(opts: argparse.Namespace) -> str:
    if opts.mix:
        return str(opts.mix)
    return str(opts.scenario or "chat")


def _out_dir(opts: argparse.Namespace, label: str) -> str:
    path = opts.out or os.path.join("loadtest-out", time.strftime("%Y%m%d-%H%M%S") + f"-{label}")
    os.makedirs(path, exist_ok=True)
    return path


def _local_pid(url: str) -> int | None:
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1") or parts.port is None:
        return None
    return procstat.listening_pid(parts.port)


def _one_run(
    opts: argparse.Namespace, target: Target, pid: int | None, label: str
) -> dict[str, Any]:
    out = open(os.devnull, "w") if opts.quiet else sys.stderr
    try:
        run = Run(opts, target, pid, label=label, out=out)
        records = run.execute()
    finally:
        if out is not sys.stderr:
            out.close()
    report = analyze(records)
    report["_records"] = records
    return report


@contextlib.contextmanager
def _server(
    opts: argparse.Namespace, kind: str | None, wrap: list[str] | None = None
) -> Iterator[servers.Server | None]:
    if kind is None:
        yield None
        return
    if kind == "talkbridge":
        srv = servers.start_talkbridge(opts.secret, store=opts.store, wrap=wrap)
    else:
        srv = servers.start_baseline(kind, opts.secret)
    try:
        yield srv
    finally:
        srv.stop()


def run_command(opts: argparse.Namespace, wrap: list[str] | None = None) -> dict[str, Any]:
    """``run`` (and the load part of ``profile``): target run, baselines, report files."""
    opts.mix = _mix(opts)
    if not opts.secret and not opts.tokens_file:
        if opts.start or opts.baseline:
            opts.secret = secrets.token_hex(16)  # we start the servers: any secret will do
        else:
            raise SystemExit("need --secret (or TALKBRIDGE_JWT_SECRET) or --tokens-file")
    registry = load_all()
    with _server(opts, opts.start, wrap) as srv:
        if srv is not None:
            target = Target(srv.url, srv.transport, opts.auth)
            pid: int | None = srv.pid if not wrap else procstat.listening_pid(srv.port)
        else:
            transport = opts.transport or "ws"
            target = Target(opts.url, transport, opts.auth)
            pid = opts.server_pid or _local_pid(opts.url)
        label = getattr(opts, "label", None) or opts.start or "target"
        out_dir = _out_dir(opts, label)
        report = _one_run(opts, target, pid, label)
        if srv is not None and srv.proc.poll() is not None:
            report["failures"].append(f"server exited during the run:\n{srv.log_tail()}")
            report["ok"] = False
    report["baselines"] = {}
    report["ratios"] = {}
    if opts.baseline:
        base_mix = ",".join(
            part for part in opts.mix.split(",") if registry[part.split("=")[0].strip()].baseline_ok
        )
        kinds = [k.strip() for k in opts.baseline.split(",") if k.strip()]
        # "--baseline socketio" means the socket.io relay as well as the bare one.
        if "bare" not in kinds:
            kinds.insert(0, "bare")
        for kind in kinds:
            if not base_mix:
                break
            bopts = argparse.Namespace(**vars(opts))
            bopts.mix = base_mix
            bopts.run_id = ""
            with _server(bopts, kind) as bsrv:
                assert bsrv is not None
                b = _one_run(bopts, Target(bsrv.url, bsrv.transport, opts.auth), bsrv.pid, kind)
            save_raw(os.path.join(out_dir, f"raw-{kind}.jsonl"), b.pop("_records"))
            b.pop("timeseries", None)
            report["baselines"][kind] = b
            report["ratios"][kind] = compare(report, b)
    save_raw(os.path.join(out_dir, "raw.jsonl"), report.pop("_records"))
    report["out_dir"] = out_dir
    write_report(report, out_dir)
    return report


def write_report(report: dict[str, Any], out_dir: str) -> None:
    """report.json and report.html in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write(render(report))


def summary_text(report: dict[str, Any]) -> str:
    """A short table of the headline figures, baselines and ratios."""
    rows = [("server", "scenario", "rate", "p50 ms", "p99 ms", "max ms", "errors", "checks")]

    def add(label: str, rep: dict[str, Any]) -> None:
        for name, s in rep["scenarios"].items():
            h = s["headline"]
            lat = h["steady_latency_ms"]
            rows.append(
                (
                    label,
                    name,
                    f"{h['steady_per_s']:,.0f} {h['counter']}/s",
                    str(lat.get("p50", "-")),
                    str(lat.get("p99", "-")),
                    str(lat.get("max", "-")),
                    str(sum(s["errors"].values())),
                    "ok" if s["checks"].get("ok") else "FAILED",
                )
            )

    add(report["label"], report)
    for kind, b in report.get("baselines", {}).items():
        add(kind, b)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    for kind, ratios in report.get("ratios", {}).items():
        for name, r in ratios.items():
            lines.append(
                f"{report['label']}/{kind} {name}: throughput x{r['throughput_ratio']}, "
                f"latency p99 x{r['latency_ratio'].get('p99')}"
            )
    for name, s in report["scenarios"].items():
        if "storm_connects_per_s" in s["checks"]:
            lines.append(
                f"{name}: {s['counts'].get('connected', 0)} connections opened in "
                f"{s['checks']['storm_s']} s ({s['checks']['storm_connects_per_s']:,.0f}/s)"
            )
    srv = report.get("server")
    if srv and srv.get("rss_per_connection_kb") is not None and srv["peak_connections"] >= 500:
        lines.append(
            f"server RSS {srv['rss_kb_at_peak_connections'] / 1024:.1f} MB at "
            f"{srv['peak_connections']} connections: "
            f"{srv['rss_per_connection_kb']} KB per connection"
        )
    speed = report["machine"].get("cpu_speed_ms")
    if speed:
        lines.append(
            f"machine speed: sum(range(100000)) in {speed['before']} ms before the run, "
            f"{speed['after']} ms after (lower is faster)"
        )
    overflows = report["machine"].get("listen_overflows")
    if overflows:
        lines.append(
            f"LISTEN QUEUE OVERFLOWED {overflows} times on this host during the run: connections "
            "waited for SYN retransmits (accept backlog too small, or accepting too slowly)"
        )
    gen = report["generator"]
    if gen["bottleneck"]:
        lines.append("GENERATOR LIMITED: " + "; ".join(gen["reasons"]))
    if gen.get("disturbed"):
        lines.append("MACHINE SHARED: " + "; ".join(gen["disturbed"]))
    for f in report.get("failures", []):
        lines.append("FAILURE: " + f.strip().splitlines()[-1])
    lines.append(f"report: {report.get('out_dir', '')}/report.json, report.html")
    return "\n".join(lines)


def profile_command(opts: argparse.Namespace) -> dict[str, Any]:
    """Run the load against a server this command starts, under a sampling profiler.

    py-spy attaches to the running server once it is ready (start-up imports stay out of the
    picture) and samples until the load is over; pyinstrument has to start the server itself.
    """
    opts.start = opts.start or "talkbridge"
    out_dir = os.path.abspath(_out_dir(opts, f"profile-{opts.start}"))
    opts.out = out_dir
    secret = opts.secret or _secret(opts)
    wrap: list[str] | None = None
    spy: subprocess.Popen[bytes] | None = None
    raw = os.path.join(out_dir, "stacks.txt")
    if opts.profiler == "py-spy":
        exe = servers.which("py-spy")
        if exe is None:
            raise SystemExit("py-spy is not installed: pip install py-spy==0.4.3")
        path = os.path.join(out_dir, "flame.svg")
    else:
        exe = servers.which("pyinstrument")
        if exe is None:
            raise SystemExit("pyinstrument is not installed: pip install pyinstrument==5.1.3")
        path = os.path.join(out_dir, "profile.html")
        wrap = [exe, "-r", "html", "-o", path]
    if opts.start == "talkbridge":
        srv = servers.start_talkbridge(secret, store=opts.store, wrap=wrap)
    elif wrap:
        srv = _wrapped_baseline(opts, wrap)
    else:
        srv = servers.start_baseline(opts.start, secret)
    pid = procstat.listening_pid(srv.port) or srv.pid
    try:
        if exe is not None and wrap is None:
            # Collapsed stacks: we draw the flame graph and rank the hot functions from them.
            spy = subprocess.Popen(
                [exe, "record", "--pid", str(pid), "--format", "raw", "--rate",
                 str(opts.profile_rate), "--output", raw, "--subprocesses"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        inner = argparse.Namespace(**vars(opts))
        inner.start = None
        inner.url = srv.url
        inner.transport = srv.transport
        inner.server_pid = pid
        inner.baseline = None
        inner.label = f"{opts.start} (under {opts.profiler})"
        report = run_command(inner)
    finally:
        if spy is not None:
            # SIGINT: py-spy stops sampling and writes what it has.
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        if wrap is not None and srv.proc.poll() is None:
            # SIGINT lets pyinstrument write its report before the server goes.
            srv.proc.send_signal(signal.SIGINT)
            try:
                srv.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        srv.stop()
    report["profile"] = {"profiler": opts.profiler, "path": path}
    if spy is not None and os.path.exists(raw):
        with open(raw) as f:
            stacks = flame.parse_collapsed(f.read())
        with open(path, "w") as f:
            f.write(flame.render_svg(stacks, f"{opts.start} under load: {_mix(opts)}"))
        report["profile"]["stacks"] = raw
        report["profile"]["hot"] = flame.hot_functions(stacks)
    report["profile"]["exists"] = os.path.exists(path)
    write_report(report, out_dir)
    return report


def _secret(opts: argparse.Namespace) -> str:
    opts.secret = opts.secret or secrets.token_hex(16)
    return str(opts.secret)


def _wrapped_baseline(opts: argparse.Namespace, wrap: list[str]) -> servers.Server:
    module = {"bare": "loadtest.baselines.bare", "socketio": "loadtest.baselines.sio"}[opts.start]
    port = servers.free_port()
    secret = _secret(opts)
    cmd = [*wrap, servers._python(), "-m", module, "--port", str(port), "--secret", secret]
    if wrap and "pyinstrument" in wrap[0]:
        cmd = [*wrap, "-m", module, "--port", str(port), "--secret", secret]
    proc = subprocess.Popen(
        cmd, cwd=str(servers.REPO), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    srv = servers.Server(opts.start, proc, port)
    servers._wait_ready(srv, 30)
    return srv


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``talkbridge-load`` and ``python -m loadtest``."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["figures"]:
        from loadtest import figures

        return figures.main(args[1:])
    opts = build_parser().parse_args(argv)
    if opts.command == "list":
        for name, cls in sorted(load_all().items()):
            print(f"{name:10} {cls.help}")
        return 0
    if opts.command == "serve-baseline":
        from loadtest.baselines import bare, sio

        mod = bare if opts.kind == "bare" else sio
        mod.main(["--host", opts.host, "--port", str(opts.port), "--secret", opts.secret])
        return 0
    if opts.command == "analyze":
        raw = opts.path if opts.path.endswith(".jsonl") else os.path.join(opts.path, "raw.jsonl")
        report = analyze(load_raw(raw))
        out_dir = opts.out or os.path.dirname(raw) or "."
        report["out_dir"] = out_dir
        write_report(report, out_dir)
        print(summary_text(report))
        return 0 if report["ok"] else 1
    report = profile_command(opts) if opts.command == "profile" else run_command(opts)
    if opts.json:
        print(json.dumps(report, indent=1))
    else:
        print(summary_text(report))
        if "profile" in report:
            print(f"profile: {report['profile']['path']}")
            hot = report["profile"].get("hot")
            if hot:
                print(f"hottest functions (self time, of {hot['working_samples']} working samples;"
                      f" {hot['waiting_share'] * 100:.0f}% of all samples were waits):")
                for h in hot["self"][:10]:
                    print(f"  {h['share'] * 100:5.1f}%  {h['function']}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
