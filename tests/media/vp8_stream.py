"""Real VP8 RTP packets for unit tests: frames encoded by libvpx, packetized by aiortc."""

from __future__ import annotations

import fractions

import av
from aiortc.codecs.vpx import Vp8Encoder, vp8_depayload
from aiortc.rtp import RtpPacket


def encode_frames(count: int, keyframes: tuple[int, ...] = (0,)) -> list[tuple[list[bytes], int]]:
    """``count`` frames of a changing 160x120 picture: (RTP payloads, timestamp) each."""
    encoder = Vp8Encoder()
    out = []
    for n in range(count):
        frame = av.VideoFrame(160, 120, "yuv420p")
        frame.planes[0].update(bytes((i * 7 + n * 13) % 256 for i in range(160 * 120)))
        frame.planes[1].update(bytes([128]) * (80 * 60))
        frame.planes[2].update(bytes([(n * 5) % 256]) * (80 * 60))
        frame.pts = n * 3000
        frame.time_base = fractions.Fraction(1, 90000)
        payloads, ts = encoder.encode(frame, force_keyframe=n in keyframes)
        out.append((payloads, ts))
    return out


def packetize(frames: list[tuple[list[bytes], int]], first_seq: int = 65530) -> list[RtpPacket]:
    """RTP packets for ``frames`` with wrapping sequence numbers; ``_data`` as aiortc sets it."""
    packets = []
    seq = first_seq
    for payloads, ts in frames:
        for i, payload in enumerate(payloads):
            p = RtpPacket(payload_type=97, sequence_number=seq, timestamp=ts + 4294960000)
            p.timestamp %= 1 << 32
            p.ssrc = 1234
            p.payload = payload
            p.marker = int(i == len(payloads) - 1)
            p._data = vp8_depayload(payload)  # type: ignore[attr-defined]
            packets.append(p)
            seq = (seq + 1) % (1 << 16)
    return packets


def encode_h264(count: int, keyframes: tuple[int, ...] = (0,)) -> list[tuple[list[bytes], int]]:
    """``count`` H264 frames (libx264 via aiortc's encoder): (RTP payloads, timestamp) each."""
    from aiortc.codecs.h264 import H264Encoder

    encoder = H264Encoder()
    out = []
    for n in range(count):
        frame = av.VideoFrame(320, 240, "yuv420p")
        frame.planes[0].update(bytes((i * 7 + n * 13) % 256 for i in range(320 * 240)))
        frame.planes[1].update(bytes([128]) * (160 * 120))
        frame.planes[2].update(bytes([(n * 5) % 256]) * (160 * 120))
        frame.pts = n * 3000
        frame.time_base = fractions.Fraction(1, 90000)
        payloads, ts = encoder.encode(frame, force_keyframe=n in keyframes)
        out.append((payloads, ts))
    return out


def packetize_h264(
    frames: list[tuple[list[bytes], int]], first_seq: int = 65500
) -> list[RtpPacket]:
    """RTP packets for H264 ``frames``, ``_data`` depayloaded as aiortc does."""
    from aiortc.codecs.h264 import h264_depayload

    packets = []
    seq = first_seq
    for payloads, ts in frames:
        for i, payload in enumerate(payloads):
            p = RtpPacket(payload_type=99, sequence_number=seq, timestamp=ts)
            p.ssrc = 99
            p.payload = payload
            p.marker = int(i == len(payloads) - 1)
            p._data = h264_depayload(payload)  # type: ignore[attr-defined]
            packets.append(p)
            seq = (seq + 1) % (1 << 16)
    return packets
