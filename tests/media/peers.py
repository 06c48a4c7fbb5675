"""Real aiortc participants for relay tests: they publish generated media and count what they get.

A :class:`Peer` plays a device: it receives the relay's events through ``emit`` (applied
strictly in order, like a real client), answers offers, publishes a moving 320x240 picture
and a tone, and decodes everything it receives.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections import defaultdict
from typing import Any

import av
from aiortc import (
    MediaStreamTrack,
    RTCBundlePolicy,
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError

from loadtest.media_peer import offered_direction
from loadtest.stamp import Tone
from media.host_addresses import restrict_host_addresses
from media.service import RelayService

WIDTH, HEIGHT, FPS = 320, 240, 30


class MovingPicture(MediaStreamTrack):
    """A 320x240 picture with a moving bar, so every frame differs (real VP8 delta frames)."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self._n = 0
        self._start: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        self._n += 1
        wait = self._start + self._n / FPS - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        frame = av.VideoFrame(WIDTH, HEIGHT, "yuv420p")
        x = (self._n * 4) % WIDTH
        row = bytes(min(255, 16 + abs(i - x) // 2) for i in range(WIDTH))
        frame.planes[0].update(row * HEIGHT)
        frame.planes[1].update(bytes([128]) * (WIDTH * HEIGHT // 4))
        frame.planes[2].update(bytes([(self._n * 3) % 256]) * (WIDTH * HEIGHT // 4))
        frame.pts = self._n * 3000
        frame.time_base = fractions.Fraction(1, 90000)
        return frame


class Peer:
    """One device in a relay room, driven by the relay's events as a real client would be."""

    def __init__(
        self,
        relay: RelayService,
        room: str,
        name: str,
        *,
        publish: bool = True,
        answer: bool = True,
        loudness: int = 8000,
    ) -> None:
        self.relay = relay
        self.room = room
        self.name = name
        self.publish = publish
        self.answer = answer
        restrict_host_addresses(["127.0.0.1"])
        self.pc = RTCPeerConnection(
            RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
        )
        self.events: list[dict[str, Any]] = []
        self.tracks_by_mid: dict[str, dict[str, Any]] = {}
        # (user, kind) -> frames decoded; (user) -> last decoded (width, height)
        self.frames: dict[tuple[str, str], int] = defaultdict(int)
        self.first_frame_at: dict[tuple[str, str], float] = {}
        self.sizes: dict[str, tuple[int, int]] = {}
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._video = MovingPicture() if publish else None
        self._audio = Tone(loudness) if publish else None
        self.connected_at: float | None = None
        self.pc.on("track", self._on_track)

        @self.pc.on("connectionstatechange")
        def _state() -> None:
            if self.pc.connectionState == "connected" and self.connected_at is None:
                self.connected_at = time.monotonic()

    async def join(self) -> dict[str, Any]:
        self._tasks.append(asyncio.ensure_future(self._run_inbox()))
        return await self.relay.join(
            self.room,
            self.name,
            user=self.name,
            device=f"{self.name}-dev",
            publish_audio=self.publish,
            publish_video=self.publish,
            emit=self._inbox.put_nowait,
        )

    async def leave(self) -> None:
        await self.relay.leave(self.room, self.name)
        await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pc.close()

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    async def _run_inbox(self) -> None:
        while True:
            event = await self._inbox.get()
            self.events.append(event)
            if event["type"] == "room.tracks":
                for t in event["tracks"]:
                    self.tracks_by_mid[t["mid"]] = t
            elif event["type"] == "room.sdp" and self.answer:
                await self._answer(event["sdp"])

    async def _answer(self, sdp: dict[str, Any]) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp["sdp"], type=sdp["type"]))
        for t in self.pc.getTransceivers():
            # The relay's recvonly sections are where this device publishes.
            if t.direction == "recvonly" and t.sender.track is None and t.currentDirection is None:
                mine = self._video if t.kind == "video" else self._audio
                offered = self.pc.remoteDescription.sdp
                if mine is not None and offered_direction(offered, t.mid) == "recvonly":
                    t.direction = "sendonly"
                    t.sender.replaceTrack(mine)
                    if t.kind == "video":
                        self._video = None
                    else:
                        self._audio = None
        answer = await self.pc.createAnswer()
        await self.pc.setLocalDescription(answer)
        await self.relay.on_sdp(
            self.room, self.name, {"type": "answer", "sdp": self.pc.localDescription.sdp}
        )

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._tasks.append(asyncio.ensure_future(self._consume(track)))

    async def _consume(self, track: MediaStreamTrack) -> None:
        mid = next(t.mid for t in self.pc.getTransceivers() if t.receiver.track is track)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            info = self.tracks_by_mid.get(mid or "")
            user = info["user"] if info else "?"
            key = (user, track.kind)
            self.frames[key] += 1
            self.first_frame_at.setdefault(key, time.monotonic())
            if isinstance(frame, av.VideoFrame):
                self.sizes[user] = (frame.width, frame.height)


async def wait_for(predicate: Any, within: float, step: float = 0.05) -> bool:
    """Poll ``predicate()`` until true or ``within`` seconds pass; returns the last value."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step)
    return bool(predicate())
