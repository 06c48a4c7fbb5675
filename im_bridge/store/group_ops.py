"""Group storage ops, in the generator style of ``store/ops.py`` (one SQL path, both drivers).

Every group change is one write op that (1) checks everything and raises its
TalkbridgeError before its first write, (2) appends the ``notice`` message to the group's
timeline, and (3) changes membership using that notice's sequence number, all in the same
transaction. So ``joined_seq`` is the notice that says someone joined (they see it and
what follows) and ``left_seq`` is the notice that says they left or were removed (they see
it and nothing after).
"""

from __future__ import annotations

from typing import Any

import msgspec

from im_bridge.errors import BadRequest, Conflict, Forbidden, NotFound
from im_bridge.ids import group_conv
from im_bridge.models import Message, SendRequest
from im_bridge.store import ops
from im_bridge.store.ops import Op, execute, one, rows

PRIVILEGED = ("owner", "admin")
JOIN_POLICIES = ("open", "approval", "invite_only")

GROUP_COLS = (
    "group_id, name, owner, announcement, avatar, join_policy, mute_all, state, created_by, "
    "created_at"
)


class Group(msgspec.Struct, kw_only=True):
    """A group's settings (the ``chat_groups`` row)."""

    id: str
    name: str
    owner: str
    announcement: str
    avatar: str
    join_policy: str
    mute_all: bool
    state: str
    created_by: str
    created_at: int

    @property
    def conv(self) -> str:
        return group_conv(self.id)

    def to_wire(self) -> dict[str, Any]:
        return {
            "group": self.id,
            "conv": self.conv,
            "name": self.name,
            "owner": self.owner,
            "announcement": self.announcement,
            "avatar": self.avatar,
            "join_policy": self.join_policy,
            "mute_all": self.mute_all,
            "created_by": self.created_by,
            "created_at": self.created_at,
        }


class MemberInfo(msgspec.Struct, kw_only=True):
    """One current member as ``group.members`` lists them."""

    user: str
    role: str
    joined_seq: int
    muted_until: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "role": self.role,
            "joined_seq": self.joined_seq,
            "muted_until": self.muted_until,
        }


class JoinRequest(msgspec.Struct, kw_only=True):
    """A pending request to join (or a plain member's invite awaiting approval)."""

    user: str
    message: str
    ts: int
    invited_by: str | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"user": self.user, "message": self.message, "ts": self.ts}
        if self.invited_by is not None:
            out["invited_by"] = self.invited_by
        return out


class Change(msgspec.Struct, kw_only=True):
    """What a group write did: the notice it appended and who must hear of it.

    ``audience`` is everyone who may see the notice: current members after the change plus
    anyone it removed (they see the notice of their own departure).
    """

    group: Group
    notice: Message | None
    audience: list[str]
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    # True when someone joined or left: the in-memory member list of the group is dropped.
    members_changed: bool = False


def group_from_row(r: tuple[Any, ...]) -> Group:
    return Group(
        id=r[0],
        name=r[1],
        owner=r[2],
        announcement=r[3],
        avatar=r[4],
        join_policy=r[5],
        mute_all=bool(r[6]),
        state=r[7],
        created_by=r[8],
        created_at=int(r[9]),
    )


# ---------------------------------------------------------------- reads and checks


def get_group(group: str) -> Op[Group | None]:
    """The group row (any state), or None."""
    r = yield one(f"SELECT {GROUP_COLS} FROM chat_groups WHERE group_id = ?", group)
    return None if r is None else group_from_row(r)


def _active(group: str) -> Op[Group]:
    g = yield from get_group(group)
    if g is None or g.state != "active":
        raise NotFound("no such group")
    return g


def _locked(group: str) -> Op[Group]:
    """:func:`_active`, for a write: first takes the group conversation's row lock.

    On PostgreSQL two nodes may run changes of one group at once (a node's commit lane
    orders only its own). Without the lock both pass their checks on the same snapshot:
    one request approved twice (two ``member_joined`` notices, the second moving the
    member's ``joined_seq``), joins past the member limit. Taken first, it makes every
    check after it (READ COMMITTED: each statement sees what committed before it) see the
    other node's change. It is the lock the notice's append takes anyway, in the same
    order as a message's, so it adds no deadlock. The UPDATE changes nothing, so a refusal
    after it still changes nothing. (SQLite: one writer at a time already.)
    """
    yield execute("UPDATE conversations SET last_seq = last_seq WHERE conv = ?", group_conv(group))
    g = yield from _active(group)
    return g


