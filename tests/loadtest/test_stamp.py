"""The frame stamp the media scenario relies on survives real VP8 encoding."""

from __future__ import annotations

import fractions

import av

from loadtest import stamp


def _vp8_round_trip(frames: list[av.VideoFrame], bit_rate: int) -> list[av.VideoFrame]:
    enc = av.CodecContext.create("libvpx", "w")
    enc.width, enc.height, enc.pix_fmt = stamp.WIDTH, stamp.HEIGHT, "yuv420p"
    enc.time_base = fractions.Fraction(1, 30)
    enc.bit_rate = bit_rate
    enc.options = {"deadline": "realtime", "cpu-used": "8"}
    dec = av.CodecContext.create("vp8", "r")
    out: list[av.VideoFrame] = []
    for n, f in enumerate(frames):
        f.pts = n
        for pkt in enc.encode(f):
            out += dec.decode(pkt)
    for pkt in enc.encode(None):
        out += dec.decode(pkt)
    return out


def test_every_frame_reads_back_its_time_and_number_after_vp8() -> None:
    t0 = 1_764_300_000_000
    frames = []
    for n in range(45):
        f = av.VideoFrame(stamp.WIDTH, stamp.HEIGHT, "yuv420p")
        stamp.draw(f, t0 + n * 33, n)
        frames.append(f)
    decoded = _vp8_round_trip(frames, bit_rate=150_000)
    assert len(decoded) == 45
    assert [stamp.read(f) for f in decoded] == [(t0 + n * 33, n) for n in range(45)]


def test_a_frame_without_a_stamp_is_not_misread() -> None:
    f = av.VideoFrame(stamp.WIDTH, stamp.HEIGHT, "yuv420p")
    f.planes[0].update(bytes([128]) * (f.planes[0].line_size * stamp.HEIGHT))
    for p in (1, 2):
        f.planes[p].update(bytes([128]) * (f.planes[p].line_size * stamp.HEIGHT // 2))
    assert stamp.read(f) is None


def test_delay_survives_the_44_bit_wrap() -> None:
    sent = (1 << 44) - 5
    assert stamp.delay_ms(sent, now_ms=(1 << 44) + 20) == 25
