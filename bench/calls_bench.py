"""Benchmark of 1:1 call signaling through a talkbridge server process on loopback.

    scripts/netns-run .venv/bin/python bench/calls_bench.py setup --calls 50
    scripts/netns-run .venv/bin/python bench/calls_bench.py capacity --rates 25,50,100,150
    scripts/netns-run .venv/bin/python bench/calls_bench.py nodes --rates 50,100

``setup``: two aiortc peers (audio + 160x120 video) call each other ``--calls`` times
through talkbridge, trickling every candidate as ``call.ice``. Call setup time is from the
moment the caller sends ``call.invite`` (its offer is already made) to both peers' ICE
``completed``; it includes the callee's answer and gathering. Printed: median and p95, the
client-observed signaling hops (invite: caller send -> callee event; accept: callee send ->
caller event) and the server's own time per request from its /metrics histogram.

``capacity``: no media, many user pairs. Calls are started open-loop at each rate for
``--duration`` seconds; each call is invite, ringing, accept, 10 ICE candidates each way,
hangup, i.e. 24 requests and as many relayed events. Printed per rate: call setups per
second completed, hop latency (request sent -> the other side's event) p50/p99/max, and
the server's CPU use. The server process runs alone on its event loop; this process
drives all the clients (2-core machine: both compete for the cores).

``nodes``: the capacity run with callers on one node and callees on another, both on one
Redis (started here) and one store: every callee request is forwarded to the node holding
the call, so the hops show what the forwarding costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from media.host_addresses import restrict_host_addresses  # noqa: E402
from signaling.client import Client  # noqa: E402
from tests.calls.rtc_peer import CallPeer  # noqa: E402
from tests.calls.server import (  # noqa: E402
    RunningServer,
    free_port,
    run_redis,
    run_talkbridge,
)

OFFER_SDP = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
             "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n")
OFFER = {"type": "offer", "sdp": OFFER_SDP}
ANSWER = {"type": "answer", "sdp": OFFER_SDP.replace("o=- 1 1", "o=- 2 1")}
CALL_TYPES = ("call.invite", "call.ringing", "call.accept", "call.ice", "call.hangup")


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``values``."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def ms(v: float) -> str:
    return f"{v * 1000:.1f} ms"


# --- server-side time from /metrics ---------------------------------------------------------

BUCKET_RE = re.compile(
    r'^talkbridge_request_seconds_bucket\{le="([^"]+)",type="([^"]+)"\} ([0-9.e+]+)$')
SUM_RE = re.compile(r'^talkbridge_request_seconds_(sum|count)\{type="([^"]+)"\} ([0-9.e+]+)$')


async def scrape(server: RunningServer) -> dict[str, Any]:
    """Per request type: count, sum and cumulative buckets of the server's handler time."""
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(f"{server.http_url}/metrics") as r:
        text = await r.text()
    out: dict[str, Any] = {}
    for line in text.splitlines():
        if m := BUCKET_RE.match(line):
            le, typ, n = m.groups()
            out.setdefault(typ, {"buckets": {}, "sum": 0.0, "count": 0.0})["buckets"][
                float(le)] = float(n)
        elif m := SUM_RE.match(line):
            what, typ, n = m.groups()
            out.setdefault(typ, {"buckets": {}, "sum": 0.0, "count": 0.0})[what] = float(n)
    return out


