"""The aiortc internals the relay relies on: these fail loudly when an upgrade changes them."""

from __future__ import annotations

import inspect

import aiortc
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCRtpSender
from aiortc.codecs import get_encoder
from aiortc.codecs.opus import OpusEncoder
from aiortc.codecs.vpx import Vp8Encoder

from media import aiortc_adapter as adapter
from media.host_addresses import restrict_host_addresses


def test_installed_aiortc_is_the_pinned_version_and_has_every_internal() -> None:
    assert aiortc.__version__.startswith(adapter.SUPPORTED_AIORTC), (
        f"aiortc {aiortc.__version__}: re-read rtcrtpreceiver.py/rtcrtpsender.py, update "
        "media/aiortc_adapter.py and SUPPORTED_AIORTC"
    )
    adapter.check_aiortc()


def test_an_unknown_aiortc_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiortc, "__version__", "2.0.0")
    with pytest.raises(adapter.UnsupportedAiortcVersion, match=r"2\.0\.0"):
        adapter.check_aiortc()


async def test_receiver_and_sender_instances_have_the_private_attributes() -> None:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        t = pc.addTransceiver("video", direction="sendrecv")
        receiver, sender = t.receiver, t.sender
        assert hasattr(receiver, adapter.RECEIVER_JITTER_BUFFER)
        jb = getattr(receiver, adapter.RECEIVER_JITTER_BUFFER)
        assert callable(jb.add)
        assert inspect.iscoroutinefunction(getattr(receiver, adapter.RECEIVER_SEND_PLI))
        assert callable(getattr(sender, adapter.SENDER_KEYFRAME))
        assert inspect.iscoroutinefunction(getattr(sender, adapter.SENDER_HANDLE_RTCP))
        assert isinstance(getattr(sender, adapter.SENDER_STREAM_ID), str)
        assert isinstance(getattr(t, adapter.TRANSCEIVER_CODECS), list)
        assert isinstance(getattr(t, adapter.TRANSCEIVER_EXTENSIONS), list)
        for name in adapter.SENDER_LEAN_NAMES:
            assert hasattr(sender, name), f"RTCRtpSender lost {name}: the lean send loop needs it"

        seen = []
        tap = adapter.tap_receiver(receiver, lambda pkt, data: seen.append(data))
        assert getattr(receiver, adapter.RECEIVER_JITTER_BUFFER) is tap

        keyframe_requests: list[int] = []
        adapter.hook_sender(sender, on_keyframe_request=lambda: keyframe_requests.append(1))
        sender._send_keyframe()
        assert keyframe_requests == [1]
        adapter.set_stream_id(sender, "publisher-stream")
        offer = await pc.createOffer()
        assert f"a=msid:publisher-stream {adapter.track_id(sender)}" in offer.sdp
    finally:
        await pc.close()


def test_receive_path_feeds_the_jitter_buffer_and_the_pli_sender_is_where_we_call_it() -> None:
    src = inspect.getsource(RTCRtpReceiver._handle_rtp_packet)
    assert "self.__jitter_buffer.add(packet)" in src
    assert "depayload(codec, packet.payload)" in src
    assert "unwrap_rtx" in src, "retransmissions are unwrapped before the jitter buffer"
    assert "_send_rtcp_nack" in src, "the receiver still NACKs losses itself"
    pli_src = inspect.getsource(RTCRtpReceiver._send_rtcp_pli)
    assert "RTCP_PSFB_PLI" in pli_src


def test_senders_pack_encoded_packets_without_encoding() -> None:
    src = inspect.getsource(RTCRtpSender._next_encoded_frame)
    assert "isinstance(data, Frame)" in src and "self.__encoder.pack(data)" in src
    rtcp_src = inspect.getsource(RTCRtpSender._handle_rtcp_packet)
    assert "self._send_keyframe()" in rtcp_src, "subscriber PLI/FIR still reach _send_keyframe"
    for cls in (Vp8Encoder, OpusEncoder):
        assert callable(cls.pack)


def test_pack_keeps_the_encoded_bytes() -> None:
    import fractions

    import av

    vp8 = get_encoder(aiortc.RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000,
                                                  payloadType=97))
    packet = av.Packet(b"\x10\x02\x00" + bytes(3000))
    packet.pts = 9000
    packet.time_base = fractions.Fraction(1, 90000)
    payloads, ts = vp8.pack(packet)
    assert ts == 9000
    assert len(payloads) == 3
    body = b"".join(p[4:] for p in payloads)  # 4-byte descriptor with a 15-bit picture id
    assert body == bytes(packet)


@pytest.mark.netns
async def test_stable_offer_keeps_negotiated_payload_types() -> None:
    restrict_host_addresses(["127.0.0.1"])
    caller = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    relay = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        # The remote (a browser, say) offers first with its own payload type for VP8.
        caller.addTransceiver("video", direction="sendrecv")
        offer = await caller.createOffer()
        sdp = offer.sdp.replace(" 97", " 120").replace(":97", ":120").replace("apt=97", "apt=120")
        await relay.setRemoteDescription(aiortc.RTCSessionDescription(sdp=sdp, type="offer"))
        answer = await relay.createAnswer()
        await relay.setLocalDescription(answer)
        assert "a=rtpmap:120 VP8/90000" in relay.localDescription.sdp
        adapter.remember_negotiated(relay)
        # aiortc's own createOffer would put VP8 back on 97; the adapter keeps 120.
        plain = await relay.createOffer()
        assert "a=rtpmap:97 VP8/90000" in plain.sdp
        stable = await adapter.create_stable_offer(relay)
        assert "a=rtpmap:120 VP8/90000" in stable.sdp
        assert "a=rtpmap:97 VP8/90000" not in stable.sdp
    finally:
        await caller.close()
        await relay.close()
