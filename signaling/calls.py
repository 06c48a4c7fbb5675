"""The 1:1 call state machine: ``ringing -> connected -> ended`` per call, transport-free.

Everything outside the machine (delivering events, who is online, push, call logs, may A
call B, the clock) comes through :class:`CallEnv`, so the same machine runs under the
gateway and in unit tests. docs/CALLS.md describes the states and frames.

Each public operation takes the requesting ``(user, device)`` and the request's fields as
they came off the wire, validates them, and either changes state and returns the reply data
or raises a :class:`~im_bridge.errors.TalkbridgeError` with the state unchanged.

Ordering: one lock serialises every operation *including its deliveries*, so the events
one operation emits reach the hub before those of the next (a caller never sees a
``call.ice`` before the ``call.accepted`` it belongs to). Call logs are written after the
lock is released: they touch the store and must not hold up signaling.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from im_bridge.errors import BadRequest, Conflict, Forbidden, NotFound, TalkbridgeError

log = logging.getLogger(__name__)

CallState = Literal["ringing", "connected", "ended"]
EndReason = Literal[
    "hangup", "declined", "busy", "cancelled", "timeout", "answered_elsewhere", "failed"]
Outcome = Literal["completed", "missed", "declined", "cancelled", "busy", "failed"]

Event = dict[str, Any]
# Offered the snapshots of a stopping node's live calls; returns the ids another node took.
HandOver = Callable[[list[dict[str, Any]]], Awaitable[Collection[str]]]

CALL_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
USER_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_SDP = 60_000  # below the default 64 KiB frame limit; a bigger SDP is not a real one
MAX_CANDIDATE = 1024


class Timer(Protocol):
    """A scheduled callback that can be cancelled."""

    def cancel(self) -> None: ...


class CallEnv(Protocol):
    """What the call machine needs from the rest of the server (hub, bridge, push, clock)."""

    def now(self) -> float:
        """Unix time in seconds."""
        ...

    def call_later(self, delay: float, callback: Callable[[], Awaitable[None]]) -> Timer:
        """Run ``callback()`` once, ``delay`` seconds from now, unless cancelled."""
        ...

    async def send(self, user: str, device: str, event: Event) -> None:
        """Deliver ``event`` to one device of ``user`` (dropped if it is not connected)."""
        ...

    async def online_devices(self, user: str) -> Collection[str]:
        """The device ids of ``user`` that are connected now."""
        ...

    async def push_call(self, user: str, invite: Event) -> None:
        """Push an incoming call to ``user``, who has no connected device (a VoIP push)."""
        ...

    async def check_may_call(self, caller: str, callee: str) -> None:
        """Raise Forbidden (blocked) or NotFound when ``caller`` may not call ``callee``."""
        ...

    async def write_call_log(self, entry: CallLog) -> None:
        """Append the ``call`` message for a finished call to the dm conversation."""
        ...

    async def call_changed(self, call: Call) -> None:
        """``call`` started ringing or ended (other nodes may need to know where it lives)."""
        ...


@dataclass(frozen=True)
class CallLog:
    """What the call log message says about one finished call."""

    call_id: str
    caller: str
    callee: str
    media: dict[str, bool]
    outcome: Outcome
    duration_s: int
    started_at: float
    ended_at: float

    def body(self) -> dict[str, Any]:
        """The ``body`` of the ``call`` message (docs/PROTOCOL.md)."""
        return {"call_id": self.call_id, "media": dict(self.media), "outcome": self.outcome,
                "duration_s": self.duration_s}


@dataclass(frozen=True)
class CallSettings:
    """Timings and policy of the call machine."""

    timeout: float = 45.0  # seconds an unanswered invite rings
    grace: float = 20.0  # seconds a disconnected party's device may take to resume
    call_waiting: bool = False  # ring a callee who is already in a call instead of busy
    remember_ended: float = 120.0  # seconds an ended call still answers with conflict
    max_early_ice: int = 100  # caller candidates buffered before the answer
    max_held: int = 500  # events held for a party's device while it is away
    force_relay: bool = False  # every call's media goes through the media relay

    @classmethod
    def from_config(cls, config: Any) -> CallSettings:
        """Settings from a :class:`signaling.config.Config`."""
        return cls(timeout=float(config.call_timeout), grace=float(config.call_grace),
                   call_waiting=bool(config.call_waiting),
                   force_relay=bool(getattr(config, "call_via_relay", False)))


@dataclass
class _Away:
    """A party's participating device that disconnected: its grace timer and held events."""

    since: float
    timer: Timer
    held: list[Event] = field(default_factory=list)


@dataclass
class _PendingInvite:
    """An invite between its arrival and its call (the bridge and presence are asked first)."""

    user: str
    device: str
    settled: asyncio.Future[None]
    # The caller device's connection closed meanwhile (unix time): the call starts with
    # that device away, as if it had dropped a moment after the call rang.
    gone_since: float | None = None