def _role(conv: str, user: str) -> Op[str | None]:
    """The user's role if they are a current member, else None."""
    r = yield one(
        "SELECT role FROM conv_members WHERE conv = ? AND user_id = ? AND left_seq IS NULL",
        conv,
        user,
    )
    return None if r is None else str(r[0])


def _member_role(g: Group, user: str) -> Op[str]:
    role = yield from _role(g.conv, user)
    if role is None:
        raise Forbidden("you are not a member of this group")
    return role


def _privileged(g: Group, user: str) -> Op[str]:
    role = yield from _member_role(g, user)
    if role not in PRIVILEGED:
        raise Forbidden("only the group's owner or an admin may do this")
    return role


def _target_role(g: Group, user: str) -> Op[str]:
    role = yield from _role(g.conv, user)
    if role is None:
        raise NotFound(f"{user} is not a member of this group", user=user)
    return role


def member_count(conv: str) -> Op[int]:
    r = yield one("SELECT COUNT(*) FROM conv_members WHERE conv = ? AND left_seq IS NULL", conv)
    return int(r[0])


def _room_for(g: Group, adding: int, limit: int) -> Op[None]:
    n = yield from member_count(g.conv)
    if n + adding > limit:
        raise Conflict(f"the group is full (limit {limit} members)", limit=limit)


def current_members(conv: str) -> Op[list[str]]:
    rs = yield rows(
        "SELECT user_id FROM conv_members WHERE conv = ? AND left_seq IS NULL ORDER BY user_id",
        conv,
    )
    return [r[0] for r in rs]


def info(group: str, user: str) -> Op[tuple[Group, int, str | None]]:
    """A group, its member count and the caller's role (None for a non-member)."""
    g = yield from _active(group)
    role = yield from _role(g.conv, user)
    n = yield from member_count(g.conv)
    return g, n, role


def members_page(
    group: str, user: str, cursor: str | None, limit: int
) -> Op[tuple[list[MemberInfo], str | None]]:
    """Current members ordered by user id, after ``cursor``; next cursor or None."""
    g = yield from _active(group)
    yield from _member_role(g, user)
    rs = yield rows(
        "SELECT user_id, role, joined_seq, muted_until FROM conv_members "
        "WHERE conv = ? AND left_seq IS NULL AND user_id > ? ORDER BY user_id LIMIT ?",
        g.conv,
        cursor or "",
        limit + 1,
    )
    out = [
        MemberInfo(user=r[0], role=r[1], joined_seq=int(r[2]), muted_until=int(r[3]))
        for r in rs[:limit]
    ]
    return out, (out[-1].user if len(rs) > limit else None)


def my_groups(user: str) -> Op[list[tuple[Group, str, int]]]:
    """The active groups the user belongs to, with their role and member count."""
    rs = yield rows(
        "SELECT "
        + ", ".join("g." + c.strip() for c in GROUP_COLS.split(","))
        + ", m.role, (SELECT COUNT(*) FROM conv_members x WHERE x.conv = m.conv "
        "AND x.left_seq IS NULL) "
        "FROM conv_members m JOIN chat_groups g ON g.group_id = substr(m.conv, 3) "
        "WHERE m.user_id = ? AND m.conv LIKE 'g:%' AND m.left_seq IS NULL "
        "AND g.state = 'active' ORDER BY g.name, g.group_id",
        user,
    )
    return [(group_from_row(r[:10]), str(r[10]), int(r[11])) for r in rs]


def requests(group: str, actor: str) -> Op[list[JoinRequest]]:
    g = yield from _active(group)
    yield from _privileged(g, actor)
    rs = yield rows(
        "SELECT user_id, message, created_at, invited_by FROM group_requests "
        "WHERE group_id = ? ORDER BY created_at, user_id",
        group,
    )
    return [JoinRequest(user=r[0], message=r[1], ts=int(r[2]), invited_by=r[3]) for r in rs]


def privileged_members(conv: str) -> Op[list[str]]:
    rs = yield rows(
        "SELECT user_id FROM conv_members WHERE conv = ? AND left_seq IS NULL "
        "AND role IN ('owner', 'admin')",
        conv,
    )
    return [r[0] for r in rs]


