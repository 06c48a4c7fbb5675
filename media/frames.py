"""Encoded frames and their reassembly from RTP packets, without decoding.

The relay forwards whole encoded frames (not packets) because aiortc's senders accept
already-encoded frames and packetize them themselves. A frame is handed on only when it is
complete and follows the previous one, so a subscriber never gets a torn frame.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

_SEQ_MOD = 1 << 16
_TS_MOD = 1 << 32


class RtpLike(Protocol):
    """The fields of aiortc's ``RtpPacket`` that the assemblers read."""

    sequence_number: int
    timestamp: int
    marker: int
    ssrc: int
    payload: bytes


@dataclass(slots=True)
class EncodedFrame:
    """One complete encoded frame: ``timestamp`` is the publisher's RTP timestamp, unwrapped."""

    data: bytes
    timestamp: int
    keyframe: bool
    arrival: float
    audio_level: int | None = None


def seq_newer(a: int, b: int) -> bool:
    """True when 16-bit sequence number ``a`` comes after ``b`` (RFC 1982 arithmetic)."""
    return a != b and ((a - b) % _SEQ_MOD) < 0x8000


class TimestampUnwrapper:
    """Turns 32-bit RTP timestamps into a monotonic count from the first one seen."""

    def __init__(self) -> None:
        self._last: int | None = None
        self._value = 0

    def unwrap(self, ts: int) -> int:
        """The unwrapped value of ``ts``; reordered (older) timestamps map below the last."""
        if self._last is None:
            self._last = ts
            return 0
        delta = (ts - self._last) % _TS_MOD
        if delta >= 1 << 31:
            delta -= _TS_MOD
        self._value += delta
        self._last = ts
        return self._value


def vp8_descriptor_start(payload: bytes) -> bool:
    """True when an RTP VP8 payload starts partition 0 of a frame (S=1, PID=0, RFC 7741)."""
    return bool(payload) and (payload[0] & 0x10) != 0 and (payload[0] & 0x0F) == 0


def vp8_is_keyframe(frame: bytes) -> bool:
    """True when a depayloaded VP8 frame is a keyframe (P bit clear, RFC 6386 9.1)."""
    return bool(frame) and (frame[0] & 0x01) == 0


def vp8_keyframe_size(frame: bytes) -> tuple[int, int] | None:
    """Width and height coded in a VP8 keyframe header, or ``None`` for delta frames."""
    if len(frame) < 10 or not vp8_is_keyframe(frame) or frame[3:6] != b"\x9d\x01\x2a":
        return None
    width = int.from_bytes(frame[6:8], "little") & 0x3FFF
    height = int.from_bytes(frame[8:10], "little") & 0x3FFF
    return width, height


_START_CODE = b"\x00\x00\x00\x01"


def h264_nal_types(frame: bytes, limit: int = 8) -> list[int]:
    """Types of the first ``limit`` NAL units of an Annex B frame (as aiortc depayloads H264)."""
    types: list[int] = []
    pos = frame.find(_START_CODE)
    while pos >= 0 and len(types) < limit and pos + 4 < len(frame):
        types.append(frame[pos + 4] & 0x1F)
        pos = frame.find(_START_CODE, pos + 4)
    return types


def h264_is_keyframe(frame: bytes) -> bool:
    """True when an H264 access unit holds an IDR slice (NAL type 5) among its first NAL units
    (AUD, SPS, PPS and SEI may come before it)."""
    return 5 in h264_nal_types(frame)


def h264_keyframe_start(data: bytes) -> bool:
    """True when a depayloaded packet starts a keyframe: its first NAL is an SPS (encoders
    send SPS and PPS ahead of every IDR), so no IDR slice of the frame comes before it."""
    return data[:4] == _START_CODE and len(data) > 4 and data[4] & 0x1F == 7


class _Codec:
    """How the video assembler tells frame starts and keyframes apart, per codec."""

    def __init__(self, name: str) -> None:
        if name not in ("VP8", "H264"):
            raise ValueError(f"no frame assembler for {name}")
        self.name = name

    def starts_frame(self, payload: bytes, data: bytes) -> bool:
        if self.name == "VP8":
            return vp8_descriptor_start(payload)
        return data[:4] == _START_CODE  # begins a NAL unit (not an FU-A continuation)

    def starts_keyframe(self, payload: bytes, data: bytes) -> bool:
        if self.name == "VP8":
            return vp8_descriptor_start(payload) and vp8_is_keyframe(data)
        return h264_keyframe_start(data)

    def is_keyframe(self, frame: bytes) -> bool:
        return vp8_is_keyframe(frame) if self.name == "VP8" else h264_is_keyframe(frame)


class AudioAssembler:
    """Opus: every RTP packet is a frame. Late or duplicate packets are dropped."""

    def __init__(self) -> None:
        self._last_seq: int | None = None
        self._ts = TimestampUnwrapper()

    def add(self, packet: RtpLike, data: bytes, audio_level: int | None) -> EncodedFrame | None:
        """The frame ``packet`` carries, or ``None`` when it came too late to be useful."""
        seq = packet.sequence_number
        if self._last_seq is not None and not seq_newer(seq, self._last_seq):
            return None
        self._last_seq = seq
        return EncodedFrame(
            data=data,
            timestamp=self._ts.unwrap(packet.timestamp),
            keyframe=True,
            arrival=time.monotonic(),
            audio_level=audio_level,
        )


