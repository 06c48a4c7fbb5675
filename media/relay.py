"""The media relay: rooms of participants whose encoded media is forwarded, never transcoded.

Each participant (one device) has one aiortc peer connection with the relay (max-bundle).
Its published audio/video arrive on ``recvonly`` transceivers; every other participant's
tracks go out on ``sendonly`` transceivers, packetized from the publisher's encoded frames.
The relay makes the offers, so it chooses the codec of every leg (VP8 + Opus).

The signaling layer calls :class:`Relay` with opaque room and participant ids and passes
an ``emit`` callback per participant; the relay knows nothing about chats, groups or
transports. Events a participant's device gets through ``emit`` (delivered in order, one
at a time; ``emit`` may be a plain function or a coroutine function):

- ``{"type": "room.sdp", "room", "sdp": {"type": "offer", "sdp"}}``: answer it with ``on_sdp``.
- ``{"type": "room.tracks", "room", "tracks": [{"track_id", "user", "kind", "mid",
  "stream_id", "participant", "device"}]}``: whose media each of its receiving tracks
  carries, sent before the offer that adds or removes them.
- ``{"type": "room.joined" | "room.left", "room", "user", "device", "participant"}`` about others
  (off with ``membership_events=False`` when signaling sends its own).
- ``{"type": "room.speaker", "room", "user", "participant"}``: the active speaker changed.
- ``{"type": "room.audio_only", "room", "reason"}``: video to this device stopped because
  its link keeps losing packets (more than ``audio_only_loss`` for ``audio_only_after`` s);
  ``{"type": "room.video_resumed", "room"}`` when it is tried again (after
  ``audio_only_retry`` s, doubling after each relapse).
- ``{"type": "room.dropped", "room", "reason"}``: the relay dropped this device
  (``ice_timeout``, ``ice_failed``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiortc import (
    RTCBundlePolicy,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.rtcrtptransceiver import RTCRtpTransceiver
from aiortc.sdp import candidate_from_sdp

from im_bridge.errors import BadRequest, Conflict, Forbidden, NotFound, Unsupported
from media import aiortc_adapter as adapter
from media.forwarding import ForwardTrack, KeyframeRequester, PublishedTrack, publisher_bitrate
from media.frames import AudioAssembler, VideoAssembler
from media.host_addresses import restrict_host_addresses
from media.recording import ParticipantRecording
from media.sdp_codecs import check_codecs, codec_preferences, forwarded_codecs
from media.service import DropCallback, Emit, Event, RoomClosedCallback

logger = logging.getLogger(__name__)


_EVENT_QUEUE_MAX = 1000


@dataclass
class Subscription:
    """One subscriber leg: a publisher's track going out on one transceiver."""

    published: PublishedTrack
    transceiver: RTCRtpTransceiver
    track: ForwardTrack
    loss: float = 0.0  # smoothed fraction lost reported by the subscriber


@dataclass
class Participant:
    """One device in a room, with its peer connection to the relay."""

    room_id: str
    participant_id: str
    user: str
    device: str
    publish_audio: bool
    publish_video: bool
    emit: Emit
    pc: RTCPeerConnection
    stream_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    published: dict[str, PublishedTrack] = field(default_factory=dict)
    tapped: set[int] = field(default_factory=set)  # id() of receivers feeding the relay
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    needs_offer: bool = False
    connected: bool = False
    closed: bool = False
    audio_only: bool = False
    ice_timer: asyncio.TimerHandle | None = None
    events: asyncio.Queue[Event | None] = field(
        default_factory=lambda: asyncio.Queue(_EVENT_QUEUE_MAX)
    )
    event_task: asyncio.Task[None] | None = None
    joined_at: float = field(default_factory=time.monotonic)
    video_since: float = field(default_factory=time.monotonic)
    audio_only_count: int = 0
    audio_only_timer: asyncio.TimerHandle | None = None

    def send(self, event: Event) -> None:
        """Queue an event for this device (dropped, with a warning, if the queue is full)."""
        if self.closed:
            return
        try:
            self.events.put_nowait(event)
        except asyncio.QueueFull:
            logger.warning(
                "event queue full for %s; dropping %s", self.participant_id, event["type"]
            )

    def info(self) -> dict[str, Any]:
        """The public description of this participant."""
        return {
            "participant": self.participant_id,
            "user": self.user,
            "device": self.device,
            "media": {"audio": self.publish_audio, "video": self.publish_video},
        }


