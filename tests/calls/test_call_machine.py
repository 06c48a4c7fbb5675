"""The 1:1 call state machine, driven through its environment port (no transport).

alice calls from device a1 (she also has a2); bob has phone and laptop; carol is a third user.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from im_bridge.errors import BadRequest, Conflict, Forbidden, NotFound
from signaling.calls import Call, CallManager, CallSettings
from tests.calls.machine_env import RecordingEnv

OFFER = {"type": "offer", "sdp": "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
         "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n"}
ANSWER = {"type": "answer", "sdp": OFFER["sdp"].replace("o=- 1 1", "o=- 2 1")}
AV = {"audio": True, "video": True}


def cand(n: int) -> dict[str, Any]:
    return {"candidate": f"candidate:{n} 1 udp 2130706431 127.0.0.1 {40000 + n} typ host",
            "sdpMid": "0", "sdpMLineIndex": 0}


@pytest.fixture
def env() -> RecordingEnv:
    e = RecordingEnv()
    e.connect("alice", "a1", "a2")
    e.connect("bob", "phone", "laptop")
    e.connect("carol", "c1")
    return e


@pytest.fixture
def calls(env: RecordingEnv) -> CallManager:
    return CallManager(env, CallSettings(timeout=45, grace=20))


async def invite(calls: CallManager, call_id: str = "call-1", frm: str = "alice",
                 dev: str = "a1", to: str = "bob") -> dict[str, Any]:
    return await calls.invite(frm, dev, {"call_id": call_id, "to": {"user": to},
                                         "media": AV, "sdp": OFFER})


async def connected(calls: CallManager, env: RecordingEnv, call_id: str = "call-1") -> None:
    await invite(calls, call_id)
    await calls.accept("bob", "phone", {"call_id": call_id, "sdp": ANSWER})
    for u, d in [("alice", "a1"), ("bob", "phone"), ("bob", "laptop")]:
        env.take(u, d)


def the(calls: CallManager, call_id: str) -> Call:
    call = calls.get(call_id)
    assert call is not None
    return call


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


# --- ringing ---------------------------------------------------------------------------------

async def test_invite_rings_every_online_device_of_the_callee(calls, env):
    reply = await invite(calls)
    assert reply == {"call_id": "call-1", "state": "ringing",
                     "expires_at": int((env.clock + 45) * 1000)}
    for device in ("phone", "laptop"):
        assert env.take("bob", device) == [{
            "type": "call.invite", "call_id": "call-1", "from": "alice", "from_device": "a1",
            "media": AV, "sdp": OFFER, "expires_at": reply["expires_at"]}]
    assert env.pushes == []


async def test_nobody_but_the_callee_devices_hears_the_invite(calls, env):
    await invite(calls)
    assert {(u, d) for u, d, _ in env.all_events()} == {("bob", "phone"), ("bob", "laptop")}


async def test_ringing_from_a_callee_device_is_relayed_to_the_caller_device(calls, env):
    await invite(calls)
    await calls.ringing("bob", "laptop", {"call_id": "call-1"})
    assert env.take("alice", "a1") == [
        {"type": "call.ringing", "call_id": "call-1", "device": "laptop"}]
    assert env.take("alice", "a2") == []


async def test_an_offline_callee_gets_a_call_push_without_the_sdp(calls, env):
    env.online["bob"] = set()
    reply = await invite(calls)
    assert reply["state"] == "ringing"
    [(user, push)] = env.pushes
    assert user == "bob"
    assert push == {"type": "call.invite", "call_id": "call-1", "from": "alice",
                    "from_device": "a1", "media": AV, "expires_at": reply["expires_at"]}


async def test_a_device_connecting_while_the_invite_rings_gets_it_right_away(calls, env):
    env.online["bob"] = set()
    await invite(calls)
    env.connect("bob", "tablet")
    await calls.device_connected("bob", "tablet")
    [event] = env.take("bob", "tablet")
    assert event["type"] == "call.invite" and event["sdp"] == OFFER
    # and it can answer it
    await calls.accept("bob", "tablet", {"call_id": "call-1", "sdp": ANSWER})
    assert types(env.take("alice", "a1")) == ["call.accepted"]


async def test_a_device_connecting_after_the_call_ended_gets_no_invite(calls, env):
    await invite(calls)
    await calls.cancel("alice", "a1", {"call_id": "call-1"})
    env.connect("bob", "tablet")
    await calls.device_connected("bob", "tablet")
    assert env.take("bob", "tablet") == []


async def test_a_callee_device_dropping_while_ringing_does_not_end_the_call(calls, env):
    await invite(calls)
    env.disconnect("bob", "laptop")
    await calls.device_disconnected("bob", "laptop")
    await env.advance(30)
    assert the(calls, "call-1").state == "ringing"
    await calls.accept("bob", "phone", {"call_id": "call-1", "sdp": ANSWER})
    assert the(calls, "call-1").state == "connected"


# --- answering -------------------------------------------------------------------------------

async def test_the_first_accept_wins_and_the_other_devices_stop_ringing(calls, env):
    await invite(calls)
    env.take("bob", "phone"), env.take("bob", "laptop")
    reply = await calls.accept("bob", "laptop", {"call_id": "call-1", "sdp": ANSWER})
    assert reply == {"call_id": "call-1", "state": "connected"}
    assert env.take("alice", "a1") == [
        {"type": "call.accepted", "call_id": "call-1", "device": "laptop", "sdp": ANSWER}]
    assert env.take("bob", "phone") == [
        {"type": "call.ended", "call_id": "call-1", "reason": "answered_elsewhere"}]
    assert env.take("bob", "laptop") == []


async def test_a_second_accept_from_another_device_is_refused_and_changes_nothing(calls, env):
    await connected(calls, env)
    with pytest.raises(Conflict) as err:
        await calls.accept("bob", "laptop", {"call_id": "call-1", "sdp": ANSWER})
    assert err.value.details["reason"] == "answered_elsewhere"
    assert the(calls, "call-1").callee_device == "phone"
    assert env.all_events() == []


async def test_a_double_accept_from_the_same_device_is_refused(calls, env):
    await connected(calls, env)
    with pytest.raises(Conflict):
        await calls.accept("bob", "phone", {"call_id": "call-1", "sdp": ANSWER})
    assert the(calls, "call-1").state == "connected"
    assert env.all_events() == []


async def test_the_caller_cannot_accept_their_own_call(calls, env):
    await invite(calls)
    with pytest.raises(Forbidden):
        await calls.accept("alice", "a1", {"call_id": "call-1", "sdp": ANSWER})
    assert the(calls, "call-1").state == "ringing"


async def test_reject_from_any_callee_device_declines_for_everyone(calls, env):
    await invite(calls)
    env.take("bob", "phone"), env.take("bob", "laptop")
    reply = await calls.reject("bob", "phone", {"call_id": "call-1"})
    assert reply == {"call_id": "call-1", "state": "ended", "reason": "declined"}
    ended = {"type": "call.ended", "call_id": "call-1", "reason": "declined"}
    assert env.take("alice", "a1") == [ended]
    assert env.take("bob", "laptop") == [ended]
    assert env.take("bob", "phone") == []  # it has the reply
    [log] = env.logs
    assert (log.outcome, log.duration_s, log.caller, log.callee) == (
        "declined", 0, "alice", "bob")


async def test_reject_as_busy_is_logged_busy(calls, env):
    await invite(calls)
    await calls.reject("bob", "phone", {"call_id": "call-1", "reason": "busy"})
    assert env.take("alice", "a1")[-1]["reason"] == "busy"
    assert env.logs[0].outcome == "busy"


# --- busy, call waiting, glare ---------------------------------------------------------------

async def test_a_callee_already_in_a_call_is_busy(calls, env):
    await connected(calls, env)
    reply = await calls.invite("carol", "c1", {"call_id": "call-2", "to": {"user": "bob"},
                                               "media": AV, "sdp": OFFER})
    assert reply == {"call_id": "call-2", "state": "ended", "reason": "busy"}
    assert env.take("carol", "c1") == [
        {"type": "call.ended", "call_id": "call-2", "reason": "busy"}]
    assert env.take("bob", "phone") == [] and env.take("bob", "laptop") == []
    assert [(lg.call_id, lg.outcome) for lg in env.logs] == [("call-2", "busy")]
    assert the(calls, "call-1").state == "connected"


async def test_with_call_waiting_the_busy_callee_is_rung_and_told_it_is_waiting(env):
    calls = CallManager(env, CallSettings(call_waiting=True))
    await connected(calls, env)
    reply = await calls.invite("carol", "c1", {"call_id": "call-2", "to": {"user": "bob"},
                                               "media": AV, "sdp": OFFER})
    assert reply["state"] == "ringing"
    [event] = env.take("bob", "phone")
    assert event["type"] == "call.invite" and event["waiting"] is True


async def test_glare_keeps_the_call_with_the_smaller_id_when_it_came_second(calls, env):
    await invite(calls, "b-call", frm="alice", dev="a1", to="bob")
    reply = await calls.invite("bob", "phone", {"call_id": "a-call", "to": {"user": "alice"},
                                                "media": AV, "sdp": OFFER})
    assert reply == {"call_id": "a-call", "state": "ringing", "expires_at": reply["expires_at"]}
    assert the(calls, "b-call").state == "ended"
    # alice: her call was replaced, then bob's invite rings her devices
    a1 = env.take("alice", "a1")
    assert a1[0] == {"type": "call.ended", "call_id": "b-call", "reason": "cancelled",
                     "replaced_by": "a-call"}
    assert types(a1[1:]) == ["call.invite"]
    # bob's devices stop ringing for alice's call
    for device in ("phone", "laptop"):
        assert env.take("bob", device)[-1] == {
            "type": "call.ended", "call_id": "b-call", "reason": "cancelled",
            "replaced_by": "a-call"}
    assert [c.call_id for c in calls.live_calls_of("alice")] == ["a-call"]
    assert env.logs == []


async def test_glare_keeps_the_call_with_the_smaller_id_when_it_came_first(calls, env):
    await invite(calls, "a-call", frm="alice", dev="a1", to="bob")
    reply = await calls.invite("bob", "phone", {"call_id": "b-call", "to": {"user": "alice"},
                                                "media": AV, "sdp": OFFER})
    assert reply == {"call_id": "b-call", "state": "ended", "reason": "cancelled",
                     "replaced_by": "a-call"}
    lost = {"type": "call.ended", "call_id": "b-call", "reason": "cancelled",
            "replaced_by": "a-call"}
    assert env.take("alice", "a1") == [lost]
    assert env.take("bob", "phone")[-1] == lost
    # alice's devices were never rung for the lost call; bob still rings for alice's
    assert all(e["call_id"] == "a-call" for e in env.take("alice", "a2"))
    assert the(calls, "a-call").state == "ringing"
    assert [c.call_id for c in calls.live_calls_of("bob")] == ["a-call"]
    await calls.accept("bob", "phone", {"call_id": "a-call", "sdp": ANSWER})
    assert the(calls, "a-call").state == "connected"


async def test_glare_with_a_callee_busy_elsewhere_keeps_the_callees_call_ringing(calls, env):
    # bob, talking with carol, calls alice from his laptop; alice calls him back at once.
    # Her call is busy (bob is in a call): his must not be "replaced" by it and die too.
    await calls.invite("carol", "c1", {"call_id": "x-carol", "to": {"user": "bob"},
                                       "media": AV, "sdp": OFFER})
    await calls.accept("bob", "phone", {"call_id": "x-carol", "sdp": ANSWER})
    await calls.invite("bob", "laptop", {"call_id": "z-bob", "to": {"user": "alice"},
                                         "media": AV, "sdp": OFFER})
    env.inbox.clear()
    reply = await invite(calls, "a-alice", frm="alice", dev="a1", to="bob")
    assert reply == {"call_id": "a-alice", "state": "ended", "reason": "busy"}
    assert the(calls, "z-bob").state == "ringing"
    assert env.take("bob", "laptop") == []
    assert env.take("alice", "a1") == [
        {"type": "call.ended", "call_id": "a-alice", "reason": "busy"}]
    await calls.accept("alice", "a2", {"call_id": "z-bob", "sdp": ANSWER})
    assert the(calls, "z-bob").state == "connected"


# --- ending ----------------------------------------------------------------------------------

async def test_the_caller_cancels_and_every_rung_device_is_told(calls, env):
    await invite(calls)
    env.take("bob", "phone"), env.take("bob", "laptop")
    await calls.cancel("alice", "a1", {"call_id": "call-1"})
    for device in ("phone", "laptop"):
        assert env.take("bob", device) == [
            {"type": "call.ended", "call_id": "call-1", "reason": "cancelled"}]
    assert env.logs[0].outcome == "cancelled"


async def test_accept_after_cancel_is_refused_saying_so(calls, env):
    await invite(calls)
    await calls.cancel("alice", "a1", {"call_id": "call-1"})
    env.inbox.clear()
    with pytest.raises(Conflict) as err:
        await calls.accept("bob", "phone", {"call_id": "call-1", "sdp": ANSWER})
    assert err.value.details["reason"] == "cancelled"
    assert env.all_events() == [] and len(env.logs) == 1


async def test_reject_or_cancel_after_the_answer_says_the_call_is_connected(calls, env):
    # The app learns why it was refused (docs: "with reason or state") and can hang up.
    await connected(calls, env)
    with pytest.raises(Conflict) as rejected:
        await calls.reject("bob", "phone", {"call_id": "call-1"})
    with pytest.raises(Conflict) as cancelled:
        await calls.cancel("alice", "a1", {"call_id": "call-1"})
    assert rejected.value.details == cancelled.value.details == {"state": "connected"}
    assert the(calls, "call-1").state == "connected" and env.all_events() == []


async def test_an_unanswered_invite_times_out_as_missed_after_45_seconds(calls, env):
    await invite(calls)
    env.take("bob", "phone"), env.take("bob", "laptop")
    await env.advance(44.9)
    assert the(calls, "call-1").state == "ringing"
    await env.advance(0.2)
    timeout = {"type": "call.ended", "call_id": "call-1", "reason": "timeout"}
    assert env.take("alice", "a1") == [timeout]
    assert env.take("bob", "phone") == [timeout] and env.take("bob", "laptop") == [timeout]
    assert env.logs[0].outcome == "missed"


async def test_the_timeout_comes_from_the_settings(env):
    calls = CallManager(env, CallSettings(timeout=5))
    await invite(calls)
    await env.advance(5)
    assert the(calls, "call-1").end_reason == "timeout"


async def test_hangup_ends_a_connected_call_as_completed_with_its_duration(calls, env):
    await connected(calls, env)
    await env.advance(61.4)
    reply = await calls.hangup("bob", "phone", {"call_id": "call-1"})
    assert reply == {"call_id": "call-1", "state": "ended", "reason": "hangup"}
    assert env.take("alice", "a1") == [
        {"type": "call.ended", "call_id": "call-1", "reason": "hangup"}]
    assert env.take("bob", "laptop") == []  # it stopped taking part when phone answered
    [log] = env.logs
    assert (log.outcome, log.duration_s) == ("completed", 61)
    assert log.body() == {"call_id": "call-1", "media": AV, "outcome": "completed",
                          "duration_s": 61}


async def test_an_answered_call_does_not_time_out(calls, env):
    await connected(calls, env)
    await env.advance(300)
    assert the(calls, "call-1").state == "connected"


async def test_hangup_before_an_answer_is_a_cancel_from_the_caller(calls, env):
    await invite(calls)
    reply = await calls.hangup("alice", "a1", {"call_id": "call-1"})
    assert reply["reason"] == "cancelled"
    assert env.logs[0].outcome == "cancelled"


async def test_hangup_before_an_answer_is_a_decline_from_the_callee(calls, env):
    await invite(calls)
    reply = await calls.hangup("bob", "laptop", {"call_id": "call-1"})
    assert reply["reason"] == "declined"


async def test_calls_are_announced_when_they_ring_are_answered_and_end(calls, env):
    await connected(calls, env)
    await calls.hangup("alice", "a1", {"call_id": "call-1"})
    await calls.invite("carol", "c1", {"call_id": "call-2", "to": {"user": "alice"},
                                       "media": AV, "sdp": OFFER})
    await calls.cancel("carol", "c1", {"call_id": "call-2"})
    assert env.changes == [("call-1", "ringing"), ("call-1", "connected"), ("call-1", "ended"),
                           ("call-2", "ringing"), ("call-2", "ended")]


async def test_each_call_leaves_exactly_one_log(calls, env):
    await connected(calls, env)
    await calls.hangup("alice", "a1", {"call_id": "call-1"})
    with pytest.raises(Conflict):
        await calls.hangup("bob", "phone", {"call_id": "call-1"})
    await env.advance(100)
    assert len(env.logs) == 1


# --- disconnects -----------------------------------------------------------------------------

async def test_a_party_disconnecting_mid_call_fails_it_after_the_grace_period(calls, env):
    await connected(calls, env)
    await env.advance(10)
    env.disconnect("bob", "phone")
    await calls.device_disconnected("bob", "phone")
    await env.advance(19.9)
    assert the(calls, "call-1").state == "connected"
    await env.advance(0.2)
    assert env.take("alice", "a1") == [
        {"type": "call.ended", "call_id": "call-1", "reason": "failed"}]
    [log] = env.logs
    assert (log.outcome, log.duration_s) == ("failed", 10)


async def test_a_party_that_reconnects_and_resumes_keeps_the_call(calls, env):
    await connected(calls, env)
    env.disconnect("alice", "a1")
    await calls.device_disconnected("alice", "a1")
    # bob keeps trickling while alice is away: held for her
    await calls.ice("bob", "phone", {"call_id": "call-1", "candidate": cand(7)})
    await env.advance(15)
    env.connect("alice", "a1")
    await calls.device_connected("alice", "a1")
    reply = await calls.resume("alice", "a1", {"call_id": "call-1"})
    assert reply == {"call_id": "call-1", "state": "connected", "media": AV,
                     "peer": {"user": "bob", "device": "phone"}}
    assert env.take("alice", "a1") == [
        {"type": "call.ice", "call_id": "call-1", "from_device": "phone", "candidate": cand(7)}]
    await env.advance(60)
    assert the(calls, "call-1").state == "connected"


async def test_an_ice_restart_offer_from_a_returning_device_resumes_it(calls, env):
    await connected(calls, env)
    env.disconnect("alice", "a1")
    await calls.device_disconnected("alice", "a1")
    env.connect("alice", "a1")
    await calls.sdp("alice", "a1", {"call_id": "call-1", "sdp": OFFER})
    assert types(env.take("bob", "phone")) == ["call.sdp"]
    await env.advance(60)
    assert the(calls, "call-1").state == "connected"


async def test_a_disconnect_of_a_device_that_already_reconnected_is_ignored(calls, env):
    await connected(calls, env)
    # the old session's close is noticed after the same device came back on a new one
    await calls.device_disconnected("bob", "phone")
    await env.advance(60)
    assert the(calls, "call-1").state == "connected"


async def test_the_caller_dropping_while_it_rings_fails_the_call_after_grace(calls, env):
    await invite(calls)
    env.disconnect("alice", "a1")
    await calls.device_disconnected("alice", "a1")
    await env.advance(20)
    assert the(calls, "call-1").end_reason == "failed"
    assert env.take("bob", "phone")[-1] == {
        "type": "call.ended", "call_id": "call-1", "reason": "failed"}
    assert env.logs[0].outcome == "failed"


async def test_a_caller_dropping_while_its_invite_is_checked_fails_the_call_after_grace(
        calls, env):
    # The connection closes while the invite waits on the store (may alice call bob?):
    # the call starts ringing after the disconnect was noticed, and must still notice it.
    env.slow_checks = 5
    pending = asyncio.create_task(invite(calls))
    await asyncio.sleep(0)
    env.disconnect("alice", "a1")
    await calls.device_disconnected("alice", "a1")
    assert (await pending)["state"] == "ringing"
    await calls.accept("bob", "phone", {"call_id": "call-1", "sdp": ANSWER})
    env.take("bob", "phone")
    await env.advance(20)
    assert the(calls, "call-1").end_reason == "failed"
    assert env.take("bob", "phone") == [
        {"type": "call.ended", "call_id": "call-1", "reason": "failed"}]
    assert [(lg.outcome, lg.duration_s) for lg in env.logs] == [("failed", 0)]


async def test_resume_after_the_grace_period_is_refused(calls, env):
    await connected(calls, env)
    env.disconnect("alice", "a1")
    await calls.device_disconnected("alice", "a1")
    await env.advance(21)
    env.connect("alice", "a1")
    with pytest.raises(Conflict) as err:
        await calls.resume("alice", "a1", {"call_id": "call-1"})
    assert err.value.details["reason"] == "failed"


async def test_shutting_down_ends_live_calls_failed_and_logs_them(calls, env):
    await connected(calls, env)
    await calls.invite("carol", "c1", {"call_id": "call-2", "to": {"user": "alice"},
                                       "media": AV, "sdp": OFFER})  # busy: already logged
    await env.advance(30)
    await calls.close()
    assert the(calls, "call-1").end_reason == "failed"
    assert [(lg.call_id, lg.outcome, lg.duration_s) for lg in env.logs] == [
        ("call-2", "busy", 0), ("call-1", "failed", 30)]
    assert [t for t in env.timers if not t.cancelled] == []


# --- handing calls over to another node ------------------------------------------------------

def over_the_wire(snapshots: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Snapshots as another node reads them back from Redis."""
    return [json.loads(json.dumps(s)) for s in snapshots]


