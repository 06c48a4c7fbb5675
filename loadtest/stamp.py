"""Synthetic media whose every video frame carries its send time and number, readable after VP8.

The top rows of each 320x240 frame hold 80 big blocks, black or white: 44 bits of the send
time in milliseconds (Unix time: all processes of a host agree), 20 bits of the frame
counter, and a 16-bit check. 16x16 blocks survive VP8 at any sane bitrate, so a subscriber
reads end-to-end frame delay and counts missing frames without any side channel. Below the
stamp a bar moves, so the encoder produces real delta frames.
"""

from __future__ import annotations

import asyncio
import fractions
import math
import time

import av
from aiortc import MediaStreamTrack

WIDTH, HEIGHT = 320, 240
BLOCK = 16
PER_ROW = WIDTH // BLOCK  # 20
BITS = 80  # 44 time + 20 counter + 16 check
ROWS = math.ceil(BITS / PER_ROW)  # 4
WHITE, BLACK = 235, 16


def _check(ms: int, counter: int) -> int:
    word = (ms << 20) | counter
    return (sum((word >> s) & 0xFFFF for s in range(0, 64, 16)) + 0x5A5A) & 0xFFFF


def stamp_bits(ms: int, counter: int) -> list[int]:
    """The 80 bits drawn for (time in ms, frame counter)."""
    ms &= (1 << 44) - 1
    counter &= (1 << 20) - 1
    value = (ms << 36) | (counter << 16) | _check(ms, counter)
    return [(value >> (BITS - 1 - i)) & 1 for i in range(BITS)]


def draw(frame: av.VideoFrame, ms: int, counter: int) -> None:
    """Paint a yuv420p frame: the stamp on top, a moving bar below, neutral chroma."""
    bits = stamp_bits(ms, counter)
    stride = frame.planes[0].line_size
    rows = bytearray()
    for r in range(ROWS):
        line = bytearray()
        for c in range(PER_ROW):
            i = r * PER_ROW + c
            v = WHITE if i < BITS and bits[i] else BLACK
            line += bytes([v]) * BLOCK
        line += bytes(stride - len(line))
        rows += bytes(line) * BLOCK
    x = (counter * 4) % WIDTH
    bar = bytes(min(255, 16 + abs(i - x) // 2) for i in range(WIDTH)) + bytes(stride - WIDTH)
    rows += bar * (HEIGHT - ROWS * BLOCK)
    frame.planes[0].update(bytes(rows))
    for p in (1, 2):
        plane = frame.planes[p]
        plane.update(bytes([128]) * (plane.line_size * (HEIGHT // 2)))


def read(frame: av.VideoFrame) -> tuple[int, int] | None:
    """(send time ms, counter) from a decoded frame, or None when the stamp does not check."""
    if frame.width != WIDTH or frame.height != HEIGHT:
        frame = frame.reformat(width=WIDTH, height=HEIGHT, format="yuv420p")
    elif frame.format.name != "yuv420p":
        frame = frame.reformat(format="yuv420p")
    plane = frame.planes[0]
    stride = plane.line_size
    data = bytes(plane)
    value = 0
    for i in range(BITS):
        r, c = divmod(i, PER_ROW)
        y0, x0 = r * BLOCK + BLOCK // 2, c * BLOCK + BLOCK // 2
        # Four pixels around the block's centre: robust to ringing at the block edges.
        total = (data[(y0 - 2) * stride + x0 - 2] + data[(y0 - 2) * stride + x0 + 2]
                 + data[(y0 + 2) * stride + x0 - 2] + data[(y0 + 2) * stride + x0 + 2])
        value = (value << 1) | (1 if total > 2 * (WHITE + BLACK) else 0)
    check = value & 0xFFFF
    counter = (value >> 16) & ((1 << 20) - 1)
    ms = value >> 36
    if _check(ms, counter) != check:
        return None
    return ms, counter


def delay_ms(sent_ms: int, now_ms: int | None = None) -> int:
    """Milliseconds since ``sent_ms`` (44-bit wrap-around taken into account)."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    return (now - sent_ms) & ((1 << 44) - 1)


class StampedVideo(MediaStreamTrack):
    """320x240 video at ``fps``, every frame stamped; ``sent`` counts frames handed out."""

    kind = "video"

    def __init__(self, fps: float = 15.0) -> None:
        super().__init__()
        self.fps = fps
        self.sent = 0
        self._start: float | None = None
        self._paused: asyncio.Future[None] | None = None

    def pause(self) -> None:
        """Produce no more frames (the sender just waits), so ``sent`` is final."""
        if self._paused is None:
            self._paused = asyncio.get_running_loop().create_future()

    async def recv(self) -> av.VideoFrame:
        """The next frame, on schedule."""
        if self._paused is not None:
            await self._paused
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self.sent / self.fps - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if self._paused is not None:  # paused while this call slept
            await self._paused
        frame = av.VideoFrame(WIDTH, HEIGHT, "yuv420p")
        draw(frame, int(time.time() * 1000), self.sent)
        frame.pts = int(self.sent * 90000 / self.fps)
        frame.time_base = fractions.Fraction(1, 90000)
        self.sent += 1
        return frame


class Tone(MediaStreamTrack):
    """A 440 Hz tone in 20 ms frames at 48 kHz."""

    kind = "audio"

    def __init__(self, amplitude: int = 8000) -> None:
        super().__init__()
        self.sent = 0
        self._start: float | None = None
        samples = [int(amplitude * math.sin(2 * math.pi * 440 * i / 48000)) for i in range(960)]
        self._pcm = b"".join(s.to_bytes(2, "little", signed=True) for s in samples)

    async def recv(self) -> av.AudioFrame:
        """The next 20 ms, on schedule."""
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self.sent * 0.02 - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        frame = av.AudioFrame(format="s16", layout="mono", samples=960)
        frame.planes[0].update(self._pcm)
        frame.sample_rate = 48000
        frame.pts = self.sent * 960
        frame.time_base = fractions.Fraction(1, 48000)
        self.sent += 1
        return frame
