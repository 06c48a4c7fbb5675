"""Recording a publisher's forwarded media to a file, without decoding it.

Each recorded participant gets one WebM file (Matroska): ``<directory>/<room>-<participant>-
<unix seconds>.webm`` with a VP8 video stream and an Opus audio stream (H264 rooms: ``.mkv``,
Matroska with H264 + Opus; the picture size comes from the SPS), holding exactly the
encoded frames the relay forwards. A recording is one more leg of the forwarding fan-out
(same keyframe discipline: it starts on a keyframe). Timestamps are the frames' arrival at
the relay, so audio and video stay in sync without RTCP clock mapping.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import re
import time
from pathlib import Path
from typing import Any

import av
from aiortc.mediastreams import MediaStreamError

from media.forwarding import ForwardTrack, OutgoingFrame, PublishedTrack
from media.frames import vp8_keyframe_size

logger = logging.getLogger(__name__)

_TIME_BASES = {"video": fractions.Fraction(1, 90000), "audio": fractions.Fraction(1, 48000)}
_RATES = {"video": 90000, "audio": 48000}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64] or "_"


class ParticipantRecording:
    """One publisher's tracks muxed into one WebM file as they are forwarded."""

    def __init__(
        self,
        directory: Path,
        room_id: str,
        participant_id: str,
        tracks: list[PublishedTrack],
        video_codec: str = "VP8",
    ) -> None:
        # WebM holds VP8 + Opus; H264 rooms record to Matroska, WebM's parent format.
        self._format, ext = ("webm", "webm") if video_codec == "VP8" else ("matroska", "mkv")
        self._video_codec = video_codec
        name = f"{_safe(room_id)}-{_safe(participant_id)}-{int(time.time())}.{ext}"
        self.path = directory / name
        self._tracks = {t.kind: t for t in tracks}
        self._key = f"recording:{participant_id}"
        self._legs: dict[str, ForwardTrack] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._container: Any = None
        self._streams: dict[str, Any] = {}
        self._last_pts: dict[str, int] = {}
        self._t0: float | None = None
        self.frames: dict[str, int] = {"audio": 0, "video": 0}

    def start(self) -> None:
        """Subscribe to the publisher's tracks and start writing."""
        for kind, track in self._tracks.items():
            leg = track.subscribe(self._key, max_frames=300)
            self._legs[kind] = leg
            self._tasks.append(asyncio.ensure_future(self._pump(kind, leg)))

    async def stop(self) -> None:
        """Stop subscribing and close the file."""
        for track in self._tracks.values():
            track.unsubscribe(self._key)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._container is not None:
            self._container.close()
            self._container = None

    async def _pump(self, kind: str, leg: ForwardTrack) -> None:
        try:
            while True:
                out = await leg.next_frame()
                self._write(kind, out)
        except MediaStreamError:
            return
        except Exception:
            logger.exception("recording %s failed", self.path)

    def _open(self, first: OutgoingFrame) -> bool:
        """Open the file once the streams' parameters are known (video: its first keyframe)."""
        size = None
        if "video" in self._tracks:
            if first.kind != "video":
                return False  # wait for the video keyframe that gives the picture size
            if not first.frame.keyframe:
                return False
            size = vp8_keyframe_size(first.frame.data) if self._video_codec == "VP8" else None
            if self._video_codec == "VP8" and size is None:
                return False
        container = av.open(str(self.path), mode="w", format=self._format)
        if "video" in self._tracks:
            video = container.add_stream("libvpx" if self._video_codec == "VP8" else "h264",
                                         rate=30)
            if size is not None:
                video.width, video.height = size
            video.time_base = _TIME_BASES["video"]
            self._streams["video"] = video
        if "audio" in self._tracks:
            audio = container.add_stream("libopus", rate=48000)
            self._streams["audio"] = audio
        self._container = container
        self._t0 = first.frame.arrival
        return True

    def _write(self, kind: str, out: OutgoingFrame) -> None:
        if self._container is None and not self._open(out):
            return
        assert self._t0 is not None
        pts = max(0, round((out.frame.arrival - self._t0) * _RATES[kind]))
        last = self._last_pts.get(kind)
        if last is not None and pts <= last:
            pts = last + 1  # the muxer needs strictly increasing timestamps per stream
        self._last_pts[kind] = pts
        packet = av.Packet(out.frame.data)
        packet.pts = packet.dts = pts
        packet.time_base = _TIME_BASES[kind]
        packet.stream = self._streams[kind]
        if kind == "video" and out.frame.keyframe:
            packet.is_keyframe = True
        self._container.mux(packet)
        self.frames[kind] += 1
