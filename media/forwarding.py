"""Forwarding one publisher's encoded frames to many subscribers, with keyframe discipline.

A :class:`PublishedTrack` receives complete frames from the publisher's leg and offers each
to every :class:`ForwardTrack` (one per subscriber leg). A forward track is what aiortc's
sender reads from: it returns ``av.Packet`` objects, which the sender packetizes without
encoding. Queues are bounded; a subscriber that falls behind is flushed and resumes at the
next keyframe, so it never holds back the publisher or the other subscribers.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from media.aiortc_adapter import h264_payloads, vp8_payloads
from media.frames import EncodedFrame

# av.Packet is generic over its stream in av's stubs; ours belong to no stream.
if TYPE_CHECKING:
    AnyPacket = av.Packet[Any]
else:
    AnyPacket = av.Packet

logger = logging.getLogger(__name__)

CLOCK_RATES = {"audio": 48000, "video": 90000}


class KeyframeRequester:
    """Coalesces keyframe requests to the publisher: at most one per ``min_interval`` seconds.

    A request inside the interval is delayed to its end, never dropped; any number of
    requests in the meantime make one upstream PLI.
    """

    def __init__(self, send: Callable[[], bool], min_interval: float = 0.5) -> None:
        self._send = send
        self._min_interval = min_interval
        self._last = -1e9
        self._timer: asyncio.TimerHandle | None = None
        self._pending_until_possible = False
        self.requested = 0
        self.sent = 0

    def request(self) -> None:
        """Ask for a keyframe as soon as the rate limit allows."""
        self.requested += 1
        if self._timer is not None:
            return
        loop = asyncio.get_running_loop()
        wait = self._last + self._min_interval - loop.time()
        if wait <= 0:
            self._fire()
        else:
            self._timer = loop.call_later(wait, self._fire)

    def retry_pending(self) -> None:
        """Send a request that had to wait for the publisher's SSRC to be known."""
        if self._pending_until_possible:
            self._pending_until_possible = False
            self.request()

    def _fire(self) -> None:
        self._timer = None
        if self._send():
            self._last = asyncio.get_running_loop().time()
            self.sent += 1
        else:
            self._pending_until_possible = True

    def close(self) -> None:
        """Cancel a delayed request."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def publisher_bitrate(
    cap: int, floor: int, uplink_estimate: int | None, subscriber_estimates: list[int]
) -> int:
    """The bitrate to ask a publisher for (REMB): the least any subscriber can take, but not
    below ``floor`` (one bad link must not starve the room; it goes audio-only instead), no
    more than the relay's own estimate of the publisher's uplink, and never above ``cap``."""
    target = cap
    if subscriber_estimates:
        target = min(target, max(floor, min(subscriber_estimates)))
    if uplink_estimate is not None:
        target = min(target, uplink_estimate)
    return target


class OutgoingFrame:
    """One publisher frame as every subscriber leg sends it, built once and shared.

    aiortc's own sender loop takes :meth:`packet` (an ``av.Packet`` it packetizes per leg);
    the relay's lean loop (:func:`media.aiortc_adapter.install_lean_sender`) takes the RTP
    :meth:`payloads`, packetized once for all legs.
    """

    __slots__ = ("_packet", "_payloads", "codec", "frame", "kind", "picture_id")

    def __init__(
        self, frame: EncodedFrame, kind: str, picture_id: int, codec: str = "VP8"
    ) -> None:
        self.frame = frame
        self.kind = kind
        self.picture_id = picture_id
        self.codec = codec
        self._packet: AnyPacket | None = None
        self._payloads: list[bytes] | None = None

    @property
    def timestamp(self) -> int:
        """Unwrapped publisher RTP timestamp (90 kHz video, 48 kHz audio)."""
        return self.frame.timestamp

    def packet(self) -> AnyPacket:
        """The frame as an ``av.Packet`` for aiortc's ``Encoder.pack``."""
        if self._packet is None:
            packet = av.Packet(self.frame.data)
            packet.pts = self.frame.timestamp
            packet.time_base = _TIME_BASES[self.kind]
            self._packet = packet
        return self._packet

    def payloads(self) -> list[bytes]:
        """RTP payloads of the frame (VP8 descriptors with this frame's picture id)."""
        if self._payloads is None:
            if self.kind == "video" and self.codec == "H264":
                self._payloads = h264_payloads(self.frame.data)
            elif self.kind == "video":
                self._payloads = vp8_payloads(self.frame.data, self.picture_id)
            else:
                self._payloads = [self.frame.data]
        return self._payloads


_TIME_BASES = {kind: fractions.Fraction(1, rate) for kind, rate in CLOCK_RATES.items()}


