"""Group fan-out benchmark (issue 3, Performance).

Starts talkbridge as a subprocess on loopback (SQLite in a temp dir, or ``--store`` URL),
creates a group of ``--members`` receivers plus one sender, connects every receiver, then:

1. throughput: the sender keeps ``--window`` messages in flight for ``--duration`` seconds;
   prints deliveries/s counted at the receivers' sockets (a delivery = one msg.new frame of
   a benchmark message reaching one receiver);
2. latency: the sender sends open-loop at half the measured rate (``--latency-rate`` to
   override, in deliveries/s) and prints p50/p99/max of send -> last member's delivery.

    .venv/bin/python bench/group_fanout_bench.py
    .venv/bin/python bench/group_fanout_bench.py --members 500 --duration 8

The receivers are raw sockets with a minimal WebSocket frame parser (no JSON decoding),
so the generator spends as little CPU per frame as possible; the server and the generator
share the machine's cores, as they would on a 2-core box. Server CPU time is reported too.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import msgspec

REPO = Path(__file__).resolve().parent.parent
SECRET = "group-fanout-bench-secret-0123456789abcdef0123456789"
MARK = b'"client_msg_id":"b'


def token(user: str) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Tally:
    """Deliveries per benchmark message, and when the last member got each one."""

    def __init__(self, members: int) -> None:
        self.members = members
        self.count: dict[int, int] = {}
        self.done_at: dict[int, float] = {}
        self.total = 0

    def seen(self, n: int) -> None:
        self.total += 1
        c = self.count.get(n, 0) + 1
        self.count[n] = c
        if c == self.members:
            self.done_at[n] = time.perf_counter()


class Receiver(asyncio.Protocol):
    """A WebSocket client that only counts the benchmark's msg.new frames."""

    def __init__(self, tally: Tally, host: str, port: int, tok: str) -> None:
        self.tally = tally
        self.request = (
            f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {tok}\r\n\r\n"
        ).encode()
        self.buf = bytearray()
        self.upgraded = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed during handshake"))

    def _pong(self, payload: bytes) -> None:
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert self.transport is not None
        self.transport.write(bytes([0x8A, 0x80 | len(payload)]) + mask + masked)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.ready.set_exception(ConnectionError(bytes(buf[:200]).decode()))
                return
            del buf[: end + 4]
            self.upgraded = True
        pos, n = 0, len(buf)
        tally = self.tally
        while n - pos >= 2:
            ln = buf[pos + 1] & 0x7F
            hl = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                hl = 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hl = 10
            end = pos + hl + ln
            if end > n:
                break
            op = buf[pos] & 0x0F
            if op == 1:
                i = buf.find(MARK, pos + hl, end)
                if i >= 0:
                    j = buf.find(b'"', i + len(MARK), end)
                    tally.seen(int(buf[i + len(MARK) : j]))
                elif not self.ready.done() and buf.find(b'"auth.ok"', pos + hl, end) >= 0:
                    self.ready.set_result(None)
            elif op == 9:
                self._pong(bytes(buf[pos + hl : end]))
            pos = end
        del buf[:pos]


def start_server(port: int, data_dir: str, store: str | None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALKBRIDGE_")}
    env.update(
        TALKBRIDGE_JWT_SECRET=SECRET,
        TALKBRIDGE_RATE_LIMIT="0",
        TALKBRIDGE_LOG_LEVEL="WARNING",
        TALKBRIDGE_SEND_QUEUE="65536",
    )
    if store:
        env["TALKBRIDGE_STORE"] = store
    cmd = [sys.executable, "-m", "signaling", "serve", "--port", str(port), "--data-dir", data_dir]
    log = open(Path(data_dir) / "server.log", "ab")  # the server writes it until it exits
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd=REPO)


