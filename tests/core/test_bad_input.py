"""Bad input gets the protocol's error frame, the connection stays, nothing stored changes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signaling.client import Client, ClientError
from tests.support import Node, start_node


async def _still_works(c: Client) -> None:
    assert (await c.request("conv.list"))["conversations"] is not None


async def _stored(c: Client) -> list[dict]:
    return (await c.request("msg.history", conv="dm:alice:bob"))["messages"]


@pytest.mark.parametrize(
    "raw, code",
    [
        ("{not json", "bad_request"),
        ("[1, 2, 3]", "bad_request"),
        ('"just a string"', "bad_request"),
        ('{"no_type": 1}', "bad_request"),
        ('{"type": 42, "id": "x"}', "bad_request"),
        ('{"type": "msg.send"}', "bad_request"),  # no id
        ('{"type": "msg.send", "id": true}', "bad_request"),
        ('{"type": "msg.send", "id": ""}', "bad_request"),
    ],
)
async def test_unparseable_or_id_less_frames_get_error_frame_and_connection_stays(
    node: Node, raw: str, code: str
):
    c = await node.client("alice")
    await c.send_raw(raw)
    ev = await c.next_event("error")
    assert ev["code"] == code and ev["message"]
    await _still_works(c)


async def test_deeply_nested_frame_gets_bad_request_and_connection_stays(node: Node):
    """Nesting deeper than the parser's recursion limit is a frame that cannot be parsed,
    not a reason to drop the connection."""
    c = await node.client("alice", reconnect=False)
    await c.send_raw('{"type":"conv.list","id":"n","x":' + "[" * 3000 + "]" * 3000 + "}")
    ev = await c.next_event(where=lambda e: e["type"] in ("error", "reply", "client.disconnected"))
    assert (ev["type"], ev.get("code")) == ("error", "bad_request"), ev
    await _still_works(c)


@pytest.mark.parametrize(
    "fields, field_name",
    [
        ({"to": {"user": "bob"}, "kind": "text"}, "body"),
        ({"to": {"user": "bob"}, "kind": "text", "body": {"text": ""}}, "body.text"),
        ({"to": {"user": "bob"}, "kind": "text", "body": {"text": 5}}, "body.text"),
        ({"to": "bob", "kind": "text", "body": {"text": "x"}}, "to"),
        ({"to": {"user": "b o b"}, "kind": "text", "body": {"text": "x"}}, "to.user"),
        ({"to": {"user": "bob", "group": "g"}, "kind": "text", "body": {"text": "x"}}, "to"),
        ({"to": {"user": "bob"}, "kind": "video", "body": {}}, "kind"),
        (
            {"to": {"user": "bob"}, "kind": "text", "body": {"text": "x"}, "client_msg_id": 7},
            "client_msg_id",
        ),
        (  # PostgreSQL cannot store a NUL character (SQLite can): refused on both
            {"to": {"user": "bob"}, "kind": "text", "body": {"text": "x"}, "client_msg_id": "\x00"},
            "client_msg_id",
        ),
        (
            {"to": {"user": "bob"}, "kind": "text", "body": {"text": "x"}, "mentions": "bob"},
            "mentions",
        ),
        ({"to": {"user": "bob"}, "kind": "file", "body": {"name": "a"}}, "body.url"),
    ],
)
async def test_wrongly_typed_send_fields_are_named_and_nothing_is_stored(
    node: Node, fields: dict, field_name: str
):
    alice = await node.client("alice")
    await alice.send_text("before", user="bob")
    with pytest.raises(ClientError) as e:
        await alice.request("msg.send", **fields)
    assert e.value.code == "bad_request" and e.value.data.get("field") == field_name
    assert [m["body"] for m in await _stored(alice)] == [{"text": "before"}]


async def test_a_nul_in_a_client_msg_id_is_bad_request_on_every_store(any_node: Node):
    """Not `internal` from PostgreSQL, which cannot store it; a NUL in the body is text."""
    alice = await any_node.client("alice")
    with pytest.raises(ClientError) as e:
        await alice.send_text("x", user="bob", client_msg_id="a\x00b")
    assert e.value.code == "bad_request" and e.value.data.get("field") == "client_msg_id"
    await alice.send_text("nul \x00 inside", user="bob", client_msg_id="a-b")
    assert [m["body"] for m in await _stored(alice)] == [{"text": "nul \x00 inside"}]


@pytest.mark.parametrize(
    "kind, fields",
    [
        ("msg.history", {}),
        ("msg.history", {"conv": "nonsense"}),
        ("msg.history", {"conv": "dm:bob:alice"}),  # not sorted: not a valid id
        ("msg.history", {"conv": "dm:alice:bob", "limit": 1000}),
        ("msg.history", {"conv": "dm:alice:bob", "before_seq": "3"}),
        ("msg.history", {"conv": "dm:alice:bob", "before_seq": 3, "after_seq": 1}),
        ("receipt.read", {"conv": "dm:alice:bob"}),
        ("receipt.read", {"conv": "dm:alice:bob", "seq": -1}),
        ("msg.recall", {"conv": "dm:alice:bob", "seq": 0}),
        ("block.add", {"user": ""}),
        ("block.add", {"user": "alice"}),
        ("conv.mute", {"conv": "dm:alice:bob", "on": "yes"}),
    ],
)
async def test_bad_fields_of_other_requests_get_bad_request(node: Node, kind: str, fields: dict):
    alice = await node.client("alice")
    await alice.send_text("keep me", user="bob")
    with pytest.raises(ClientError) as e:
        await alice.request(kind, **fields)
    assert e.value.code == "bad_request"
    assert [m["body"] for m in await _stored(alice)] == [{"text": "keep me"}]


async def test_unknown_request_type_gets_unsupported(node: Node):
    c = await node.client("alice")
    with pytest.raises(ClientError) as e:
        await c.request("msg.teleport", conv="dm:alice:bob")
    assert e.value.code == "unsupported"
    await _still_works(c)


async def test_binary_frame_gets_bad_request(node: Node):
    c = await node.client("alice")
    assert c._ws is not None
    await c._ws.send_bytes(b"\x00\x01")
    assert (await c.next_event("error"))["code"] == "bad_request"
    await _still_works(c)


async def test_oversized_frame_gets_too_large_and_connection_stays(tmp_path: Path):
    n = await start_node(f"sqlite:///{tmp_path / 's.db'}", tmp_path, max_frame=1024)
    try:
        c = await n.client("alice")
        big = json.dumps(
            {
                "type": "msg.send",
                "id": "big",
                "to": {"user": "bob"},
                "kind": "text",
                "body": {"text": "x" * 2000},
            }
        )
        await c.send_raw(big)
        assert (await c.next_event("error"))["code"] == "too_large"
        await c.send_text("small is fine", user="bob")
        assert [m["body"]["text"] for m in await _stored(c)] == ["small is fine"]
    finally:
        await n.stop()


async def test_frame_size_limit_counts_utf8_bytes_not_characters(tmp_path: Path):
    n = await start_node(f"sqlite:///{tmp_path / 's.db'}", tmp_path, max_frame=1024)
    try:
        c = await n.client("alice")
        for text, answer in (("\U0001f600" * 900, "too_large"), ("\U0001f600" * 200, "reply")):
            raw = json.dumps(
                {"type": "msg.send", "id": "e", "to": {"user": "bob"}, "kind": "text",
                 "body": {"text": text}},
                ensure_ascii=False,
            )
            assert len(raw) < 1024  # in characters: only the bytes make the first too large
            await c.send_raw(raw)
            ev = await c.next_event(where=lambda e: e["type"] in ("reply", "error"))
            assert ev.get("code", ev["type"]) == answer, ev
        assert [len(m["body"]["text"]) for m in await _stored(c)] == [200]
    finally:
        await n.stop()


async def test_flooding_is_rate_limited_per_connection_and_recovers(tmp_path: Path):
    n = await start_node(f"sqlite:///{tmp_path / 's.db'}", tmp_path, rate_limit=5, rate_burst=10)
    try:
        flooder = await n.client("alice", sync=False)  # no conv.list of its own at connect
        calm = await n.client("carol")
        results = await asyncio.gather(
            *(flooder.request("conv.list") for _ in range(30)), return_exceptions=True
        )
        limited = [r for r in results if isinstance(r, ClientError) and r.code == "rate_limited"]
        assert 15 <= len(limited) <= 20  # the burst of 10 passes (plus what refills meanwhile)
        await _still_works(calm)  # other connections are unaffected
        await asyncio.sleep(0.5)
        await _still_works(flooder)  # the bucket refills
    finally:
        await n.stop()


@pytest.mark.parametrize(
    "frame",
    ["{not json", '{"type":"msg.send"}', "x" * 2000, b"\x00"],
    ids=["unparseable", "no-id", "too-large", "binary"],
)
async def test_flooding_with_frames_that_are_refused_anyway_is_rate_limited_too(
    tmp_path: Path, frame: str | bytes
):
    n = await start_node(
        f"sqlite:///{tmp_path / 's.db'}", tmp_path, rate_limit=5, rate_burst=10, max_frame=1024
    )
    try:
        c = await n.client("alice", sync=False)
        assert c._ws is not None
        for _ in range(30):
            await (c._ws.send_bytes(frame) if isinstance(frame, bytes) else c.send_raw(frame))
        codes = [(await c.next_event("error"))["code"] for _ in range(30)]
        assert 15 <= codes.count("rate_limited") <= 20, codes  # the burst of 10 passes
    finally:
        await n.stop()


# Request frames built from the protocol's own names with arbitrary JSON values.
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_types = st.sampled_from(
    [
        "msg.send",
        "msg.history",
        "conv.list",
        "msg.recall",
        "receipt.read",
        "receipt.delivered",
        "typing",
        "block.add",
        "block.remove",
        "block.list",
        "conv.mute",
        "ping",
        "auth",
        "nope",
    ]
)
_fields = st.sampled_from(
    [
        "to",
        "kind",
        "body",
        "client_msg_id",
        "mentions",
        "conv",
        "seq",
        "before_seq",
        "after_seq",
        "limit",
        "user",
        "on",
        "id",
    ]
)
_frames = st.builds(
    lambda t, rid, extra: {"type": t, "id": rid, **extra},
    _types,
    st.one_of(st.text(min_size=1, max_size=10), st.integers(), st.none(), st.booleans()),
    st.dictionaries(_fields, _json, max_size=6),
)


async def test_fuzzed_request_frames_never_break_the_connection_or_stored_messages(
    tmp_path: Path,
):
    n = await start_node(f"sqlite:///{tmp_path / 's.db'}", tmp_path, rate_limit=0)
    try:
        alice = await n.client("alice")
        await alice.send_text("precious", user="bob")
        before = await _stored(alice)
        frames: list[dict] = []

        @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
        @given(frame=_frames)
        def collect(frame: dict) -> None:
            frames.append(frame)

        collect()
        for frame in frames:
            await alice.send_raw(json.dumps(frame))
        # Every frame gets exactly one answer: a reply, an error frame or a pong.
        answers = 0
        async with asyncio.timeout(30):
            while answers < len(frames):
                ev = await alice.next_event()
                if ev["type"] in ("reply", "error", "pong"):
                    answers += 1
                assert ev["type"] != "client.disconnected"
        await asyncio.sleep(0.2)
        assert not [e for e in alice.pending_events() if e["type"] in ("reply", "error", "pong")]
        await _still_works(alice)
        assert (await _stored(alice))[0] == before[0]
    finally:
        await n.stop()


async def test_more_requests_than_the_in_flight_window_are_all_answered(tmp_path: Path):
    from signaling.gateway import MAX_IN_FLIGHT

    n = await start_node(f"sqlite:///{tmp_path / 's.db'}", tmp_path, rate_limit=0)
    try:
        alice = await n.client("alice")
        count = MAX_IN_FLIGHT * 3
        results = await asyncio.gather(
            *(alice.send_text(f"m{i}", user="bob") for i in range(count))
        )
        assert [r["seq"] for r in results] == list(range(1, count + 1))
    finally:
        await n.stop()