@pytest.fixture
def other(env: RecordingEnv) -> CallManager:
    """The call manager of a second node in the same world (same devices, same clock)."""
    return CallManager(env, CallSettings(timeout=45, grace=20))


async def hand_over(calls: CallManager, other: CallManager) -> list[Call]:
    """``calls``' node stops and ``other`` takes over whatever it offers."""
    async def to_other(snapshots: list[dict[str, Any]]) -> list[str]:
        return await other.adopt(over_the_wire(snapshots))

    return await calls.close(hand_over=to_other)


async def test_a_ringing_call_handed_over_is_forgotten_silently_by_the_stopping_node(
        calls, other, env):
    await invite(calls)
    env.take("bob", "phone"), env.take("bob", "laptop")
    assert await hand_over(calls, other) == []
    assert calls.get("call-1") is None and the(other, "call-1").state == "ringing"
    assert env.all_events() == [] and env.logs == []
    assert len([t for t in env.timers if not t.cancelled]) == 1  # the new node's ring timer


async def test_a_handed_over_call_rings_until_its_original_deadline(calls, other, env):
    reply = await invite(calls)
    await env.advance(30)
    await hand_over(calls, other)
    assert the(other, "call-1").summary()["expires_at"] == reply["expires_at"]
    await env.advance(14.9)
    assert the(other, "call-1").state == "ringing"
    await env.advance(0.2)
    assert the(other, "call-1").end_reason == "timeout"
    assert [(lg.call_id, lg.outcome) for lg in env.logs] == [("call-1", "missed")]


