"""Replay every ```example block of docs/*.md against a real server (see docs/PROTOCOL.md)."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
import pytest

from tests.support import REPO, Node, token

BLOCK_RE = re.compile(r"^```example\n(.*?)^```", re.M | re.S)
LINE_RE = re.compile(r"^([a-z][a-z0-9_]*(?:\.\d+)?)([<>]) (\{.*\})$")


def examples() -> list[Any]:
    out = []
    for doc in sorted((REPO / "docs").glob("*.md")):
        for i, m in enumerate(BLOCK_RE.finditer(doc.read_text())):
            line_no = doc.read_text()[: m.start()].count("\n") + 1
            out.append(pytest.param(m.group(1), id=f"{doc.name}:{line_no}:{i}"))
    return out


def matches(expected: Any, actual: Any) -> bool:
    """Subset match: every expected key equal (recursively); "*" matches anything."""
    if expected == "*":
        return True
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            k in actual and matches(v, actual[k]) for k, v in expected.items()
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(expected) == len(actual)
            and all(matches(e, a) for e, a in zip(expected, actual, strict=True))
        )
    return bool(expected == actual)


def device_of(name: str) -> tuple[str, str]:
    user, _, n = name.partition(".")
    return user, f"{user}-dev{n}"


class Device:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.buffer: list[dict[str, Any]] = []

    async def expect(self, want: dict[str, Any]) -> dict[str, Any]:
        def wanted(f: dict[str, Any]) -> bool:
            return f.get("type") == want.get("type") and (
                "id" not in want or f.get("id") == want["id"]
            )

        async with asyncio.timeout(5):
            while True:
                for f in self.buffer:
                    if wanted(f):
                        self.buffer.remove(f)
                        return f
                msg = await self.ws.receive()
                assert msg.type == aiohttp.WSMsgType.TEXT, f"socket closed: {msg}"
                self.buffer.append(json.loads(msg.data))


def test_docs_have_examples():
    assert len(examples()) >= 8


@pytest.mark.parametrize("block", examples())
async def test_protocol_example(node: Node, block: str):
    lines = [ln for ln in block.splitlines() if ln.strip()]
    parsed = []
    for ln in lines:
        m = LINE_RE.match(ln)
        assert m, f"not an example line: {ln}"
        parsed.append((m.group(1), m.group(2), json.loads(m.group(3))))
    devices: dict[str, Device] = {}
    async with aiohttp.ClientSession() as session:
        for name in dict.fromkeys(n for n, _, _ in parsed):
            user, dev = device_of(name)
            ws = await session.ws_connect(
                node.ws_url,
                headers={"Authorization": f"Bearer {token(user)}"},
                params={"device": dev},
            )
            devices[name] = Device(ws)
            ok = await devices[name].expect({"type": "auth.ok"})
            assert ok["user"] == user and ok["device"] == dev
        for name, direction, frame in parsed:
            d = devices[name]
            if direction == ">":
                await d.ws.send_str(json.dumps(frame))
            else:
                got = await d.expect(frame)
                assert matches(frame, got), f"{name} expected {frame}\n got {got}"
        for d in devices.values():
            await d.ws.close()


def test_matcher_is_strict_where_it_should_be():
    assert matches({"a": 1, "b": "*"}, {"a": 1, "b": [1], "c": 3})
    assert not matches({"a": 1}, {"a": 2})
    assert not matches({"a": 1}, {})
    assert not matches([1, 2], [1])
    assert matches([{"x": "*"}], [{"x": 0, "y": 1}])
