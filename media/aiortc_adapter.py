"""The one place that touches aiortc internals (written against aiortc 1.16).

aiortc has no public hook for encoded frames on the receive side, no way to see a
subscriber's keyframe requests or bitrate estimates on the send side, and its
``createOffer`` resets negotiated payload types and header-extension ids. The relay needs
all of these, so this module reaches into exactly these private names:

- ``RTCRtpReceiver._RTCRtpReceiver__jitter_buffer``: replaced by a :class:`PacketTap` so
  depayloaded packets come to the relay instead of the decoder (which then idles);
- ``RTCRtpReceiver._send_rtcp_pli``: sends a keyframe request to the publisher;
- ``RTCRtpReceiver._RTCRtpReceiver__remote_bitrate_estimator``: wrapped so the relay, not
  aiortc, decides the REMB the publisher gets (``_send_rtcp`` and ``__rtcp_ssrc`` send it);
- ``RTCRtpSender._send_keyframe`` and ``._handle_rtcp_packet``: wrapped per instance to see
  a subscriber's PLI/FIR and REMB;
- ``RTCRtpSender._stream_id``: the ``msid`` stream, so a publisher's audio and video share one;
- ``RTCRtpTransceiver._codecs`` / ``._headerExtensions``: restored after ``createOffer``;
- the lean send path (:func:`install_lean_sender`) replaces a sender's ``send``/``_run_rtp``
  per instance and keeps the sender's RTP history (NACK/RTX) and RTCP SR counters
  (``_RTCRtpSender__rtp_history``, ``__ntp_timestamp``, ``__rtp_timestamp``,
  ``__octet_count``, ``__packet_count``, ``__rtp_started``, ``__rtp_exited``) up to date.

Senders already accept encoded ``av.Packet`` objects from a track (the ``Encoder.pack``
path), so the send side needs no more than the above. :func:`check_aiortc` verifies the
version and every name, and tests/media/test_aiortc_adapter.py fails loudly on an upgrade.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import struct
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiortc
from aiortc import RTCPeerConnection, RTCRtpReceiver, RTCRtpSender, RTCSessionDescription
from aiortc import sdp as aiortc_sdp
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtptransceiver import RTCRtpTransceiver
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTP_HISTORY_SIZE,
    RtcpPsfbPacket,
    RtcpRrPacket,
    RtcpSrPacket,
    RtpPacket,
    pack_remb_fci,
    unpack_remb_fci,
)

logger = logging.getLogger(__name__)

SUPPORTED_AIORTC = ("1.16.",)

RECEIVER_JITTER_BUFFER = "_RTCRtpReceiver__jitter_buffer"
RECEIVER_SEND_PLI = "_send_rtcp_pli"
RECEIVER_SEND_RTCP = "_send_rtcp"
RECEIVER_RTCP_SSRC = "_RTCRtpReceiver__rtcp_ssrc"
RECEIVER_BITRATE_ESTIMATOR = "_RTCRtpReceiver__remote_bitrate_estimator"
SENDER_KEYFRAME = "_send_keyframe"
SENDER_HANDLE_RTCP = "_handle_rtcp_packet"
SENDER_STREAM_ID = "_stream_id"
TRANSCEIVER_CODECS = "_codecs"
TRANSCEIVER_EXTENSIONS = "_headerExtensions"

# Source fragments whose presence proves the receive path still feeds the jitter buffer
# with depayloaded packets and still honours the (pli_flag, frame) return value.
_RECEIVER_SOURCE_NEEDLES = (
    "remb = self.__remote_bitrate_estimator.add(",
    "if self.__rtcp_ssrc is not None and remb is not None:",
    "packet._data = depayload(codec, packet.payload)",
    "self.__jitter_buffer.add(packet)",
    "if encoded_frame is not None and self.__decoder_thread:",
)
# ... and that senders pack non-Frame data (our av.Packets) instead of encoding it.
_SENDER_SOURCE_NEEDLES = ("self.__encoder.pack(data)", "self._send_keyframe()")


class UnsupportedAiortcVersion(RuntimeError):
    """The installed aiortc is not one whose internals this adapter was written against."""


def check_aiortc() -> None:
    """Raise :class:`UnsupportedAiortcVersion` unless aiortc's internals are the ones we use."""
    version = getattr(aiortc, "__version__", "")
    if not version.startswith(SUPPORTED_AIORTC):
        raise UnsupportedAiortcVersion(
            f"aiortc {version!r} is not supported by media.aiortc_adapter "
            f"(written against {SUPPORTED_AIORTC}); re-read rtcrtpreceiver.py and rtcrtpsender.py"
        )
    missing = [
        f"RTCRtpReceiver.{name}"
        for name in (RECEIVER_SEND_PLI, RECEIVER_SEND_RTCP, "_handle_rtp_packet")
        if not callable(getattr(RTCRtpReceiver, name, None))
    ] + [
        f"RTCRtpSender.{name}"
        for name in (SENDER_KEYFRAME, SENDER_HANDLE_RTCP, "_next_encoded_frame")
        if not callable(getattr(RTCRtpSender, name, None))
    ]
    receive_src = inspect.getsource(RTCRtpReceiver._handle_rtp_packet)
    missing += [f"receiver source: {n}" for n in _RECEIVER_SOURCE_NEEDLES if n not in receive_src]
    send_src = inspect.getsource(RTCRtpSender._next_encoded_frame) + inspect.getsource(
        RTCRtpSender._handle_rtcp_packet
    )
    missing += [f"sender source: {n}" for n in _SENDER_SOURCE_NEEDLES if n not in send_src]
    run_src = inspect.getsource(RTCRtpSender._run_rtp) + inspect.getsource(RTCRtpSender.stop)
    missing += [f"sender loop: {n}" for n in _SENDER_RUN_RTP_NEEDLES if n not in run_src]
    for cls, name in ((Vp8Encoder, "_packetize"), (H264Encoder, "_packetize"),
                      (H264Encoder, "_split_bitstream")):
        if not callable(getattr(cls, name, None)):
            missing.append(f"{cls.__name__}.{name}")
    if missing:
        raise UnsupportedAiortcVersion(f"aiortc {version}: internals changed: {missing}")


