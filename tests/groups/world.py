"""A group of five users over a real node: the cast of the group tests.

alice is the owner, bob an admin, carol and dave members, eve an outsider.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from signaling.client import Client, ClientError
from tests.support import Node

CAST = ("alice", "bob", "carol", "dave", "eve")


@dataclass
class World:
    node: Node
    group: str
    conv: str
    c: dict[str, Client]

    async def req(self, who: str, type: str, /, **fields: Any) -> dict[str, Any]:
        return await self.c[who].request(type, **fields)

    async def fails(self, who: str, type: str, code: str, /, **fields: Any) -> ClientError:
        """Assert that the request fails with ``code``."""
        with pytest.raises(ClientError) as e:
            await self.c[who].request(type, **fields)
        assert e.value.code == code, e.value
        return e.value

    async def say(self, who: str, text: str, **extra: Any) -> dict[str, Any]:
        """``who`` sends a text message to the group."""
        return await self.c[who].send_text(text, group=self.group, **extra)

    async def cannot_say(self, who: str, code: str, text: str = "hi", **extra: Any) -> None:
        """``who``'s message to the group is refused with ``code``."""
        fields = {"to": {"group": self.group}, "kind": "text", "body": {"text": text}, **extra}
        await self.fails(who, "msg.send", code, **fields)

    async def last_seq(self, user: str = "alice") -> int:
        hist = await self.req(user, "msg.history", conv=self.conv, limit=1)
        return int(hist["messages"][-1]["seq"])

    async def notice(self, user: str, event: str) -> dict[str, Any]:
        """The next notice of ``event`` that ``user`` receives as msg.new."""
        return await self.c[user].next_event(
            "msg.new", where=lambda e: e["kind"] == "notice" and e["body"]["event"] == event
        )

    async def snapshot(self) -> dict[str, Any]:
        """Everything a group op could change, as the owner sees it."""
        owner = (await self.req("alice", "group.info", group=self.group))["group"]["owner"]
        info = await self.req(owner, "group.info", group=self.group)
        members = await self.req(owner, "group.members", group=self.group, limit=500)
        reqs = await self.req(owner, "group.requests", group=self.group)
        return {
            "info": info,
            "members": members,
            "requests": reqs,
            "last_seq": await self.last_seq(owner),
        }


async def make_world(node: Node, policy: str = "approval") -> World:
    c = {u: await node.client(u) for u in CAST}
    d = await c["alice"].request(
        "group.create", name="Team", members=["bob", "carol", "dave"], join_policy=policy
    )
    await c["alice"].request("group.set_role", group=d["group"], user="bob", role="admin")
    return World(node, d["group"], d["conv"], c)
