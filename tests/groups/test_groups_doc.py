"""docs/GROUPS.md stays true: its worked example is replayed against a real server (on
SQLite and PostgreSQL), and every group frame the server handles is documented."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from signaling.client import ClientError
from signaling.dispatch import HANDLERS, load_handler_modules
from tests.support import Node

DOC = Path(__file__).resolve().parents[2] / "docs" / "GROUPS.md"
BLOCK = re.compile(r"^```json (request|reply|event)(?: (\w+))?\n(.*?)^```", re.M | re.S)
VOLATILE = {"ts", "msg_id", "created_at"}


def _steady(obj: Any) -> Any:
    """``obj`` without the fields that differ from run to run."""
    if isinstance(obj, dict):
        return {k: _steady(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_steady(v) for v in obj]
    return obj


def _blocks() -> list[tuple[str, str | None, dict[str, Any]]]:
    text = DOC.read_text()
    example = text[text.index("## Worked example") :]
    return [(m[1], m[2], json.loads(m[3])) for m in BLOCK.finditer(example)]


async def test_worked_example_replays_exactly(any_node: Node):
    users = ("alice", "bob", "carol", "dave", "eve")
    clients = {u: await any_node.client(u, f"{u[0]}1") for u in users}
    blocks = _blocks()
    requests = [b for b in blocks if b[0] == "request"]
    assert len(requests) >= 20 and len(requests) == len([b for b in blocks if b[0] == "reply"])
    last_id: Any = None
    for kind, who, frame in blocks:
        if kind == "request":
            assert who is not None
            fields = {k: v for k, v in frame.items() if k not in ("type", "id")}
            last_id = frame["id"]
            try:
                data = await clients[who].request(frame["type"], **fields)
                got: dict[str, Any] = {"type": "reply", "id": last_id, "ok": True, "data": data}
            except ClientError as err:
                got = {"type": "reply", "id": last_id, "ok": False, "error": err.data}
        elif kind == "reply":
            assert _steady(got) == _steady(frame), f"reply to request {last_id}"
        else:
            assert who is not None
            want = _steady(frame)

            def same(e: dict[str, Any], want: Any = want) -> bool:
                return bool(_steady(e) == want)

            ev = await clients[who].next_event(frame["type"], timeout=3, where=same)
            assert ev["type"] == frame["type"]


def test_every_group_frame_is_documented_and_every_documented_frame_exists():
    load_handler_modules()
    text = DOC.read_text()
    served = {name for name in HANDLERS if name.startswith("group.")} | {"msg.receipts"}
    table = text[text.index("## Frames") : text.index("### Events")]
    documented = set(re.findall(r"^\| `((?:group|msg)\.[a-z_]+)` \|", table, re.M))
    assert served == documented
    matrix = text[text.index("## Authorization matrix") : text.index("## Frames")]
    assert {name for name in served if f"`{name}`" not in matrix} == set()
