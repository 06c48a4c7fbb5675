"""The group service: creation, membership, roles, mutes, join requests, dissolution.

Transport-free. Each change returns a :class:`Change` (the ``notice`` it appended to the
group timeline and who must hear of it); the signaling layer delivers it. The rules of
who may do what to whom live in ``store/group_ops.py`` so they run in the same
transaction as the change; docs/GROUPS.md has them as a table.

The service also keeps each group's current member list in memory (fan-out reads it for
every message) and drops an entry whenever a change of membership commits.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from im_bridge.errors import BadRequest, NotFound
from im_bridge.ids import (
    check_group_id,
    check_user_id,
    group_conv,
    new_id,
    no_nul,
    now_ms,
    parse_conv,
)
from im_bridge.store import Store
from im_bridge.store import group_ops as gops
from im_bridge.store.group_ops import (
    JOIN_POLICIES,
    Change,
    Group,
    JoinRequest,
    MemberInfo,
)

__all__ = ["Change", "Group", "GroupService", "JoinRequest", "MemberInfo"]

MAX_NAME = 100
MAX_ANNOUNCEMENT = 2000
MAX_AVATAR = 1000
MAX_REQUEST_MESSAGE = 500
MAX_USERS_PER_CALL = 500
ROLES = ("admin", "member")


def _text(value: Any, field: str, max_len: int, *, required: bool) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"'{field}' must be a string", field=field)
    text: str = value.strip()
    if required and not text:
        raise BadRequest(f"'{field}' must not be empty", field=field)
    if len(text) > max_len:
        raise BadRequest(f"'{field}' is longer than {max_len} characters", field=field)
    return no_nul(text, field)  # stored in a column (see ids.no_nul)


def _policy(value: Any) -> str:
    if value not in JOIN_POLICIES:
        raise BadRequest(
            f"'join_policy' must be one of {', '.join(JOIN_POLICIES)}", field="join_policy"
        )
    return str(value)


def _users(
    value: Any,
    field: str = "users",
    *,
    allow_empty: bool = False,
    max_items: int = MAX_USERS_PER_CALL,
) -> list[str]:
    if not isinstance(value, list) or (not value and not allow_empty):
        raise BadRequest(f"'{field}' must be a non-empty list of user ids", field=field)
    if len(value) > max_items:
        raise BadRequest(f"'{field}' has more than {max_items} users", field=field)
    return list(dict.fromkeys(check_user_id(u, field) for u in value))


class GroupService:
    """Group rules over the store, plus the in-memory member lists used by fan-out."""

    def __init__(self, store: Store, member_limit: int = 2000, cache_size: int = 10_000) -> None:
        self.store = store
        self.member_limit = member_limit
        self._members: OrderedDict[str, list[str]] = OrderedDict()
        self._cache_size = cache_size
        # Bumped by every invalidation: a fill that raced with one is not kept.
        self._epoch = 0
        # Called with the conversation id after a membership change commits (a multi-node
        # bus hooks here to tell the other nodes to drop their copy).
        self.on_members_changed: list[Callable[[str], None]] = []

    # ------------------------------------------------------------ member cache

    async def members(self, conv: str) -> list[str]:
        """Current members of a group conversation (cached; do not mutate the list)."""
        cached = self._members.get(conv)
        if cached is not None:
            self._members.move_to_end(conv)
            return cached
        epoch = self._epoch
        users = await self.store.read(gops.current_members(conv))
        if epoch == self._epoch:
            self._members[conv] = users
            if len(self._members) > self._cache_size:
                self._members.popitem(last=False)
        return users

    def cached(self, conv: str) -> list[str] | None:
        """The cached member list of ``conv``, if any (fan-out without a wait)."""
        cached = self._members.get(conv)
        if cached is not None:
            self._members.move_to_end(conv)
        return cached

    def invalidate(self, conv: str, *, broadcast: bool = True) -> None:
        """Forget the cached member list of ``conv`` (after its membership changed)."""
        self._epoch += 1
        self._members.pop(conv, None)
        if broadcast:
            for hook in self.on_members_changed:
                hook(conv)

    async def _write(self, group: str, op: Any) -> Change:
        # Keyed by the conversation: one group's changes and messages share a commit lane,
        # so they commit, and their futures resolve, in order.
        change: Change = await self.store.write(op, key=group_conv(group))
        if change.members_changed:
            # Runs as soon as the commit is known, before any later message's fan-out can
            # resume (futures of one batch resolve in order): no stale recipient list.
            self.invalidate(change.group.conv)
        return change

    # ------------------------------------------------------------ reads

    async def info(self, user: str, group: Any) -> tuple[Group, int, str | None]:
        """The group, its member count and the caller's role.

        Non-members may look up open and approval groups (to join them by id).
        """
        gid = check_group_id(group)
        g, n, role = await self.store.read(gops.info(gid, user))
        if role is None and g.join_policy == "invite_only":
            raise NotFound("no such group")
        return g, n, role

    async def member_page(
        self, user: str, group: Any, cursor: Any, limit: int
    ) -> tuple[list[MemberInfo], str | None]:
        gid = check_group_id(group)
        if cursor is not None:
            cursor = check_user_id(cursor, "cursor")
        return await self.store.read(gops.members_page(gid, user, cursor, limit))

    async def my_groups(self, user: str) -> list[tuple[Group, str, int]]:
        return await self.store.read(gops.my_groups(user))

    async def requests(self, user: str, group: Any) -> list[JoinRequest]:
        return await self.store.read(gops.requests(check_group_id(group), user))

    async def role_of(self, group: str, user: str) -> str | None:
        """The user's role in an active group ("owner", "admin", "member"), or None for a
        non-member or a group that does not exist (any more). For the call/room bridge."""
        try:
            _, _, role = await self.store.read(gops.info(group, user))
        except NotFound:
            return None
        return role

    async def privileged(self, conv: str) -> list[str]:
        """The owner and admins of a group conversation."""
        return await self.store.read(gops.privileged_members(conv))

    async def receipts(self, user: str, conv: str, seq: int) -> tuple[list[str], int]:
        """Who has read message ``seq`` of ``conv`` and how many members have not."""
        parse_conv(conv)
        return await self.store.read(gops.receipts(conv, user, seq))

    # ------------------------------------------------------------ changes

    async def create(
        self,
        owner: str,
        name: Any,
        members: Any,
        join_policy: Any = "approval",
        group: Any = None,
        announcement: Any = "",
        avatar: Any = "",
    ) -> Change:
        """Create a group owned by ``owner`` with initial ``members``."""
        gid = new_id("") if group is None else check_group_id(group)
        nm = _text(name, "name", MAX_NAME, required=True)
        # A group may start at full size: the member limit (a conflict) bounds the list.
        users = (
            []
            if members is None
            else _users(members, "members", allow_empty=True, max_items=max(self.member_limit, 1))
        )
        policy = _policy(join_policy)
        ann = _text(announcement, "announcement", MAX_ANNOUNCEMENT, required=False)
        av = _text(avatar, "avatar", MAX_AVATAR, required=False)
        return await self._write(
            gid,
            gops.create(gid, nm, owner, users, policy, ann, av, now_ms(), self.member_limit),
        )

    async def update(self, actor: str, group: Any, fields: dict[str, Any]) -> Change:
        """Change any of name, announcement, avatar, join_policy (owner/admin)."""
        gid = check_group_id(group)
        clean: dict[str, Any] = {}
        if fields.get("name") is not None:
            clean["name"] = _text(fields["name"], "name", MAX_NAME, required=True)
        if fields.get("announcement") is not None:
            clean["announcement"] = _text(
                fields["announcement"], "announcement", MAX_ANNOUNCEMENT, required=False
            )
        if fields.get("avatar") is not None:
            clean["avatar"] = _text(fields["avatar"], "avatar", MAX_AVATAR, required=False)
        if fields.get("join_policy") is not None:
            clean["join_policy"] = _policy(fields["join_policy"])
        if not clean:
            raise BadRequest("give at least one of name, announcement, avatar, join_policy")
        return await self._write(gid, gops.update(gid, actor, clean, now_ms()))

    async def invite(self, actor: str, group: Any, users: Any) -> Change:
        gid = check_group_id(group)
        return await self._write(
            gid, gops.invite(gid, actor, _users(users), now_ms(), self.member_limit)
        )

    async def join(self, user: str, group: Any, message: Any = None) -> Change:
        gid = check_group_id(group)
        text = (
            ""
            if message is None
            else _text(message, "message", MAX_REQUEST_MESSAGE, required=False)
        )
        return await self._write(gid, gops.join(gid, user, text, now_ms(), self.member_limit))

    async def approve(self, actor: str, group: Any, user: Any) -> Change:
        gid = check_group_id(group)
        return await self._write(
            gid, gops.approve(gid, actor, check_user_id(user), now_ms(), self.member_limit)
        )

    async def reject(self, actor: str, group: Any, user: Any) -> Change:
        gid = check_group_id(group)
        return await self._write(gid, gops.reject(gid, actor, check_user_id(user), now_ms()))

    async def kick(self, actor: str, group: Any, user: Any) -> Change:
        gid = check_group_id(group)
        return await self._write(gid, gops.kick(gid, actor, check_user_id(user), now_ms()))

    async def leave(self, user: str, group: Any) -> Change:
        gid = check_group_id(group)
        return await self._write(gid, gops.leave(gid, user, now_ms()))

    async def dissolve(self, actor: str, group: Any) -> Change:
        gid = check_group_id(group)
        return await self._write(gid, gops.dissolve(gid, actor, now_ms()))

    async def set_role(self, actor: str, group: Any, user: Any, role: Any) -> Change:
        gid = check_group_id(group)
        uid = check_user_id(user)
        if role not in ROLES:
            raise BadRequest("'role' must be 'admin' or 'member'", field="role")
        return await self._write(gid, gops.set_role(gid, actor, uid, str(role), now_ms()))

    async def transfer(self, actor: str, group: Any, user: Any) -> Change:
        gid = check_group_id(group)
        return await self._write(gid, gops.transfer(gid, actor, check_user_id(user), now_ms()))

    async def mute(self, actor: str, group: Any, user: Any, until_ts: int) -> Change:
        gid = check_group_id(group)
        return await self._write(
            gid, gops.mute(gid, actor, check_user_id(user), until_ts, now_ms())
        )

    async def mute_all(self, actor: str, group: Any, on: bool) -> Change:
        gid = check_group_id(group)
        return await self._write(gid, gops.mute_all(gid, actor, on, now_ms()))

    @staticmethod
    def conv_of(group: str) -> str:
        """The conversation id of a group."""
        return group_conv(group)

    @staticmethod
    def group_of(conv: str) -> str:
        """The group id of a ``g:`` conversation (BadRequest for any other)."""
        kind, parts = parse_conv(conv)
        if kind != "group":
            raise BadRequest("'conv' must be a group conversation (g:<id>)", field="conv")
        return parts[0]