async def test_a_handed_over_call_answered_delivers_the_candidates_buffered_before(
        calls, other, env):
    await invite(calls)
    await calls.ice("alice", "a1", {"call_id": "call-1", "candidate": cand(1)})
    env.take("bob", "phone"), env.take("bob", "laptop")
    await hand_over(calls, other)
    await other.accept("bob", "laptop", {"call_id": "call-1", "sdp": ANSWER})
    assert types(env.take("alice", "a1")) == ["call.accepted"]
    assert [e.get("candidate") for e in env.take("bob", "laptop")] == [cand(1)]
    assert types(env.take("bob", "phone")) == ["call.ended"]  # answered elsewhere


async def test_a_handed_over_call_keeps_what_was_held_for_an_away_device(calls, other, env):
    await connected(calls, env)
    env.disconnect("alice", "a1")
    await calls.device_disconnected("alice", "a1")
    await calls.sdp("bob", "phone", {"call_id": "call-1", "sdp": OFFER})
    await hand_over(calls, other)
    env.connect("alice", "a1")
    reply = await other.resume("alice", "a1", {"call_id": "call-1"})
    assert reply["state"] == "connected"
    assert [(e["type"], e["sdp"]) for e in env.take("alice", "a1")] == [("call.sdp", OFFER)]