@dataclass
class Call:
    """One call. ``rung`` holds the callee devices that were sent the invite."""

    call_id: str
    caller: str
    caller_device: str
    callee: str
    media: dict[str, bool]
    offer: dict[str, str]
    created_at: float
    expires_at: float
    state: CallState = "ringing"
    rung: set[str] = field(default_factory=set)
    callee_device: str | None = None
    answered_at: float | None = None
    ended_at: float | None = None
    end_reason: EndReason | None = None
    early_ice: list[Any] = field(default_factory=list)
    timer: Timer | None = None  # ring timeout while ringing, forget-me timer once ended
    away: dict[tuple[str, str], _Away] = field(default_factory=dict)
    # "p2p": SDP and ICE relayed between the devices; "relay": both join the call's room.
    via: str = "p2p"

    def is_party(self, user: str) -> bool:
        return user in (self.caller, self.callee)

    def participants(self) -> list[tuple[str, str]]:
        """The devices that hear about this call now."""
        devs = [(self.caller, self.caller_device)]
        if self.callee_device is not None:
            devs.append((self.callee, self.callee_device))
        else:
            devs.extend((self.callee, d) for d in sorted(self.rung))
        return devs

    def is_participant(self, user: str, device: str) -> bool:
        return (user, device) in self.participants()

    def peer_of(self, user: str, device: str) -> tuple[str, str] | None:
        """The other party's chosen device once connected."""
        if self.callee_device is None:
            return None
        if (user, device) == (self.caller, self.caller_device):
            return (self.callee, self.callee_device)
        if (user, device) == (self.callee, self.callee_device):
            return (self.caller, self.caller_device)
        return None

    def snapshot(self) -> dict[str, Any]:
        """The call as JSON-ready data: all another node needs to take it over (see
        :meth:`CallManager.adopt`). Timers are not data: the adopting node arms its own."""
        return {
            "call_id": self.call_id, "caller": self.caller, "caller_device": self.caller_device,
            "callee": self.callee, "callee_device": self.callee_device,
            "media": dict(self.media),
            # The offer re-rings callee devices that connect; once answered nobody needs it.
            "offer": dict(self.offer) if self.state == "ringing" else {},
            "created_at": self.created_at, "expires_at": self.expires_at, "state": self.state,
            "rung": sorted(self.rung), "answered_at": self.answered_at, "via": self.via,
            "early_ice": list(self.early_ice),
            "away": [{"user": u, "device": d, "since": a.since, "held": list(a.held)}
                     for (u, d), a in sorted(self.away.items())],
        }

    @classmethod
    def from_snapshot(cls, snap: Mapping[str, Any]) -> Call:
        """The call of a :meth:`snapshot`, without its away devices (they need timers)."""
        return cls(
            call_id=str(snap["call_id"]), caller=str(snap["caller"]),
            caller_device=str(snap["caller_device"]), callee=str(snap["callee"]),
            callee_device=snap.get("callee_device"), media=dict(snap["media"]),
            offer=dict(snap.get("offer") or {}), created_at=float(snap["created_at"]),
            expires_at=float(snap["expires_at"]), state=snap["state"],
            rung=set(snap.get("rung") or ()), answered_at=snap.get("answered_at"),
            via=str(snap.get("via") or "p2p"), early_ice=list(snap.get("early_ice") or ()))

    def summary(self) -> dict[str, Any]:
        data: dict[str, Any] = {"call_id": self.call_id, "state": self.state}
        if self.via == "relay":
            data["via"] = "relay"
        if self.state == "ringing":
            data["expires_at"] = _ms(self.expires_at)
        if self.end_reason is not None:
            data["reason"] = self.end_reason
        return data


def _ms(t: float) -> int:
    return round(t * 1000)


# --- validation of wire fields -------------------------------------------------------------

def parse_call_id(req: Mapping[str, Any]) -> str:
    """The request's ``call_id`` (BadRequest when missing or malformed)."""
    call_id = req.get("call_id")
    if not isinstance(call_id, str) or not CALL_ID_RE.match(call_id):
        raise BadRequest("call_id must be 1-128 characters of A-Z a-z 0-9 _ . : -",
                         field="call_id")
    return call_id