def server_time_report(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Mean and p99 upper bound of the server's time per call.* request between two scrapes."""
    lines = []
    for typ in CALL_TYPES:
        a, b = after.get(typ), before.get(typ, {"buckets": {}, "sum": 0.0, "count": 0.0})
        if not a:
            continue
        n = a["count"] - b["count"]
        if n <= 0:
            continue
        mean = (a["sum"] - b["sum"]) / n
        p99 = float("inf")
        for le in sorted(a["buckets"]):
            if a["buckets"][le] - b["buckets"].get(le, 0.0) >= 0.99 * n:
                p99 = le
                break
        lines.append(f"    {typ:13s} n={int(n):6d}  mean {ms(mean):>9s}  p99 <= {ms(p99)}")
    return lines


def cpu_stall_us() -> int | None:
    """Microseconds some task on this machine waited for a CPU (PSI), if the kernel says."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None
    return int(line.rsplit("total=", 1)[1])


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- setup time with real aiortc peers ------------------------------------------------------

async def bench_setup(server: RunningServer, calls: int) -> None:
    restrict_host_addresses(["127.0.0.1"])
    alice = Client(server.ws_url, server.token("alice"), "a1", reconnect=False)
    bob = Client(server.ws_url, server.token("bob"), "b1", reconnect=False)
    await alice.connect()
    await bob.connect()
    setup, invite_hop, accept_hop = [], [], []
    before = await scrape(server)
    stall0, t_start = cpu_stall_us(), time.perf_counter()
    try:
        for _ in range(calls):
            a, b = CallPeer(alice), CallPeer(bob)
            try:
                await a.call("bob")
                async with asyncio.timeout(20):
                    await asyncio.gather(a.ice_connected.wait(), b.ice_connected.wait())
                assert a.t_ice_connected and b.t_ice_connected
                t0 = a.t_sent["call.invite"]
                setup.append(max(a.t_ice_connected, b.t_ice_connected) - t0)
                invite_hop.append(b.t_got["call.invite"] - t0)
                accept_hop.append(a.t_got["call.accepted"] - b.t_sent["call.accept"])
                await a.hangup()
                async with asyncio.timeout(5):
                    await b.ended
            finally:
                await a.close()
                await b.close()
    finally:
        after = await scrape(server)
        await alice.close()
        await bob.close()
    stall1, wall = cpu_stall_us(), time.perf_counter() - t_start
    pressure = "" if stall0 is None or stall1 is None else \
        f", CPU pressure {(stall1 - stall0) / 1e6 / wall:.0%}"
    print(f"call setup, {calls} aiortc calls (audio + 160x120 video, trickle ICE, "
          f"loopback{pressure}):")
    print(f"  invite -> both ICE completed: median {ms(statistics.median(setup))}, "
          f"p95 {ms(pct(setup, 95))}, min {ms(min(setup))}, max {ms(max(setup))}")
    print(f"  hop invite (caller send -> callee event): median "
          f"{ms(statistics.median(invite_hop))}, p95 {ms(pct(invite_hop, 95))}")
    print(f"  hop accept (callee send -> caller event): median "
          f"{ms(statistics.median(accept_hop))}, p95 {ms(pct(accept_hop, 95))}")
    print("  server time per request (handler incl. delivery, from /metrics):")
    print("\n".join(server_time_report(before, after)))


# --- signaling capacity ---------------------------------------------------------------------

class Side:
    """One client of the capacity run: resolves waits on (event type, call id, tag)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.waits: dict[tuple[str, str, str], asyncio.Future[float]] = {}
        self.task = asyncio.get_running_loop().create_task(self._pump())

    def expect(self, kind: str, call_id: str, tag: str = "") -> asyncio.Future[float]:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waits[(kind, call_id, tag)] = fut
        return fut

    async def _pump(self) -> None:
        async for ev in self.client.events():
            now = time.perf_counter()
            kind = str(ev.get("type"))
            tag = ""
            if kind == "call.ice":
                c = ev.get("candidate")
                tag = c["candidate"] if c else "end"
            fut = self.waits.pop((kind, str(ev.get("call_id")), tag), None)
            if fut is not None and not fut.done():
                fut.set_result(now)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.client.close()


def cand(n: int, side: str) -> dict[str, Any]:
    return {"candidate": f"candidate:{side}{n} 1 udp 2130706431 127.0.0.1 {40000 + n} typ host",
            "sdpMid": "0", "sdpMLineIndex": 0}


async def one_call(a: Side, b: Side, hops: list[float], ice: int = 10) -> None:
    """invite, ringing, accept, ``ice`` candidates each way, hangup; hop latencies appended."""
    cid = uuid.uuid4().hex

    async def hop(sender: Side, kind: str, event: str, receiver: Side, tag: str = "",
                  **fields: Any) -> None:
        fut = receiver.expect(event, cid, tag)
        t0 = time.perf_counter()
        await sender.client.request(kind, call_id=cid, **fields)
        async with asyncio.timeout(10):
            t1 = await fut
        hops.append(t1 - t0)

    await hop(a, "call.invite", "call.invite", b, to={"user": b.client.user},
              media={"audio": True, "video": False}, sdp=OFFER)
    await hop(b, "call.ringing", "call.ringing", a)
    await hop(b, "call.accept", "call.accepted", a, sdp=ANSWER)

    async def trickle(frm: Side, to: Side, side: str) -> None:
        for n in range(ice):
            c = cand(n, side)
            await hop(frm, "call.ice", "call.ice", to, tag=c["candidate"], candidate=c)

    await asyncio.gather(trickle(a, b, "a"), trickle(b, a, "b"))
    await hop(a, "call.hangup", "call.ended", b)


async def run_load(ws_url: str, token: Callable[[str], str], prefix: str, rate: float,
                   duration: float, pairs: int,
                   ready: Callable[[], Awaitable[None]] | None = None,
                   ws_url_b: str | None = None) -> dict[str, Any]:
    """Start calls open-loop at ``rate`` for ``duration`` s over ``pairs`` user pairs.

    ``ready`` is awaited once every client is connected, before the first call. Callees
    connect to ``ws_url_b`` when given (another node).
    """
    sides: list[tuple[Side, Side]] = []
    for i in range(pairs):
        a = Client(ws_url, token(f"{prefix}a{i}"), "d", reconnect=False, request_timeout=30)
        b = Client(ws_url_b or ws_url, token(f"{prefix}b{i}"), "d", reconnect=False,
                   request_timeout=30)
        await a.connect()
        await b.connect()
        sides.append((Side(a), Side(b)))
    if ready is not None:
        await ready()
    free = list(range(pairs))
    hops: list[float] = []
    errors: list[str] = []
    done = failed = skipped = 0
    tasks: set[asyncio.Task[None]] = set()

    def finish(i: int) -> Callable[[asyncio.Task[None]], None]:
        def cb(t: asyncio.Task[None]) -> None:
            nonlocal done, failed
            free.append(i)
            if t.cancelled() or t.exception() is not None:
                failed += 1
                if len(errors) < 5:
                    errors.append("cancelled" if t.cancelled() else repr(t.exception()))
            else:
                done += 1
        return cb

    try:
        t_start = time.perf_counter()
        n = 0
        while (now := time.perf_counter()) - t_start < duration:
            due = t_start + n / rate
            if due > now:
                await asyncio.sleep(due - now)
            n += 1
            if not free:
                skipped += 1  # every pair still busy: the server (or we) fell behind
                continue
            i = free.pop()
            task = asyncio.get_running_loop().create_task(
                one_call(sides[i][0], sides[i][1], hops))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            task.add_done_callback(finish(i))
        if tasks:
            await asyncio.wait(set(tasks), timeout=30)
        elapsed = time.perf_counter() - t_start
    finally:
        for caller, callee in sides:
            await caller.close()
            await callee.close()
    return {"done": done, "failed": failed, "skipped": skipped, "elapsed": elapsed,
            "hops": hops, "errors": errors}


async def worker_main(args: argparse.Namespace) -> None:
    """One load process of ``capacity --workers N``: prints its results as JSON."""
    srv = RunningServer(port=args.port, pid=0, log_path=Path("/dev/null"))

    async def ready() -> None:
        # Tell the orchestrator we are connected, and start when it says go.
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)

    b_url = f"ws://127.0.0.1:{args.port_b}/ws" if args.port_b else None
    result = await run_load(srv.ws_url, srv.token, args.prefix, args.rate, args.duration,
                            args.pairs, ready, b_url)
    print(json.dumps(result), flush=True)