class VideoAssembler:
    """Reassembles VP8 or H264 frames from packets; after a loss, drops frames until a keyframe.

    ``add`` returns the frames completed by a packet, in order, and whether a keyframe is
    needed from the publisher (loss was declared, or the stream started on a delta frame).
    A gap waits ``loss_timeout`` seconds for a retransmission (aiortc NACKs) before it is
    declared lost, and at most ``max_pending`` packets are held.
    """

    def __init__(
        self, codec: str = "VP8", loss_timeout: float = 0.25, max_pending: int = 512
    ) -> None:
        self._codec = _Codec(codec)
        self._pending: dict[int, tuple[RtpLike, bytes, float]] = {}
        self._next_seq: int | None = None
        self._need_keyframe = True
        self._ts = TimestampUnwrapper()
        self._loss_timeout = loss_timeout
        self._max_pending = max_pending
        self.frames_lost = 0
        self._last_dropped_ts: int | None = None

    @property
    def waiting_for_keyframe(self) -> bool:
        """True while frames are dropped until the next keyframe."""
        return self._need_keyframe

    def add(self, packet: RtpLike, data: bytes) -> tuple[list[EncodedFrame], bool]:
        """Store a depayloaded packet; return completed frames and whether a keyframe is needed."""
        seq = packet.sequence_number
        if self._next_seq is not None and not self._need_keyframe and seq_newer(
            self._next_seq, seq
        ):
            return [], False  # late: its frame was already handed on or given up
        now = time.monotonic()
        self._pending[seq] = (packet, data, now)
        out: list[EncodedFrame] = []
        want_keyframe = False
        while True:
            frame = self._next_frame()
            if frame is None:
                break
            out.append(frame)
        if self._pending and self._stalled(now):
            if not self._need_keyframe:
                self.frames_lost += 1
                self._need_keyframe = True
            want_keyframe = True
            frame = self._next_frame()
            while frame is not None:
                out.append(frame)
                frame = self._next_frame()
            if self._need_keyframe:
                # Whatever waited this long cannot complete a keyframe any more.
                for s, entry in list(self._pending.items()):
                    if now - entry[2] > self._loss_timeout:
                        del self._pending[s]
        elif (
            self._need_keyframe
            and not out
            and self._codec.starts_frame(packet.payload, data)
            and packet.timestamp != self._last_dropped_ts
        ):
            # A frame that is not a keyframe starts while we wait: it will be dropped, so ask.
            self._last_dropped_ts = packet.timestamp
            want_keyframe = not self._codec.starts_keyframe(packet.payload, data)
        return out, want_keyframe

    def _stalled(self, now: float) -> bool:
        if len(self._pending) > self._max_pending:
            return True
        oldest = min(entry[2] for entry in self._pending.values())
        return now - oldest > self._loss_timeout

    def _collect(self, start: int) -> tuple[list[int], bytes] | None:
        """Sequence numbers and data of the complete frame starting at ``start``, if all arrived."""
        first = self._pending.get(start)
        if first is None or not self._codec.starts_frame(first[0].payload, first[1]):
            return None
        ts = first[0].timestamp
        seqs: list[int] = []
        chunks: list[bytes] = []
        seq = start
        for _ in range(len(self._pending)):
            entry = self._pending.get(seq)
            if entry is None or entry[0].timestamp != ts:
                return None
            seqs.append(seq)
            chunks.append(entry[1])
            if entry[0].marker:
                return seqs, b"".join(chunks)
            seq = (seq + 1) % _SEQ_MOD
        return None

    def _next_frame(self) -> EncodedFrame | None:
        if self._need_keyframe:
            starts = sorted(
                (s for s, e in self._pending.items()
                 if self._codec.starts_keyframe(e[0].payload, e[1])),
                key=lambda s: (s - (self._next_seq or s)) % _SEQ_MOD,
            )
            for start in starts:
                found = self._collect(start)
                if found is not None:
                    self._need_keyframe = False
                    self._next_seq = start
                    # Everything older than the keyframe is useless now.
                    for s in list(self._pending):
                        if seq_newer(start, s):
                            del self._pending[s]
                    break
            else:
                return None
        assert self._next_seq is not None
        found = self._collect(self._next_seq)
        if found is None:
            return None
        seqs, data = found
        first = self._pending[seqs[0]][0]
        arrival = self._pending[seqs[-1]][2]
        for s in seqs:
            del self._pending[s]
        self._next_seq = (seqs[-1] + 1) % _SEQ_MOD
        return EncodedFrame(
            data=data,
            timestamp=self._ts.unwrap(first.timestamp),
            keyframe=self._codec.is_keyframe(data),
            arrival=arrival,
        )


class Vp8Assembler(VideoAssembler):
    """:class:`VideoAssembler` for VP8."""

    def __init__(self, loss_timeout: float = 0.25, max_pending: int = 512) -> None:
        super().__init__("VP8", loss_timeout, max_pending)