def receipts(conv: str, user: str, seq: int) -> Op[tuple[list[str], int]]:
    """Who among the current members (sender excluded) has read up to ``seq``, and how many not.

    Members who joined after ``seq`` never saw the message and are not counted.
    """
    me = yield one(
        "SELECT joined_seq, left_seq FROM conv_members WHERE conv = ? AND user_id = ?", conv, user
    )
    if me is None:
        raise Forbidden("you are not a member of this conversation")
    lo, hi = int(me[0]), me[1]
    if seq < lo or (hi is not None and seq > int(hi)):
        raise NotFound("no such message")
    msg = yield one("SELECT sender FROM messages WHERE conv = ? AND seq = ?", conv, seq)
    if msg is None:
        raise NotFound("no such message")
    rs = yield rows(
        "SELECT user_id, read_seq FROM conv_members WHERE conv = ? AND left_seq IS NULL "
        "AND joined_seq <= ? AND user_id <> ? ORDER BY user_id",
        conv,
        seq,
        msg[0],
    )
    read = [r[0] for r in rs if int(r[1]) >= seq]
    return read, len(rs) - len(read)


def conv_muted_users(conv: str, users: list[str]) -> Op[set[str]]:
    """Which of ``users`` have muted the conversation (``conv.mute``)."""
    if not users:
        return set()
    rs = yield rows("SELECT user_id FROM conv_members WHERE conv = ? AND conv_muted <> 0", conv)
    wanted = set(users)
    return {r[0] for r in rs if r[0] in wanted}


def senders_between(conv: str, lo: int, hi: int) -> Op[dict[str, int]]:
    """Senders of client messages with lo < seq <= hi, each with their earliest such seq
    (who a coalesced read receipt concerns, and from which position on)."""
    rs = yield rows(
        "SELECT sender, MIN(seq) FROM messages WHERE conv = ? AND seq > ? AND seq <= ? "
        "AND kind NOT IN ('notice', 'call') GROUP BY sender",
        conv,
        lo,
        hi,
    )
    return {r[0]: int(r[1]) for r in rs}


# ---------------------------------------------------------------- writes


def _notice(g: Group, actor: str, body: dict[str, Any], now: int) -> Op[Message]:
    req = SendRequest(
        conv=g.conv,
        sender=actor,
        sender_device="server",
        kind="notice",
        body=body,
        check="system",
    )
    msg, _ = yield from ops.append_message(req, now)
    return msg


def _add_member(conv: str, user: str, role: str, seq: int, read_seq: int, now: int) -> Op[None]:
    """Insert a member, or bring a former member back (their visible range restarts at seq)."""
    yield execute(
        "INSERT INTO conv_members (conv, user_id, role, joined_seq, left_seq, read_seq, "
        "delivered_seq, mention_seq, muted_until, joined_at) "
        "VALUES (?, ?, ?, ?, NULL, ?, ?, 0, 0, ?) "
        "ON CONFLICT (conv, user_id) DO UPDATE SET role = excluded.role, "
        "joined_seq = excluded.joined_seq, left_seq = NULL, read_seq = excluded.read_seq, "
        "delivered_seq = excluded.delivered_seq, mention_seq = 0, muted_until = 0, "
        "joined_at = excluded.joined_at",
        conv,
        user,
        role,
        seq,
        read_seq,
        read_seq,
        now,
    )


def _audience(conv: str, departed: list[str]) -> Op[list[str]]:
    cur = yield from current_members(conv)
    extra = [u for u in departed if u not in cur]
    return cur + extra


def create(
    group: str,
    name: str,
    owner: str,
    members: list[str],
    join_policy: str,
    announcement: str,
    avatar: str,
    now: int,
    limit: int,
) -> Op[Change]:
    """Create a group with its owner and initial members; its first notice is ``created``."""
    others = [u for u in dict.fromkeys(members) if u != owner]
    if 1 + len(others) > limit:
        raise Conflict(f"the group is full (limit {limit} members)", limit=limit)
    exists = yield one("SELECT 1 FROM chat_groups WHERE group_id = ?", group)
    taken = yield one("SELECT 1 FROM conversations WHERE conv = ?", group_conv(group))
    if exists is not None or taken is not None:
        raise Conflict("a group with this id exists", field="group")
    # Another node may create the same id between the check above and this insert
    # (PostgreSQL): the insert then waits for its commit and does nothing, and the create is
    # the same conflict as above (not a key violation that rolls back the batch: internal).
    made = yield one(
        f"INSERT INTO chat_groups ({GROUP_COLS}) VALUES (?, ?, ?, ?, ?, ?, 0, 'active', ?, ?) "
        "ON CONFLICT (group_id) DO NOTHING RETURNING group_id",
        group,
        name,
        owner,
        announcement,
        avatar,
        join_policy,
        owner,
        now,
    )
    if made is None:
        raise Conflict("a group with this id exists", field="group")
    conv = group_conv(group)
    # The creation notice will be seq 1: every initial member sees it.
    yield from _add_member(conv, owner, "owner", 1, 0, now)
    for u in others:
        yield from _add_member(conv, u, "member", 1, 0, now)
    g = Group(
        id=group,
        name=name,
        owner=owner,
        announcement=announcement,
        avatar=avatar,
        join_policy=join_policy,
        mute_all=False,
        state="active",
        created_by=owner,
        created_at=now,
    )
    body: dict[str, Any] = {"event": "created", "actor": owner, "name": name, "users": others}
    msg = yield from _notice(g, owner, body, now)
    return Change(group=g, notice=msg, audience=[owner, *others], members_changed=True)