async def test_a_handed_over_call_fails_when_the_away_device_s_first_grace_period_ends(
        calls, other, env):
    await connected(calls, env)
    env.disconnect("alice", "a1")
    await calls.device_disconnected("alice", "a1")
    await env.advance(15)
    await hand_over(calls, other)
    await env.advance(4.9)
    assert the(other, "call-1").state == "connected"
    await env.advance(0.2)
    assert the(other, "call-1").end_reason == "failed"
    assert [(lg.outcome, lg.duration_s) for lg in env.logs] == [("failed", 0)]


async def test_a_call_taken_over_past_its_deadline_ends_missed_before_any_answer(
        calls, other, env):
    await invite(calls)
    snapshot = over_the_wire([the(calls, "call-1").snapshot()])  # its record
    for timer in env.timers:
        timer.cancel()  # its node died, timers and all
    await env.advance(46)
    await other.adopt(snapshot)
    with pytest.raises(Conflict) as err:
        await other.accept("bob", "phone", {"call_id": "call-1", "sdp": ANSWER})
    assert err.value.details["reason"] == "timeout"
    assert [lg.outcome for lg in env.logs] == ["missed"]


async def test_a_stopping_node_with_nobody_to_take_its_calls_keeps_connected_ones_only(
        calls, other, env):
    await connected(calls, env)
    await invite(calls, "call-2", frm="carol", dev="c1", to="dave")

    async def nobody(snapshots: list[dict[str, Any]]) -> list[str]:
        return []

    kept = await calls.close(hand_over=nobody)
    assert [c.call_id for c in kept] == ["call-1"]
    assert the(calls, "call-1").state == "connected"
    assert [(lg.call_id, lg.outcome) for lg in env.logs] == [("call-2", "failed")]


