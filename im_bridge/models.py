"""Domain records shared by the store and the services."""

from __future__ import annotations

from typing import Any

import msgspec


class Message(msgspec.Struct, kw_only=True):
    """One stored message of a conversation."""

    conv: str
    seq: int
    msg_id: str
    sender: str
    sender_device: str
    ts: int
    kind: str
    body: dict[str, Any]
    client_msg_id: str | None = None
    mentions: list[str] | None = None
    recalled_by: str | None = None
    recalled_at: int | None = None
    # The conversation's change counter at this message's last change (a recall); set
    # only where it is asked for (msg.changes, a recall's result), None elsewhere.
    change_seq: int | None = None

    def to_wire(self) -> dict[str, Any]:
        """The message as clients see it (``msg.new`` and ``msg.history`` entries)."""
        out: dict[str, Any] = {
            "conv": self.conv,
            "seq": self.seq,
            "msg_id": self.msg_id,
            "from": self.sender,
            "from_device": self.sender_device,
            "ts": self.ts,
            "kind": self.kind,
            "body": self.body,
            "client_msg_id": self.client_msg_id,
        }
        if self.mentions:
            out["mentions"] = self.mentions
        if self.recalled_by is not None:
            out["recalled"] = {"by": self.recalled_by, "ts": self.recalled_at}
        if self.change_seq is not None:
            out["change_seq"] = self.change_seq
        return out


class Member(msgspec.Struct, kw_only=True):
    """A user's membership of a conversation (current or past)."""

    conv: str
    user: str
    role: str
    joined_seq: int
    left_seq: int | None
    read_seq: int
    delivered_seq: int
    mention_seq: int
    muted_until: int
    conv_muted: bool

    @property
    def current(self) -> bool:
        return self.left_seq is None


class ConvSummary(msgspec.Struct, kw_only=True):
    """One row of ``conv.list``."""

    conv: str
    last_seq: int
    read_seq: int
    delivered_seq: int
    unread: int
    mentioned: bool
    muted: bool
    left: bool
    last_message: Message | None
    change_seq: int = 0  # the conversation's change counter (see msg.changes)

    def to_wire(self) -> dict[str, Any]:
        return {
            "conv": self.conv,
            "last_seq": self.last_seq,
            "read_seq": self.read_seq,
            "delivered_seq": self.delivered_seq,
            "unread": self.unread,
            "mentioned": self.mentioned,
            "muted": self.muted,
            "left": self.left,
            "last_message": self.last_message.to_wire() if self.last_message else None,
            "change_seq": self.change_seq,
        }


class User(msgspec.Struct, kw_only=True):
    """A registered (demo) account."""

    id: str
    name: str
    password_hash: str | None
    created_at: int


class SendRequest(msgspec.Struct, kw_only=True):
    """What the message service asks the store to append."""

    conv: str
    sender: str
    sender_device: str
    kind: str
    body: dict[str, Any]
    client_msg_id: str | None = None
    mentions: list[str] | None = None
    # The posting rule the store enforces atomically with the append:
    # "dm" (not blocked by the peer), "group" (current member, not muted), "system" (none).
    check: str = "dm"
    peer: str | None = None  # for dm: the other user (whose block list matters)
