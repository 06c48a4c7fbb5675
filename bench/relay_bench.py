"""Benchmark: our forwarding relay against aiortc's stock MediaRelay, side by side.

Publisher, relay and subscribers are aiortc peers in separate processes on loopback
(run it inside the loopback-only namespace):

    scripts/netns-run .venv/bin/python bench/relay_bench.py \
        --forward 0,8,16,32 --forward-pack 32 --stock 0,1,2,4 --direct --profile /tmp/relay.prof

Modes: ``forward`` (our relay, its lean send loop), ``forward-pack`` (our relay on aiortc's
own per-leg ``Encoder.pack`` send loop), ``stock`` (aiortc's MediaRelay: decode once,
re-encode per subscriber), ``direct`` (no relay: the baseline path for latency).

The publisher sends pre-encoded 640x480 30 fps VP8 at about 1 Mbps plus Opus (cached in
/tmp, so its own CPU does not depend on the mode; it ignores keyframe requests, keyframes
every 2 s). Subscribers never decode: they reassemble frames with the relay's own assembler
and count them. Printed per run: relay CPU (CPU-s per s, from /proc), marginal CPU per
subscriber against the 0-subscriber run, subscriber fps (mean, and the worst single second
of any subscriber), audio packets/s, frame delay p50/p95 (publisher send to subscriber frame
complete, from a send-time trailer; forward and direct runs only: the stock relay
re-encodes, so the trailer is lost), the relay's own queueing delay p95 (frame complete at
the relay to its sender taking it), subscriber processes' CPU, how busy the whole machine
was (other tenants' load shows here), and the stock/forward ratio of marginal cost.
``--profile FILE`` adds a separate cProfile run of the largest forward case and prints the
per-outgoing-packet cost split (it never feeds the table: cProfile doubles the cost).

Subcommands ``serve``, ``publish`` and ``subscribe`` are the processes the orchestrator starts.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import os
import random
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import av
from aiortc import (
    MediaStreamTrack,
    RTCBundlePolicy,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from media import aiortc_adapter as adapter  # noqa: E402
from media.eventloop import new_event_loop  # noqa: E402
from media.frames import Vp8Assembler  # noqa: E402
from media.host_addresses import restrict_host_addresses  # noqa: E402
from media.relay import Relay  # noqa: E402

W, H, FPS, GOP, LOOP = 640, 480, 30, 60, 180
TRAILER = b"TBTS"  # + float64 send time, appended to VP8 frames in forward/direct runs
CONFIG = RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)


# ----- wire: newline-delimited JSON over TCP ------------------------------------------------

async def send_line(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(json.dumps(obj).encode() + b"\n")
    await writer.drain()


# ----- media: pre-encoded VP8 and Opus ------------------------------------------------------

def encode_video(bitrate: int) -> list[bytes]:
    """The same pre-encoded stream for every process and run (libvpx's realtime mode is not
    deterministic, so it is encoded once and cached)."""
    cache = Path(f"/tmp/talkbridge-relay-bench-vp8-{W}x{H}-{bitrate}.json")
    if cache.exists():
        return [bytes.fromhex(h) for h in json.loads(cache.read_text())]
    # libvpx's realtime rate control overshoots on this content: aim lower until near target.
    aim = bitrate
    for _ in range(4):
        frames = _encode_video(aim)
        kbps = sum(len(f) for f in frames) * 8 / (LOOP / FPS)
        if abs(kbps - bitrate) < 0.1 * bitrate:
            break
        aim = int(aim * bitrate / kbps)
    tmp = cache.with_suffix(f".{os.getpid()}")
    tmp.write_text(json.dumps([f.hex() for f in frames]))
    tmp.replace(cache)
    return frames


def _encode_video(bitrate: int) -> list[bytes]:
    """LOOP frames of 640x480 VP8 (keyframe every GOP) with enough change for ~``bitrate``."""
    rnd = random.Random(7)
    codec = av.CodecContext.create("libvpx", "w")
    codec.width, codec.height, codec.pix_fmt = W, H, "yuv420p"
    codec.bit_rate = bitrate
    codec.time_base = fractions.Fraction(1, FPS)
    codec.options = {
        "deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0",
        "minrate": str(bitrate), "maxrate": str(bitrate), "bufsize": str(bitrate),
        "undershoot-pct": "95", "overshoot-pct": "15",
    }
    codec.gop_size = 3000  # keyframes only where we ask (every GOP frames)
    # A blocky picture panning sideways plus a moving band of fresh noise: motion and new
    # detail the encoder has to code, at about the target rate with realistic frame sizes.
    bw = W // 16
    blocks = [rnd.randrange(40, 220) for _ in range(bw * (H // 16))]
    base = bytes(blocks[(r // 16) * bw + c // 16] for r in range(H) for c in range(W))
    out: list[bytes] = []
    for n in range(LOOP):
        shift = (n * 3) % W
        y = bytearray(W * H)
        for row in range(H):
            line = base[row * W:(row + 1) * W]
            y[row * W:(row + 1) * W] = line[shift:] + line[:shift]
        band = (n * 8) % (H - 12)
        y[band * W:(band + 12) * W] = rnd.randbytes(12 * W)
        frame = av.VideoFrame(W, H, "yuv420p")
        frame.planes[0].update(bytes(y))
        frame.planes[1].update(bytes([128]) * (W * H // 4))
        frame.planes[2].update(bytes([(n * 2) % 256]) * (W * H // 4))
        frame.pts = n
        frame.time_base = fractions.Fraction(1, FPS)
        if n % GOP == 0:
            frame.pict_type = av.video.frame.PictureType.I
        data = b"".join(bytes(p) for p in codec.encode(frame))
        out.append(data)
    return out


def encode_audio() -> list[bytes]:
    """50 Opus packets (1 s) of a 440 Hz tone, 20 ms each."""
    import math

    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate, codec.layout, codec.format = 48000, "stereo", "s16"
    codec.bit_rate = 32000
    codec.time_base = fractions.Fraction(1, 48000)
    out: list[bytes] = []
    for n in range(60):
        pcm = b"".join(
            struct.pack("<hh", v, v)
            for v in (int(6000 * math.sin(2 * math.pi * 440 * (n * 960 + i) / 48000))
                      for i in range(960))
        )
        frame = av.AudioFrame(format="s16", layout="stereo", samples=960)
        frame.planes[0].update(pcm)
        frame.sample_rate = 48000
        frame.pts = n * 960
        frame.time_base = fractions.Fraction(1, 48000)
        out += [bytes(p) for p in codec.encode(frame)]
    return out[-50:]


class PacketTrack(MediaStreamTrack):
    """Paced pre-encoded frames as ``av.Packet`` (the sender packs them, no encoding)."""

    def __init__(self, kind: str, frames: list[bytes], rate: int, clock: int,
                 trailer: bool) -> None:
        super().__init__()
        self.kind = kind
        self._frames = frames
        self._period = 1 / rate
        self._step = clock // rate
        self._tb = fractions.Fraction(1, clock)
        self._trailer = trailer
        self._n = 0
        self._start: float | None = None
        self.late = 0.0

    async def recv(self) -> Any:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self._n * self._period
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        else:
            self.late = max(self.late, -wait)
        data = self._frames[self._n % len(self._frames)]
        if self._trailer:
            data = data + TRAILER + struct.pack("<d", time.time())
        packet = av.Packet(data)
        packet.pts = self._n * self._step
        packet.time_base = self._tb
        self._n += 1
        return packet


# ----- subscriber side ----------------------------------------------------------------------

class Counter:
    """What one subscriber peer received: frame completion times and send-to-complete delays."""

    def __init__(self) -> None:
        self.video: list[float] = []
        self.delays: list[tuple[float, float]] = []
        self.audio: list[float] = []
        self.seq_gaps = 0  # packets that arrived after a gap (loss or reordering)
        self.assemblers: list[Vp8Assembler] = []

    def tap(self, transceiver: Any) -> None:
        if transceiver.kind == "video":
            # Loopback loses nothing (seq_gaps counts it); a long loss timeout keeps a
            # subscriber process that is descheduled for a while from declaring loss.
            assembler = Vp8Assembler(loss_timeout=2.0)
            self.assemblers.append(assembler)
            last_seq: list[int] = []

            def on_video(packet: Any, data: bytes) -> None:
                seq = packet.sequence_number
                step = (seq - last_seq[0]) % 65536 if last_seq else 1
                if 1 < step < 32768:
                    self.seq_gaps += 1
                if step < 32768:
                    last_seq[:] = [seq]
                frames, _ = assembler.add(packet, data)
                now = time.time()
                for f in frames:
                    self.video.append(now)
                    tail = f.data[-12:]
                    if tail[:4] == TRAILER:
                        self.delays.append((now, now - struct.unpack("<d", tail[4:])[0]))

            adapter.tap_receiver(transceiver.receiver, on_video)
        else:
            def on_audio(packet: Any, data: bytes) -> None:
                self.audio.append(time.time())

            adapter.tap_receiver(transceiver.receiver, on_audio)


_keep: list[tuple[asyncio.Future[None], asyncio.StreamWriter]] = []


async def run_subscriber_peer(port: int, name: str, counter: Counter,
                              connected: asyncio.Event) -> RTCPeerConnection:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    pc = RTCPeerConnection(CONFIG)
    tapped: set[int] = set()

    @pc.on("connectionstatechange")
    def _state() -> None:
        if pc.connectionState == "connected":
            connected.set()

    await send_line(writer, {"op": "join", "name": name, "publish": False})

    async def loop() -> None:
        while line := await reader.readline():
            event = json.loads(line)
            if event["type"] == "room.sdp":
                await pc.setRemoteDescription(RTCSessionDescription(**event["sdp"]))
                for t in pc.getTransceivers():
                    if id(t) not in tapped:
                        tapped.add(id(t))
                        counter.tap(t)
                await pc.setLocalDescription(await pc.createAnswer())
                await send_line(writer, {"op": "sdp", "sdp": {
                    "type": "answer", "sdp": pc.localDescription.sdp}})

    task = asyncio.ensure_future(loop())
    pc.on("connectionstatechange", lambda: None)
    _keep.append((task, writer))
    return pc


async def subscribe_main(args: argparse.Namespace) -> None:
    restrict_host_addresses(["127.0.0.1"])
    counters = [Counter() for _ in range(args.count)]
    events = [asyncio.Event() for _ in range(args.count)]
    pcs = []
    for i in range(args.count):
        name = f"{args.prefix}{i}"
        pcs.append(await run_subscriber_peer(args.port, name, counters[i], events[i]))
    async with asyncio.timeout(60):
        await asyncio.gather(*(e.wait() for e in events))
    print("CONNECTED", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    t0, t1 = map(float, line.split()[1:3])
    await asyncio.sleep(max(0.0, t1 - time.time()) + 0.3)
    span = t1 - t0
    result = []
    for c in counters:
        video = [t for t in c.video if t0 <= t < t1]
        # fps per whole second of the window: the worst second shows stalls
        per_second = [sum(1 for t in video if t0 + s <= t < t0 + s + 1) for s in range(int(span))]
        result.append({
            "fps": len(video) / span,
            "min_fps_1s": min(per_second) if per_second else 0,
            "audio_pps": sum(1 for t in c.audio if t0 <= t < t1) / span,
            "delays": [d for t, d in c.delays if t0 <= t < t1],
            "seq_gaps": c.seq_gaps,
            "frames_lost": sum(a.frames_lost for a in c.assemblers),
        })
    print("RESULT " + json.dumps(result), flush=True)
    for task, writer in _keep:
        task.cancel()
        writer.close()
    for pc in pcs:
        await pc.close()


# ----- publisher ----------------------------------------------------------------------------

async def publish_main(args: argparse.Namespace) -> None:
    restrict_host_addresses(["127.0.0.1"])
    video = encode_video(args.bitrate)
    audio = encode_audio()
    kbps = sum(len(f) for f in video) * 8 / (LOOP / FPS) / 1000
    print(f"ENCODED {kbps:.0f}", flush=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
    pc = RTCPeerConnection(CONFIG)
    tracks = {"video": PacketTrack("video", video, FPS, 90000, args.trailer),
              "audio": PacketTrack("audio", audio, 50, 48000, False)}
    await send_line(writer, {"op": "join", "name": "publisher", "publish": True})
    while line := await reader.readline():
        event = json.loads(line)
        if event["type"] == "room.sdp":
            await pc.setRemoteDescription(RTCSessionDescription(**event["sdp"]))
            for t in pc.getTransceivers():
                if t.sender.track is None and t.kind in tracks:
                    t.direction = "sendonly"
                    t.sender.replaceTrack(tracks.pop(t.kind))
            await pc.setLocalDescription(await pc.createAnswer())
            await send_line(writer, {"op": "sdp", "sdp": {
                "type": "answer", "sdp": pc.localDescription.sdp}})


# ----- relay processes ----------------------------------------------------------------------

async def serve_forward(args: argparse.Namespace) -> None:
    relay = Relay(["127.0.0.1"], [], ice_timeout=60, membership_events=False,
                  lean_sender=args.mode == "forward")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        name = None
        while line := await reader.readline():
            msg = json.loads(line)
            if msg["op"] == "join":
                name = msg["name"]

                async def emit(event: dict[str, Any]) -> None:
                    if event["type"] in ("room.sdp", "room.dropped"):
                        await send_line(writer, event)

                await relay.join("bench", name, user=name, device=name,
                                 publish_audio=msg["publish"], publish_video=msg["publish"],
                                 emit=emit)
            elif msg["op"] == "sdp":
                assert name is not None
                await relay.on_sdp("bench", name, msg["sdp"])
                if name == "publisher":
                    print("PUBLISHER", flush=True)

    def legs() -> list[Any]:
        room = relay._rooms.get("bench")
        return [s.track for p in room.participants.values() for s in p.subscriptions.values()
                if s.published.kind == "video"] if room else []

    def on_command(line: str) -> None:
        # RESET at the window start, REPORT at its end: the relay's own queueing delay
        # (frame complete at the relay -> its sender takes it) and overflow counts.
        if line == "RESET":
            for leg in legs():
                leg.delays.clear()
                leg.overflows = 0
        elif line == "REPORT":
            delays = sorted(d for leg in legs() for d in leg.delays)
            print("RELAYSTATS " + json.dumps({
                "queue_p50_ms": 1000 * delays[len(delays) // 2] if delays else None,
                "queue_p95_ms": 1000 * delays[int(len(delays) * 0.95)] if delays else None,
                "queue_max_ms": 1000 * delays[-1] if delays else None,
                "overflows": sum(leg.overflows for leg in legs()),
            }), flush=True)

    server = await asyncio.start_server(handle, "127.0.0.1", args.port)
    print("READY", flush=True)
    async with server:
        await serve_until_stdin_closes(args, on_command)


async def serve_stock(args: argparse.Namespace) -> None:
    """aiortc's stock relay: decode the publisher once, re-encode for every subscriber."""
    media_relay = MediaRelay()
    published: dict[str, MediaStreamTrack] = {}
    got_tracks = asyncio.Event()
    pcs: list[RTCPeerConnection] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pc = RTCPeerConnection(CONFIG)
        pcs.append(pc)
        while line := await reader.readline():
            msg = json.loads(line)
            if msg["op"] == "join":
                if msg["publish"]:
                    for kind in ("audio", "video"):
                        pc.addTransceiver(kind, direction="recvonly")

                    @pc.on("track")
                    def on_track(track: MediaStreamTrack) -> None:
                        published[track.kind] = track
                        if len(published) == 2:
                            got_tracks.set()
                else:
                    await got_tracks.wait()
                    for kind in ("audio", "video"):
                        proxy = media_relay.subscribe(published[kind], buffered=False)
                        t = pc.addTransceiver(proxy, direction="sendonly")
                        if kind == "video":
                            t.setCodecPreferences([
                                c for c in RTCRtpSender.getCapabilities("video").codecs
                                if c.mimeType in ("video/VP8", "video/rtx")])
                await pc.setLocalDescription(await pc.createOffer())
                await send_line(writer, {"type": "room.sdp", "sdp": {
                    "type": "offer", "sdp": pc.localDescription.sdp}})
            elif msg["op"] == "sdp":
                await pc.setRemoteDescription(RTCSessionDescription(**msg["sdp"]))
        await pc.close()

    async def announce() -> None:
        await got_tracks.wait()
        print("PUBLISHER", flush=True)

    announcer = asyncio.ensure_future(announce())
    server = await asyncio.start_server(handle, "127.0.0.1", args.port)
    print("READY", flush=True)
    async with server:
        await serve_until_stdin_closes(args)
    announcer.cancel()


