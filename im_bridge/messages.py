"""The chat service: sending, history, conversation list, receipts, recall, typing, blocks.

Transport-free: it returns what was stored and who should hear about it; the signaling
layer publishes the events (see signaling/delivery.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from im_bridge.errors import BadRequest, Forbidden, NotFound
from im_bridge.ids import (
    check_group_id,
    check_user_id,
    dm_conv,
    group_conv,
    no_nul,
    now_ms,
    parse_conv,
)
from im_bridge.models import ConvSummary, Member, Message, SendRequest
from im_bridge.store import Store, ops

CLIENT_KINDS = ("text", "custom", "file")
MAX_TEXT = 16_000
# A dm has no owner or admin: "@all" is refused there as a group member without the right
# is refused (store/ops.py); it would also have pushed through the peer's conv.mute.
_AT_ALL_REFUSED = "only a group's owner or admins may mention @all"


def _dm_peer(parts: tuple[str, ...], user: str) -> str:
    """The other member of a dm (``parts``: its two user ids), whose members are its two
    users, always current: Forbidden for anyone else."""
    if user not in parts:
        raise Forbidden("you are not a member of this conversation")
    return parts[1] if parts[0] == user else parts[0]


@dataclass(slots=True)
class Marked:
    """Result of a receipt: the user's position after it, whether it moved, and (when it
    did) the members to tell."""

    seq: int
    changed: bool
    members: list[str]


@dataclass(slots=True)
class Sent:
    """Result of a send: the message, whether it is new, and the conversation's members."""

    message: Message
    created: bool
    members: list[str]