def parse_sdp(value: Any, types: Collection[str]) -> dict[str, str]:
    """A session description ``{type, sdp}`` whose type is one of ``types``."""
    if not isinstance(value, Mapping):
        raise BadRequest("sdp must be an object {type, sdp}", field="sdp")
    kind, text = value.get("type"), value.get("sdp")
    if kind not in types:
        raise BadRequest(f"sdp.type must be one of {sorted(types)}", field="sdp.type")
    if not isinstance(text, str) or len(text) > MAX_SDP:
        raise BadRequest("sdp.sdp must be a session description string", field="sdp.sdp")
    lines = [ln for ln in text.replace("\r\n", "\n").split("\n") if ln]
    # The shape every RFC 8866 description has; deeper parsing is the peers' job.
    if (not lines or lines[0] != "v=0" or not any(ln.startswith("o=") for ln in lines)
            or not any(ln.startswith("m=") for ln in lines)
            or any(len(ln) < 2 or ln[1] != "=" for ln in lines)):
        raise BadRequest("sdp.sdp is not a session description", field="sdp.sdp")
    return {"type": str(kind), "sdp": text}


def parse_candidate(req: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``candidate`` of a ``call.ice``: an RTCIceCandidateInit, or null (end of candidates)."""
    if "candidate" not in req:
        raise BadRequest("candidate is required (null for end of candidates)",
                         field="candidate")
    cand = req["candidate"]
    if cand is None:
        return None
    if not isinstance(cand, Mapping):
        raise BadRequest("candidate must be an object or null", field="candidate")
    line = cand.get("candidate")
    mid = cand.get("sdpMid")
    index = cand.get("sdpMLineIndex")
    if (not isinstance(line, str) or len(line) > MAX_CANDIDATE
            or (line and not line.startswith(("candidate:", "a=candidate:")))):
        raise BadRequest("candidate.candidate must be an ICE candidate line",
                         field="candidate.candidate")
    if mid is not None and not isinstance(mid, str):
        raise BadRequest("candidate.sdpMid must be a string or null", field="candidate.sdpMid")
    if index is not None and (not isinstance(index, int) or isinstance(index, bool)
                              or not 0 <= index < 1024):
        raise BadRequest("candidate.sdpMLineIndex must be a small integer or null",
                         field="candidate.sdpMLineIndex")
    if mid is None and index is None:
        raise BadRequest("candidate needs sdpMid or sdpMLineIndex", field="candidate")
    out: dict[str, Any] = {"candidate": line, "sdpMid": mid, "sdpMLineIndex": index}
    ufrag = cand.get("usernameFragment")
    if isinstance(ufrag, str) and len(ufrag) <= 256:
        out["usernameFragment"] = ufrag
    return out


def parse_via(value: Any) -> str:
    """Where a call's media goes: ``"p2p"`` (default) or ``"relay"`` (the media relay)."""
    if value is None:
        return "p2p"
    if value not in ("p2p", "relay"):
        raise BadRequest("'via' must be \"p2p\" or \"relay\"", field="via")
    return str(value)


def parse_media(value: Any) -> dict[str, bool]:
    """``media {audio, video}``: booleans, at least one true."""
    if not isinstance(value, Mapping):
        raise BadRequest("media must be an object {audio, video}", field="media")
    media = {}
    for kind in ("audio", "video"):
        v = value.get(kind)
        if v is None:  # left out or null, as optional fields are everywhere (codec.opt_*)
            v = False
        if not isinstance(v, bool):
            raise BadRequest(f"media.{kind} must be a boolean", field=f"media.{kind}")
        media[kind] = v
    if not (media["audio"] or media["video"]):
        raise BadRequest("a call needs audio or video", field="media")
    return media


def parse_callee(req: Mapping[str, Any]) -> str:
    """``to {user}`` of a ``call.invite``."""
    to = req.get("to")
    user = to.get("user") if isinstance(to, Mapping) else None
    if not isinstance(user, str) or not USER_RE.match(user):
        raise BadRequest('to must be {"user": "<user id>"}', field="to")
    return user


_OUTCOMES: dict[EndReason, Outcome] = {
    "declined": "declined", "busy": "busy", "cancelled": "cancelled", "timeout": "missed",
    "failed": "failed", "hangup": "completed", "answered_elsewhere": "completed",
}


class CallManager:
    """All calls of this node. Public methods are the ``call.*`` requests and hub hooks."""

    def __init__(self, env: CallEnv, settings: CallSettings | None = None) -> None:
        self.env = env
        self.settings = settings or CallSettings()
        self._calls: dict[str, Call] = {}
        self._live: dict[str, set[str]] = {}  # user -> ids of their calls not yet ended
        self._lock = asyncio.Lock()
        self._pending: dict[str, _PendingInvite] = {}  # call id -> invite being checked
        self._out: list[tuple[str, str, Event]] = []
        self._logs: list[CallLog] = []
        self._changed: list[Call] = []

    # --- introspection ---------------------------------------------------------------------

    def get(self, call_id: str) -> Call | None:
        """The call with this id (live, or ended and still remembered)."""
        return self._calls.get(call_id)

    def live_calls_of(self, user: str) -> list[Call]:
        """Calls ``user`` takes part in that have not ended."""
        return [self._calls[c] for c in sorted(self._live.get(user, ()))]

    def live_count(self) -> int:
        """How many calls are ringing or connected."""
        return sum(1 for c in self._calls.values() if c.state != "ended")

    def in_call(self, user: str) -> bool:
        """True when ``user`` is ringing, being rung or talking."""
        return bool(self._live.get(user))

    # --- requests --------------------------------------------------------------------------

    async def invite(self, user: str, device: str, req: Mapping[str, Any]) -> Event:
        """``call.invite``: ring every online device of the callee (or push, or busy, or glare)."""
        call_id = parse_call_id(req)
        callee = parse_callee(req)
        media = parse_media(req.get("media"))
        via = "relay" if self.settings.force_relay else parse_via(req.get("via"))
        # Through the relay, each device negotiates with the relay (room.*), not its peer.
        offer = parse_sdp(req.get("sdp"), ("offer",)) if via == "p2p" else {}
        if callee == user:
            raise BadRequest("cannot call yourself", field="to")
        first = self._pending.get(call_id)
        if first is not None and (first.user, first.device) == (user, device):
            # A retry (after a lost connection) of an invite still being checked: wait for
            # it, then answer like any repeated invite, not "call_id in use" for its own id.
            await asyncio.shield(first.settled)
        known = self._calls.get(call_id)
        if known is not None and (known.caller, known.caller_device) == (user, device):
            return await self._repeat_invite(known, user, device)
        if known is not None or call_id in self._pending:
            raise Conflict("call_id already in use: pick a new random one", field="call_id")
        # Requests for this call that arrive while we ask the bridge wait for the answer
        # (a caller trickles candidates right after its invite).
        pending = _PendingInvite(user, device, asyncio.get_running_loop().create_future())
        self._pending[call_id] = pending
        try:
            return await self._invite(pending, call_id, callee, media, offer, via)
        finally:
            del self._pending[call_id]
            pending.settled.set_result(None)

    async def _repeat_invite(self, call: Call, user: str, device: str) -> Event:
        """The same invite again from the same device (a retry after a lost connection).

        Nothing is rung twice: the reply says where the call stands, and a device that was
        away takes the call up again as with ``call.resume``.
        """
        async with self._lock:
            if call.state != "ended":
                self._resume_if_away(call, user, device)
            await self._flush()
            return call.summary()

    async def _invite(self, pending: _PendingInvite, call_id: str, callee: str,
                      media: dict[str, bool], offer: dict[str, str], via: str) -> Event:
        user, device = pending.user, pending.device
        await self.env.check_may_call(user, callee)
        # Asked before any state changes: if presence fails, the invite fails cleanly.
        devices = await self.env.online_devices(callee)
        push: Event | None = None
        async with self._lock:
            if call_id in self._calls:
                raise Conflict("call_id already in use: pick a new random one", field="call_id")
            now = self.env.now()
            call = Call(call_id=call_id, caller=user, caller_device=device, callee=callee,
                        media=media, offer=offer, created_at=now,
                        expires_at=now + self.settings.timeout, via=via)
            self._calls[call_id] = call
            rival = next((c for c in self.live_calls_of(callee)
                          if c.state == "ringing" and c.caller == callee and c.callee == user),
                         None)
            if (rival is not None and not self.settings.call_waiting
                    and any(c.call_id != rival.call_id for c in self.live_calls_of(callee))):
                # The callee is in another call too: this invite is busy whatever the ids,
                # so it must not replace the callee's own invite (both would end, and
                # "replaced_by" would name a call that never rang). That one rings on.
                rival = None
            # Glare: both invited each other. The smaller call_id survives everywhere.
            if rival is not None and rival.call_id < call_id:
                self._end(call, "cancelled", None, replaced_by=rival.call_id, log_it=False)
                self._emit(callee, rival.caller_device, {
                    "type": "call.ended", "call_id": call_id, "reason": "cancelled",
                    "replaced_by": rival.call_id})
                await self._flush()
                reply = {**call.summary(), "replaced_by": rival.call_id}
            else:
                if rival is not None:
                    self._end(rival, "cancelled", None, replaced_by=call_id, log_it=False)
                waiting = self.in_call(callee)
                self._live.setdefault(user, set()).add(call_id)
                self._live.setdefault(callee, set()).add(call_id)
                if waiting and not self.settings.call_waiting:
                    self._end(call, "busy", None)
                    await self._flush()
                    reply = call.summary()
                else:
                    invite = self._invite_event(call, waiting)
                    for d in sorted(devices):
                        call.rung.add(d)
                        self._emit(callee, d, invite)
                    call.timer = self.env.call_later(self.settings.timeout,
                                                     self._timeout_of(call_id))
                    if pending.gone_since is not None:
                        # device_disconnected came before the call existed: without this
                        # nobody would ever notice the caller is gone (an answered call
                        # would stay up forever).
                        left = pending.gone_since + self.settings.grace - now
                        call.away[(user, device)] = _Away(
                            since=pending.gone_since,
                            timer=self.env.call_later(max(0.0, left), self._grace_over(
                                call_id, user, device)))
                    self._changed.append(call)
                    await self._flush()
                    if not devices:
                        push = invite
                    reply = call.summary()
            after = self._take_after()
        if push is not None:
            await self._push(call, push)
        await self._run_after(after)
        return reply

    async def ringing(self, user: str, device: str, req: Mapping[str, Any]) -> Event:
        """``call.ringing`` from a callee device: tell the caller which device rings."""
        await self._settled(req)
        async with self._lock:
            call = self._call_for(user, req)
            self._require_callee_device(call, user, device)
            self._require_state(call, "ringing")
            self._to_party(call, call.caller, call.caller_device,
                           {"type": "call.ringing", "call_id": call.call_id, "device": device})
            await self._flush()
            return call.summary()

    async def accept(self, user: str, device: str, req: Mapping[str, Any]) -> Event:
        """``call.accept``: the first answer wins; the callee's other devices stop ringing."""
        await self._settled(req)
        async with self._lock:
            call = self._call_for(user, req)
            answer = parse_sdp(req.get("sdp"), ("answer",)) if call.via == "p2p" else None
            self._require_callee_device(call, user, device)
            if call.state == "connected":
                raise Conflict("the call was already answered", reason="answered")
            self._require_state(call, "ringing")
            if call.timer is not None:
                call.timer.cancel()
                call.timer = None
            call.state = "connected"
            call.callee_device = device
            call.answered_at = self.env.now()
            others = sorted(call.rung - {device})
            call.rung.add(device)
            accepted: Event = {"type": "call.accepted", "call_id": call.call_id, "device": device}
            if answer is None:
                accepted["via"] = "relay"
            else:
                accepted["sdp"] = answer
            self._to_party(call, call.caller, call.caller_device, accepted)
            for d in others:
                self._emit(user, d, {"type": "call.ended", "call_id": call.call_id,
                                     "reason": "answered_elsewhere"})
            for cand in call.early_ice:
                self._emit(user, device, {"type": "call.ice", "call_id": call.call_id,
                                          "from_device": call.caller_device, "candidate": cand})
            call.early_ice.clear()
            self._changed.append(call)
            await self._flush()
            reply = call.summary()
            after = self._take_after()
        await self._run_after(after)
        return reply

    async def reject(self, user: str, device: str, req: Mapping[str, Any]) -> Event:
        """``call.reject``: any callee device declines (or says busy) for all of them."""
        reason: EndReason = "declined"
        given = req.get("reason")
        # Left out or null (as optional fields are everywhere, codec.opt_*): declined.
        if given is not None:
            if given not in ("declined", "busy"):
                raise BadRequest('reason must be "declined" or "busy"', field="reason")
            reason = given
        return await self._finish(user, device, req, "reject", reason)

    async def cancel(self, user: str, device: str, req: Mapping[str, Any]) -> Event:
        """``call.cancel``: the caller gives up before an answer."""
        return await self._finish(user, device, req, "cancel", "cancelled")

    async def hangup(self, user: str, device: str, req: Mapping[str, Any]) -> Event:
        """``call.hangup``: either side ends the call (before an answer: cancel or decline)."""
        return await self._finish(user, device, req, "hangup", "hangup")

    async def ice(self, user: str, device: str, req: Mapping[str, Any]) -> Event:
        """``call.ice``: trickle a candidate to the other party's chosen device."""
        await self._settled(req)
        async with self._lock:
            call = self._call_for(user, req)
            cand = parse_candidate(req)
            self._require_participant(call, user, device)
            self._require_p2p(call)
            self._require_live(call)
            if call.state == "ringing":
                if (user, device) != (call.caller, call.caller_device):
                    raise Conflict("accept the call before sending candidates")
                if len(call.early_ice) >= self.settings.max_early_ice:
                    raise Conflict("too many candidates before the answer")
                self._resume_if_away(call, user, device)
                call.early_ice.append(cand)
            else:
                self._resume_if_away(call, user, device)
                peer = call.peer_of(user, device)
                assert peer is not None
                self._to_party(call, peer[0], peer[1], {
                    "type": "call.ice", "call_id": call.call_id, "from_device": device,
                    "candidate": cand})
            await self._flush()
            return {"call_id": call.call_id}

    async def sdp(self, user: str, device: str, req: Mapping[str, Any]) -> Event:
        """``call.sdp``: renegotiation (adding video, ICE restart) once connected."""
        await self._settled(req)
        async with self._lock:
            call = self._call_for(user, req)
            desc = parse_sdp(req.get("sdp"), ("offer", "answer"))
            self._require_participant(call, user, device)
            self._require_p2p(call)
            self._require_live(call)
            if call.state != "connected":
                raise Conflict("renegotiate after the call is answered")
            self._resume_if_away(call, user, device)
            peer = call.peer_of(user, device)
            assert peer is not None
            self._to_party(call, peer[0], peer[1], {
                "type": "call.sdp", "call_id": call.call_id, "from_device": device,
                "sdp": desc})
            await self._flush()
            return {"call_id": call.call_id}

    async def resume(self, user: str, device: str, req: Mapping[str, Any]) -> Event:
        """``call.resume``: a participating device is back after a disconnect.

        Events held for it while it was away are delivered now; the reply says where the call
        stands (``peer`` is the other party's device once connected).
        """
        await self._settled(req)
        async with self._lock:
            call = self._call_for(user, req)
            self._require_participant(call, user, device)
            self._require_live(call)
            self._resume_if_away(call, user, device)
            await self._flush()
            data = call.summary()
            peer = call.peer_of(user, device)
            if peer is not None:
                data["peer"] = {"user": peer[0], "device": peer[1]}
            data["media"] = dict(call.media)
            return data

    # --- hub hooks -------------------------------------------------------------------------

    async def device_connected(self, user: str, device: str) -> None:
        """A device authenticated (call right after ``auth.ok``): ring it for pending invites."""
        async with self._lock:
            for call in self.live_calls_of(user):
                if call.state == "ringing" and call.callee == user:
                    if device not in call.rung:
                        call.rung.add(device)
                        self._changed.append(call)  # recorded: a node taking over rings it
                    self._emit(user, device,
                               self._invite_event(call, waiting=self._busy_besides(call)))
            await self._flush()
            after = self._take_after()
        await self._run_after(after)

    async def device_disconnected(self, user: str, device: str) -> None:
        """A device's connection closed: its calls wait ``grace`` seconds for a resume."""
        invites = [p for p in self._pending.values() if (p.user, p.device) == (user, device)]
        if not (self._live.get(user) or invites):
            return
        if device in await self.env.online_devices(user):
            return  # a newer session of the same device is already up
        async with self._lock:
            now = self.env.now()
            for invite in invites:  # its call starts with this device away (see _invite)
                if invite.gone_since is None:
                    invite.gone_since = now
            for call in self.live_calls_of(user):
                if ((user, device) == (call.caller, call.caller_device)
                        or (user, device) == (call.callee, call.callee_device)):
                    if (user, device) in call.away:
                        continue
                    timer = self.env.call_later(
                        self.settings.grace, self._grace_over(call.call_id, user, device))
                    call.away[(user, device)] = _Away(since=now, timer=timer)

    async def close(self, hand_over: HandOver | None = None) -> list[Call]:
        """Server shutdown: hand live calls to another node, or end them; stop every timer.

        Without ``hand_over`` (one node) every call still ringing or connected ends
        ``failed`` and is logged. With it (nodes sharing Redis) the snapshots of the live
        calls are offered to it while the lock keeps every request off them; the calls whose
        ids it returns were taken over by another node and are forgotten here without a word.
        Of the others, connected calls go on (their media is peer to peer; a node takes them
        over later from their Redis record) and are returned; ringing ones end ``failed``.
        """
        kept: list[Call] = []
        async with self._lock:
            live = [c for c in self._calls.values() if c.state != "ended"]
            moved: Collection[str] = ()
            if hand_over is not None and live:
                try:
                    moved = await hand_over([c.snapshot() for c in live])
                except Exception:
                    log.exception("handing %d calls over failed", len(live))
            for call in live:
                if call.call_id in moved:
                    self._drop(call)
                elif call.state == "connected" and hand_over is not None:
                    kept.append(call)
                else:
                    since = min((a.since for a in call.away.values()), default=None)
                    self._end(call, "failed", None, at=since)
            await self._flush()
            after = self._take_after()
            for call in self._calls.values():
                if call.timer is not None:
                    call.timer.cancel()
                for away in call.away.values():
                    away.timer.cancel()
        await self._run_after(after)
        return kept

    async def adopt(self, snapshots: Iterable[Mapping[str, Any]]) -> list[str]:
        """Take over calls another node held (it stopped or died) from their snapshots.

        Each call goes on here as it was: the ring timeout fires at the original
        ``expires_at`` (at once if that has passed), a device that was away keeps its held
        events and the rest of its grace period, caller candidates wait for the answer.
        Calls already here are skipped. Returns the ids taken over.
        """
        adopted: list[str] = []
        async with self._lock:
            now = self.env.now()
            for snap in snapshots:
                call = Call.from_snapshot(snap)
                if call.call_id in self._calls or call.state == "ended":
                    continue
                self._calls[call.call_id] = call
                for party in (call.caller, call.callee):
                    self._live.setdefault(party, set()).add(call.call_id)
                adopted.append(call.call_id)
                self._changed.append(call)
                away = [(str(a["user"]), str(a["device"]), float(a["since"]), list(a["held"]))
                        for a in snap.get("away") or ()]
                gone = min((since for _, _, since, _ in away
                            if since + self.settings.grace <= now), default=None)
                # Past its deadline or grace the call ends now, before any request sees it.
                if call.state == "ringing" and call.expires_at <= now:
                    self._end(call, "timeout", None, at=call.expires_at)
                    continue
                if gone is not None:
                    self._end(call, "failed", None, at=gone)
                    continue
                for user, device, since, held in away:
                    timer = self.env.call_later(since + self.settings.grace - now,
                                                self._grace_over(call.call_id, user, device))
                    call.away[(user, device)] = _Away(since=since, timer=timer, held=held)
                if call.state == "ringing":
                    call.timer = self.env.call_later(call.expires_at - now,
                                                     self._timeout_of(call.call_id))
            await self._flush()
            after = self._take_after()
        await self._run_after(after)
        return adopted

    # --- internals -------------------------------------------------------------------------

    async def _finish(self, user: str, device: str, req: Mapping[str, Any],
                      op: Literal["reject", "cancel", "hangup"], reason: EndReason) -> Event:
        await self._settled(req)
        async with self._lock:
            call = self._call_for(user, req)
            if op == "reject":
                self._require_callee_device(call, user, device)
                self._require_live(call)
                if call.state != "ringing":
                    # With the state, as every conflict about a live call (docs/CALLS.md).
                    raise Conflict("the call was answered: use call.hangup", state=call.state)
            elif op == "cancel":
                if (user, device) != (call.caller, call.caller_device):
                    if user == call.caller:
                        raise Conflict("the call was placed from another device")
                    raise Forbidden("only the caller cancels; the callee rejects")
                self._require_live(call)
                if call.state != "ringing":
                    # With the state, as every conflict about a live call (docs/CALLS.md).
                    raise Conflict("the call was answered: use call.hangup", state=call.state)
            else:
                self._require_participant(call, user, device)
                self._require_live(call)
                if call.state == "ringing":
                    reason = "cancelled" if user == call.caller else "declined"
            self._end(call, reason, (user, device))
            await self._flush()
            reply = call.summary()
            after = self._take_after()
        await self._run_after(after)
        return reply

    async def _settled(self, req: Mapping[str, Any]) -> None:
        call_id = req.get("call_id")
        pending = self._pending.get(call_id) if isinstance(call_id, str) else None
        if pending is not None:
            await asyncio.shield(pending.settled)

    def _call_for(self, user: str, req: Mapping[str, Any]) -> Call:
        call = self._calls.get(parse_call_id(req))
        # The same answer for "no such call" and "not your call": outsiders learn nothing.
        if call is None or not call.is_party(user):
            raise NotFound("no such call", field="call_id")
        return call

    def _require_callee_device(self, call: Call, user: str, device: str) -> None:
        if user != call.callee:
            raise Forbidden("only the callee answers, rings or rejects")
        if call.callee_device is not None and call.callee_device != device:
            raise Conflict("the call was answered on another device",
                           reason="answered_elsewhere")

    def _require_participant(self, call: Call, user: str, device: str) -> None:
        if not call.is_participant(user, device):
            if call.callee_device is not None and user == call.callee:
                raise Conflict("the call was answered on another device",
                               reason="answered_elsewhere")
            raise Conflict("this device does not take part in the call")

    def _require_live(self, call: Call) -> None:
        if call.state == "ended":
            raise Conflict("the call has ended", reason=call.end_reason)

    def _require_state(self, call: Call, state: CallState) -> None:
        self._require_live(call)
        if call.state != state:
            raise Conflict(f"the call is {call.state}", state=call.state)

    def _require_p2p(self, call: Call) -> None:
        if call.via != "p2p":
            raise BadRequest("this call's media goes through the relay: negotiate with room.*")

    def _busy_besides(self, call: Call) -> bool:
        return any(c.call_id != call.call_id for c in self.live_calls_of(call.callee))

    def _invite_event(self, call: Call, waiting: bool) -> Event:
        event: Event = {"type": "call.invite", "call_id": call.call_id, "from": call.caller,
                        "from_device": call.caller_device, "media": dict(call.media),
                        "expires_at": _ms(call.expires_at)}
        if call.via == "relay":
            event["via"] = "relay"
        else:
            event["sdp"] = dict(call.offer)
        if waiting:
            event["waiting"] = True
        return event

    def _emit(self, user: str, device: str, event: Event) -> None:
        self._out.append((user, device, event))

    def _to_party(self, call: Call, user: str, device: str, event: Event) -> None:
        """Send to a party's device, or hold it while that device is away."""
        away = call.away.get((user, device))
        if away is None:
            self._emit(user, device, event)
        elif len(away.held) < self.settings.max_held:
            away.held.append(event)

    def _resume_if_away(self, call: Call, user: str, device: str) -> None:
        away = call.away.pop((user, device), None)
        if away is not None:
            away.timer.cancel()
            for event in away.held:
                self._emit(user, device, event)

    def _end(self, call: Call, reason: EndReason, by: tuple[str, str] | None,
             replaced_by: str | None = None, log_it: bool = True,
             at: float | None = None) -> None:
        """Move ``call`` to ended and tell every participating device but ``by``."""
        now = self.env.now()
        ended_at = now if at is None else at
        event: Event = {"type": "call.ended", "call_id": call.call_id, "reason": reason}
        if replaced_by is not None:
            event["replaced_by"] = replaced_by
        for user, device in call.participants():
            if (user, device) != by:
                self._emit(user, device, event)
        if call.timer is not None:
            call.timer.cancel()
        for away in call.away.values():
            away.timer.cancel()
        call.away.clear()
        call.early_ice.clear()
        call.state = "ended"
        call.end_reason = reason
        call.ended_at = ended_at
        self._forget_live(call)
        self._changed.append(call)
        call_id = call.call_id
        call.timer = self.env.call_later(self.settings.remember_ended,
                                         lambda: self._forget(call_id))
        if log_it:
            duration = 0
            if call.answered_at is not None:
                duration = max(0, round(ended_at - call.answered_at))
            self._logs.append(CallLog(
                call_id=call.call_id, caller=call.caller, callee=call.callee,
                media=dict(call.media), outcome=_OUTCOMES[reason], duration_s=duration,
                started_at=call.created_at, ended_at=ended_at))

    async def _flush(self) -> None:
        out, self._out = self._out, []
        for user, device, event in out:
            try:
                await self.env.send(user, device, event)
            except Exception:
                log.exception("delivering %s to %s/%s failed", event.get("type"), user, device)

    async def _push(self, call: Call, invite: Event) -> None:
        payload = {k: v for k, v in invite.items() if k != "sdp"}
        try:
            await self.env.push_call(call.callee, payload)
        except Exception:
            log.exception("push for call %s failed", call.call_id)

    def _take_after(self) -> tuple[list[CallLog], list[Call]]:
        """What to do once the lock is released: logs to write, live/ended calls to announce."""
        logs, self._logs = self._logs, []
        changed, self._changed = self._changed, []
        return logs, changed

    async def _run_after(self, after: tuple[list[CallLog], list[Call]]) -> None:
        logs, changed = after
        for call in changed:
            try:
                await self.env.call_changed(call)
            except Exception:
                log.exception("announcing call %s failed", call.call_id)
        for entry in logs:
            try:
                await self.env.write_call_log(entry)
            except TalkbridgeError as exc:
                log.warning("call log for %s not written: %s", entry.call_id, exc.message)
            except Exception:
                log.exception("call log for %s not written", entry.call_id)

    def _drop(self, call: Call) -> None:
        """Forget a live call without ending it: another node holds it now."""
        if call.timer is not None:
            call.timer.cancel()
        for away in call.away.values():
            away.timer.cancel()
        del self._calls[call.call_id]
        self._forget_live(call)

    def _forget_live(self, call: Call) -> None:
        """The call is no longer one of its parties' live calls (here)."""
        for party in (call.caller, call.callee):
            ids = self._live.get(party)
            if ids is not None:
                ids.discard(call.call_id)
                if not ids:
                    del self._live[party]

    def _timeout_of(self, call_id: str) -> Callable[[], Awaitable[None]]:
        return lambda: self._on_timeout(call_id)

    async def _on_timeout(self, call_id: str) -> None:
        async with self._lock:
            call = self._calls.get(call_id)
            if call is None or call.state != "ringing":
                return
            call.timer = None
            self._end(call, "timeout", None)
            await self._flush()
            after = self._take_after()
        await self._run_after(after)

    def _grace_over(self, call_id: str, user: str,
                    device: str) -> Callable[[], Awaitable[None]]:
        return lambda: self._on_grace_over(call_id, user, device)

    async def _on_grace_over(self, call_id: str, user: str, device: str) -> None:
        async with self._lock:
            call = self._calls.get(call_id)
            if call is None or call.state == "ended":
                return
            away = call.away.pop((user, device), None)
            if away is None:
                return
            # The call died when the device went away, not when we gave up waiting.
            self._end(call, "failed", None, at=away.since)
            await self._flush()
            after = self._take_after()
        await self._run_after(after)

    async def _forget(self, call_id: str) -> None:
        call = self._calls.get(call_id)
        if call is not None and call.state == "ended":
            del self._calls[call_id]