async def serve_direct(args: argparse.Namespace) -> None:
    """No relay: the publisher's frames go straight to one subscriber (the baseline path)."""
    video = encode_video(args.bitrate)
    audio = encode_audio()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pc = RTCPeerConnection(CONFIG)
        while line := await reader.readline():
            msg = json.loads(line)
            if msg["op"] == "join":
                pc.addTransceiver(PacketTrack("video", video, FPS, 90000, True), "sendonly")
                pc.addTransceiver(PacketTrack("audio", audio, 50, 48000, False), "sendonly")
                await pc.setLocalDescription(await pc.createOffer())
                await send_line(writer, {"type": "room.sdp", "sdp": {
                    "type": "offer", "sdp": pc.localDescription.sdp}})
            elif msg["op"] == "sdp":
                await pc.setRemoteDescription(RTCSessionDescription(**msg["sdp"]))
        await pc.close()

    restrict_host_addresses(["127.0.0.1"])
    server = await asyncio.start_server(handle, "127.0.0.1", args.port)
    print("READY", flush=True)
    print("PUBLISHER", flush=True)
    async with server:
        await serve_until_stdin_closes(args)


async def serve_until_stdin_closes(
    args: argparse.Namespace, on_command: Any = None
) -> None:
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or line.startswith("STOP"):
            break
        if on_command is not None:
            on_command(line.strip())
        if line.startswith("PROFILE") and profiler is not None:
            profiler.enable()
        if line.startswith("ENDPROFILE") and profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
            print("PROFILED", flush=True)