def validate_body(kind: str, body: Any) -> dict[str, Any]:
    """Check a client message body for its kind."""
    if kind not in CLIENT_KINDS:
        raise BadRequest(f"'kind' must be one of {', '.join(CLIENT_KINDS)}", field="kind")
    if not isinstance(body, dict):
        raise BadRequest("'body' must be an object", field="body")
    if kind == "text":
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            raise BadRequest("a text message needs a non-empty 'body.text'", field="body.text")
        if len(text) > MAX_TEXT:
            raise BadRequest(f"'body.text' is longer than {MAX_TEXT} characters", field="body.text")
    elif kind == "file":
        url = body.get("url")
        if not isinstance(url, str) or not url:
            raise BadRequest("a file message needs 'body.url'", field="body.url")
        size = body.get("size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise BadRequest("'body.size' must be a non-negative integer", field="body.size")
    return body


class ChatService:
    """Messaging rules over the store."""

    def __init__(self, store: Store, recall_window_s: int = 120) -> None:
        self.store = store
        self.recall_window_ms = recall_window_s * 1000
        # Set by the group service: its cached member lists (fan-out reads one per message).
        self.group_members: Callable[[str], Awaitable[list[str]]] | None = None
        self.group_members_cached: Callable[[str], list[str] | None] | None = None

    # ------------------------------------------------------------ membership

    async def members(self, conv: str) -> list[str]:
        """Current members of a conversation (for fan-out)."""
        kind, parts = parse_conv(conv)
        if kind == "dm":
            return sorted(set(parts))
        if self.group_members is not None:
            return await self.group_members(conv)
        return await self.store.read(ops.current_members(conv))

    def members_now(self, conv: str) -> list[str] | None:
        """:meth:`members` when known without a read (a dm, a cached group), else None."""
        kind, parts = parse_conv(conv)
        if kind == "dm":
            return sorted(set(parts))
        if self.group_members_cached is not None:
            return self.group_members_cached(conv)
        return None

    async def member_view(self, conv: str, user: str) -> Member | None:
        """The user's membership row, or a virtual one for a dm not yet written to."""
        kind, parts = parse_conv(conv)
        if kind == "dm":
            if user not in parts:
                return None
            m = await self.store.read(ops.get_member(conv, user))
            return m or Member(
                conv=conv,
                user=user,
                role="member",
                joined_seq=1,
                left_seq=None,
                read_seq=0,
                delivered_seq=0,
                mention_seq=0,
                muted_until=0,
                conv_muted=False,
            )
        return await self.store.read(ops.get_member(conv, user))

    async def require_reader(self, conv: str, user: str) -> Member:
        """The user's membership, or Forbidden: only members (current or past) read."""
        m = await self.member_view(conv, user)
        if m is None:
            raise Forbidden("you are not a member of this conversation")
        return m

    async def require_current(self, conv: str, user: str) -> Member:
        """The user's current membership, or Forbidden."""
        m = await self.require_reader(conv, user)
        if not m.current:
            raise Forbidden("you are no longer a member of this conversation")
        return m

    # ------------------------------------------------------------ sending

    async def send(
        self,
        sender: str,
        device: str,
        to: Any,
        client_msg_id: str | None,
        kind: str,
        body: Any,
        mentions: list[str] | None = None,
    ) -> Sent:
        """Store a client message durably (idempotent on client_msg_id)."""
        return await self._append(
            self.prepare_send(sender, device, to, client_msg_id, kind, body, mentions)
        )

    def prepare_send(
        self,
        sender: str,
        device: str,
        to: Any,
        client_msg_id: str | None,
        kind: str,
        body: Any,
        mentions: list[str] | None = None,
    ) -> SendRequest:
        """Check a client message (BadRequest naming the field) and address it."""
        if not isinstance(to, dict) or len(to) != 1 or not ({"user", "group"} & to.keys()):
            raise BadRequest('\'to\' must be {"user": id} or {"group": id}', field="to")
        body = validate_body(kind, body)
        if client_msg_id is not None:  # stored in a column: no NUL (see ids.no_nul)
            no_nul(client_msg_id, "client_msg_id")
        if mentions:
            for m in mentions:
                if m != "@all":
                    check_user_id(m, "mentions")
        peer: str | None = None
        if "user" in to:
            peer = check_user_id(to["user"], "to.user")
            if mentions and "@all" in mentions:
                raise Forbidden(_AT_ALL_REFUSED)
            conv, check = dm_conv(sender, peer), "dm"
        else:
            conv, check = group_conv(check_group_id(to["group"], "to.group")), "group"
        return SendRequest(
            conv=conv, sender=sender, sender_device=device, kind=kind, body=body,
            client_msg_id=client_msg_id, mentions=mentions, check=check, peer=peer,
        )

    def send_nowait(self, req: SendRequest, done: Callable[[Any], None]) -> None:
        """Queue a prepared message for the next commit; ``done`` then gets ``(message,
        created)`` or the TalkbridgeError that refused it (see Store.write_nowait)."""
        self.store.write_nowait(ops.append_message(req, now_ms()), req.conv, done)

    async def _append(self, req: SendRequest) -> Sent:
        msg, created = await self.store.write(ops.append_message(req, now_ms()), key=req.conv)
        return Sent(msg, created, await self.members(msg.conv))

    async def post_system(
        self,
        conv: str,
        kind: str,
        body: dict[str, Any],
        actor: str,
        client_msg_id: str | None = None,
        device: str = "server",
    ) -> Sent:
        """Store a server-written message (``notice``, ``call``) in a conversation."""
        parse_conv(conv)  # validates the id
        return await self._append(
            SendRequest(
                conv=conv, sender=actor, sender_device=device, kind=kind, body=body,
                client_msg_id=client_msg_id, check="system",
            )
        )

    # ------------------------------------------------------------ reading

    async def history(
        self, user: str, conv: str, before: int | None, after: int | None, limit: int
    ) -> tuple[list[Message], bool]:
        """A page of a conversation the user belongs (or belonged) to."""
        m = await self.require_reader(conv, user)
        if before is not None and after is not None:
            raise BadRequest("give 'before_seq' or 'after_seq', not both")
        return await self.store.read(
            ops.history(conv, m.joined_seq, m.left_seq, before, after, limit)
        )

    async def changes(
        self, user: str, conv: str, after: int, limit: int
    ) -> tuple[list[Message], bool]:
        """A page of the conversation's changed messages (recalls) after change number
        ``after``, for its readers: the same range rule as :meth:`history`."""
        m = await self.require_reader(conv, user)
        return await self.store.read(ops.changes(conv, m.joined_seq, m.left_seq, after, limit))

    async def conversations(self, user: str) -> list[ConvSummary]:
        return await self.store.read(ops.conv_list(user))

    # ------------------------------------------------------------ state changes

    async def mark(self, user: str, conv: str, kind: str, seq: int) -> Marked:
        """Advance delivered/read to ``seq`` (see :func:`ops.mark`).

        In a dm whose peer has blocked the user, the position still moves (the user's own
        devices sync their unread counts from it) but the peer is not told: what a blocked
        user reads is no more the blocker's concern than their messages.
        """
        kind_, parts = parse_conv(conv)
        peer = None
        if kind_ == "dm":
            # No membership read (the op finds no row, NotFound, before the first message);
            # it asks for the block.
            peer = _dm_peer(parts, user)
        else:
            await self.require_reader(conv, user)
        pos, changed, blocked = await self.store.write(
            ops.mark(conv, user, kind, seq, peer), key=conv
        )
        if not changed:
            return Marked(pos, False, [])
        return Marked(pos, True, [user] if blocked else await self.members(conv))

    async def recall(self, user: str, conv: str, seq: int) -> tuple[Message, list[str]]:
        await self.require_current(conv, user)
        msg = await self.store.write(
            ops.recall(conv, seq, user, now_ms(), self.recall_window_ms), key=conv
        )
        return msg, await self.members(conv)

    async def typing(self, user: str, conv: str) -> list[str]:
        """Who should see that ``user`` is typing in ``conv``; Forbidden in a dm whose peer
        has blocked the user, as their msg.send is (so it tells them nothing more)."""
        kind, parts = parse_conv(conv)
        if kind != "dm":
            await self.require_current(conv, user)
            return await self.members(conv)
        # One read, as before: the block look-up takes the place of the membership read.
        peer = _dm_peer(parts, user)
        if peer != user and await self.is_blocked(user, by=peer):
            raise Forbidden("this user does not accept your messages")
        return sorted(set(parts))

    async def set_muted(self, user: str, conv: str, on: bool) -> None:
        await self.require_reader(conv, user)
        kind, _ = parse_conv(conv)
        if kind == "dm":
            m = await self.store.read(ops.get_member(conv, user))
            if m is None:
                raise NotFound("no messages in this conversation yet")
        await self.store.write(ops.set_conv_muted(conv, user, on), key=conv)

    async def block(self, user: str, other: Any) -> None:
        other = check_user_id(other)
        if other == user:
            raise BadRequest("you cannot block yourself", field="user")
        await self.store.write(ops.block_add(user, other, now_ms()))

    async def unblock(self, user: str, other: Any) -> bool:
        return await self.store.write(ops.block_remove(user, check_user_id(other)))

    async def blocked(self, user: str) -> list[str]:
        return await self.store.read(ops.block_list(user))

    async def is_blocked(self, user: str, by: str) -> bool:
        """True when ``by`` has blocked ``user`` (used by the call bridge)."""
        return await self.store.read(ops.is_blocked(user, by))