# --- trickle ICE and renegotiation -----------------------------------------------------------

async def test_caller_candidates_before_the_answer_go_to_the_answering_device_only(calls, env):
    await invite(calls)
    for n in (1, 2):
        await calls.ice("alice", "a1", {"call_id": "call-1", "candidate": cand(n)})
    await calls.ice("alice", "a1", {"call_id": "call-1", "candidate": None})
    env.take("bob", "phone"), env.take("bob", "laptop")
    await calls.accept("bob", "laptop", {"call_id": "call-1", "sdp": ANSWER})
    assert env.take("bob", "laptop") == [
        {"type": "call.ice", "call_id": "call-1", "from_device": "a1", "candidate": c}
        for c in (cand(1), cand(2), None)]
    assert types(env.take("bob", "phone")) == ["call.ended"]


async def test_candidates_after_the_answer_reach_only_the_other_partys_chosen_device(calls, env):
    await connected(calls, env)
    await calls.ice("alice", "a1", {"call_id": "call-1", "candidate": cand(3)})
    await calls.ice("bob", "phone", {"call_id": "call-1", "candidate": cand(4)})
    assert env.take("bob", "phone") == [
        {"type": "call.ice", "call_id": "call-1", "from_device": "a1", "candidate": cand(3)}]
    assert env.take("alice", "a1") == [
        {"type": "call.ice", "call_id": "call-1", "from_device": "phone", "candidate": cand(4)}]
    assert env.all_events() == []


