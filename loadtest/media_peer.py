"""An aiortc participant in a relay room, driven over talkbridge's WebSocket protocol.

Kept out of loadtest/scenarios/media.py so that listing or running other scenarios never
imports aiortc.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from aiortc.sdp import candidate_from_sdp

from loadtest import stamp
from loadtest.recorder import Stats
from loadtest.wire import Frame, SioConn, WsConn


def offered_direction(sdp: str, mid: str | None) -> str | None:
    """The direction attribute of the m-section ``mid`` in an SDP text."""
    current: str | None = None
    direction: str | None = None
    for line in sdp.splitlines():
        if line.startswith("m="):
            if current == mid and direction:
                return direction
            current, direction = None, None
        elif line.startswith("a=mid:"):
            current = line[6:]
        elif line.startswith("a=") and line[2:] in ("sendrecv", "sendonly", "recvonly", "inactive"):
            direction = line[2:]
    return direction if current == mid else None


class Participant:
    """One device in a room: its socket, its peer connection, what it received."""

    def __init__(self, rec: Stats, index: int, conn: WsConn | SioConn, publish: bool,
                 fps: float) -> None:
        self.rec = rec
        self.index = index
        self.conn = conn
        self.room = ""
        self.pc = RTCPeerConnection(
            RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
        )
        self.video = stamp.StampedVideo(fps) if publish else None
        self.audio = stamp.Tone() if publish else None
        self._unattached: list[MediaStreamTrack] = [t for t in (self.audio, self.video) if t]
        self.tracks_by_mid: dict[str, dict[str, Any]] = {}
        self.last_counter: dict[str, int] = {}  # mid -> last frame number seen
        self.inbox: asyncio.Queue[Frame] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []
        self.n = 0
        # Wall-clock ms of the run's start: frames sent before it (while calls were being
        # set up) are neither timed nor owed.
        self.count_from_ms: int | None = None
        conn.handler = self.on_frame
        self.pc.on("track", self._on_track)

    def on_frame(self, frame: Frame) -> None:
        """Events are applied strictly in order by one task, as a real client must."""
        kind = frame.get("type")
        if kind == "reply":
            if not frame.get("ok"):
                code = (frame.get("error") or {}).get("code", "unknown")
                self.rec.error(f"{str(frame.get('id', '')).split('|')[0]}:{code}")
            return
        self.inbox.put_nowait(frame)

    async def run_inbox(self) -> None:
        """Apply room events: track map, offers, candidates."""
        while True:
            event = await self.inbox.get()
            kind = event.get("type")
            try:
                if kind == "room.tracks":
                    for t in event.get("tracks", []):
                        self.tracks_by_mid[str(t.get("mid"))] = t
                elif kind == "room.sdp":
                    # The relay may offer before the join reply has told us the room id.
                    self.room = str(event.get("room") or self.room)
                    await self._answer(event["sdp"])
                elif kind == "room.ice":
                    await self._add_candidate(event.get("candidate"))
                else:
                    self.rec.counts[f"event:{kind}"] += 1
            except Exception as exc:  # a client that cannot apply an event counts it
                self.rec.error(f"apply:{kind}:{type(exc).__name__}")

    async def _answer(self, sdp: dict[str, Any]) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp["sdp"], type=sdp["type"]))
        offered = self.pc.remoteDescription.sdp
        for t in self.pc.getTransceivers():
            # The relay's recvonly sections are where this device publishes.
            if (t.sender.track is None and t.currentDirection is None
                    and offered_direction(offered, t.mid) == "recvonly"):
                mine = next((m for m in self._unattached if m.kind == t.kind), None)
                if mine is not None:
                    self._unattached.remove(mine)
                    t.direction = "sendonly"
                    t.sender.replaceTrack(mine)
        answer = await self.pc.createAnswer()
        await self.pc.setLocalDescription(answer)
        self.n += 1
        await self.conn.send({
            "type": "room.sdp", "id": f"room.sdp|{self.n}", "room": self.room,
            "sdp": {"type": "answer", "sdp": self.pc.localDescription.sdp},
        })
        self.rec.counts["answers"] += 1

    async def _add_candidate(self, cand: Any) -> None:
        if not cand or not cand.get("candidate"):
            await self.pc.addIceCandidate(None)
            return
        text = str(cand["candidate"])
        c = candidate_from_sdp(text.split(":", 1)[1] if text.startswith("candidate:") else text)
        c.sdpMid = cand.get("sdpMid")
        c.sdpMLineIndex = cand.get("sdpMLineIndex")
        await self.pc.addIceCandidate(c)

    def _on_track(self, track: MediaStreamTrack) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(self._consume(track)))

    async def _consume(self, track: MediaStreamTrack) -> None:
        rec = self.rec
        mid = next((t.mid for t in self.pc.getTransceivers() if t.receiver.track is track), "")
        key = str(mid)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if not isinstance(frame, av.VideoFrame):
                rec.counts["audio_frames_received"] += 1
                continue
            rec.counts["video_frames_received"] += 1
            got = stamp.read(frame)
            if got is None:
                rec.counts["video_frames_unreadable"] += 1
                continue
            sent_ms, counter = got
            last = self.last_counter.get(key)
            if self.count_from_ms is not None and sent_ms >= self.count_from_ms:
                # Sent during the run: timed, and owed to this member.
                rec.counts["video_frames_received_in_run"] += 1
                rec.latency("frame_delay", stamp.delay_ms(sent_ms) * 1000)
            if last is None:
                rec.counts["video_streams_receiving"] += 1
            elif counter > last + 1:
                rec.counts["video_frames_missing"] += counter - last - 1
            elif counter <= last:
                rec.counts["video_frames_reordered"] += 1
            self.last_counter[key] = max(counter, last if last is not None else counter)

    async def close(self) -> None:
        """Stop media and the event task."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.pc.close()