def update(group: str, actor: str, fields: dict[str, Any], now: int) -> Op[Change]:
    """Change name/announcement/avatar/join_policy (owner/admin); a notice lists what changed."""
    g = yield from _locked(group)
    yield from _privileged(g, actor)
    changed = {k: v for k, v in fields.items() if getattr(g, k) != v}
    if not changed:
        cur = yield from current_members(g.conv)
        return Change(group=g, notice=None, audience=cur, data={"changed": []})
    sets = ", ".join(f"{k} = ?" for k in changed)
    yield execute(f"UPDATE chat_groups SET {sets} WHERE group_id = ?", *changed.values(), group)
    for k, v in changed.items():
        setattr(g, k, v)
    msg = yield from _notice(g, actor, {"event": "updated", "actor": actor, **changed}, now)
    audience = yield from current_members(g.conv)
    return Change(group=g, notice=msg, audience=audience, data={"changed": sorted(changed)})


def invite(group: str, actor: str, users: list[str], now: int, limit: int) -> Op[Change]:
    """Add users (owner/admin; any member of an open group), or, for a plain member of an
    approval group, file join requests on their behalf."""
    g = yield from _locked(group)
    role = yield from _member_role(g, actor)
    users = list(dict.fromkeys(users))
    if actor in users:
        raise Conflict("you are already a member", field="users")
    present = []
    for u in users:
        r = yield from _role(g.conv, u)
        if r is not None:
            present.append(u)
    if present:
        raise Conflict(f"already members: {', '.join(present)}", field="users", users=present)
    privileged = role in PRIVILEGED
    if not privileged and g.join_policy == "invite_only":
        raise Forbidden("only the owner or an admin may invite to this group")
    if not privileged and g.join_policy == "approval":
        pending = yield rows("SELECT user_id FROM group_requests WHERE group_id = ?", group)
        already = {r[0] for r in pending} & set(users)
        if already:
            raise Conflict(
                f"requests already pending: {', '.join(sorted(already))}",
                field="users",
                users=sorted(already),
            )
        for u in users:
            yield execute(
                "INSERT INTO group_requests (group_id, user_id, message, created_at, invited_by) "
                "VALUES (?, ?, '', ?, ?)",
                group,
                u,
                now,
                actor,
            )
        body = {"event": "invite_requested", "actor": actor, "users": users}
        msg = yield from _notice(g, actor, body, now)
        audience = yield from current_members(g.conv)
        return Change(
            group=g, notice=msg, audience=audience, data={"added": [], "requested": users}
        )
    yield from _room_for(g, len(users), limit)
    msg = yield from _notice(
        g, actor, {"event": "member_invited", "actor": actor, "users": users}, now
    )
    for u in users:
        yield from _add_member(g.conv, u, "member", msg.seq, msg.seq - 1, now)
        yield execute("DELETE FROM group_requests WHERE group_id = ? AND user_id = ?", group, u)
    audience = yield from current_members(g.conv)
    return Change(
        group=g,
        notice=msg,
        audience=audience,
        data={"added": users, "requested": []},
        members_changed=True,
    )