async def test_candidates_sent_right_behind_the_invite_wait_for_it(calls, env):
    # The gateway runs one connection's requests as concurrent tasks in arrival order.
    env.slow_checks = 5
    results = await asyncio.gather(
        invite(calls),
        calls.ice("alice", "a1", {"call_id": "call-1", "candidate": cand(1)}),
        calls.ice("alice", "a1", {"call_id": "call-1", "candidate": cand(2)}),
    )
    assert results[0]["state"] == "ringing"
    await calls.accept("bob", "phone", {"call_id": "call-1", "sdp": ANSWER})
    assert [e["candidate"] for e in env.take("bob", "phone") if e["type"] == "call.ice"] == [
        cand(1), cand(2)]


async def test_callee_candidates_before_accepting_are_refused(calls, env):
    await invite(calls)
    env.inbox.clear()
    with pytest.raises(Conflict):
        await calls.ice("bob", "phone", {"call_id": "call-1", "candidate": cand(1)})
    assert env.all_events() == []


async def test_renegotiation_is_relayed_mid_call(calls, env):
    await connected(calls, env)
    await calls.sdp("bob", "phone", {"call_id": "call-1", "sdp": OFFER})
    await calls.sdp("alice", "a1", {"call_id": "call-1", "sdp": ANSWER})
    assert env.take("alice", "a1") == [
        {"type": "call.sdp", "call_id": "call-1", "from_device": "phone", "sdp": OFFER}]
    assert env.take("bob", "phone") == [
        {"type": "call.sdp", "call_id": "call-1", "from_device": "a1", "sdp": ANSWER}]