def _require(obj: object, name: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise UnsupportedAiortcVersion(
            f"aiortc {aiortc.__version__}: {type(obj).__name__} has no {name}"
        ) from None


class PacketTap:
    """Stands in for a receiver's jitter buffer: hands each depayloaded RTP packet to a callback.

    The receiver calls ``add(packet)`` with ``packet._data`` set to the depayloaded payload
    (after RTX unwrapping and NACK generation) and expects ``(pli_flag, frame)`` back. We
    return ``(False, None)``: keyframe requests are the relay's (coalesced) decision and no
    frame ever reaches the decoder thread.
    """

    capacity = 1 << 15  # read by nothing here, kept for code that inspects jitter buffers

    def __init__(self, on_packet: Callable[[Any, bytes], None]) -> None:
        self._on_packet = on_packet

    def add(self, packet: Any) -> tuple[bool, None]:
        """Called by aiortc for every media packet."""
        try:
            self._on_packet(packet, packet._data)
        except Exception:  # never let relay bugs kill aiortc's receive loop
            logger.exception("relay packet handler failed")
        return False, None


def tap_receiver(receiver: RTCRtpReceiver, on_packet: Callable[[Any, bytes], None]) -> PacketTap:
    """Route ``receiver``'s depayloaded packets to ``on_packet(packet, data)``, not the decoder."""
    _require(receiver, RECEIVER_JITTER_BUFFER)
    tap = PacketTap(on_packet)
    setattr(receiver, RECEIVER_JITTER_BUFFER, tap)
    return tap


def send_pli(receiver: RTCRtpReceiver, media_ssrc: int) -> Awaitable[None]:
    """Ask the publisher of ``media_ssrc`` for a keyframe (RTCP PLI) through ``receiver``."""
    send: Callable[[int], Awaitable[None]] = _require(receiver, RECEIVER_SEND_PLI)
    return send(media_ssrc)


class _EstimateTap:
    """Wraps aiortc's remote bitrate estimator: keeps its estimate, suppresses its REMB."""

    def __init__(self, inner: Any, on_estimate: Callable[[int], None]) -> None:
        self._inner = inner
        self._on_estimate = on_estimate

    def add(self, **kwargs: Any) -> None:
        remb = self._inner.add(**kwargs)
        if remb is not None:
            self._on_estimate(int(remb[0]))
        return None


def tap_bitrate_estimate(receiver: RTCRtpReceiver, on_estimate: Callable[[int], None]) -> bool:
    """Send ``receiver``'s incoming-bitrate estimates to ``on_estimate(bps)`` instead of to the
    publisher as REMB (the relay sends its own, see :func:`send_remb`). False for audio."""
    inner = _require(receiver, RECEIVER_BITRATE_ESTIMATOR)
    if inner is None:
        return False
    setattr(receiver, RECEIVER_BITRATE_ESTIMATOR, _EstimateTap(inner, on_estimate))
    return True


async def send_remb(receiver: RTCRtpReceiver, bitrate: int, media_ssrcs: list[int]) -> bool:
    """Send the publisher an RTCP REMB of ``bitrate`` bps for ``media_ssrcs``; False if the
    receiver has no RTCP SSRC yet (not connected)."""
    rtcp_ssrc = _require(receiver, RECEIVER_RTCP_SSRC)
    if rtcp_ssrc is None:
        return False
    packet = RtcpPsfbPacket(
        fmt=RTCP_PSFB_APP, ssrc=rtcp_ssrc, media_ssrc=0, fci=pack_remb_fci(bitrate, media_ssrcs)
    )
    send: Callable[[Any], Awaitable[None]] = _require(receiver, RECEIVER_SEND_RTCP)
    await send(packet)
    return True


def hook_sender(
    sender: RTCRtpSender,
    *,
    on_keyframe_request: Callable[[], None],
    on_remb: Callable[[int], None] | None = None,
    on_loss: Callable[[int], None] | None = None,
) -> None:
    """Call ``on_keyframe_request`` on the subscriber's PLI/FIR, ``on_remb(bps)`` on its REMB
    and ``on_loss(fraction_lost/256)`` on its receiver reports for this sender."""
    _require(sender, SENDER_KEYFRAME)
    original = _require(sender, SENDER_HANDLE_RTCP)

    async def handle_rtcp(packet: Any) -> None:
        is_remb = isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP
        if on_remb is not None and is_remb:
            try:
                bitrate, ssrcs = unpack_remb_fci(packet.fci)
            except ValueError:
                bitrate, ssrcs = 0, []
            if sender._ssrc in ssrcs:
                on_remb(bitrate)
        elif on_loss is not None and isinstance(packet, (RtcpRrPacket, RtcpSrPacket)):
            for report in packet.reports:
                if report.ssrc == sender._ssrc:
                    on_loss(report.fraction_lost)
        await original(packet)

    setattr(sender, SENDER_KEYFRAME, on_keyframe_request)
    setattr(sender, SENDER_HANDLE_RTCP, handle_rtcp)


def set_stream_id(sender: RTCRtpSender, stream_id: str) -> None:
    """Set the ``msid`` stream id the next offer announces for ``sender``."""
    _require(sender, SENDER_STREAM_ID)
    setattr(sender, SENDER_STREAM_ID, stream_id)


def track_id(sender: RTCRtpSender) -> str:
    """The ``msid`` track id announced for ``sender``."""
    return str(_require(sender, "_track_id"))


def negotiated_codec(transceiver: RTCRtpTransceiver) -> Any:
    """The first (sending) codec negotiated on ``transceiver``, or ``None`` before negotiation."""
    codecs = _require(transceiver, TRANSCEIVER_CODECS)
    return codecs[0] if codecs else None


def keep_only_codec(transceiver: RTCRtpTransceiver, mime_type: str) -> bool:
    """Restrict a transceiver's negotiated codecs to ``mime_type`` (and its RTX) before an answer.

    Returns False when that codec was not negotiated at all.
    """
    codecs = _require(transceiver, TRANSCEIVER_CODECS)
    main = [c for c in codecs if c.mimeType.lower() == mime_type.lower()]
    if not main:
        return False
    pts = {c.payloadType for c in main[:1]}
    rtx = [
        c for c in codecs if c.mimeType.lower().endswith("/rtx") and c.parameters.get("apt") in pts
    ]
    setattr(transceiver, TRANSCEIVER_CODECS, main[:1] + rtx)
    return True


_negotiated: weakref.WeakKeyDictionary[RTCPeerConnection, dict[str, tuple[list[Any], list[Any]]]]
_negotiated = weakref.WeakKeyDictionary()


def remember_negotiated(pc: RTCPeerConnection) -> None:
    """Record the payload types and extension ids of every negotiated transceiver of ``pc``.

    Call after each completed offer/answer; :func:`create_stable_offer` re-offers them.
    """
    kept = _negotiated.setdefault(pc, {})
    for t in pc.getTransceivers():
        codecs = _require(t, TRANSCEIVER_CODECS)
        if t.mid is not None and t.currentDirection is not None and codecs:
            kept.setdefault(t.mid, (list(codecs), list(_require(t, TRANSCEIVER_EXTENSIONS))))


async def create_stable_offer(pc: RTCPeerConnection) -> RTCSessionDescription:
    """``pc.createOffer()`` that keeps the payload types and header-extension ids already
    negotiated on every transceiver (aiortc resets them to its defaults, which makes a remote
    that offered first switch payload types or reject the re-offer)."""
    remember_negotiated(pc)
    saved = _negotiated.get(pc, {})
    offer = await pc.createOffer()
    if not saved:
        return offer
    description = aiortc_sdp.SessionDescription.parse(offer.sdp)
    description.type = offer.type
    changed = False
    for media in description.media:
        kept = saved.get(media.rtp.muxId)
        if kept is None:
            continue
        codecs, extensions = kept
        if [c.payloadType for c in media.rtp.codecs] != [c.payloadType for c in codecs] or [
            (e.id, e.uri) for e in media.rtp.headerExtensions
        ] != [(e.id, e.uri) for e in extensions]:
            media.rtp.codecs = codecs
            media.rtp.headerExtensions = extensions
            media.fmt = [c.payloadType for c in codecs]
            changed = True
        t = next(t for t in pc.getTransceivers() if t.mid == media.rtp.muxId)
        setattr(t, TRANSCEIVER_CODECS, codecs)
        setattr(t, TRANSCEIVER_EXTENSIONS, extensions)
    if not changed:
        return offer
    return RTCSessionDescription(sdp=str(description), type=offer.type)


SENDER_LEAN_NAMES = (
    "_RTCRtpSender__rtp_started",
    "_RTCRtpSender__rtp_exited",
    "_RTCRtpSender__rtp_history",
    "_RTCRtpSender__ntp_timestamp",
    "_RTCRtpSender__rtp_timestamp",
    "_RTCRtpSender__octet_count",
    "_RTCRtpSender__packet_count",
)
# What aiortc's own loop does per packet/frame, mirrored by the lean loop.
_SENDER_RUN_RTP_NEEDLES = (
    "self.__rtp_started.set()",
    "self.__rtp_history[packet.sequence_number % RTP_HISTORY_SIZE] = (",
    "await self.transport._send_rtp(packet_bytes)",
    "self.__ntp_timestamp = clock.current_ntp_time()",
    "self.__rtp_timestamp = packet.timestamp",
    "self.__octet_count += len(payload)",
    "self.__packet_count += 1",
    "self.__rtp_exited.set()",
    "packet.extensions.mid = self.__mid",
)
_MID_URI = "urn:ietf:params:rtp-hdrext:sdes:mid"
_ABS_SEND_TIME_URI = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
_AUDIO_LEVEL_URI = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"
_NTP_EPOCH_OFFSET = 2208988800  # seconds from 1900 (NTP) to 1970 (Unix)
_RESUME_SEQUENCE_JUMP = 2000


class FrameLike(Protocol):
    """A frame ready to send: shared RTP payloads, an unwrapped timestamp, an audio level."""

    @property
    def timestamp(self) -> int: ...

    @property
    def frame(self) -> Any: ...

    def payloads(self) -> list[bytes]: ...


class FrameSource(Protocol):
    """Where a lean sender takes its frames (``media.forwarding.ForwardTrack``)."""

    kind: str
    discontinuity: bool

    async def next_frame(self) -> FrameLike: ...

    def stop(self) -> None: ...


def vp8_payloads(frame: bytes, picture_id: int) -> list[bytes]:
    """RTP payloads of a VP8 frame (aiortc's packetizer: 15-bit picture id, ~1300 bytes)."""
    payloads: list[bytes] = Vp8Encoder._packetize(frame, picture_id)
    return payloads


def h264_payloads(frame: bytes) -> list[bytes]:
    """RTP payloads of an Annex B H264 access unit (aiortc's STAP-A/FU-A packetizer)."""
    payloads: list[bytes] = H264Encoder._packetize(H264Encoder._split_bitstream(frame))
    return payloads


def install_lean_sender(sender: RTCRtpSender, source: FrameSource) -> None:
    """Make ``sender`` send ``source``'s pre-packetized frames with the relay's own RTP loop.

    aiortc's loop packetizes each frame per leg and builds every packet through generic
    objects (two datetime-based clock reads, a header-extension map, ``RtpPacket.serialize``).
    Forwarding the same frame to many legs only needs a fixed header per leg, so this loop
    writes it with one ``struct.pack`` and shares the payloads between legs.
    """
    for name in (*SENDER_LEAN_NAMES, "send", "_run_rtp", "_ssrc", "_enabled"):
        _require(sender, name)
    original_send = sender.send
    negotiated: list[Any] = []

    async def send(parameters: Any) -> None:
        negotiated.append(parameters)
        await original_send(parameters)

    async def run_rtp(codec: Any) -> None:
        await _lean_rtp_loop(sender, source, codec, negotiated[-1])

    # Per instance: aiortc's send() starts self._run_rtp(), which now finds ours.
    sender.send = send  # type: ignore[method-assign]
    sender._run_rtp = run_rtp  # type: ignore[method-assign]


async def _lean_rtp_loop(sender: Any, source: FrameSource, codec: Any, parameters: Any) -> None:
    started: asyncio.Event = sender._RTCRtpSender__rtp_started
    exited: asyncio.Event = sender._RTCRtpSender__rtp_exited
    history: dict[int, RtpPacket] = sender._RTCRtpSender__rtp_history
    started.set()
    ids = {ext.uri: ext.id for ext in parameters.headerExtensions}
    mid: str | None = parameters.muxId
    mid_ext = b""
    if mid and _MID_URI in ids:
        mid_bytes = mid.encode()
        mid_ext = bytes([(ids[_MID_URI] << 4) | (len(mid_bytes) - 1)]) + mid_bytes
    abs_id = ids.get(_ABS_SEND_TIME_URI)
    level_id = ids.get(_AUDIO_LEVEL_URI)
    payload_type = codec.payloadType
    ssrc = sender._ssrc
    keep_history = source.kind == "video"  # only video negotiates NACK in aiortc
    seq = random.getrandbits(16) % 32768  # lower half: avoids early wraps (as aiortc)
    origin = random.getrandbits(32)
    octets = packets = 0
    pack = struct.pack
    try:
        while True:
            out = await source.next_frame()
            if not sender._enabled:
                continue
            if source.discontinuity:
                # Resuming after a pause (audio-only period): packets lost before it will
                # never be repaired, and receivers that wait for them in order (aiortc's
                # jitter buffer) would stall. A jump past their NACK windows (Chrome gives
                # up beyond 1000 missing, aiortc's buffer holds 512) lets them start over
                # at the keyframe that comes next.
                source.discontinuity = False
                seq = (seq + _RESUME_SEQUENCE_JUMP) & 0xFFFF
            payloads = out.payloads()
            timestamp = (origin + out.timestamp) & 0xFFFFFFFF
            ntp = int((time.time() + _NTP_EPOCH_OFFSET) * 4294967296)
            abs_send_time = (ntp >> 14) & 0xFFFFFF
            ext = mid_ext
            if abs_id:
                ext += bytes([(abs_id << 4) | 2]) + abs_send_time.to_bytes(3, "big")
            level = out.frame.audio_level
            if level_id and level is not None:
                ext += bytes([level_id << 4, level & 0x7F])
            if ext:
                ext += b"\x00" * (-len(ext) % 4)
                header_ext = pack("!HH", 0xBEDE, len(ext) >> 2) + ext
                first = 0x90
            else:
                header_ext = b""
                first = 0x80
            last = len(payloads) - 1
            transport = sender.transport
            for i, payload in enumerate(payloads):
                marker = 1 if i == last else 0
                data = pack("!BBHLL", first, (marker << 7) | payload_type, seq, timestamp, ssrc)
                if keep_history:
                    packet = RtpPacket(payload_type, marker, seq, timestamp, ssrc, payload)
                    packet.extensions.mid = mid
                    packet.extensions.abs_send_time = abs_send_time
                    history[seq % RTP_HISTORY_SIZE] = packet
                await transport._send_rtp(data + header_ext + payload)
                octets += len(payload)
                packets += 1
                seq = (seq + 1) & 0xFFFF
            # What RTCP sender reports are built from.
            sender._RTCRtpSender__ntp_timestamp = ntp
            sender._RTCRtpSender__rtp_timestamp = timestamp
            sender._RTCRtpSender__octet_count = octets
            sender._RTCRtpSender__packet_count = packets
    except (asyncio.CancelledError, ConnectionError, MediaStreamError):
        pass
    except Exception:
        logger.exception("lean RTP sender failed")
    finally:
        source.stop()
        exited.set()
