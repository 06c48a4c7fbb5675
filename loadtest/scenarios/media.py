"""``media``: aiortc participants publishing stamped audio+video into group calls.

Each unit is a group of ``--media-size`` members; the first creates the group, every member
joins its room (``room.join``) and answers the relay's offers as PROTOCOL.md says (the
relay's ``recvonly`` sections are where a device publishes). Every video frame carries its
send time and number (loadtest/stamp.py), so subscribers measure end-to-end frame delay and
count missing frames per received stream. Checks: every publisher's video reached every
other member.

Run it inside a loopback-only network namespace (scripts/netns-run) or with the relay's
candidates on 127.0.0.1 (``TALKBRIDGE_RELAY_ADDRESSES=127.0.0.1``): participants gather host
candidates on 127.0.0.1 only and never use a STUN server.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from loadtest.scenarios.base import Context, Scenario, register, request
from loadtest.wire import ConnectError


@register
class MediaCalls(Scenario):
    """Group calls through the relay with synthetic, stamped media."""

    name = "media"
    help = "aiortc participants publishing stamped audio+video into group calls (relay)"
    headline = ("video_frames_received", "frame_delay")

    def __init__(self, ctx: Context, units: list[int], first_client: int, total_units: int) -> None:
        super().__init__(ctx, units, first_client, total_units)
        self.size = int(self.opts.media_size)
        self.publishers = min(self.size, int(self.opts.media_publishers) or self.size)
        self.fps = float(self.opts.media_fps)
        self.rooms: list[list[Any]] = []
        self.calls = 0  # calls whose group this worker created
        self.peer_cls: Any = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Room size, publishers, frame rate."""
        parser.add_argument("--media-size", type=int, default=3, help="media: members per call")
        parser.add_argument("--media-publishers", type=int, default=0,
                            help="media: members that publish (default all)")
        parser.add_argument("--media-fps", type=float, default=15.0,
                            help="media: video frames per second per publisher")

    @classmethod
    def per_unit(cls, opts: argparse.Namespace) -> int:
        """A unit is one call's members."""
        return int(opts.media_size)

    @classmethod
    def checks(cls, counts: dict[str, int], errors: dict[str, int]) -> dict[str, Any]:
        """Every publisher's video reached every other member; how much went missing."""
        expected = counts.get("expected_video_streams", 0)
        receiving = counts.get("video_streams_receiving", 0)
        got = counts.get("video_frames_received", 0)
        in_run = counts.get("video_frames_received_in_run", 0)
        missing = counts.get("video_frames_missing", 0)
        # Frames the publishers produced times the members who should see each of them.
        owed = counts.get("video_frames_owed", 0)
        return {
            "expected_video_streams": expected,
            "video_streams_receiving": receiving,
            "video_frames_received": got,
            "video_frames_missing": missing,
            "video_loss": round(missing / (got + missing), 4) if got + missing else None,
            # Below 1 when streams fall behind (frames still queued or dropped at the end).
            "video_delivery_ratio": round(in_run / owed, 4) if owed else None,
            "ok": expected > 0 and receiving >= expected and not errors,
        }

    async def setup(self) -> None:
        """Connect the members, create each call's group, join the rooms."""
        # aiortc only when media runs. Loopback host candidates only: aioice skips loopback
        # unless told otherwise, and no STUN server is ever configured.
        from loadtest.media_peer import Participant
        from media.host_addresses import restrict_host_addresses

        restrict_host_addresses(["127.0.0.1"])
        await asyncio.gather(*(self._setup_call(unit, Participant) for unit in self.units))

    def owner(self, unit: int, member: int) -> int:
        """The worker holding ``member`` of call ``unit``: members are spread, since decoding
        every stream is the subscribers' heavy part; the creator sits on the home worker."""
        return (unit + member) % self.ctx.workers

    async def _setup_call(self, unit: int, participant_cls: Any) -> None:
        me = self.ctx.worker
        mine = [i for i in range(self.size) if self.owner(unit, i) == me]
        members: list[Any] = []
        try:
            for i in mine:
                conn = await self.connect(self.client_index(unit, i))
                p = participant_cls(self.rec, i, conn, i < self.publishers, self.fps)
                conn.start()
                p.tasks.append(asyncio.get_running_loop().create_task(p.run_inbox()))
                members.append(p)
        except ConnectError:
            for p in members:
                await p.close()
            return
        if not members:
            return
        home = self.owner(unit, 0) == me
        group = await (self._create_group(unit, members[0]) if home
                       else self._find_group(members[0]))
        if group is None:
            return
        for p in members:
            publish = p.video is not None
            joined = await request(p.conn, {
                "type": "room.join", "id": f"room.join|{unit}.{p.index}", "group": group,
                "media": {"audio": publish, "video": publish},
            })
            if not joined.get("ok"):
                self.rec.error(f"room.join:{(joined.get('error') or {}).get('code')}")
                continue
            p.room = str((joined.get("data") or {}).get("room", ""))
        if home:
            self.calls += 1
            self.rec.counts["expected_video_streams"] += self.publishers * (self.size - 1)
        self.rooms.append(members)

    async def _create_group(self, unit: int, creator: Any) -> str | None:
        names = [self.ctx.users.name(self.client_index(unit, i)) for i in range(1, self.size)]
        reply = await request(creator.conn, {
            "type": "group.create", "id": f"group.create|{unit}",
            "name": f"media {self.ctx.users.run}.{unit}", "members": names,
            "join_policy": "invite_only",
        })
        if not reply.get("ok"):
            self.rec.error(f"group.create:{(reply.get('error') or {}).get('code')}")
            return None
        return str((reply.get("data") or {}).get("group"))

    async def _find_group(self, member: Any) -> str | None:
        """Members on other workers wait for the home worker to create the call's group
        (each simulated user belongs to exactly one group)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30.0
        n = 0
        while loop.time() < deadline:
            n += 1
            reply = await request(member.conn, {"type": "group.list", "id": f"group.list|{n}"})
            groups = (reply.get("data") or {}).get("groups") or []
            if groups:
                return str(groups[0]["group"])
            await asyncio.sleep(0.2)
        self.rec.error("group.list:never_created")
        return None

    @classmethod
    def units_for(cls, worker: int, workers: int, total_units: int) -> list[int]:
        """Every worker holds a share of every call's members."""
        return list(range(total_units))

    async def run(self, stop_at: float) -> None:
        """Media flows by itself; at the end publishers stop, so what they sent is final.

        Only frames sent during the run count: receivers time and count frames stamped at or
        after the run's start (wall clock, common to all workers); publishers owe the frames
        they produce from then on to every other member.
        """
        loop = asyncio.get_running_loop()
        start_ms = int(time.time() * 1000)
        base: dict[int, int] = {}
        for members in self.rooms:
            for p in members:
                p.count_from_ms = start_ms
                if p.video is not None:
                    base[id(p)] = p.video.sent
        await asyncio.sleep(max(0.0, stop_at - loop.time()))
        for members in self.rooms:
            for p in members:
                if p.video is not None:
                    p.video.pause()
                    sent = p.video.sent - base.get(id(p), 0)
                    self.rec.counts["video_frames_sent"] += sent
                    self.rec.counts["video_frames_owed"] += sent * (self.size - 1)

    async def drain(self, deadline: float) -> None:
        """Let the frames still on their way arrive, then leave the rooms and close."""
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, min(1.5, deadline - loop.time())))
        t = time.monotonic()
        for members in self.rooms:
            for p in members:
                if p.room:
                    await p.conn.send({"type": "room.leave", "id": f"room.leave|{p.index}",
                                       "room": p.room})
                await p.close()
        self.rec.latency("leave", (time.monotonic() - t) * 1e6)

    def finish(self) -> dict[str, Any]:
        """Calls and their size."""
        return {"calls": self.calls, "members_per_call": self.size,
                "publishers_per_call": self.publishers}