def join(group: str, user: str, message: str, now: int, limit: int) -> Op[Change]:
    """Join an open group, or file a request to join an approval group."""
    g = yield from _locked(group)
    role = yield from _role(g.conv, user)
    if role is not None:
        raise Conflict("you are already a member of this group")
    if g.join_policy == "invite_only":
        raise Forbidden("this group is joined by invitation only")
    if g.join_policy == "approval":
        pending = yield one(
            "SELECT 1 FROM group_requests WHERE group_id = ? AND user_id = ?", group, user
        )
        if pending is not None:
            raise Conflict("your request to join is already pending")
        yield execute(
            "INSERT INTO group_requests (group_id, user_id, message, created_at) "
            "VALUES (?, ?, ?, ?)",
            group,
            user,
            message,
            now,
        )
        body: dict[str, Any] = {"event": "join_requested", "actor": user, "users": [user]}
        if message:
            body["message"] = message
        msg = yield from _notice(g, user, body, now)
        audience = yield from current_members(g.conv)
        return Change(group=g, notice=msg, audience=audience, data={"status": "pending"})
    yield from _room_for(g, 1, limit)
    msg = yield from _notice(
        g, user, {"event": "member_joined", "actor": user, "users": [user]}, now
    )
    yield from _add_member(g.conv, user, "member", msg.seq, msg.seq, now)
    yield execute("DELETE FROM group_requests WHERE group_id = ? AND user_id = ?", group, user)
    audience = yield from current_members(g.conv)
    return Change(
        group=g, notice=msg, audience=audience, data={"status": "joined"}, members_changed=True
    )


def _pending(group: str, user: str) -> Op[None]:
    r = yield one("SELECT 1 FROM group_requests WHERE group_id = ? AND user_id = ?", group, user)
    if r is None:
        raise NotFound(f"no pending request from {user}", user=user)


def approve(group: str, actor: str, user: str, now: int, limit: int) -> Op[Change]:
    g = yield from _locked(group)
    yield from _privileged(g, actor)
    yield from _pending(group, user)
    role = yield from _role(g.conv, user)
    if role is not None:
        raise Conflict(f"{user} is already a member", user=user)
    yield from _room_for(g, 1, limit)
    yield execute("DELETE FROM group_requests WHERE group_id = ? AND user_id = ?", group, user)
    msg = yield from _notice(
        g,
        actor,
        {"event": "member_joined", "actor": actor, "users": [user], "via": "approval"},
        now,
    )
    yield from _add_member(g.conv, user, "member", msg.seq, msg.seq - 1, now)
    audience = yield from current_members(g.conv)
    return Change(group=g, notice=msg, audience=audience, members_changed=True)


def reject(group: str, actor: str, user: str, now: int) -> Op[Change]:
    g = yield from _locked(group)
    yield from _privileged(g, actor)
    yield from _pending(group, user)
    yield execute("DELETE FROM group_requests WHERE group_id = ? AND user_id = ?", group, user)
    msg = yield from _notice(
        g, actor, {"event": "join_rejected", "actor": actor, "users": [user]}, now
    )
    audience = yield from current_members(g.conv)
    return Change(group=g, notice=msg, audience=audience)


def _depart(g: Group, user: str, seq: int) -> Op[None]:
    yield execute(
        "UPDATE conv_members SET left_seq = ?, role = 'member', muted_until = 0 "
        "WHERE conv = ? AND user_id = ?",
        seq,
        g.conv,
        user,
    )


def kick(group: str, actor: str, user: str, now: int) -> Op[Change]:
    """Remove a member: the owner removes anyone; an admin removes plain members only."""
    g = yield from _locked(group)
    role = yield from _privileged(g, actor)
    if user == actor:
        raise BadRequest("use group.leave to leave a group", field="user")
    target = yield from _target_role(g, user)
    if target == "owner" or (target == "admin" and role != "owner"):
        raise Forbidden(f"you may not remove {user} ({target})", user=user)
    msg = yield from _notice(
        g, actor, {"event": "member_kicked", "actor": actor, "users": [user]}, now
    )
    yield from _depart(g, user, msg.seq)
    audience = yield from _audience(g.conv, [user])
    return Change(group=g, notice=msg, audience=audience, members_changed=True)


def leave(group: str, user: str, now: int) -> Op[Change]:
    g = yield from _locked(group)
    role = yield from _member_role(g, user)
    if role == "owner":
        raise Forbidden("the owner must transfer ownership (group.transfer) before leaving")
    msg = yield from _notice(g, user, {"event": "member_left", "actor": user, "users": [user]}, now)
    yield from _depart(g, user, msg.seq)
    audience = yield from _audience(g.conv, [user])
    return Change(group=g, notice=msg, audience=audience, members_changed=True)