async def test_renegotiation_before_the_answer_is_refused(calls, env):
    await invite(calls)
    with pytest.raises(Conflict):
        await calls.sdp("alice", "a1", {"call_id": "call-1", "sdp": OFFER})


async def test_ice_for_an_ended_call_is_refused(calls, env):
    await connected(calls, env)
    await calls.hangup("alice", "a1", {"call_id": "call-1"})
    env.inbox.clear()
    with pytest.raises(Conflict):
        await calls.ice("bob", "phone", {"call_id": "call-1", "candidate": cand(1)})
    assert env.all_events() == []


# --- authorization ---------------------------------------------------------------------------

@pytest.mark.parametrize("op,extra", [
    ("ringing", {}), ("accept", {"sdp": ANSWER}), ("reject", {}), ("cancel", {}),
    ("hangup", {}), ("ice", {"candidate": cand(1)}), ("sdp", {"sdp": OFFER}), ("resume", {}),
])
async def test_a_third_user_learns_nothing_about_someone_elses_call(calls, env, op, extra):
    await invite(calls)
    env.inbox.clear()
    with pytest.raises(NotFound) as theirs:
        await getattr(calls, op)("carol", "c1", {"call_id": "call-1", **extra})
    with pytest.raises(NotFound) as unknown:
        await getattr(calls, op)("carol", "c1", {"call_id": "no-such-call", **extra})
    assert theirs.value.to_wire() == unknown.value.to_wire() == {
        "code": "not_found", "message": "no such call", "field": "call_id"}
    assert env.all_events() == []
    assert the(calls, "call-1").state == "ringing"


async def test_the_callers_other_devices_hear_nothing_and_cannot_act(calls, env):
    await connected(calls, env)
    await calls.ice("bob", "phone", {"call_id": "call-1", "candidate": cand(1)})
    assert env.take("alice", "a2") == []
    with pytest.raises(Conflict):
        await calls.hangup("alice", "a2", {"call_id": "call-1"})
    assert the(calls, "call-1").state == "connected"


async def test_an_invite_that_fails_midway_leaves_nobody_in_a_call(calls, env):
    env.presence_down = True
    with pytest.raises(ConnectionError):
        await invite(calls)
    assert not calls.in_call("alice") and not calls.in_call("bob")
    env.presence_down = False
    assert (await invite(calls, "call-2"))["state"] == "ringing"


async def test_a_blocked_user_cannot_call(calls, env):
    env.blocks.add(("bob", "alice"))
    with pytest.raises(Forbidden):
        await invite(calls)
    assert env.all_events() == [] and calls.get("call-1") is None


async def test_the_same_invite_again_from_the_same_device_rings_nobody_twice(calls, env):
    # a client that lost its connection before the reply retries its invite
    await invite(calls)
    env.disconnect("alice", "a1")
    await calls.device_disconnected("alice", "a1")
    await calls.ringing("bob", "phone", {"call_id": "call-1"})
    env.connect("alice", "a1")
    env.inbox.clear()
    reply = await invite(calls)
    assert reply["state"] == "ringing"
    assert env.take("alice", "a1") == [
        {"type": "call.ringing", "call_id": "call-1", "device": "phone"}]  # held while away
    assert env.all_events() == []
    await env.advance(30)
    assert the(calls, "call-1").state == "ringing"  # resumed: the grace timer is off


async def test_an_invite_retried_while_the_first_is_still_checked_says_it_rings(calls, env):
    # The retry (after a lost connection) overtakes nothing: it waits for the first invite
    # and answers where the call stands instead of calling its own call_id taken.
    env.slow_checks = 5
    first, retry = await asyncio.gather(invite(calls), invite(calls))
    assert first["state"] == retry["state"] == "ringing"
    assert retry == first
    assert types(env.take("bob", "phone")) == ["call.invite"]  # rung once


