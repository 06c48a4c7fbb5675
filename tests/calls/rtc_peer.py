"""An aiortc peer that places and answers 1:1 calls through talkbridge (tests and bench).

It signals exactly as an app would: ``call.invite`` with the offer, ``call.accept`` with the
answer, and trickles every ICE candidate as ``call.ice``. aiortc puts all candidates in
the SDP once gathering ends and never trickles by itself, so the peer takes them *out* of
the description it sends and sends them one by one: the other side only gets candidates
through talkbridge's ``call.ice``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from fractions import Fraction
from typing import Any

import av
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, VideoStreamTrack
from aiortc.rtcconfiguration import RTCBundlePolicy, RTCIceTransportPolicy
from aiortc.sdp import candidate_from_sdp

from signaling.client import Client

Event = dict[str, Any]


class SmallVideoTrack(VideoStreamTrack):
    """A 160x120 test picture at 30 fps (cheap to encode on a 2-core machine)."""

    def __init__(self) -> None:
        super().__init__()
        self._n = 0

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame(width=160, height=120, format="yuv420p")
        shade = (self._n * 4) % 256
        self._n += 1
        for i, plane in enumerate(frame.planes):
            plane.update(bytes([shade if i == 0 else 128]) * plane.buffer_size)
        frame.pts = pts
        frame.time_base = time_base if isinstance(time_base, Fraction) else Fraction(time_base)
        return frame


def split_candidates(sdp: str) -> tuple[str, list[dict[str, Any]]]:
    """The SDP without its candidate lines, and those candidates as RTCIceCandidateInit dicts."""
    kept: list[str] = []
    cands: list[dict[str, Any]] = []
    mid: str | None = None
    mline = -1
    for line in sdp.splitlines():
        if line.startswith("m="):
            mline += 1
            mid = None
        elif line.startswith("a=mid:"):
            mid = line[len("a=mid:"):]
        if line.startswith("a=candidate:"):
            cands.append({"candidate": line[2:], "sdpMid": mid, "sdpMLineIndex": mline})
            continue
        if line == "a=end-of-candidates":
            continue
        kept.append(line)
    return "\r\n".join(kept) + "\r\n", cands


def candidate_type(init: dict[str, Any]) -> str:
    bits = str(init["candidate"]).split()
    return bits[bits.index("typ") + 1]


class CallPeer:
    """One device: a talkbridge client plus an aiortc peer connection for one call at a time."""

    def __init__(self, client: Client, *, relay_only: bool = False, video: bool = True,
                 auto_answer: bool = True, use_ice_servers: bool = True) -> None:
        self.client = client
        self.use_ice_servers = use_ice_servers
        self.relay_only = relay_only
        self.video = video
        self.auto_answer = auto_answer
        self.pc: RTCPeerConnection | None = None
        self.call_id: str | None = None
        self.frames: Counter[str] = Counter()
        self.sent_candidates: list[dict[str, Any]] = []
        self.got_candidates: list[dict[str, Any]] = []
        self.events: list[Event] = []
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.ice_connected = asyncio.Event()
        self.media_flowing = asyncio.Event()
        self.t_ice_connected: float | None = None
        self.t_sent: dict[str, float] = {}  # perf_counter when a request was sent
        self.t_got: dict[str, float] = {}  # perf_counter when an event type first arrived
        self._tasks: list[asyncio.Task[None]] = []
        self._pump = asyncio.get_running_loop().create_task(self._run())

    # --- peer connection ---------------------------------------------------------------------

    def _new_pc(self) -> RTCPeerConnection:
        # The servers talkbridge handed out in auth.ok (none: host candidates only).
        servers = self.client.auth_ok.get("ice_servers", []) if self.use_ice_servers else []
        config = RTCConfiguration(
            iceServers=[RTCIceServer(urls=s["urls"], username=s.get("username"),
                                     credential=s.get("credential")) for s in servers],
            bundlePolicy=RTCBundlePolicy.MAX_BUNDLE,
        )
        if self.relay_only:
            config.iceTransportPolicy = RTCIceTransportPolicy.RELAY
        pc = RTCPeerConnection(config)

        @pc.on("iceconnectionstatechange")
        def on_ice_state() -> None:
            if pc.iceConnectionState in ("completed", "connected") and \
                    not self.ice_connected.is_set():
                self.t_ice_connected = time.perf_counter()
                self.ice_connected.set()

        @pc.on("track")
        def on_track(track: Any) -> None:
            self._tasks.append(asyncio.get_running_loop().create_task(self._consume(track)))

        pc.addTrack(AudioStreamTrack())
        if self.video:
            pc.addTrack(SmallVideoTrack())
        return pc

    async def _consume(self, track: Any) -> None:
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                await track.recv()
                self.frames[track.kind] += 1
                if self.frames["audio"] >= 10 and (not self.video or self.frames["video"] >= 10):
                    self.media_flowing.set()

    async def _local_description(self, pc: RTCPeerConnection, offer: bool
                                 ) -> tuple[dict[str, str], list[dict[str, Any]]]:
        desc = await (pc.createOffer() if offer else pc.createAnswer())
        await pc.setLocalDescription(desc)  # gathers every candidate
        sdp, cands = split_candidates(pc.localDescription.sdp)
        return {"type": pc.localDescription.type, "sdp": sdp}, cands

    async def _trickle(self, cands: list[dict[str, Any]]) -> None:
        for c in cands:
            self.sent_candidates.append(c)
            await self.client.request("call.ice", call_id=self.call_id, candidate=c)
        await self.client.request("call.ice", call_id=self.call_id, candidate=None)

    # --- placing and answering ---------------------------------------------------------------

    async def call(self, callee: str, call_id: str | None = None) -> dict[str, Any]:
        """Invite ``callee`` with an offer, then trickle our candidates; returns the reply."""
        self.call_id = call_id or uuid.uuid4().hex
        self.pc = self._new_pc()
        offer, cands = await self._local_description(self.pc, offer=True)
        self.t_sent["call.invite"] = time.perf_counter()
        reply = await self.client.request(
            "call.invite", call_id=self.call_id, to={"user": callee},
            media={"audio": True, "video": self.video}, sdp=offer)
        await self._trickle(cands)
        return reply

    async def _answer(self, invite: Event) -> None:
        self.call_id = invite["call_id"]
        self.pc = self._new_pc()
        await self.pc.setRemoteDescription(RTCSessionDescription(**invite["sdp"]))
        answer, cands = await self._local_description(self.pc, offer=False)
        self.t_sent["call.accept"] = time.perf_counter()
        await self.client.request("call.accept", call_id=self.call_id, sdp=answer)
        await self._trickle(cands)

    async def hangup(self) -> dict[str, Any]:
        return await self.client.request("call.hangup", call_id=self.call_id)

    # --- events, applied strictly in order ---------------------------------------------------

    async def _run(self) -> None:
        async for ev in self.client.events():
            self.events.append(ev)
            kind = str(ev.get("type"))
            self.t_got.setdefault(kind, time.perf_counter())
            try:
                if kind == "call.invite" and self.auto_answer:
                    await self._answer(ev)
                elif kind == "call.accepted" and ev["call_id"] == self.call_id:
                    assert self.pc is not None
                    await self.pc.setRemoteDescription(RTCSessionDescription(**ev["sdp"]))
                elif kind == "call.ice" and ev["call_id"] == self.call_id:
                    await self._add_candidate(ev["candidate"])
                elif kind == "call.ended" and ev["call_id"] == self.call_id:
                    if not self.ended.done():
                        self.ended.set_result(ev["reason"])
            except Exception as exc:  # a test should see it, not a silent dead pump
                if not self.ended.done():
                    self.ended.set_exception(exc)

    async def _add_candidate(self, init: dict[str, Any] | None) -> None:
        assert self.pc is not None
        if init is None:
            await self.pc.addIceCandidate(None)
            return
        self.got_candidates.append(init)
        line = str(init["candidate"])
        cand = candidate_from_sdp(line.split(":", 1)[1])
        cand.sdpMid = init.get("sdpMid")
        cand.sdpMLineIndex = init.get("sdpMLineIndex")
        await self.pc.addIceCandidate(cand)

    async def close(self) -> None:
        """Stop the event pump, the receivers and the peer connection."""
        self._pump.cancel()
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.pc is not None:
            await self.pc.close()
