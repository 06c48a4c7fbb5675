"""Scale-out benchmark (issue 8): talkbridge nodes sharing Redis and PostgreSQL on one machine.

Starts a private redis-server (free port, no persistence) and a fresh PostgreSQL database,
then, one configuration after the other:

1. Saturation, closed loop: ``--pairs`` sender/receiver pairs, ``--window`` messages in
   flight per sender, each receiver homed on a different node than its sender when there is
   more than one node. Configurations: 1 node with the in-process bus (no Redis), then 1, 2
   and 3 nodes on Redis. Reports delivered msgs/s, send->deliver p50/p99, CPU of the nodes
   (per-core efficiency = msgs/s per node CPU-second), Redis CPU per 10,000 msgs/s (from
   /proc of the redis-server), the machine's load average.
2. The Redis hop: the same open-loop rate (``--rate`` msgs/s, well below saturation) on one
   node without Redis and on two nodes with every message crossing nodes; the difference in
   p50/p99 is what the hop costs.
3. Reconnect and sync: ``--clients`` clients on node 3 (signaling.client.Client, failing
   over to the others). Node 3 is frozen (SIGSTOP), one message per client is stored, then
   node 3 is killed (SIGKILL) and the clock starts: time until every client is reconnected
   and until every client has synced its missed message.

    .venv/bin/python bench/scaleout_bench.py
    .venv/bin/python bench/scaleout_bench.py --duration 10 --only saturation
    .venv/bin/python bench/scaleout_bench.py --json out.json

The machine has 2 cores and is shared: the generator, the nodes, Redis and PostgreSQL all
compete for them, so absolute figures are a floor; per-core figures and the hop's latency
are the ones that carry over. Load average is printed with every row.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import jwt
import msgspec
from hdrh.histogram import HdrHistogram

from loadtest import servers
from loadtest.procstat import cpu_seconds, machine_busy_seconds
from signaling.cli import raise_fd_limit
from signaling.client import Client

REPO = Path(__file__).resolve().parent.parent
SECRET = "scaleout-bench-secret-" + secrets.token_hex(8)
_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token(user: str) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 7200}, SECRET, algorithm="HS256")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---------------------------------------------------------------- processes


@dataclass
class Proc:
    """A child process we started (stopped by PID)."""

    popen: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-3000:])
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def start_redis(workdir: Path) -> Proc:
    port = free_port()
    log = workdir / "redis.log"
    with open(log, "ab") as fh:
        p = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir)], stdout=fh, stderr=fh)
    wait_port(port, p, log)
    return Proc(p, port, log)


def start_node(workdir: Path, name: str, store: str, redis_url: str | None) -> Proc:
    port = free_port()
    d = workdir / name
    d.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALKBRIDGE_")}
    env.update({
        "TALKBRIDGE_JWT_SECRET": SECRET, "TALKBRIDGE_STORE": store, "TALKBRIDGE_NODE_ID": name,
        "TALKBRIDGE_RATE_LIMIT": "0", "TALKBRIDGE_LOG_LEVEL": "WARNING",
        "TALKBRIDGE_SEND_QUEUE": "100000",
    })
    if redis_url:
        env["TALKBRIDGE_REDIS"] = redis_url
    log = d / "server.log"
    with open(log, "ab") as fh:
        p = subprocess.Popen(
            [sys.executable, "-m", "signaling", "serve", "--port", str(port),
             "--data-dir", str(d)], env=env, stdout=fh, stderr=fh, cwd=REPO)
    wait_port(port, p, log)
    return Proc(p, port, log)


# ---------------------------------------------------------------- lean chat generator


@dataclass
class ChatStats:
    sent: int = 0
    acked: int = 0
    delivered: int = 0
    errors: int = 0
    hist: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 60_000_000, 3))
    measuring: bool = False


async def _open(session: aiohttp.ClientSession, url: str, user: str,
                device: str) -> aiohttp.ClientWebSocketResponse:
    ws = await session.ws_connect(url, headers={"Authorization": f"Bearer {token(user)}"},
                                  params={"device": device}, heartbeat=60)
    first = await ws.receive(timeout=20)
    assert _dec.decode(first.data)["type"] == "auth.ok", first.data
    return ws


async def chat_run(urls: list[str], pairs: int, window: int, rate: float, duration: float,
                   warmup: float, tag: str) -> ChatStats:
    """Closed loop (``window`` in flight per sender) or open loop (``rate`` msgs/s in all)."""
    st = ChatStats()
    n = len(urls)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        senders, receivers = [], []
        for i in range(pairs):
            s_url, r_url = urls[i % n], urls[(i + 1) % n] if n > 1 else urls[0]
            senders.append(await _open(session, s_url, f"{tag}s{i}", "d"))
            receivers.append(await _open(session, r_url, f"{tag}r{i}", "d"))

        async def read_receiver(ws: aiohttp.ClientWebSocketResponse) -> None:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                ev = _dec.decode(msg.data)
                if ev.get("type") == "msg.new":
                    now = time.monotonic_ns()
                    if st.measuring:
                        st.delivered += 1
                        sent_ns = int(ev["body"]["text"].split(" ", 1)[0])
                        st.hist.record_value(max(1, (now - sent_ns) // 1000))

        running = True

        async def sender(i: int, ws: aiohttp.ClientWebSocketResponse) -> None:
            peer = f"{tag}r{i}"
            k = 0
            in_flight = asyncio.Semaphore(window)
            waiting: dict[str, asyncio.Future[None]] = {}

            async def read_replies() -> None:
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    fr = _dec.decode(msg.data)
                    if fr.get("type") == "reply":
                        fut = waiting.pop(str(fr["id"]), None)
                        if fut is not None and not fut.done():
                            fut.set_result(None)
                        if st.measuring:
                            st.acked += 1
                            if not fr.get("ok"):
                                st.errors += 1
                        in_flight.release()

            reader = asyncio.get_running_loop().create_task(read_replies())
            interval = pairs / rate if rate else 0.0
            next_at = time.monotonic() + (i / pairs) * interval
            while running:
                try:
                    async with asyncio.timeout(10):
                        await in_flight.acquire()
                except TimeoutError:
                    st.errors += 1  # replies stopped coming: count it, do not hang
                    break
                if interval:
                    next_at += interval
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                k += 1
                rid = f"{i}.{k}"
                waiting[rid] = asyncio.get_running_loop().create_future()
                body = {"text": f"{time.monotonic_ns()} x"}
                await ws.send_str(_enc.encode({
                    "type": "msg.send", "id": rid, "to": {"user": peer}, "kind": "text",
                    "client_msg_id": f"{tag}.{i}.{k}", "body": body}).decode())
                if st.measuring:
                    st.sent += 1
            await asyncio.sleep(2)  # let the last replies in
            reader.cancel()

        readers = [asyncio.get_running_loop().create_task(read_receiver(ws)) for ws in receivers]
        tasks = [asyncio.get_running_loop().create_task(sender(i, ws))
                 for i, ws in enumerate(senders)]
        await asyncio.sleep(warmup)
        st.measuring = True
        await asyncio.sleep(duration)
        st.measuring = False
        running = False
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in readers:
            t.cancel()
        for ws in senders + receivers:
            await ws.close()
    return st


# ---------------------------------------------------------------- configurations


def cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(p) or 0.0 for p in pids)


def postgres_pids() -> list[int]:
    """Every postgres process (the server is shared: other users' queries count too)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if (d / "comm").read_text().strip() == "postgres":
                    out.append(int(d.name))
    return out


def own_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def start_nodes(workdir: Path, label: str, store: str, redis: Proc | None,
                n: int) -> list[Proc]:
    """``n`` nodes for one row: data dirs under ``workdir/label``, Redis keys under ``label:``."""
    redis_url = f"redis://127.0.0.1:{redis.port}/0?prefix={label}:" if redis else None
    return [start_node(workdir / label, f"n{i + 1}", store, redis_url) for i in range(n)]


async def saturation_row(workdir: Path, store: str, redis: Proc | None, nodes: int,
                         args: argparse.Namespace, label: str) -> dict[str, Any]:
    procs = start_nodes(workdir, label, store, redis, nodes)
    try:
        await asyncio.sleep(1.0)
        urls = [f"ws://127.0.0.1:{p.port}/ws" for p in procs]
        load_before = loadavg()
        c0 = cpu([p.pid for p in procs])
        r0 = cpu([redis.pid]) if redis else 0.0
        pg = postgres_pids()
        pg0, g0, m0 = cpu(pg), own_cpu(), machine_busy_seconds()
        # CPU is sampled over the whole run (warm-up included); scale to the measured window.
        t0 = time.monotonic()
        st = await chat_run(urls, args.pairs, args.window, args.rate_sat, args.duration,
                            args.warmup, label)
        wall = time.monotonic() - t0
        node_cpu = (cpu([p.pid for p in procs]) - c0) / wall
        redis_cpu = ((cpu([redis.pid]) - r0) / wall) if redis else 0.0
        pg_cpu = (cpu(pg) - pg0) / wall
        gen_cpu = (own_cpu() - g0) / wall
        machine = (machine_busy_seconds() - m0) / wall
    finally:
        for p in procs:
            p.stop()
    rate = st.delivered / args.duration
    return {
        "config": label, "nodes": nodes, "redis": redis is not None,
        "delivered_per_s": round(rate), "acked": st.acked, "errors": st.errors,
        "p50_ms": st.hist.get_value_at_percentile(50) / 1000,
        "p99_ms": st.hist.get_value_at_percentile(99) / 1000,
        "node_cpu_cores": round(node_cpu, 2),
        "msgs_per_node_cpu_s": round(rate / node_cpu) if node_cpu else None,
        "redis_cpu_cores": round(redis_cpu, 3),
        "postgres_cpu_cores": round(pg_cpu, 2), "generator_cpu_cores": round(gen_cpu, 2),
        "machine_busy_cores": round(machine, 2),
        "redis_cpu_per_10k_msgs_s": round(redis_cpu / (rate / 10000), 3) if rate and redis
        else None,
        "loadavg_before": load_before, "loadavg_after": loadavg(),
    }


async def hop_row(workdir: Path, store: str, redis: Proc | None, nodes: int,
                  args: argparse.Namespace, label: str) -> dict[str, Any]:
    procs = start_nodes(workdir, label, store, redis, nodes)
    try:
        await asyncio.sleep(1.0)
        urls = [f"ws://127.0.0.1:{p.port}/ws" for p in procs]
        load_before = loadavg()
        st = await chat_run(urls, args.hop_pairs, 1000, args.rate, args.duration, args.warmup,
                            label)
    finally:
        for p in procs:
            p.stop()
    return {
        "config": label, "nodes": nodes, "redis": redis is not None,
        "rate": args.rate, "delivered_per_s": round(st.delivered / args.duration),
        "p50_ms": st.hist.get_value_at_percentile(50) / 1000,
        "p90_ms": st.hist.get_value_at_percentile(90) / 1000,
        "p99_ms": st.hist.get_value_at_percentile(99) / 1000,
        "loadavg_before": load_before,
    }


async def reconnect_row(workdir: Path, store: str, redis: Proc,
                        args: argparse.Namespace) -> dict[str, Any]:
    label = "reconnect"
    procs = start_nodes(workdir, label, store, redis, 3)
    urls = [f"ws://127.0.0.1:{p.port}/ws" for p in procs]
    clients: list[Client] = []
    try:
        await asyncio.sleep(1.0)
        sender = Client(urls[0], token("rc-sender"), device="d", request_timeout=60)
        await sender.connect()
        # Each client already has a conversation (so sync has something to look at).
        sem = asyncio.Semaphore(50)

        async def make(i: int) -> Client:
            async with sem:
                # Half fail over to n1 first, half to n2 (what a load balancer would do).
                order = [urls[2], urls[0], urls[1]] if i % 2 else [urls[2], urls[1], urls[0]]
                c = Client(order, token(f"rc{i}"), device="d",
                           max_backoff=2.0, request_timeout=60)
                await c.connect()
                return c

        clients = list(await asyncio.gather(*(make(i) for i in range(args.clients))))
        for i in range(0, args.clients, 50):
            await asyncio.gather(*(sender.send_text("before", user=f"rc{j}")
                                   for j in range(i, min(i + 50, args.clients))))
        await asyncio.sleep(2)
        for c in clients:
            c.pending_events()
        # Node 3 is frozen first, then one message per client is stored: none can reach its
        # client live, and all are in PostgreSQL before the clock starts.
        procs[2].popen.send_signal(signal.SIGSTOP)
        for i in range(0, args.clients, 50):
            await asyncio.gather(*(sender.send_text("missed", user=f"rc{j}")
                                   for j in range(i, min(i + 50, args.clients))))
        load_before = loadavg()
        g0, n0 = own_cpu(), cpu([procs[0].pid, procs[1].pid])
        t_kill = time.monotonic()
        procs[2].popen.kill()
        procs[2].popen.wait()
        reconnected: list[float] = []
        synced: list[float] = []

        async def watch(c: Client) -> None:
            await c.next_event("client.reconnected", timeout=120)
            reconnected.append(time.monotonic() - t_kill)
            await c.next_event("msg.new", timeout=120,
                               where=lambda e: e["body"].get("text") == "missed")
            synced.append(time.monotonic() - t_kill)

        watchers = asyncio.gather(*(watch(c) for c in clients), return_exceptions=True)
        results = await watchers
        wall = time.monotonic() - t_kill
        gen_cpu = (own_cpu() - g0) / wall
        node_cpu = (cpu([procs[0].pid, procs[1].pid]) - n0) / wall
        failures = [r for r in results if isinstance(r, BaseException)]
        await sender.close()
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        for p in procs:
            p.stop()

    def pct(xs: list[float], q: float) -> float:
        xs = sorted(xs)
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 2) if xs else float("nan")

    return {
        "clients": args.clients, "failures": len(failures),
        "reconnected_all_s": round(max(reconnected), 2) if reconnected else None,
        "reconnected_p50_s": pct(reconnected, 0.5),
        "synced_all_s": round(max(synced), 2) if synced else None,
        "synced_p50_s": pct(synced, 0.5), "synced_p99_s": pct(synced, 0.99),
        "mean_synced_s": round(statistics.mean(synced), 2) if synced else None,
        "client_process_cpu_cores": round(gen_cpu, 2),
        "surviving_nodes_cpu_cores": round(node_cpu, 2),
        "loadavg_before": load_before, "loadavg_after": loadavg(),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    only = set(args.only.split(",")) if args.only else {"saturation", "hop", "reconnect"}
    workdir = Path(tempfile.mkdtemp(prefix="tb-scaleout-"))
    store = await servers.create_database("tb_scaleout_")
    redis = start_redis(workdir)
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "loadavg_start": loadavg()},
                           "options": vars(args)}
    try:
        if "saturation" in only:
            rows = []
            for label, nodes, with_redis in [("mem1", 1, False), ("redis1", 1, True),
                                             ("redis2", 2, True), ("redis3", 3, True)]:
                row = await saturation_row(workdir, store, redis if with_redis else None,
                                           nodes, args, label)
                print(json.dumps(row), flush=True)
                rows.append(row)
            out["saturation"] = rows
        if "hop" in only:
            rows = []
            for label, nodes, with_redis in [("hop-mem1", 1, False), ("hop-redis2", 2, True)]:
                row = await hop_row(workdir, store, redis if with_redis else None, nodes, args,
                                    label)
                print(json.dumps(row), flush=True)
                rows.append(row)
            out["hop"] = rows
        if "reconnect" in only:
            row = await reconnect_row(workdir, store, redis, args)
            print(json.dumps(row), flush=True)
            out["reconnect"] = row
    finally:
        redis.stop(signal.SIGKILL)
        await servers.drop_database(store)
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=60, help="sender/receiver pairs (saturation)")
    p.add_argument("--window", type=int, default=8, help="messages in flight per sender")
    p.add_argument("--rate-sat", type=float, default=0.0, help="open-loop rate instead (0: off)")
    p.add_argument("--rate", type=float, default=300.0, help="open-loop msgs/s for the hop test")
    p.add_argument("--hop-pairs", type=int, default=30)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--clients", type=int, default=1000, help="clients moved by the node kill")
    p.add_argument("--only", default="", help="saturation,hop,reconnect")
    p.add_argument("--json", default="", help="write the results here too")
    return p.parse_args()


if __name__ == "__main__":
    ns = parse_args()
    result = asyncio.run(main(ns))
    print(json.dumps(result, indent=2))
    if ns.json:
        Path(ns.json).write_text(json.dumps(result, indent=2))