async def bench_capacity(server: RunningServer, rates: list[float], duration: float,
                         pairs: int, workers: int, other: RunningServer | None = None) -> None:
    where = "" if other is None else \
        " callers on node 1, callees on node 2 (calls held by node 1, forwarded through Redis),"
    print(f"signaling capacity:{where} {pairs} user pairs in {workers} load process(es), calls "
          f"of 24 requests (invite, ringing, accept, 10+10 ICE, hangup), open loop, "
          f"{duration:.0f} s per rate")
    servers = [server] if other is None else [server, other]
    for round_no, rate in enumerate(rates):
        procs = [await asyncio.create_subprocess_exec(
            sys.executable, __file__, "_worker", "--port", str(server.port),
            "--prefix", f"r{round_no}w{w}-", "--rate", str(rate / workers),
            "--duration", str(duration), "--pairs", str(pairs // workers),
            *([] if other is None else ["--port-b", str(other.port)]),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            for w in range(workers)]
        for p in procs:  # every client connected before the clock starts
            assert p.stdout is not None
            assert (await p.stdout.readline()).strip() == b"ready"
        before = [await scrape(srv) for srv in servers]
        cpu0 = sum(server_cpu(srv.pid) for srv in servers)
        t0, stall0 = time.perf_counter(), cpu_stall_us()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            await p.stdin.drain()
        outs = [json.loads((await p.communicate())[0]) for p in procs]
        wall = time.perf_counter() - t0
        cpu = (sum(server_cpu(srv.pid) for srv in servers) - cpu0) / wall
        stall1 = cpu_stall_us()
        # Share of the time some task waited for a CPU: high means the machine was
        # oversubscribed (other work on it, or this bench) and latencies say little.
        pressure = "" if stall0 is None or stall1 is None else \
            f", CPU pressure {(stall1 - stall0) / 1e6 / wall:.0%}"
        after = [await scrape(srv) for srv in servers]
        hops = [h for o in outs for h in o["hops"]]
        done = sum(o["done"] for o in outs)
        elapsed = max(o["elapsed"] for o in outs)
        print(f"  offered {rate:6.1f}/s: completed {done / elapsed:6.1f} setups/s "
              f"({done} ok, {sum(o['failed'] for o in outs)} failed, "
              f"{sum(o['skipped'] for o in outs)} not started: no free pair), "
              f"hops n={len(hops)} p50 {ms(pct(hops, 50))} p99 {ms(pct(hops, 99))} "
              f"max {ms(max(hops) if hops else float('nan'))}, server CPU {cpu:.2f}{pressure}")
        for err in sorted({e for o in outs for e in o["errors"]})[:5]:
            print(f"    failure: {err}")
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            if other is not None:
                print(f"    node {i + 1}:")
            for line in server_time_report(b, a):
                print("  " + line)


async def bench_nodes(args: argparse.Namespace) -> None:
    """Capacity with the two parties of every call on different nodes sharing Redis."""
    with tempfile.TemporaryDirectory() as tmp, \
            run_redis(Path(tmp) / "redis", free_port()) as url:
        settings = {"redis": url, "store": f"sqlite:///{tmp}/shared.sqlite3",
                    "log_level": "ERROR", "send_queue": "100000"}
        with run_talkbridge(Path(tmp) / "n1", node_id="n1", **settings) as n1, \
                run_talkbridge(Path(tmp) / "n2", node_id="n2", **settings) as n2:
            print(f"machine: {os.cpu_count()} cores; two talkbridge nodes (pids {n1.pid}, "
                  f"{n2.pid}), one SQLite file, Redis bus")
            rates = [float(r) for r in args.rates.split(",")]
            await bench_capacity(n1, rates, args.duration, args.pairs, args.workers, n2)


async def amain(args: argparse.Namespace) -> None:
    if args.what == "nodes":
        await bench_nodes(args)
        return
    with tempfile.TemporaryDirectory() as tmp, \
            run_talkbridge(Path(tmp), log_level="ERROR", send_queue="100000") as server:
        print(f"machine: {os.cpu_count()} cores; talkbridge pid {server.pid}, SQLite store, "
              f"in-process bus")
        runs: list[Awaitable[None]] = []
        if args.what in ("setup", "all"):
            runs.append(bench_setup(server, args.calls))
        if args.what in ("capacity", "all"):
            rates = [float(r) for r in args.rates.split(",")]
            runs.append(bench_capacity(server, rates, args.duration, args.pairs,
                                       args.workers))
        for run in runs:
            await run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["setup", "capacity", "nodes", "all", "_worker"],
                        nargs="?", default="all")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--rates", default="25,50,100,150")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2, help="load generator processes")
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default="", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--port-b", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    asyncio.run(worker_main(args) if args.what == "_worker" else amain(args))


if __name__ == "__main__":
    main()