async def test_a_reused_call_id_is_a_conflict(calls, env):
    await invite(calls)
    with pytest.raises(Conflict):
        await calls.invite("carol", "c1", {"call_id": "call-1", "to": {"user": "alice"},
                                           "media": AV, "sdp": OFFER})
    assert the(calls, "call-1").caller == "alice"


async def test_an_ended_call_is_forgotten_after_a_while(calls, env):
    await invite(calls)
    await calls.cancel("alice", "a1", {"call_id": "call-1"})
    await env.advance(121)
    with pytest.raises(NotFound):
        await calls.accept("bob", "phone", {"call_id": "call-1", "sdp": ANSWER})


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("sdp", [
    None, "v=0", {"type": "offer"}, {"type": "offer", "sdp": "hello"},
    {"type": "answer", "sdp": OFFER["sdp"]}, {"type": "offer", "sdp": 5},
    {"type": "offer", "sdp": "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\n"},  # no m= line
    {"type": "offer", "sdp": "x" * 70_000},
])
async def test_an_invite_with_an_invalid_offer_is_a_bad_request(calls, env, sdp):
    with pytest.raises(BadRequest):
        await calls.invite("alice", "a1", {"call_id": "call-1", "to": {"user": "bob"},
                                           "media": AV, "sdp": sdp})
    assert calls.get("call-1") is None and env.all_events() == []


@pytest.mark.parametrize("req", [
    {"to": {"user": "bob"}, "media": AV, "sdp": OFFER},
    {"call_id": "", "to": {"user": "bob"}, "media": AV, "sdp": OFFER},
    {"call_id": "has space", "to": {"user": "bob"}, "media": AV, "sdp": OFFER},
    {"call_id": "c", "to": "bob", "media": AV, "sdp": OFFER},
    {"call_id": "c", "to": {"user": "alice"}, "media": AV, "sdp": OFFER},
    {"call_id": "c", "to": {"user": "bob"}, "media": {"audio": False}, "sdp": OFFER},
    {"call_id": "c", "to": {"user": "bob"}, "media": {"audio": "yes"}, "sdp": OFFER},
])
async def test_malformed_invites_are_bad_requests(calls, env, req):
    with pytest.raises(BadRequest):
        await calls.invite("alice", "a1", req)
    assert env.all_events() == [] and not calls.in_call("alice")


async def test_an_accept_with_an_invalid_answer_leaves_the_call_ringing(calls, env):
    await invite(calls)
    env.inbox.clear()
    with pytest.raises(BadRequest):
        await calls.accept("bob", "phone", {"call_id": "call-1", "sdp": {"type": "answer",
                                                                         "sdp": "garbage"}})
    assert the(calls, "call-1").state == "ringing" and env.all_events() == []


@pytest.mark.parametrize("candidate", [
    "candidate:1 1 udp 1 127.0.0.1 9 typ host", {"candidate": 5, "sdpMid": "0"},
    {"candidate": "nonsense", "sdpMid": "0"}, {"candidate": "candidate:1 1 udp"},
    {"candidate": "candidate:1", "sdpMid": "0", "sdpMLineIndex": "zero"},
])
async def test_malformed_candidates_are_bad_requests(calls, env, candidate):
    await connected(calls, env)
    with pytest.raises(BadRequest):
        await calls.ice("alice", "a1", {"call_id": "call-1", "candidate": candidate})
    assert env.all_events() == []


async def test_an_ice_request_without_a_candidate_field_is_a_bad_request(calls, env):
    await connected(calls, env)
    with pytest.raises(BadRequest):
        await calls.ice("alice", "a1", {"call_id": "call-1"})


async def test_unknown_call_ids_are_not_found(calls, env):
    with pytest.raises(NotFound):
        await calls.hangup("alice", "a1", {"call_id": "never-was"})


async def test_null_for_an_optional_field_counts_as_left_out(calls, env):
    # As everywhere in the protocol (opt_str, opt_bool): a client that sends null for a
    # field it leaves out can still place a call without video and decline one.
    reply = await calls.invite("alice", "a1", {
        "call_id": "call-1", "to": {"user": "bob"}, "media": {"audio": True, "video": None},
        "sdp": OFFER, "via": None})
    assert reply["state"] == "ringing"
    assert the(calls, "call-1").media == {"audio": True, "video": False}
    reply = await calls.reject("bob", "phone", {"call_id": "call-1", "reason": None})
    assert reply == {"call_id": "call-1", "state": "ended", "reason": "declined"}


async def test_a_bad_reject_reason_is_a_bad_request(calls, env):
    await invite(calls)
    with pytest.raises(BadRequest):
        await calls.reject("bob", "phone", {"call_id": "call-1", "reason": "because"})
    assert the(calls, "call-1").state == "ringing"