async def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited during start-up")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError("server did not start")


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of a process (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def send_buckets(session: aiohttp.ClientSession, port: int) -> dict[float, float]:
    """Cumulative msg.send request-time buckets (le -> count) from the server's /metrics."""
    async with session.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    out: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith("talkbridge_request_seconds_bucket{") and 'type="msg.send"' in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> str:
    """The upper bound of the bucket holding quantile ``q`` of what happened in between."""
    total = after.get(float("inf"), 0) - before.get(float("inf"), 0)
    for le in sorted(after):
        if after[le] - before.get(le, 0) >= q * total:
            return f"<= {le * 1000:g} ms" if le != float("inf") else "> 2500 ms"
    return "n/a"


class Sender:
    """The sending member: one aiohttp WebSocket, replies matched by id."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, group: str) -> None:
        self.ws = ws
        self.group = group
        self.pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.next = 0
        self.sent_at: dict[int, float] = {}
        self.acked_at: dict[int, float] = {}
        self.reader = asyncio.get_running_loop().create_task(self._read())
        self.enc = msgspec.json.Encoder()
        self.dec = msgspec.json.Decoder()

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            frame = self.dec.decode(msg.data)
            fut = self.pending.pop(frame.get("id", ""), None)
            if fut is not None and not fut.done():
                fut.set_result(frame)

    async def request(self, type: str, **fields: Any) -> dict[str, Any]:
        rid = f"q{self.next}"
        self.next += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        await self.ws.send_str(self.enc.encode({"type": type, "id": rid, **fields}).decode())
        reply = await fut
        if not reply.get("ok"):
            raise RuntimeError(f"{type} failed: {reply}")
        data: dict[str, Any] = reply["data"]
        return data

    async def send(self, n: int) -> None:
        self.sent_at[n] = time.perf_counter()
        await self.request(
            "msg.send",
            to={"group": self.group},
            kind="text",
            body={"text": f"fan-out message {n} " + "x" * 40},
            client_msg_id=f"b{n}",
        )
        self.acked_at[n] = time.perf_counter()


async def run(args: argparse.Namespace) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    data_dir = tempfile.mkdtemp(prefix="tb-fanout-")
    port = free_port()
    proc = start_server(port, data_dir, args.store)
    loop = asyncio.get_running_loop()
    try:
        await wait_port(port, proc)
        members = [f"r{i:04d}" for i in range(args.members)]
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(
            f"ws://127.0.0.1:{port}/ws", headers={"Authorization": f"Bearer {token('sender')}"}
        )
        await ws.receive()  # auth.ok
        sender = Sender(ws, "")
        made = await sender.request("group.create", name="fan-out", members=members)
        sender.group = made["group"]
        tally = Tally(args.members)
        receivers = []
        for i in range(0, len(members), 50):
            batch = []
            for u in members[i : i + 50]:
                tok = token(u)

                def factory(tok: str = tok) -> Receiver:
                    return Receiver(tally, "127.0.0.1", port, tok)

                _, proto = await loop.create_connection(factory, "127.0.0.1", port)
                batch.append(proto)
            await asyncio.gather(*(p.ready for p in batch))
            receivers += batch
        print(f"{len(receivers)} receivers online in group {sender.group}", flush=True)

        # Warm-up, then throughput with a window of messages in flight.
        n = 0

        async def pump(stop_at: float) -> None:
            nonlocal n
            while time.perf_counter() < stop_at:
                n += 1
                await sender.send(n)

        await asyncio.gather(*(pump(time.perf_counter() + 1.0) for _ in range(args.window)))
        await asyncio.sleep(0.5)
        total0, cpu0, t0 = tally.total, cpu_seconds(proc.pid), time.perf_counter()
        gen0 = time.process_time()
        first = n + 1
        await asyncio.gather(
            *(pump(time.perf_counter() + args.duration) for _ in range(args.window))
        )
        last = n
        # Count what the sends of the window delivered, however long the tail takes.
        deadline = time.perf_counter() + 10
        while any(tally.count.get(k, 0) < args.members for k in range(first, last + 1)):
            if time.perf_counter() > deadline:
                break
            await asyncio.sleep(0.01)
        t1 = max(tally.done_at.get(k, 0.0) for k in range(first, last + 1))
        elapsed = t1 - t0
        delivered = tally.total - total0
        rate = delivered / elapsed
        cpu = cpu_seconds(proc.pid) - cpu0
        gen = (time.process_time() - gen0) / elapsed
        lost = sum(args.members - tally.count.get(k, 0) for k in range(first, last + 1))
        print(
            f"throughput: {last - first + 1} messages x {args.members} members = "
            f"{delivered} deliveries in {elapsed:.2f} s = {rate:,.0f} deliveries/s "
            f"({(last - first + 1) / elapsed:,.0f} msgs/s; server CPU {cpu / elapsed:.2f} cores, "
            f"generator CPU {gen:.2f} cores; missing {lost})",
            flush=True,
        )

        # Latency at half that rate (open loop: sends are scheduled, not awaited in turn).
        target = args.latency_rate or rate / 2
        msgs_per_s = target / args.members
        interval = 1.0 / msgs_per_s
        count = max(20, int(args.duration * msgs_per_s))
        start = n + 1
        tasks = []
        buckets0 = await send_buckets(session, port)
        cpu0, t0, gen0 = cpu_seconds(proc.pid), time.perf_counter(), time.process_time()
        t_next = time.perf_counter()
        for _ in range(count):
            n += 1
            delay = t_next - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(sender.send(n)))
            t_next += interval
        await asyncio.gather(*tasks)
        deadline = time.perf_counter() + 10
        while any(k not in tally.done_at for k in range(start, n + 1)):
            if time.perf_counter() > deadline:
                break
            await asyncio.sleep(0.01)
        cpu = (cpu_seconds(proc.pid) - cpu0) / (time.perf_counter() - t0)
        gen = (time.process_time() - gen0) / (time.perf_counter() - t0)
        buckets1 = await send_buckets(session, port)
        acks = sorted((sender.acked_at[k] - sender.sent_at[k]) * 1000 for k in range(start, n + 1))
        lat = sorted(
            (tally.done_at[k] - sender.sent_at[k]) * 1000
            for k in range(start, n + 1)
            if k in tally.done_at
        )
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        print(
            f"latency at {target:,.0f} deliveries/s ({msgs_per_s:,.0f} msgs/s, {len(lat)} msgs): "
            f"send -> last delivery p50 {statistics.median(lat):.1f} ms, p99 {p99:.1f} ms, "
            f"max {lat[-1]:.1f} ms; incomplete {count - len(lat)}; send -> ack p50 "
            f"{statistics.median(acks):.1f} ms, p99 {acks[int(len(acks) * 0.99)]:.1f} ms; "
            f"server CPU {cpu:.2f} cores, generator CPU {gen:.2f} cores",
            flush=True,
        )
        print(
            "server-side msg.send time (request read -> reply queued, incl. commit and fan-out): "
            f"p50 {bucket_quantile(buckets0, buckets1, 0.5)}, "
            f"p99 {bucket_quantile(buckets0, buckets1, 0.99)}; "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
            flush=True,
        )
        for r in receivers:
            if r.transport is not None:
                r.transport.close()
        await ws.close()
        await session.close()
        sender.reader.cancel()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--members", type=int, default=500, help="online receivers (default 500)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per phase")
    p.add_argument("--window", type=int, default=64, help="messages in flight (throughput)")
    p.add_argument("--latency-rate", type=float, default=0.0, help="deliveries/s for phase 2")
    p.add_argument("--store", default=None, help="store URL (default: SQLite in a temp dir)")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