@dataclass
class Room:
    """Participants by id, and the room's active speaker."""

    room_id: str
    participants: dict[str, Participant] = field(default_factory=dict)
    speaker: str | None = None
    speaker_task: asyncio.Task[None] | None = None
    bitrate_task: asyncio.Task[None] | None = None
    recording_dir: Path | None = None
    recordings: dict[str, ParticipantRecording] = field(default_factory=dict)


class Relay:
    """Rooms of aiortc peers whose encoded media is forwarded to each other.

    ``host_addresses``: where ICE candidates are gathered (``TALKBRIDGE_RELAY_ADDRESSES``).
    ``ice_servers``: passed to every peer connection (never a public default).
    ``on_dropped(room_id, participant_id, reason)``: called when the relay drops a device.
    ``on_room_closed(room_id)``: called when the last participant is gone.
    ``ice_timeout``: seconds from the first offer for the connection to come up.
    ``max_publish_bitrate``: the video bitrate cap sent to publishers (REMB), lowered to the
    least of the subscribers' REMB estimates but not below ``min_subscriber_bitrate``.
    ``lean_sender``: send with the relay's own RTP loop (packetize once for all legs) instead
    of aiortc's per-leg ``Encoder.pack`` loop; both forward without decoding.
    ``video_codec``: ``VP8`` (default) or ``H264`` (constrained baseline/baseline,
    packetization-mode 1): the codec of every video leg, publishers' and subscribers'.
    """

    def __init__(
        self,
        host_addresses: list[str],
        ice_servers: list[dict[str, Any]] | None = None,
        *,
        on_dropped: DropCallback | None = None,
        on_room_closed: RoomClosedCallback | None = None,
        ice_timeout: float = 15.0,
        keyframe_interval: float = 0.5,
        video_queue_frames: int = 30,
        membership_events: bool = True,
        speaker_interval: float = 0.3,
        speaker_threshold: int = 60,
        audio_only_loss: float = 0.15,
        audio_only_after: float = 5.0,
        audio_only_retry: float = 30.0,
        max_publish_bitrate: int = 1_500_000,
        min_subscriber_bitrate: int = 150_000,
        remb_interval: float = 1.0,
        lean_sender: bool = True,
        video_codec: str = "VP8",
    ) -> None:
        adapter.check_aiortc()
        if host_addresses:
            restrict_host_addresses(host_addresses)
        self._ice_servers = [
            RTCIceServer(
                urls=s["urls"], username=s.get("username"), credential=s.get("credential")
            )
            for s in (ice_servers or [])
        ]
        self._on_dropped = on_dropped
        self._on_room_closed = on_room_closed
        self._ice_timeout = ice_timeout
        self._keyframe_interval = keyframe_interval
        self._video_queue = video_queue_frames
        self._membership_events = membership_events
        self._speaker_interval = speaker_interval
        self._speaker_threshold = speaker_threshold
        self._audio_only_loss = audio_only_loss
        self._audio_only_after = audio_only_after
        self._audio_only_retry = audio_only_retry
        self._max_bitrate = max_publish_bitrate
        self._min_bitrate = min_subscriber_bitrate
        self._remb_interval = remb_interval
        self._lean_sender = lean_sender
        self._codecs = forwarded_codecs(video_codec)
        self._video_codec = video_codec
        self._rooms: dict[str, Room] = {}
        self._tasks: set[asyncio.Future[Any]] = set()
        self._closed = False

    @property
    def video_codec(self) -> str:
        """The video codec every leg uses: ``VP8`` or ``H264``."""
        return self._video_codec

    # ----- the interface signaling calls -------------------------------------------------

    async def join(
        self,
        room_id: str,
        participant_id: str,
        *,
        user: str,
        device: str,
        publish_audio: bool,
        publish_video: bool,
        emit: Emit,
    ) -> dict[str, Any]:
        """Add a device to a room (created on first join). The relay's offer follows as a
        ``room.sdp`` event. Returns ``{"room", "participants": [...]}`` (the others). Joining
        again with the same ``participant_id`` replaces the old connection (a reconnect)."""
        if self._closed:
            raise Conflict("relay is closed")
        existing = self._rooms.get(room_id)
        previous = existing.participants.get(participant_id) if existing else None
        if previous is not None:
            # A reconnecting device: its old connection goes, the others keep their media
            # and see no leave/join, just a re-offer.
            await self._remove(previous, reason="replaced", notify=False, keep_room=True)
        room = self._rooms.setdefault(room_id, Room(room_id))
        pc = RTCPeerConnection(
            RTCConfiguration(iceServers=self._ice_servers, bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
        )
        p = Participant(
            room_id, participant_id, user, device, publish_audio, publish_video, emit, pc
        )
        p.event_task = asyncio.ensure_future(self._deliver_events(p))
        others = list(room.participants.values())
        room.participants[participant_id] = p
        self._watch_connection(p)

        for kind, on in (("audio", publish_audio), ("video", publish_video)):
            if on:
                t = pc.addTransceiver(kind, direction="recvonly")
                t.setCodecPreferences(codec_preferences(kind, self._codecs))
                self._publish(p, t)
        for other in others:
            for track in other.published.values():
                self._subscribe(p, track)
        for other in others:
            for track in p.published.values():
                self._subscribe(other, track)
            if p.published:
                self._spawn(self._negotiate(other))
            if self._membership_events and previous is None:
                other.send(self._member_event("room.joined", p))
        self._spawn(self._negotiate(p))
        if room.recording_dir is not None and p.published:
            self._record(room, p)
        if room.speaker_task is None:
            room.speaker_task = asyncio.ensure_future(self._watch_speaker(room))
            room.bitrate_task = asyncio.ensure_future(self._steer_bitrates(room))
        return {"room": room_id, "participants": [o.info() for o in others]}

    async def on_sdp(
        self, room_id: str, participant_id: str, sdp: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Apply a device's description. An answer returns ``None``; an offer returns the
        relay's answer ``{"type": "answer", "sdp"}``. An offer while the relay's own offer is
        pending is refused with :class:`Conflict` (glare: the device is the polite side, rolls
        back and answers the relay's offer). Codecs other than VP8/Opus: :class:`Unsupported`."""
        p = self._get(room_id, participant_id)
        if not isinstance(sdp, dict):
            raise BadRequest("sdp must be an object {type, sdp}")
        kind, text = sdp.get("type"), sdp.get("sdp")
        if kind not in ("offer", "answer"):
            raise BadRequest("sdp.type must be 'offer' or 'answer'")
        if not isinstance(text, str):
            raise BadRequest("sdp.sdp must be a string")
        async with p.lock:
            if p.closed:
                raise Forbidden(f"not in room {room_id}")
            if kind == "answer":
                if p.pc.signalingState != "have-local-offer":
                    raise Conflict("no relay offer is waiting for an answer")
                check_codecs(text, sending_only=False, codecs=self._codecs)
                await self._set_remote(p, RTCSessionDescription(sdp=text, type="answer"))
                adapter.remember_negotiated(p.pc)
                again = p.needs_offer
            else:
                if p.pc.signalingState == "have-local-offer":
                    raise Conflict(
                        "glare: the relay's offer is pending; roll back and answer it"
                    )
                check_codecs(text, sending_only=True, codecs=self._codecs)
                await self._set_remote(p, RTCSessionDescription(sdp=text, type="offer"))
                for t in p.pc.getTransceivers():
                    if t.currentDirection is None and t.receiver.track is not None:
                        adapter.keep_only_codec(t, self._codecs[t.kind])
                answer = await p.pc.createAnswer()
                await p.pc.setLocalDescription(answer)
                adapter.remember_negotiated(p.pc)
                self._start_ice_timer(p)
                again = p.needs_offer
        if again:
            self._spawn(self._negotiate(p))
        if kind == "answer":
            return None
        return {"type": "answer", "sdp": p.pc.localDescription.sdp}

    async def on_ice(
        self, room_id: str, participant_id: str, candidate: dict[str, Any] | None
    ) -> None:
        """Add a trickled ICE candidate from the device (``None`` or ``""``: end of candidates)."""
        p = self._get(room_id, participant_id)
        if candidate is not None and not isinstance(candidate, dict):
            raise BadRequest("candidate must be an object {candidate, sdpMid, sdpMLineIndex}")
        if candidate is None or not candidate.get("candidate"):
            await p.pc.addIceCandidate(None)
            return
        text = candidate.get("candidate")
        if not isinstance(text, str):
            raise BadRequest("candidate.candidate must be a string")
        try:
            c = candidate_from_sdp(text.split(":", 1)[1] if text.startswith("candidate:") else text)
        except (ValueError, IndexError, AssertionError) as exc:  # aiortc asserts the field count
            raise BadRequest(f"bad ICE candidate: {exc or 'too few fields'}") from None
        c.sdpMid = candidate.get("sdpMid")
        c.sdpMLineIndex = candidate.get("sdpMLineIndex")
        if c.sdpMid is None and c.sdpMLineIndex is None:
            raise BadRequest("candidate needs sdpMid or sdpMLineIndex")
        await p.pc.addIceCandidate(c)

    async def leave(self, room_id: str, participant_id: str) -> None:
        """Remove a device from a room; the others' media continue (they get a re-offer)."""
        p = self._get(room_id, participant_id)
        await self._remove(p, reason=None)

    async def start_recording(self, room_id: str, directory: str | Path) -> list[str]:
        """Record every publisher of the room (and later ones) to WebM files in ``directory``
        (VP8 + Opus as forwarded, no decoding). Returns the files being written."""
        room = self._rooms.get(room_id)
        if room is None:
            raise NotFound(f"no room {room_id}")
        path = Path(directory)
        await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
        room.recording_dir = path
        for p in room.participants.values():
            if p.published and p.participant_id not in room.recordings:
                self._record(room, p)
        return [str(r.path) for r in room.recordings.values()]

    async def stop_recording(self, room_id: str) -> list[str]:
        """Stop recording a room; returns the files written (closed and complete)."""
        room = self._rooms.get(room_id)
        if room is None:
            return []
        room.recording_dir = None
        paths = []
        for pid in list(room.recordings):
            recording = room.recordings.pop(pid)
            await recording.stop()
            paths.append(str(recording.path))
        return paths

    def _record(self, room: Room, p: Participant) -> None:
        assert room.recording_dir is not None
        recording = ParticipantRecording(
            room.recording_dir, room.room_id, p.participant_id, list(p.published.values()),
            video_codec=self._video_codec,
        )
        recording.start()
        room.recordings[p.participant_id] = recording

    def participants(self, room_id: str) -> list[dict[str, Any]]:
        """The participants of a room (empty when there is no such room)."""
        room = self._rooms.get(room_id)
        return [p.info() for p in room.participants.values()] if room else []

    def rooms(self) -> list[str]:
        """Ids of the rooms that have participants."""
        return list(self._rooms)

    def stats(self, room_id: str) -> dict[str, Any]:
        """Forwarding counters per participant (for tests, benchmarks and /metrics)."""
        room = self._rooms.get(room_id)
        out: dict[str, Any] = {}
        for p in room.participants.values() if room else []:
            out[p.participant_id] = {
                "connected": p.connected,
                "audio_only": p.audio_only,
                "published": {
                    t.kind: {
                        "frames": t.frames,
                        "keyframes": t.keyframes,
                        "keyframe_requests": t.requester.requested,
                        "plis_sent": t.requester.sent,
                    }
                    for t in p.published.values()
                },
                "subscriptions": {
                    tid: {
                        "kind": s.published.kind,
                        "from": s.published.publisher,
                        "frames_out": s.track.frames_out,
                        "overflows": s.track.overflows,
                    }
                    for tid, s in p.subscriptions.items()
                },
            }
        return out

    async def close(self) -> None:
        """Close every peer connection; the relay cannot be used afterwards."""
        self._closed = True
        for room in list(self._rooms.values()):
            for p in list(room.participants.values()):
                await self._remove(p, reason=None, notify=False)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ----- publishing and subscribing ----------------------------------------------------

    def _publish(self, p: Participant, t: RTCRtpTransceiver) -> PublishedTrack:
        """Make the media arriving on ``t`` a published track of ``p``."""
        receiver = t.receiver
        ssrc: list[int] = []
        pending: set[asyncio.Future[Any]] = set()

        def send_pli() -> bool:
            if not ssrc or p.closed:
                return False
            fut = asyncio.ensure_future(adapter.send_pli(receiver, ssrc[0]))
            pending.add(fut)
            fut.add_done_callback(pending.discard)
            return True

        requester = KeyframeRequester(send_pli, self._keyframe_interval)
        track = PublishedTrack(
            uuid.uuid4().hex, t.kind, p.participant_id, p.user, self._codecs[t.kind], requester
        )
        if t.kind == "video":
            vp8 = VideoAssembler(self._video_codec)

            def on_video(packet: Any, data: bytes) -> None:
                if not ssrc:
                    ssrc.append(packet.ssrc)
                    requester.retry_pending()
                frames, want_keyframe = vp8.add(packet, data)
                for frame in frames:
                    track.forward(frame)
                if want_keyframe:
                    requester.request()

            adapter.tap_receiver(receiver, on_video)

            def on_uplink_estimate(bps: int) -> None:
                track.uplink_estimate = bps

            def remb(bps: int) -> None:
                if ssrc and not p.closed:
                    fut = asyncio.ensure_future(adapter.send_remb(receiver, bps, ssrc[:1]))
                    pending.add(fut)
                    fut.add_done_callback(pending.discard)

            adapter.tap_bitrate_estimate(receiver, on_uplink_estimate)
            track.send_remb = remb
        else:
            opus = AudioAssembler()

            def on_audio(packet: Any, data: bytes) -> None:
                if not ssrc:
                    ssrc.append(packet.ssrc)
                level = packet.extensions.audio_level
                frame = opus.add(packet, data, None if level is None else int(level[1]))
                if frame is not None:
                    track.forward(frame)

            adapter.tap_receiver(receiver, on_audio)
        p.published[track.track_id] = track
        p.tapped.add(id(receiver))
        return track

    def _subscribe(self, p: Participant, track: PublishedTrack) -> None:
        """Add a ``sendonly`` leg of ``track`` to ``p`` (sent with ``p``'s next offer)."""
        fwd = track.subscribe(
            p.participant_id, self._video_queue if track.kind == "video" else None
        )
        if p.audio_only and track.kind == "video":
            fwd.paused = True
        t = p.pc.addTransceiver(fwd, direction="sendonly")
        if self._lean_sender:
            adapter.install_lean_sender(t.sender, fwd)
        t.setCodecPreferences(codec_preferences(track.kind, self._codecs))
        publisher = self._rooms[p.room_id].participants.get(track.publisher)
        adapter.set_stream_id(t.sender, publisher.stream_id if publisher else track.publisher)
        sub = Subscription(track, t, fwd)

        def on_loss(fraction: int) -> None:
            self._on_subscriber_loss(p, sub, fraction / 256)

        def on_remb(bps: int) -> None:
            if track.kind == "video":
                track.subscriber_estimates[p.participant_id] = bps

        adapter.hook_sender(
            t.sender,
            on_keyframe_request=track.requester.request,
            on_remb=on_remb,
            on_loss=on_loss,
        )
        p.subscriptions[track.track_id] = sub

    async def _unsubscribe(self, p: Participant, track_id: str) -> None:
        sub = p.subscriptions.pop(track_id, None)
        if sub is None:
            return
        sub.published.unsubscribe(p.participant_id)
        sub.transceiver.direction = "inactive"
        await sub.transceiver.sender.stop()

    def _on_subscriber_loss(self, p: Participant, sub: Subscription, fraction: float) -> None:
        """Move a subscriber whose video keeps getting lost to audio only, and tell it."""
        if sub.published.kind != "video" or p.audio_only:
            return
        # No judgement in the first seconds of (resumed) video: reports then still cover the
        # join, or the sequence jump at the resume, which are not losses of this link.
        grace = self._audio_only_after if p.audio_only_count == 0 else max(
            self._audio_only_after, 2.0
        )
        if time.monotonic() - p.video_since < grace:
            return
        sub.loss = 0.7 * sub.loss + 0.3 * fraction
        if sub.loss < self._audio_only_loss:
            return
        p.audio_only = True
        for s in p.subscriptions.values():
            if s.published.kind == "video":
                s.track.paused = True
        p.send({"type": "room.audio_only", "room": p.room_id, "reason": "loss"})
        # Links recover: try video again later, waiting twice as long after each relapse.
        retry = self._audio_only_retry * (2 ** p.audio_only_count)
        p.audio_only_count += 1
        p.audio_only_timer = asyncio.get_running_loop().call_later(
            retry, self._resume_video, p
        )

    def _resume_video(self, p: Participant) -> None:
        """Give an audio-only subscriber video again (from a fresh keyframe), and tell it."""
        p.audio_only_timer = None
        if p.closed or not p.audio_only:
            return
        p.audio_only = False
        p.video_since = time.monotonic()
        for s in p.subscriptions.values():
            s.loss = 0.0
            if s.published.kind == "video":
                s.track.resume()
        p.send({"type": "room.video_resumed", "room": p.room_id})

    # ----- negotiation --------------------------------------------------------------------

    async def _negotiate(self, p: Participant) -> None:
        """Send ``p`` an offer for its current transceivers (or mark one needed after the
        pending answer)."""
        async with p.lock:
            if p.closed or self._closed:
                return
            if p.pc.signalingState != "stable":
                p.needs_offer = True
                return
            if not p.pc.getTransceivers():
                return  # nothing to send or receive yet: offer when there is
            p.needs_offer = False
            offer = await adapter.create_stable_offer(p.pc)
            await p.pc.setLocalDescription(offer)
            p.send({"type": "room.tracks", "room": p.room_id, "tracks": self._tracks_of(p)})
            p.send(
                {
                    "type": "room.sdp",
                    "room": p.room_id,
                    "sdp": {"type": "offer", "sdp": p.pc.localDescription.sdp},
                }
            )
            self._start_ice_timer(p)

    async def _set_remote(self, p: Participant, description: RTCSessionDescription) -> None:
        before = {id(t) for t in p.pc.getTransceivers()}
        try:
            await p.pc.setRemoteDescription(description)
        except (Unsupported, BadRequest):
            raise
        except Exception as exc:  # aiortc: OperationError, ValueError, InvalidStateError
            if "Failed to set remote" in str(exc):
                raise Unsupported(f"no codec in common with the relay: {exc}") from None
            raise BadRequest(f"SDP rejected: {exc}") from None
        # Sections the device added in its own offer: publish what it sends.
        for t in p.pc.getTransceivers():
            if id(t) in before or id(t.receiver) in p.tapped:
                continue
            if t.receiver.track is not None:
                track = self._publish(p, t)
                if t.kind == "audio":
                    p.publish_audio = True
                else:
                    p.publish_video = True
                for other in self._rooms[p.room_id].participants.values():
                    if other is not p:
                        self._subscribe(other, track)
                        self._spawn(self._negotiate(other))

    def _tracks_of(self, p: Participant) -> list[dict[str, Any]]:
        room = self._rooms.get(p.room_id)
        out = []
        for sub in p.subscriptions.values():
            publisher = room.participants.get(sub.published.publisher) if room else None
            out.append(
                {
                    "track_id": adapter.track_id(sub.transceiver.sender),
                    "user": sub.published.user,
                    "kind": sub.published.kind,
                    "mid": sub.transceiver.mid,
                    "stream_id": publisher.stream_id if publisher else None,
                    "participant": sub.published.publisher,
                    "device": publisher.device if publisher else None,
                }
            )
        return out

    # ----- connection state, drops, removal ----------------------------------------------

    def _watch_connection(self, p: Participant) -> None:
        @p.pc.on("connectionstatechange")
        def on_state() -> None:
            state = p.pc.connectionState
            if state == "connected":
                p.connected = True
                if p.ice_timer is not None:
                    p.ice_timer.cancel()
                    p.ice_timer = None
            elif state == "failed" and not p.closed:
                self._spawn(self._drop(p, "ice_failed"))

    def _start_ice_timer(self, p: Participant) -> None:
        if p.connected or p.ice_timer is not None:
            return
        loop = asyncio.get_running_loop()
        p.ice_timer = loop.call_later(
            self._ice_timeout, lambda: self._spawn(self._drop(p, "ice_timeout"))
        )

    async def _drop(self, p: Participant, reason: str) -> None:
        if p.closed or (reason == "ice_timeout" and p.connected):
            return
        logger.info("dropping %s from %s: %s", p.participant_id, p.room_id, reason)
        p.send({"type": "room.dropped", "room": p.room_id, "reason": reason})
        await self._remove(p, reason=reason)
        if self._on_dropped is not None:
            await _maybe_await(self._on_dropped(p.room_id, p.participant_id, reason))

    async def _remove(
        self, p: Participant, reason: str | None, notify: bool = True, keep_room: bool = False
    ) -> None:
        room = self._rooms.get(p.room_id)
        if p.closed or room is None:
            return
        p.closed = True
        for timer in (p.ice_timer, p.audio_only_timer):
            if timer is not None:
                timer.cancel()
        room.participants.pop(p.participant_id, None)
        recording = room.recordings.pop(p.participant_id, None)
        if recording is not None:
            await recording.stop()
        for track_id in list(p.subscriptions):
            await self._unsubscribe_quietly(p, track_id)
        for track in p.published.values():
            for other in room.participants.values():
                if track.track_id in other.subscriptions:
                    await self._unsubscribe(other, track.track_id)
            track.close()
        for other in room.participants.values():
            if p.published:
                self._spawn(self._negotiate(other))
            if notify and self._membership_events:
                other.send(self._member_event("room.left", p))
        await p.pc.close()
        # Let the device get what is queued (e.g. room.dropped), then stop its event task.
        if p.event_task is not None:
            try:
                p.events.put_nowait(None)
                async with asyncio.timeout(2.0):
                    await asyncio.shield(p.event_task)
            except (asyncio.QueueFull, TimeoutError):
                p.event_task.cancel()
        if not room.participants and not keep_room:
            self._rooms.pop(room.room_id, None)
            for task in (room.speaker_task, room.bitrate_task):
                if task is not None:
                    task.cancel()
            if self._on_room_closed is not None and notify:
                await _maybe_await(self._on_room_closed(room.room_id))

    async def _unsubscribe_quietly(self, p: Participant, track_id: str) -> None:
        sub = p.subscriptions.pop(track_id, None)
        if sub is not None:
            sub.published.unsubscribe(p.participant_id)

    def _get(self, room_id: str, participant_id: str) -> Participant:
        room = self._rooms.get(room_id)
        p = room.participants.get(participant_id) if room else None
        if p is None:
            raise Forbidden(f"not in room {room_id}")
        return p

    def _member_event(self, kind: str, p: Participant) -> Event:
        return {
            "type": kind,
            "room": p.room_id,
            "user": p.user,
            "device": p.device,
            "participant": p.participant_id,
        }

    # ----- active speaker -----------------------------------------------------------------

    async def _watch_speaker(self, room: Room) -> None:
        """Every ``speaker_interval``, the loudest publisher (ssrc-audio-level) becomes the
        speaker if louder than ``-speaker_threshold`` dBov; changes go to everyone."""
        last_frames: dict[str, int] = {}
        while True:
            await asyncio.sleep(self._speaker_interval)
            best: tuple[float, Participant] | None = None
            for p in room.participants.values():
                for t in p.published.values():
                    if t.kind != "audio":
                        continue
                    fresh = t.frames != last_frames.get(t.track_id)
                    last_frames[t.track_id] = t.frames
                    if fresh and t.audio_level < self._speaker_threshold and (
                        best is None or t.audio_level < best[0]
                    ):
                        best = (t.audio_level, p)
            if best is not None and best[1].participant_id != room.speaker:
                room.speaker = best[1].participant_id
                event = {
                    "type": "room.speaker",
                    "room": room.room_id,
                    "user": best[1].user,
                    "participant": best[1].participant_id,
                }
                for p in room.participants.values():
                    p.send(dict(event))

    # ----- bandwidth ----------------------------------------------------------------------

    async def _steer_bitrates(self, room: Room) -> None:
        """Every ``remb_interval``, send each video publisher the REMB of
        :func:`media.forwarding.publisher_bitrate` (cap, subscribers' minimum, floor)."""
        while True:
            await asyncio.sleep(self._remb_interval)
            for p in room.participants.values():
                for t in p.published.values():
                    if t.kind != "video" or t.send_remb is None:
                        continue
                    # Audio-only subscribers get no video: their estimates do not count.
                    estimates = [
                        bps
                        for sub, bps in t.subscriber_estimates.items()
                        if sub in room.participants and not room.participants[sub].audio_only
                    ]
                    t.target_bitrate = publisher_bitrate(
                        self._max_bitrate, self._min_bitrate, t.uplink_estimate, estimates
                    )
                    t.send_remb(t.target_bitrate)

    # ----- plumbing -----------------------------------------------------------------------

    async def _deliver_events(self, p: Participant) -> None:
        while True:
            event = await p.events.get()
            if event is None:
                return
            try:
                await _maybe_await(p.emit(event))
            except Exception:
                logger.exception("emit to %s failed", p.participant_id)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("relay task failed", exc_info=task.exception())


async def _maybe_await(result: Awaitable[None] | None) -> None:
    if inspect.isawaitable(result):
        await result


__all__ = ["Emit", "Event", "Relay"]