class ForwardTrack(MediaStreamTrack):
    """What one subscriber leg's sender reads: encoded frames, never decoded.

    Frames are accepted only once the sender runs (its first read), which is also when a
    keyframe is requested: the subscriber's first frame is always a keyframe.
    """

    def __init__(
        self,
        kind: str,
        request_keyframe: Callable[[], None],
        max_frames: int | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        self._request_keyframe = request_keyframe
        self._queue: deque[tuple[OutgoingFrame, float]] = deque()
        self._max = max_frames or (30 if kind == "video" else 50)
        self._wakeup: asyncio.Future[None] | None = None
        self._waiting_keyframe = kind == "video"
        self._started = False
        self.paused = False
        # Set when forwarding resumes after a pause: the send loop then skips ahead in
        # sequence numbers so receivers drop what they still wait for from before the pause.
        self.discontinuity = False
        self.frames_in = 0
        self.frames_out = 0
        self.overflows = 0
        self.first_sent_at: float | None = None
        # Seconds from a frame completing at the relay to its sender taking it (recent ones).
        self.delays: deque[float] = deque(maxlen=512)

    @property
    def started(self) -> bool:
        """True once aiortc's sender is reading this track (transport up)."""
        return self._started

    def offer(self, out: OutgoingFrame) -> None:
        """Queue a frame unless this leg waits for a keyframe (or is paused, or not running)."""
        frame = out.frame
        if not self._started or self.paused or self.readyState != "live":
            return
        if self._waiting_keyframe:
            if not frame.keyframe:
                return
            self._waiting_keyframe = False
        if len(self._queue) >= self._max:
            # Behind by a whole queue: what is queued is stale. Start over at a keyframe.
            self._queue.clear()
            self.overflows += 1
            if self.kind == "video" and not frame.keyframe:
                self._waiting_keyframe = True
                self._request_keyframe()
                return
        self._queue.append((out, frame.arrival))
        self.frames_in += 1
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def resume(self) -> None:
        """Start forwarding again after :attr:`paused` (waits for a fresh keyframe)."""
        if self.paused:
            self.paused = False
            self.discontinuity = True
            if self.kind == "video":
                self._waiting_keyframe = True
                self._request_keyframe()

    async def next_frame(self) -> OutgoingFrame:
        """The next frame to send; raises ``MediaStreamError`` once the track is stopped."""
        if not self._started:
            self._started = True
            if self.kind == "video":
                self._request_keyframe()
        while not self._queue:
            if self.readyState != "live":
                raise MediaStreamError
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup
        now = time.monotonic()
        if self.first_sent_at is None:
            self.first_sent_at = now
        self.frames_out += 1
        out, arrival = self._queue.popleft()
        self.delays.append(now - arrival)
        return out

    async def recv(self) -> AnyPacket:
        """Next frame as ``av.Packet`` for aiortc's sender (``Encoder.pack``, no encoding)."""
        return (await self.next_frame()).packet()

    def stop(self) -> None:
        """End the track: aiortc's sender loop exits on the next ``recv``."""
        super().stop()
        self._queue.clear()
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)


class PublishedTrack:
    """One publisher track in a room and the subscriber legs it is forwarded to."""

    def __init__(
        self,
        track_id: str,
        kind: str,
        publisher: str,
        user: str,
        mime_type: str,
        requester: KeyframeRequester,
    ) -> None:
        self.track_id = track_id
        self.kind = kind
        self.publisher = publisher
        self.user = user
        self.mime_type = mime_type
        self.requester = requester
        self.subscribers: dict[str, ForwardTrack] = {}
        self._picture_id = random.randrange(1 << 15)
        self._codec = mime_type.split("/")[1].upper()
        self.frames = 0
        self.keyframes = 0
        self.audio_level: float = 127.0  # smoothed -dBov; 127 is silence
        # Bandwidth: subscribers' REMB (bps) by subscriber, the relay's uplink estimate, and
        # how to send the publisher a REMB (set by the relay once the receiver exists).
        self.subscriber_estimates: dict[str, int] = {}
        self.uplink_estimate: int | None = None
        self.target_bitrate: int | None = None
        self.send_remb: Callable[[int], None] | None = None

    def forward(self, frame: EncodedFrame) -> None:
        """Hand one complete frame to every subscriber leg (built once, shared)."""
        self.frames += 1
        if frame.keyframe and self.kind == "video":
            self.keyframes += 1
        if frame.audio_level is not None:
            self.audio_level = 0.7 * self.audio_level + 0.3 * frame.audio_level
        out = OutgoingFrame(frame, self.kind, self._picture_id, self._codec)
        self._picture_id = (self._picture_id + 1) & 0x7FFF
        for sub in self.subscribers.values():
            sub.offer(out)

    def subscribe(self, subscriber: str, max_frames: int | None = None) -> ForwardTrack:
        """A new forward track for ``subscriber`` (replacing any earlier one)."""
        old = self.subscribers.pop(subscriber, None)
        if old is not None:
            old.stop()
        track = ForwardTrack(self.kind, self.requester.request, max_frames)
        self.subscribers[subscriber] = track
        return track

    def unsubscribe(self, subscriber: str) -> None:
        """Stop forwarding to ``subscriber``."""
        track = self.subscribers.pop(subscriber, None)
        self.subscriber_estimates.pop(subscriber, None)
        if track is not None:
            track.stop()

    def close(self) -> None:
        """Stop every subscriber leg and pending keyframe requests."""
        for track in self.subscribers.values():
            track.stop()
        self.subscribers.clear()
        self.requester.close()
