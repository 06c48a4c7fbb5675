"""``calls``: call-signaling storms between caller/callee pairs.

Each pair places calls back to back: ``call.invite`` -> callee ``call.ringing`` and
``call.accept`` -> both sides trickle ``--ice`` candidates and end-of-candidates ->
caller ``call.hangup`` -> ``call.ended`` on the callee. Measures invite->ringing,
invite->accepted (call setup), ICE forwarding and hangup->ended, and checks every
candidate crossed and every call ended.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from loadtest.scenarios.base import Context, Scenario, fire, register
from loadtest.wire import ConnectError, Frame, SioConn, WsConn

OFFER = (
    "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendrecv\r\n"
    "a=rtpmap:111 opus/48000/2\r\n"
)
ANSWER = OFFER.replace("o=- 1 2", "o=- 3 4")


def _candidate(j: int) -> dict[str, Any]:
    return {
        "candidate": f"candidate:{j} 1 udp 2122260223 127.0.0.1 {40000 + j} typ host",
        "sdpMid": "0",
        "sdpMLineIndex": 0,
    }


class CallRun:
    """One call in progress, seen from both ends (both live in this worker)."""

    __slots__ = (
        "accepted", "call_id", "callee_ended", "done", "hangup_at", "hangup_ok", "ice_from_callee",
        "ice_from_caller", "ice_sent_at", "t0",
    )

    def __init__(self, call_id: str, done: asyncio.Future[None]) -> None:
        self.call_id = call_id
        self.t0 = time.monotonic_ns()
        self.done = done
        self.accepted = False
        self.ice_from_caller = 0  # received by the callee
        self.ice_from_callee = 0  # received by the caller
        self.ice_sent_at: dict[str, int] = {}  # "caller"/"callee" -> send time of the batch
        self.hangup_at = 0
        self.hangup_ok = False
        self.callee_ended = False

    def check_done(self) -> None:
        """A call is over when the hangup was acknowledged and the callee saw call.ended."""
        if self.hangup_ok and self.callee_ended and not self.done.done():
            self.done.set_result(None)


@register
class Calls(Scenario):
    """Back-to-back 1:1 calls per caller/callee pair."""

    name = "calls"
    help = "call signaling storms: invite, ringing, accept, ICE, hangup"
    clients_per_unit = 2
    headline = ("calls_completed", "call_setup")

    def __init__(self, ctx: Context, units: list[int], first_client: int, total_units: int) -> None:
        super().__init__(ctx, units, first_client, total_units)
        self.pairs: list[tuple[int, WsConn | SioConn, WsConn | SioConn]] = []
        self.calls: dict[str, CallRun] = {}
        self.ice = int(self.opts.ice)
        self.timeout = float(self.opts.msg_timeout)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Candidates per side."""
        parser.add_argument("--ice", type=int, default=4, help="calls: ICE candidates per side")

    @classmethod
    def checks(cls, counts: dict[str, int], errors: dict[str, int]) -> dict[str, Any]:
        """Every call started also completed; every candidate crossed."""
        started, done = counts.get("calls_started", 0), counts.get("calls_completed", 0)
        sent, got = counts.get("ice_sent", 0), counts.get("ice_received", 0)
        return {
            "calls_started": started,
            "calls_completed": done,
            "ice_sent": sent,
            "ice_received": got,
            "ok": started > 0 and started == done and sent == got and not errors,
        }

    async def setup(self) -> None:
        """Connect both sides of every pair."""
        sem = asyncio.Semaphore(int(self.opts.connect_concurrency))

        async def make(unit: int) -> None:
            async with sem:
                try:
                    caller = await self.connect(self.client_index(unit, 0))
                    callee = await self.connect(self.client_index(unit, 1))
                except ConnectError:
                    return
            caller.handler = lambda f: self.on_caller(caller, f)
            callee.handler = lambda f: self.on_callee(callee, f)
            caller.start()
            callee.start()
            self.pairs.append((unit, caller, callee))

        await asyncio.gather(*(make(u) for u in self.units))

    def _reply(self, frame: Frame) -> tuple[str, CallRun | None]:
        """A reply's request kind and call, from an id of the form ``kind|call_id``."""
        kind, _, call_id = str(frame.get("id", "")).partition("|")
        run = self.calls.get(call_id)
        if not frame.get("ok"):
            code = (frame.get("error") or {}).get("code", "unknown")
            self.rec.error(f"{kind}:{code}")
            if run is not None and not run.done.done():
                run.done.set_exception(RuntimeError(f"{kind} failed: {code}"))
        return kind, run

    def _send(self, conn: WsConn | SioConn, frame: Frame) -> None:
        fire(self.rec, conn.send(frame))

    def _send_ice(self, conn: WsConn | SioConn, run: CallRun, side: str) -> None:
        run.ice_sent_at[side] = time.monotonic_ns()
        for j in range(self.ice):
            self._send(conn, {"type": "call.ice", "id": f"call.ice|{run.call_id}",
                              "call_id": run.call_id, "candidate": _candidate(j)})
        self._send(conn, {"type": "call.ice", "id": f"call.ice|{run.call_id}",
                          "call_id": run.call_id, "candidate": None})
        self.rec.counts["ice_sent"] += self.ice + 1

    def on_caller(self, conn: WsConn | SioConn, frame: Frame) -> None:
        """Frames to the caller."""
        kind = frame.get("type")
        if kind == "reply":
            req, run = self._reply(frame)
            if req == "call.hangup" and run is not None and frame.get("ok"):
                run.hangup_ok = True
                run.check_done()
            return
        run = self.calls.get(str(frame.get("call_id", "")))
        if run is None:
            self._other(frame)
            return
        now = time.monotonic_ns()
        if kind == "call.ringing":
            self.rec.latency("call_ring", (now - run.t0) / 1000)
        elif kind == "call.accepted":
            run.accepted = True
            self.rec.counts["calls_accepted"] += 1
            self.rec.latency("call_setup", (now - run.t0) / 1000)
            self._send_ice(conn, run, "caller")
        elif kind == "call.ice":
            self._ice_in(run, "callee", now)
            run.ice_from_callee += 1
            if run.ice_from_callee == self.ice + 1:
                # Everything crossed: hang up.
                run.hangup_at = time.monotonic_ns()
                self._send(conn, {"type": "call.hangup", "id": f"call.hangup|{run.call_id}",
                                  "call_id": run.call_id})
        elif kind == "call.ended":
            self.rec.counts["ended_caller"] += 1
        else:
            self._other(frame)

    def _other(self, frame: Frame) -> None:
        """Frames outside a live call: the call-log messages, a late call.ended."""
        kind = frame.get("type")
        if kind == "msg.new" and frame.get("kind") == "call":
            self.rec.counts["call_log_messages"] += 1
        elif kind == "call.ended":
            self.rec.counts["ended_after_done"] += 1
        else:
            self.rec.counts[f"event:{kind}"] += 1

    def _ice_in(self, run: CallRun, from_side: str, now: int) -> None:
        self.rec.counts["ice_received"] += 1
        sent = run.ice_sent_at.get(from_side)
        if sent:
            self.rec.latency("call_ice", (now - sent) / 1000)

    def on_callee(self, conn: WsConn | SioConn, frame: Frame) -> None:
        """Frames to the callee."""
        kind = frame.get("type")
        if kind == "reply":
            req, run = self._reply(frame)
            if req == "call.accept" and run is not None and frame.get("ok"):
                self._send_ice(conn, run, "callee")
            return
        call_id = str(frame.get("call_id", ""))
        run = self.calls.get(call_id)
        if run is None:
            self._other(frame)
            return
        if kind == "call.invite":
            self._send(conn, {"type": "call.ringing", "id": f"call.ringing|{call_id}",
                              "call_id": call_id})
            self._send(conn, {"type": "call.accept", "id": f"call.accept|{call_id}",
                              "call_id": call_id, "sdp": {"type": "answer", "sdp": ANSWER}})
        elif kind == "call.ice":
            self._ice_in(run, "caller", time.monotonic_ns())
            run.ice_from_caller += 1
        elif kind == "call.ended":
            self.rec.counts["ended_callee"] += 1
            if run.hangup_at:
                self.rec.latency("call_end", (time.monotonic_ns() - run.hangup_at) / 1000)
            run.callee_ended = True
            run.check_done()
        else:
            self._other(frame)

    async def run(self, stop_at: float) -> None:
        """Every pair calls back to back until ``stop_at``."""
        await asyncio.gather(*(self._pair_loop(u, a, b, stop_at) for u, a, b in self.pairs))

    async def _pair_loop(
        self, unit: int, caller: WsConn | SioConn, callee: WsConn | SioConn, stop_at: float
    ) -> None:
        loop = asyncio.get_running_loop()
        delay = self.ramp_delay(unit)
        if delay:
            await asyncio.sleep(delay)
        n = 0
        tag = f"{self.ctx.users.run}.{unit}"
        while loop.time() < stop_at and not caller.closed and not callee.closed:
            call_id = f"{tag}.{n}"
            n += 1
            run = CallRun(call_id, loop.create_future())
            self.calls[call_id] = run
            self.rec.counts["calls_started"] += 1
            await caller.send({
                "type": "call.invite", "id": f"call.invite|{call_id}", "call_id": call_id,
                "to": {"user": callee.user}, "media": {"audio": True, "video": False},
                "sdp": {"type": "offer", "sdp": OFFER},
            })
            try:
                async with asyncio.timeout(self.timeout):
                    await asyncio.shield(run.done)
                self.rec.counts["calls_completed"] += 1
                self.rec.latency("call_total", (time.monotonic_ns() - run.t0) / 1000)
            except TimeoutError:
                self.rec.error("call:timeout")
                await self._abandon(caller, run)
            except RuntimeError:
                await self._abandon(caller, run)
            finally:
                self.calls.pop(call_id, None)

    async def _abandon(self, caller: WsConn | SioConn, run: CallRun) -> None:
        """End a failed call so the pair is free for the next one."""
        kind = "call.hangup" if run.accepted else "call.cancel"
        await caller.send({"type": kind, "id": f"abandon|{run.call_id}", "call_id": run.call_id})
        await asyncio.sleep(0.05)