def dissolve(group: str, actor: str, now: int) -> Op[Change]:
    """End the group (owner): nobody sends any more; history stays readable to members."""
    g = yield from _locked(group)
    role = yield from _member_role(g, actor)
    if role != "owner":
        raise Forbidden("only the owner may dissolve the group")
    audience = yield from current_members(g.conv)
    msg = yield from _notice(g, actor, {"event": "dissolved", "actor": actor}, now)
    yield execute("UPDATE chat_groups SET state = 'dissolved' WHERE group_id = ?", group)
    yield execute(
        "UPDATE conv_members SET left_seq = ? WHERE conv = ? AND left_seq IS NULL",
        msg.seq,
        g.conv,
    )
    yield execute("DELETE FROM group_requests WHERE group_id = ?", group)
    g.state = "dissolved"
    return Change(group=g, notice=msg, audience=audience, members_changed=True)


def set_role(group: str, actor: str, user: str, role: str, now: int) -> Op[Change]:
    """Make a member an admin or back (owner only)."""
    g = yield from _locked(group)
    mine = yield from _member_role(g, actor)
    if mine != "owner":
        raise Forbidden("only the owner may change roles")
    if user == actor:
        raise BadRequest("the owner's role changes by group.transfer", field="user")
    target = yield from _target_role(g, user)
    if target == role:
        raise Conflict(f"{user} is already {role}", user=user)
    yield execute(
        "UPDATE conv_members SET role = ? WHERE conv = ? AND user_id = ?", role, g.conv, user
    )
    msg = yield from _notice(
        g, actor, {"event": "role_changed", "actor": actor, "users": [user], "role": role}, now
    )
    audience = yield from current_members(g.conv)
    return Change(group=g, notice=msg, audience=audience)


def transfer(group: str, actor: str, user: str, now: int) -> Op[Change]:
    """Hand ownership to another member; the previous owner becomes an admin."""
    g = yield from _locked(group)
    mine = yield from _member_role(g, actor)
    if mine != "owner":
        raise Forbidden("only the owner may transfer ownership")
    if user == actor:
        raise BadRequest("you already own this group", field="user")
    yield from _target_role(g, user)
    yield execute(
        "UPDATE conv_members SET role = 'admin' WHERE conv = ? AND user_id = ?", g.conv, actor
    )
    yield execute(
        "UPDATE conv_members SET role = 'owner', muted_until = 0 WHERE conv = ? AND user_id = ?",
        g.conv,
        user,
    )
    yield execute("UPDATE chat_groups SET owner = ? WHERE group_id = ?", user, group)
    g.owner = user
    msg = yield from _notice(
        g, actor, {"event": "owner_transferred", "actor": actor, "users": [user]}, now
    )
    audience = yield from current_members(g.conv)
    return Change(group=g, notice=msg, audience=audience)


def mute(group: str, actor: str, user: str, until_ts: int, now: int) -> Op[Change]:
    """Mute a member until ``until_ts`` (ms; 0 or past unmutes): owner mutes anyone but
    themselves, an admin mutes plain members."""
    g = yield from _locked(group)
    role = yield from _privileged(g, actor)
    if user == actor:
        raise BadRequest("you cannot mute yourself", field="user")
    target = yield from _target_role(g, user)
    if target == "owner" or (target == "admin" and role != "owner"):
        raise Forbidden(f"you may not mute {user} ({target})", user=user)
    until = until_ts if until_ts > now else 0
    yield execute(
        "UPDATE conv_members SET muted_until = ? WHERE conv = ? AND user_id = ?",
        until,
        g.conv,
        user,
    )
    event = "muted" if until else "unmuted"
    body: dict[str, Any] = {"event": event, "actor": actor, "users": [user], "until_ts": until}
    msg = yield from _notice(g, actor, body, now)
    audience = yield from current_members(g.conv)
    return Change(group=g, notice=msg, audience=audience, data={"until_ts": until})


def mute_all(group: str, actor: str, on: bool, now: int) -> Op[Change]:
    """Mute everyone but the owner and admins (or lift it)."""
    g = yield from _locked(group)
    yield from _privileged(g, actor)
    if g.mute_all == on:
        raise Conflict("the group is already " + ("muted" if on else "unmuted"))
    yield execute("UPDATE chat_groups SET mute_all = ? WHERE group_id = ?", 1 if on else 0, group)
    g.mute_all = on
    msg = yield from _notice(g, actor, {"event": "mute_all", "actor": actor, "on": on}, now)
    audience = yield from current_members(g.conv)
    return Change(group=g, notice=msg, audience=audience)