# ----- orchestrator -------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """Busy and total jiffies of all cores (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


class Proc:
    """A child process we talk to over stdin/stdout lines."""

    def __init__(self, *argv: str) -> None:
        self.p = subprocess.Popen(
            [sys.executable, __file__, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, bufsize=1,
        )

    def expect(self, word: str, timeout: float = 90) -> str:
        deadline = time.time() + timeout
        assert self.p.stdout is not None
        while time.time() < deadline:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(f"process exited waiting for {word}")
            if line.startswith(word):
                return line.strip()
        raise TimeoutError(word)

    def say(self, line: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                self.say("STOP")
            except BrokenPipeError:
                pass
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def run_one(mode: str, subscribers: int, args: argparse.Namespace, port: int,
            profile: bool = False) -> dict[str, Any]:
    """One run: relay (or direct publisher), publisher, subscribers; measured over a window."""
    procs: list[Proc] = []
    try:
        serve = Proc("serve", "--mode", mode, "--port", str(port), "--bitrate", str(args.bitrate),
                     *(["--profile", args.profile] if profile else []),
                     *(["--stock-loop"] if args.stock_loop else []))
        procs.append(serve)
        serve.expect("READY")
        encoded = None
        if mode != "direct":
            pub = Proc("publish", "--port", str(port), "--bitrate", str(args.bitrate),
                       *(["--trailer"] if mode.startswith("forward") else []))
            procs.append(pub)
            encoded = float(pub.expect("ENCODED").split()[1])
        serve.expect("PUBLISHER")
        subs: list[Proc] = []
        per_proc = args.per_process
        for i in range(0, subscribers, per_proc):
            n = min(per_proc, subscribers - i)
            s = Proc("subscribe", "--port", str(port), "--count", str(n), "--prefix", f"s{i}-")
            procs.append(s)
            subs.append(s)
        for s in subs:
            s.expect("CONNECTED")
        time.sleep(args.warmup)
        if mode.startswith("forward"):
            serve.say("RESET")
        t0 = time.time()
        c0 = cpu_seconds(serve.p.pid)
        others0 = sum(cpu_seconds(p.p.pid) for p in procs if p is not serve)
        busy0, total0 = machine_cpu()
        if profile:
            serve.say("PROFILE")
        for s in subs:
            s.say(f"WINDOW {t0} {t0 + args.seconds}")
        time.sleep(args.seconds)
        c1 = cpu_seconds(serve.p.pid)
        others1 = sum(cpu_seconds(p.p.pid) for p in procs if p is not serve)
        busy1, total1 = machine_cpu()
        t1 = time.time()
        relay_stats: dict[str, Any] = {}
        if mode.startswith("forward"):
            serve.say("REPORT")
            relay_stats = json.loads(serve.expect("RELAYSTATS").split(" ", 1)[1])
        if profile:
            serve.say("ENDPROFILE")
            serve.expect("PROFILED")
        peers: list[dict[str, Any]] = []
        for s in subs:
            peers += json.loads(s.expect("RESULT", 60).split(" ", 1)[1])
        delays = sorted(d for p in peers for d in p["delays"])
        return {
            "mode": mode,
            "subscribers": subscribers,
            "relay_cpu": (c1 - c0) / (t1 - t0),
            "publisher_kbps": encoded,
            "fps_mean": statistics.mean(p["fps"] for p in peers) if peers else None,
            "fps_min_1s": min(p["min_fps_1s"] for p in peers) if peers else None,
            "audio_pps_mean": statistics.mean(p["audio_pps"] for p in peers) if peers else None,
            "delay_p50_ms": 1000 * delays[len(delays) // 2] if delays else None,
            "delay_p95_ms": 1000 * delays[int(len(delays) * 0.95)] if delays else None,
            "peers_cpu": (others1 - others0) / (t1 - t0),
            "seq_gaps": sum(p["seq_gaps"] for p in peers),
            "frames_lost": sum(p["frames_lost"] for p in peers),
            "machine_busy": (busy1 - busy0) / max(1e-9, total1 - total0),
            **relay_stats,
        }
    finally:
        for p in reversed(procs):
            p.stop()


def orchestrate(args: argparse.Namespace) -> None:
    args.forward_list = [int(x) for x in args.forward.split(",") if x]
    stock = [int(x) for x in args.stock.split(",") if x]
    results: list[dict[str, Any]] = []
    port = 47000
    pack = [int(x) for x in args.forward_pack.split(",") if x]
    plan = ([("forward", n) for n in args.forward_list] + [("forward-pack", n) for n in pack]
            + [("stock", n) for n in stock])
    if args.direct:
        plan.append(("direct", 1))
    for mode, n in plan:
        port += 1
        r = run_one(mode, n, args, port)
        results.append(r)
        print(json.dumps(r), flush=True)
    print()
    print(f"machine: {os.cpu_count()} cores; publisher {W}x{H} {FPS} fps VP8 "
          f"~{args.bitrate // 1000} kbps + Opus; {args.seconds:.0f} s window after "
          f"{args.warmup:.0f} s warm-up")
    header = (f"{'mode':12} {'subs':>4} {'relay CPU':>9} {'marginal/sub':>12} {'fps mean':>8} "
              f"{'fps min1s':>9} {'audio pps':>9} {'delay p50':>9} {'p95 ms':>7} "
              f"{'relayq p95':>10} {'peers CPU':>9} {'machine':>7}")
    print(header)
    marginal: dict[str, list[float]] = {}
    base = {r["mode"]: r["relay_cpu"] for r in results if r["subscribers"] == 0}
    if "forward" in base:  # same publisher leg either way
        base.setdefault("forward-pack", base["forward"])
    for r in results:
        m = None
        if r["subscribers"] and r["mode"] in base:
            m = (r["relay_cpu"] - base[r["mode"]]) / r["subscribers"]
            marginal.setdefault(r["mode"], []).append(m)

        def fmt(v: Any, spec: str) -> str:
            return "-" if v is None else format(v, spec)

        print(f"{r['mode']:12} {r['subscribers']:>4} {r['relay_cpu']:>9.3f} {fmt(m, '>12.4f')} "
              f"{fmt(r['fps_mean'], '>8.1f')} {fmt(r['fps_min_1s'], '>9.0f')} "
              f"{fmt(r['audio_pps_mean'], '>9.1f')} {fmt(r['delay_p50_ms'], '>9.1f')} "
              f"{fmt(r['delay_p95_ms'], '>7.1f')} {fmt(r.get('queue_p95_ms'), '>10.1f')} "
              f"{r['peers_cpu']:>9.2f} {r['machine_busy']:>7.0%}")
    if marginal.get("forward") and marginal.get("stock"):
        fwd = marginal["forward"][-1]
        stk = max(marginal["stock"])
        print(f"marginal CPU per subscriber: forward {fwd:.4f} (largest run), stock {stk:.4f} "
              f"(largest, least saturated) -> stock/forward = {stk / fwd:.1f}x")
    direct = next((r for r in results if r["mode"] == "direct"), None)
    fwd_runs = [r for r in results if r["mode"] == "forward" and r["delay_p50_ms"] is not None]
    if direct and direct["delay_p50_ms"] is not None and fwd_runs:
        for r in fwd_runs:
            print(f"added latency at {r['subscribers']} subscribers: p50 "
                  f"{r['delay_p50_ms'] - direct['delay_p50_ms']:.1f} ms, p95 "
                  f"{r['delay_p95_ms'] - direct['delay_p95_ms']:.1f} ms (direct path p50 "
                  f"{direct['delay_p50_ms']:.1f} ms)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.profile and args.forward_list:
        # A separate run: cProfile roughly doubles the cost, so it never feeds the table.
        n = max(args.forward_list)
        r = run_one("forward", n, args, port + 1, profile=True)
        print(f"profiled forward run at {n} subscribers -> {args.profile}")
        print_profile(args.profile, r["relay_cpu"])


def print_profile(path: str, relay_cpu: float) -> None:
    """Per-packet cost of the profiled run, split into the parts the adapter can touch."""
    import pstats

    stats = pstats.Stats(path)
    table: dict[tuple[str, int, str], Any] = stats.stats  # type: ignore[attr-defined]
    by_name: dict[str, tuple[int, float, float]] = {}
    for (file, _line, func), (_cc, ncalls, tottime, cumtime, _callers) in table.items():
        key = f"{Path(file).name}:{func}"
        n, t, c = by_name.get(key, (0, 0.0, 0.0))
        by_name[key] = (n + ncalls, t + tottime, c + cumtime)
    packets = by_name.get("rtcdtlstransport.py:_send_rtp", (0, 0.0, 0.0))[0]
    if not packets:
        return
    total = sum(t for k, (_n, t, _c) in by_name.items() if "epoll" not in k)
    print(f"outgoing packets (RTP+RTCP) in window: {packets}; profiled CPU per packet "
          f"{1e6 * total / packets:.1f} us (cProfile overhead included)")
    parts = {
        "kernel sendto (UDP, loopback delivery)": "~:<method 'sendto' of '_socket.socket' objects>",
        "SRTP protect": "__init__.py:__process",
        "RTP serialize + header extensions": "rtp.py:serialize",
        "send loop own time (aiortc's)": "rtcrtpsender.py:_run_rtp",
        "send loop own time (lean)": "aiortc_adapter.py:_lean_rtp_loop",
        "VP8 packetize": "vpx.py:_packetize",
        "forward track next_frame/offer": "forwarding.py:next_frame",
        "abs-send-time/NTP clock": "clock.py:current_ntp_time",
    }
    for label, key in parts.items():
        n, t, c = by_name.get(key, (0, 0.0, 0.0))
        own = t if key.startswith("~") or key.endswith(("_run_rtp", "_lean_rtp_loop")) else c
        print(f"  {label:42} {1e6 * own / packets:6.1f} us/packet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    s = sub.add_parser("serve")
    s.add_argument("--mode", choices=["forward", "forward-pack", "stock", "direct"], required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--bitrate", type=int, default=1_000_000)
    s.add_argument("--profile")
    s.add_argument("--stock-loop", action="store_true")
    p = sub.add_parser("publish")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bitrate", type=int, default=1_000_000)
    p.add_argument("--trailer", action="store_true")
    c = sub.add_parser("subscribe")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--prefix", default="s")
    ap.add_argument("--forward", default="0,8,32", help="subscriber counts, forwarding relay")
    ap.add_argument("--stock", default="0,2,4", help="subscriber counts for aiortc's MediaRelay")
    ap.add_argument("--forward-pack", default="",
                    help="subscriber counts for the forwarding relay on aiortc's own send loop")
    ap.add_argument("--direct", action="store_true", help="also measure the no-relay path")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=4)
    ap.add_argument("--bitrate", type=int, default=1_000_000)
    ap.add_argument("--per-process", type=int, default=8, help="subscriber peers per process")
    ap.add_argument("--profile", help="cProfile the forwarding relay at the largest run into FILE")
    ap.add_argument("--json", help="write the results to FILE")
    ap.add_argument("--stock-loop", action="store_true",
                    help="run the relay on asyncio's stock loop (one datagram per wake-up)")
    args = ap.parse_args()
    if args.cmd in ("serve", "publish", "subscribe"):
        restrict_host_addresses(["127.0.0.1"])
        if args.cmd == "serve":
            runner = {"forward": serve_forward, "forward-pack": serve_forward,
                      "stock": serve_stock, "direct": serve_direct}
            factory = asyncio.SelectorEventLoop if args.stock_loop else new_event_loop
            with asyncio.Runner(loop_factory=factory) as loop_runner:
                loop_runner.run(runner[args.mode](args))
        elif args.cmd == "publish":
            asyncio.run(publish_main(args))
        else:
            asyncio.run(subscribe_main(args))
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
