"""1:1 call signaling through a real talkbridge server process (WebSocket on 127.0.0.1).

No media here: the SDP and candidates are well-formed text; tests/calls/test_call_e2e.py
places real aiortc calls.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from signaling.client import ClientError
from tests.calls.server import RunningServer, run_talkbridge
from tests.calls.wire import ANSWER, AUDIO, OFFER, cand, connect


class Webhook:
    """A push webhook receiver on 127.0.0.1 that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", "0"))
                bodies.append(json.loads(self.rfile.read(n)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/push"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with run_talkbridge(tmp_path_factory.mktemp("tb")) as srv:
        yield srv


@pytest.fixture(scope="module")
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    try:
        yield hook
    finally:
        hook.close()


@pytest.fixture(scope="module")
def fast_server(tmp_path_factory: pytest.TempPathFactory, webhook: Webhook
                ) -> Iterator[RunningServer]:
    """Short ring timeout and grace period, a push webhook, and TURN configured."""
    with run_talkbridge(tmp_path_factory.mktemp("tb-fast"), call_timeout="1.5",
                        call_grace="1.0", push_webhook=webhook.url,
                        turn_urls="turn:127.0.0.1:3478", turn_secret="k", turn_ttl="600",
                        stun_urls="stun:127.0.0.1:3478") as srv:
        yield srv


def new_id() -> str:
    return uuid.uuid4().hex


async def invite(client: Any, call_id: str, to: str, **extra: Any) -> dict[str, Any]:
    return dict(await client.request("call.invite", call_id=call_id, to={"user": to},
                                     media=AUDIO, sdp=OFFER, **extra))


async def call_logs(client: Any, peer: str) -> list[dict[str, Any]]:
    conv = "dm:" + ":".join(sorted((client.user, peer)))
    page = await client.request("msg.history", conv=conv, limit=100)
    return [m for m in page["messages"] if m["kind"] == "call"]


async def test_a_whole_call_over_the_wire_leaves_a_completed_log_for_both(server):
    alice_name, bob_name = f"alice-{new_id()[:6]}", f"bob-{new_id()[:6]}"
    async with connect(server.ws_url, server.token(alice_name), "a1") as (alice, a_in), \
            connect(server.ws_url, server.token(bob_name), "phone") as (bob, b_in), \
            connect(server.ws_url, server.token(bob_name), "laptop") as (_, l_in):
        cid = new_id()
        reply = await invite(alice, cid, bob_name)
        assert reply["state"] == "ringing"
        await alice.request("call.ice", call_id=cid, candidate=cand(1))  # before the answer
        for inbox in (b_in, l_in):
            ev = await inbox.wait("call.invite")
            assert (ev["call_id"], ev["from"], ev["from_device"], ev["sdp"]) == (
                cid, alice_name, "a1", OFFER)
        await bob.request("call.ringing", call_id=cid)
        assert (await a_in.wait("call.ringing"))["device"] == "phone"
        await bob.request("call.accept", call_id=cid, sdp=ANSWER)
        accepted = await a_in.wait("call.accepted")
        assert (accepted["device"], accepted["sdp"]) == ("phone", ANSWER)
        assert (await l_in.wait("call.ended"))["reason"] == "answered_elsewhere"
        early = await b_in.wait("call.ice")
        assert (early["from_device"], early["candidate"]) == ("a1", cand(1))
        await bob.request("call.ice", call_id=cid, candidate=cand(2))
        got = await a_in.wait("call.ice")
        assert (got["from_device"], got["candidate"]) == ("phone", cand(2))
        await bob.request("call.sdp", call_id=cid, sdp=OFFER)
        assert (await a_in.wait("call.sdp"))["sdp"] == OFFER
        await alice.request("call.hangup", call_id=cid)
        assert (await b_in.wait("call.ended"))["reason"] == "hangup"
        [log] = await call_logs(alice, bob_name)
        assert log["body"] == {"call_id": cid, "media": AUDIO, "outcome": "completed",
                               "duration_s": 0}
        assert log["from"] == alice_name
        assert await call_logs(bob, alice_name) == [log]
        new = await b_in.wait("msg.new", lambda e: e["kind"] == "call")
        assert new["seq"] == log["seq"]
        # the laptop stopped taking part at the answer: it never saw candidates or the SDP
        assert [e["type"] for e in l_in.of("call.")] == ["call.invite", "call.ended"]


async def test_a_second_accept_gets_a_conflict_reply_and_the_call_stays_up(server):
    bob_name = f"bob-{new_id()[:6]}"
    async with connect(server.ws_url, server.token("alice"), "a1") as (alice, a_in), \
            connect(server.ws_url, server.token(bob_name), "phone") as (phone, _), \
            connect(server.ws_url, server.token(bob_name), "laptop") as (laptop, _):
        cid = new_id()
        await invite(alice, cid, bob_name)
        await phone.request("call.accept", call_id=cid, sdp=ANSWER)
        with pytest.raises(ClientError) as err:
            await laptop.request("call.accept", call_id=cid, sdp=ANSWER)
        assert err.value.code == "conflict"
        await phone.request("call.ice", call_id=cid, candidate=cand(3))
        assert (await a_in.wait("call.ice"))["from_device"] == "phone"
        await alice.request("call.hangup", call_id=cid)


async def test_a_blocked_user_gets_forbidden_and_the_blocker_hears_nothing(server):
    a, b = f"alice-{new_id()[:6]}", f"bob-{new_id()[:6]}"
    async with connect(server.ws_url, server.token(a), "a1") as (alice, _), \
            connect(server.ws_url, server.token(b), "b1") as (bob, b_in):
        await bob.request("block.add", user=a)
        with pytest.raises(ClientError) as err:
            await invite(alice, new_id(), b)
        assert err.value.code == "forbidden"
        await asyncio.sleep(0.2)
        assert b_in.of("call.") == []
        assert await call_logs(bob, a) == []


async def test_a_third_user_gets_not_found_and_hears_nothing(server):
    b = f"bob-{new_id()[:6]}"
    async with connect(server.ws_url, server.token("alice"), "a1") as (alice, _), \
            connect(server.ws_url, server.token(b), "b1") as (bob, _), \
            connect(server.ws_url, server.token("carol"), "c1") as (carol, c_in):
        cid = new_id()
        await invite(alice, cid, b)
        await bob.request("call.accept", call_id=cid, sdp=ANSWER)
        attempts: list[tuple[str, dict[str, Any]]] = [
            ("call.hangup", {}), ("call.ice", {"candidate": cand(1)}),
            ("call.accept", {"sdp": ANSWER}), ("call.sdp", {"sdp": OFFER})]
        for op, extra in attempts:
            with pytest.raises(ClientError) as err:
                await carol.request(op, call_id=cid, **extra)
            assert (err.value.code, err.value.message) == ("not_found", "no such call")
        await alice.request("call.ice", call_id=cid, candidate=cand(2))
        await alice.request("call.hangup", call_id=cid)
        await asyncio.sleep(0.2)
        assert c_in.of("call.") == []


async def test_invalid_sdp_is_a_bad_request_and_the_connection_stays_up(server):
    async with connect(server.ws_url, server.token("alice"), "a1") as (alice, _):
        with pytest.raises(ClientError) as err:
            await alice.request("call.invite", call_id=new_id(), to={"user": "bob"},
                                media=AUDIO, sdp={"type": "offer", "sdp": "not sdp"})
        assert err.value.code == "bad_request"
        with pytest.raises(ClientError) as err:
            await alice.request("call.hangup", call_id="no-such-call")
        assert err.value.code == "not_found"
        assert (await alice.request("conv.list"))["conversations"] is not None


async def test_an_offline_callee_gets_a_call_push_then_the_invite_right_after_auth_ok(
        fast_server, webhook):
    b = f"bob-{new_id()[:6]}"
    async with connect(fast_server.ws_url, fast_server.token("alice"), "a1") as (alice, a_in):
        cid = new_id()
        await invite(alice, cid, b)
        for _ in range(500):  # the webhook is POSTed by a background task: up to 10 s
            pushes = [p for p in webhook.bodies if p["user"] == b]
            if pushes:
                break
            await asyncio.sleep(0.02)
        [push] = pushes
        assert push["kind"] == "call" and push["sender"] == "alice"
        assert push["data"]["call_id"] == cid and "sdp" not in push["data"]
        # bob's app wakes up on the push and connects: the invite comes right after auth.ok
        async with connect(fast_server.ws_url, fast_server.token(b), "phone") as (bob, b_in):
            first = await b_in.wait("call.invite")
            assert b_in.events[0] is first and first["call_id"] == cid
            await bob.request("call.accept", call_id=cid, sdp=ANSWER)
            assert (await a_in.wait("call.accepted"))["device"] == "phone"
            await bob.request("call.hangup", call_id=cid)


async def test_an_unanswered_call_times_out_and_is_logged_missed(fast_server):
    b = f"bob-{new_id()[:6]}"
    async with connect(fast_server.ws_url, fast_server.token("alice"), "a1") as (alice, a_in), \
            connect(fast_server.ws_url, fast_server.token(b), "b1") as (bob, b_in):
        cid = new_id()
        await invite(alice, cid, b)
        assert (await a_in.wait("call.ended", timeout=5))["reason"] == "timeout"
        assert (await b_in.wait("call.ended"))["reason"] == "timeout"
        await b_in.wait("msg.new")
        [log] = await call_logs(bob, "alice")
        assert log["body"]["outcome"] == "missed"


async def test_a_party_that_drops_mid_call_ends_it_failed_after_the_grace_period(fast_server):
    b = f"bob-{new_id()[:6]}"
    async with connect(fast_server.ws_url, fast_server.token("alice"), "a1") as (alice, a_in):
        cid = new_id()
        async with connect(fast_server.ws_url, fast_server.token(b), "b1") as (bob, _):
            await invite(alice, cid, b)
            await bob.request("call.accept", call_id=cid, sdp=ANSWER)
        # bob's connection is gone
        ended = await a_in.wait("call.ended", timeout=5)
        assert ended["reason"] == "failed"
        await a_in.wait("msg.new")
        [log] = await call_logs(alice, b)
        assert log["body"]["outcome"] == "failed"


async def test_a_device_that_reconnects_within_the_grace_period_resumes_the_call(server):
    b = f"bob-{new_id()[:6]}"
    async with connect(server.ws_url, server.token("alice"), "a1") as (alice, a_in):
        cid = new_id()
        async with connect(server.ws_url, server.token(b), "b1") as (bob, _):
            await invite(alice, cid, b)
            await bob.request("call.accept", call_id=cid, sdp=ANSWER)
        async with connect(server.ws_url, server.token(b), "b1") as (bob, b_in):
            # Before the resume: held for bob's device, or (if the server had not yet seen
            # the old connection go) sent to it straight away. Holding itself is unit-tested.
            await alice.request("call.ice", call_id=cid, candidate=cand(5))
            state = await bob.request("call.resume", call_id=cid)
            assert state["state"] == "connected"
            assert state["peer"] == {"user": "alice", "device": "a1"}
            assert (await b_in.wait("call.ice"))["candidate"] == cand(5)
            await bob.request("call.hangup", call_id=cid)
        assert (await a_in.wait("call.ended"))["reason"] == "hangup"


async def test_glare_leaves_one_call_and_nobody_ringing(server):
    a, b = f"alice-{new_id()[:6]}", f"bob-{new_id()[:6]}"
    async with connect(server.ws_url, server.token(a), "a1") as (alice, a_in), \
            connect(server.ws_url, server.token(b), "b1") as (bob, b_in):
        small, big = sorted([new_id(), new_id()])
        replies = await asyncio.gather(invite(alice, big, b), invite(bob, small, a))
        assert replies[1]["state"] == "ringing"
        assert (await b_in.wait("call.ended", lambda e: e["call_id"] == big))["replaced_by"] \
            == small
        assert (await a_in.wait("call.ended", lambda e: e["call_id"] == big))["replaced_by"] \
            == small
        await a_in.wait("call.invite", lambda e: e["call_id"] == small)
        await alice.request("call.accept", call_id=small, sdp=ANSWER)
        await b_in.wait("call.accepted")
        await alice.request("call.hangup", call_id=small)
        logs = await call_logs(alice, b)
        assert [lg["body"]["call_id"] for lg in logs] == [small]


async def test_auth_ok_and_the_http_endpoint_carry_the_configured_ice_servers(fast_server):
    async with connect(fast_server.ws_url, fast_server.token("alice"), "a1") as (alice, _):
        stun, turn = alice.auth_ok["ice_servers"]
    assert stun == {"urls": ["stun:127.0.0.1:3478"]}
    assert turn["urls"] == ["turn:127.0.0.1:3478"]
    assert turn["username"].endswith(":alice")
    req = urllib.request.Request(f"{fast_server.http_url}/api/ice-servers",
                                 headers={"Authorization": f"Bearer {fast_server.token('bob')}"})
    body = await asyncio.to_thread(lambda: json.loads(urllib.request.urlopen(req).read()))
    assert body["ttl"] == 600
    assert body["ice_servers"][1]["username"].endswith(":bob")


def test_no_ice_servers_are_handed_out_by_default(server: RunningServer, tmp_path: Path):
    req = urllib.request.Request(f"{server.http_url}/api/ice-servers",
                                 headers={"Authorization": f"Bearer {server.token('bob')}"})
    with urllib.request.urlopen(req) as resp:
        assert json.loads(resp.read())["ice_servers"] == []


async def test_metrics_count_ended_calls_by_outcome_and_live_calls(server):
    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(f"{server.http_url}/metrics") as resp:
            text = resp.read().decode()
        return {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines()
                if ln.startswith("talkbridge_calls_")}

    b = f"bob-{new_id()[:6]}"
    before = await asyncio.to_thread(scrape)
    async with connect(server.ws_url, server.token("alice"), "a1") as (alice, _), \
            connect(server.ws_url, server.token(b), "b1") as (bob, _):
        cid = new_id()
        await invite(alice, cid, b)
        await bob.request("call.accept", call_id=cid, sdp=ANSWER)
        during = await asyncio.to_thread(scrape)
        await alice.request("call.hangup", call_id=cid)
    after = await asyncio.to_thread(scrape)
    completed = 'talkbridge_calls_ended_total{outcome="completed"}'
    assert during["talkbridge_calls_live"] == before["talkbridge_calls_live"] + 1
    assert after["talkbridge_calls_live"] == before["talkbridge_calls_live"]
    assert after[completed] == before.get(completed, 0) + 1


async def test_a_call_up_when_the_server_stops_is_logged_failed(tmp_path: Path):
    with run_talkbridge(tmp_path) as srv:
        async with connect(srv.ws_url, srv.token("alice"), "a1") as (alice, _), \
                connect(srv.ws_url, srv.token("bob"), "b1") as (bob, _):
            await invite(alice, "up-at-shutdown", "bob")
            await bob.request("call.accept", call_id="up-at-shutdown", sdp=ANSWER)
    # the with block stopped the server (SIGTERM) while the call was still connected
    with run_talkbridge(tmp_path) as srv:
        async with connect(srv.ws_url, srv.token("alice"), "a1") as (alice, _):
            [log] = await call_logs(alice, "bob")
    assert log["body"]["call_id"] == "up-at-shutdown"
    assert log["body"]["outcome"] == "failed"
