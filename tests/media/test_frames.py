"""Reassembly of encoded frames from RTP packets (real libvpx output, aiortc packetizer)."""

from __future__ import annotations

from typing import Any

from media.frames import (
    AudioAssembler,
    TimestampUnwrapper,
    VideoAssembler,
    Vp8Assembler,
    h264_nal_types,
    vp8_keyframe_size,
)
from tests.media.vp8_stream import encode_frames, encode_h264, packetize, packetize_h264


def _feed(assembler: VideoAssembler, packets: list[Any]) -> tuple[list[Any], int]:
    frames, asks = [], 0
    for p in packets:
        out, want = assembler.add(p, p._data)
        frames += out
        asks += want
    return frames, asks


def test_frames_come_out_whole_and_in_order_across_sequence_wrap() -> None:
    encoded = encode_frames(10)
    packets = packetize(encoded)
    frames, asks = _feed(Vp8Assembler(), packets)
    # The packetizer's frames, rebuilt byte for byte (descriptor stripped), in order.
    assert len(frames) == 10
    assert frames[0].keyframe and not any(f.keyframe for f in frames[1:])
    assert [f.timestamp for f in frames] == [ts for _, ts in encoded]
    assert vp8_keyframe_size(frames[0].data) == (160, 120)
    assert asks == 0


def test_reordered_packets_within_the_wait_still_make_whole_frames() -> None:
    packets = packetize(encode_frames(6))
    shuffled = packets[:]
    shuffled[3], shuffled[4] = shuffled[4], shuffled[3]
    shuffled[7], shuffled[9] = shuffled[9], shuffled[7]
    frames, _ = _feed(Vp8Assembler(), shuffled)
    assert len(frames) == 6


def test_a_lost_packet_drops_frames_until_the_next_keyframe_and_asks_for_one() -> None:
    packets = packetize(encode_frames(12, keyframes=(0, 8)))
    starts = [i for i, p in enumerate(packets) if p.payload[0] & 0x10]
    lost = starts[3]  # first packet of frame 3
    per_frame = max(b - a for a, b in zip(starts, [*starts[1:], len(packets)], strict=True))
    # Loss is declared when more packets wait than one frame can hold (no waiting on a clock).
    assembler = Vp8Assembler(loss_timeout=60, max_pending=per_frame + 1)
    frames, asks = _feed(assembler, packets[:lost] + packets[lost + 1 :])
    assert asks >= 1
    assert [round(f.timestamp / 3000) for f in frames] == [0, 1, 2, 8, 9, 10, 11]
    assert frames[3].keyframe
    assert assembler.frames_lost == 1


def test_a_stream_joined_on_a_delta_frame_waits_for_a_keyframe() -> None:
    packets = packetize(encode_frames(8, keyframes=(0, 5)))
    starts = [i for i, p in enumerate(packets) if p.payload[0] & 0x10]
    frames, asks = _feed(Vp8Assembler(), packets[starts[2] :])
    assert asks >= 1
    assert frames[0].timestamp == 0  # unwrapped from the first frame handed on
    assert frames[0].keyframe and len(frames) == 3


def test_audio_late_packets_are_dropped() -> None:
    from aiortc.rtp import RtpPacket

    a = AudioAssembler()
    got = []
    for seq, ts in [(10, 0), (12, 1920), (11, 960), (13, 2880)]:
        p = RtpPacket(payload_type=96, sequence_number=seq, timestamp=ts)
        f = a.add(p, b"x", 30)
        got.append(None if f is None else f.timestamp)
    assert got == [0, 1920, None, 2880]


def test_timestamps_unwrap_past_32_bits() -> None:
    u = TimestampUnwrapper()
    assert [u.unwrap(t) for t in (4294967000, 200, 3200)] == [0, 496, 3496]


def test_h264_access_units_are_rebuilt_and_a_loss_waits_for_the_next_idr() -> None:
    encoded = encode_h264(10, keyframes=(0, 6))
    packets = packetize_h264(encoded)
    assert any(len(payloads) > 1 for payloads, _ in encoded), "some frames span packets"
    frames, asks = _feed(VideoAssembler("H264"), packets)
    assert len(frames) == 10 and asks == 0
    assert [f.keyframe for f in frames] == [n in (0, 6) for n in range(10)]
    types = h264_nal_types(frames[0].data)
    assert types[:2] == [7, 8] and 5 in types  # SPS, PPS, (SEI,) IDR
    # Lose a packet of frame 2: frames 2..5 are dropped, 6 (IDR) onwards come through.
    starts = [sum(len(p) for p, _ in encoded[:n]) for n in range(10)]
    lost = starts[2]
    per_frame = max(len(p) for p, _ in encoded)
    assembler = VideoAssembler("H264", loss_timeout=60, max_pending=per_frame + 1)
    frames, asks = _feed(assembler, packets[:lost] + packets[lost + 1 :])
    assert asks >= 1
    assert [round(f.timestamp / 3000) for f in frames] == [0, 1, 6, 7, 8, 9]
