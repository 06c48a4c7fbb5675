"""Storage operations, written once for both SQLite and PostgreSQL.

An op is a generator that *yields* queries and receives their results (sans-I/O), so the
same SQL and the same rules run on both drivers: ``store/sqlite.py`` runs ops on a writer
thread, ``store/postgres.py`` over asyncpg. SQL here is the dialect both accept (``?``
placeholders, ``ON CONFLICT``, ``RETURNING``, ``CASE`` instead of MAX/GREATEST).

Convention that makes group commit safe without a savepoint per op: a write op performs
all its checks (and raises a TalkbridgeError) *before* its first write.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from types import TracebackType
from typing import Any, Literal, TypeVar

import msgspec

from im_bridge.errors import Conflict, Forbidden, NotFound
from im_bridge.ids import new_id, parse_conv
from im_bridge.models import ConvSummary, Member, Message, SendRequest, User

Mode = Literal["one", "all", "exec", "count", "many"]
Query = tuple[str, tuple[Any, ...], Mode]
T = TypeVar("T")
Op = Generator[Query, Any, T]

_json_enc = msgspec.json.Encoder()
_json_dec = msgspec.json.Decoder()


def one(sql: str, *args: Any) -> Query:
    """A query returning its first row (a tuple) or None."""
    return (sql, args, "one")


def rows(sql: str, *args: Any) -> Query:
    """A query returning all rows as tuples."""
    return (sql, args, "all")


def execute(sql: str, *args: Any) -> Query:
    """A statement whose result is ignored."""
    return (sql, args, "exec")


def count(sql: str, *args: Any) -> Query:
    """A statement returning the number of rows it changed."""
    return (sql, args, "count")


def many(sql: str, arg_rows: list[tuple[Any, ...]]) -> Query:
    """One statement run once per row of arguments (executemany); result ignored."""
    return (sql, tuple(arg_rows), "many")


def dumps(obj: Any) -> str:
    return _json_enc.encode(obj).decode()


def loads(text: str | None) -> Any:
    return None if text is None else _json_dec.decode(text)


MSG_COLS = (
    "conv, seq, msg_id, sender, sender_device, client_msg_id, kind, body, mentions, ts, "
    "recalled_by, recalled_at"
)


def msg_from_row(r: tuple[Any, ...]) -> Message:
    return Message(
        conv=r[0],
        seq=int(r[1]),
        msg_id=r[2],
        sender=r[3],
        sender_device=r[4],
        client_msg_id=r[5],
        kind=r[6],
        body=loads(r[7]),
        mentions=loads(r[8]),
        ts=int(r[9]),
        recalled_by=r[10],
        recalled_at=None if r[11] is None else int(r[11]),
    )


MEMBER_COLS = (
    "conv, user_id, role, joined_seq, left_seq, read_seq, delivered_seq, mention_seq, "
    "muted_until, conv_muted"
)


def member_from_row(r: tuple[Any, ...]) -> Member:
    return Member(
        conv=r[0],
        user=r[1],
        role=r[2],
        joined_seq=int(r[3]),
        left_seq=None if r[4] is None else int(r[4]),
        read_seq=int(r[5]),
        delivered_seq=int(r[6]),
        mention_seq=int(r[7]),
        muted_until=int(r[8]),
        conv_muted=bool(r[9]),
    )


# ---------------------------------------------------------------- users


def create_user(user: str, name: str, password_hash: str | None, now: int) -> Op[bool]:
    """Create an account; False when the id is taken: by an account, or by a user who
    already has conversations or blocks (one whose tokens an app minted: registering the
    id would hand its messages to whoever registered it)."""
    n = yield count(
        "INSERT INTO users (id, name, password_hash, created_at) SELECT ?, ?, ?, ? "
        "WHERE NOT EXISTS (SELECT 1 FROM conv_members WHERE user_id = ?) "
        "AND NOT EXISTS (SELECT 1 FROM blocks WHERE user_id = ?) "
        "ON CONFLICT (id) DO NOTHING",
        user,
        name,
        password_hash,
        now,
        user,
        user,
    )
    return bool(n)


def get_user(user: str) -> Op[User | None]:
    r = yield one("SELECT id, name, password_hash, created_at FROM users WHERE id = ?", user)
    if r is None:
        return None
    return User(id=r[0], name=r[1], password_hash=r[2], created_at=int(r[3]))


# ---------------------------------------------------------------- messages


# The (conv, seq) of an earlier message with the same (sender, client_msg_id), if any.
_DUP = (
    "(SELECT conv FROM messages WHERE sender = ? AND client_msg_id = ?), "
    "(SELECT seq FROM messages WHERE sender = ? AND client_msg_id = ?)"
)


def _first_copy(conv: str, seq: Any) -> Op[Message]:
    msg = yield from get_message(conv, int(seq))
    assert msg is not None
    return msg


def append_message(req: SendRequest, now: int) -> Op[tuple[Message, bool]]:
    """Append a message with the next sequence number, atomically with its posting rule.

    Returns (message, created). A repeated (sender, client_msg_id) returns the first
    message and created=False, storing nothing. The op is a :class:`MessageAppend`: a
    batch may run a 1:1 message together with its neighbours (see :func:`coalesced`).
    """
    return MessageAppend(req, now)


class MessageAppend(Generator[Query, Any, tuple[Message, bool]]):
    """The op appending one message, with its request kept as data (a batch can see which
    1:1 sends to run as one :func:`append_dms` op, and which client ids it may insert).

    Run alone it is :func:`_append_message`.
    """

    __slots__ = ("_op", "now", "req")

    def __init__(self, req: SendRequest, now: int) -> None:
        self.req = req
        self.now = now
        self._op: Op[tuple[Message, bool]] | None = None

    def send(self, value: Any) -> Query:
        if self._op is None:
            self._op = _append_message(self.req, self.now)
        return self._op.send(value)

    def throw(
        self, typ: Any, val: Any = None, tb: TracebackType | None = None
    ) -> Query:
        if self._op is None:
            self._op = _append_message(self.req, self.now)
        return self._op.throw(typ, val, tb)


# A run of 1:1 appends is one op of at most this many messages (its statements run
# without a turn of the event loop in between: ~15 us a message).
MAX_RUN = 256
# The retry/block probe's row count is rounded up to a multiple of this, so that a
# handful of statement shapes serves every run length (PostgreSQL prepares each shape).
_PROBE_STEP = 32


def _is_dm_append(op: Op[Any]) -> bool:
    return isinstance(op, MessageAppend) and op.req.check == "dm"


def coalesced(batch: list[Op[Any]], row_locks: bool) -> Iterator[tuple[Op[Any], int]]:
    """A batch's ops as they run: ``(op, 1)`` for an op alone, ``(append_dms(...), n)``
    for a run of ``n`` consecutive 1:1 appends, whose result is the list of their results
    (a value or the TalkbridgeError that refused it, each). ``row_locks``: the database
    locks rows (PostgreSQL), see :func:`append_dms`."""
    i, n = 0, len(batch)
    while i < n:
        j = i
        while j < n and j - i < MAX_RUN and _is_dm_append(batch[j]):
            j += 1
        if j - i > 1:
            yield append_dms(batch[i:j], row_locks), j - i  # type: ignore[arg-type]
            i = j
        else:
            yield batch[i], 1
            i += 1


_READ_UPTO = (
    "UPDATE conv_members SET read_seq = ?, delivered_seq = ? WHERE conv = ? AND user_id = ?"
)


# Rows per statement of append_dms's sequence upserts: a handful of statement shapes,
# each prepared once.
_UPSERT_SIZES = (64, 16, 4, 1)


def _upsert_seqs(n: int) -> str:
    """Add to ``n`` conversations' last sequence numbers (creating the conversations that
    do not exist yet); returns each one's ``(conv, last_seq)``."""
    values = ", ".join(["(?, 'dm', ?, ?)"] * n)
    return (
        f"INSERT INTO conversations (conv, kind, last_seq, created_at) VALUES {values} "
        "ON CONFLICT (conv) DO UPDATE SET last_seq = conversations.last_seq + "
        "excluded.last_seq RETURNING conv, last_seq"
    )


_UPSERT_SQL = {n: _upsert_seqs(n) for n in _UPSERT_SIZES}


def append_dms(items: list[MessageAppend], row_locks: bool = True) -> Op[list[Any]]:
    """Append a run of 1:1 messages, with what :func:`_append_message` does for each, in
    one probe for retries and blocks, the sequence upserts, the senders' read positions
    and one executemany for all the messages. Results in the order of ``items``:
    ``(message, created)`` or the TalkbridgeError that refused it.

    ``row_locks=False`` (SQLite: one writer, a database-wide write lock) upserts every
    conversation's sequence in a few statements of many rows, then updates every read
    position in one executemany; with row locks (PostgreSQL) that order could deadlock,
    so each conversation gets its upsert and its read positions in turn, see below.
    """
    padded = -(-len(items) // _PROBE_STEP) * _PROBE_STEP
    args: list[Any] = []
    for i, it in enumerate(items):
        args += (str(i), it.req.sender, it.req.client_msg_id, it.req.peer)
    args += (None, None, None, None) * (padded - len(items))
    values = ", ".join(["(?, ?, ?, ?)"] * padded)
    probe = yield rows(
        f"WITH v(i, s, c, p) AS (VALUES {values}) "
        "SELECT v.i, m.conv, m.seq, (SELECT 1 FROM blocks b WHERE b.user_id = v.p "
        "AND b.blocked = v.s) FROM v "
        "LEFT JOIN messages m ON m.sender = v.s AND m.client_msg_id = v.c",
        *args,
    )
    earlier: dict[int, tuple[Any, Any]] = {}
    blocked: set[int] = set()
    for i, conv, seq, block in probe:
        if i is None:
            continue
        if conv is not None:
            earlier[int(i)] = (conv, seq)
        if block is not None:
            blocked.add(int(i))
    results: list[Any] = [None] * len(items)
    new_by_conv: dict[str, list[int]] = {}
    first_in_run: dict[tuple[str, str], int] = {}  # (sender, client_msg_id) -> item
    copies: list[tuple[int, int]] = []  # (item, the item of the run it repeats)
    for i, it in enumerate(items):
        req = it.req
        key = (req.sender, req.client_msg_id) if req.client_msg_id is not None else None
        if i in earlier:
            conv, seq = earlier[i]
            results[i] = ((yield from _first_copy(conv, seq)), False)
        elif key is not None and key in first_in_run:
            copies.append((i, first_in_run[key]))
        elif i in blocked:
            results[i] = Forbidden("this user does not accept your messages")
        else:
            new_by_conv.setdefault(req.conv, []).append(i)
            if key is not None:
                first_in_run[key] = i
    # Writes, all checks done. With row locks, in the order every transaction takes them
    # (the batch's key order, see groupcommit.py): all of one conversation's before the
    # next one's, as when each message is its own op. (The message rows, inserted last,
    # lock nothing that another transaction could hold: their keys are new.)
    msg_rows: list[tuple[Any, ...]] = []
    read_rows: list[tuple[Any, ...]] = []
    # The conversations' new last sequence numbers. Without row locks, every conversation's
    # in a few statements of many rows (one statement each was ~7 us a message, a third of
    # the batch's SQLite time); with them, one conversation at a time, in order, below.
    last: dict[str, int] = {}
    if not row_locks:
        convs = list(new_by_conv)
        at = 0
        while at < len(convs):
            size = next(n for n in _UPSERT_SIZES if n <= len(convs) - at)
            args = []
            for conv in convs[at : at + size]:
                idx = new_by_conv[conv]
                args += (conv, len(idx), items[idx[0]].now)
            at += size
            for conv, seq in (yield rows(_UPSERT_SQL[size], *args)):
                last[conv] = int(seq)
    for conv, idx in new_by_conv.items():
        now = items[idx[0]].now
        if row_locks:
            r = yield one(_UPSERT_SQL[1], conv, len(idx), now)
            last[conv] = int(r[1])
        seq = last[conv] - len(idx)
        if seq == 0:
            _, parts = parse_conv(conv)
            yield many(
                "INSERT INTO conv_members (conv, user_id, joined_seq, joined_at) "
                "VALUES (?, ?, 1, ?) ON CONFLICT (conv, user_id) DO NOTHING",
                [(conv, user, now) for user in sorted(set(parts))],
            )
        read_upto: dict[str, int] = {}
        for i in idx:
            seq += 1
            req = items[i].req
            msg = Message(
                conv=conv,
                seq=seq,
                msg_id=new_id(),
                sender=req.sender,
                sender_device=req.sender_device,
                ts=items[i].now,
                kind=req.kind,
                body=req.body,
                client_msg_id=req.client_msg_id,
                mentions=req.mentions or None,
            )
            results[i] = (msg, True)
            msg_rows.append((
                conv, seq, msg.msg_id, msg.sender, msg.sender_device, msg.client_msg_id,
                msg.kind, dumps(msg.body), dumps(msg.mentions) if msg.mentions else None,
                msg.ts,
            ))
            read_upto[req.sender] = seq
        # Whoever writes a message has read the conversation up to it.
        read_rows += [(seq, seq, conv, user) for user, seq in read_upto.items()]
        if row_locks:
            yield many(_READ_UPTO, read_rows)
            read_rows = []
    if read_rows:
        yield many(_READ_UPTO, read_rows)
    if msg_rows:
        yield many(
            f"INSERT INTO messages ({MSG_COLS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
            msg_rows,
        )
    for i, first in copies:
        results[i] = (results[first][0], False)
    return results


def _append_message(req: SendRequest, now: int) -> Op[tuple[Message, bool]]:
    """:func:`append_message`, one statement at a time."""
    # One statement answers both "is this a retry?" and the posting rule's question: the
    # per-message statement count is what bounds a group-commit batch's speed.
    sender, cid = req.sender, req.client_msg_id
    if req.check == "dm":
        r = yield one(
            "SELECT m.conv, m.seq, (SELECT 1 FROM blocks WHERE user_id = ? AND blocked = ?) "
            "FROM (SELECT 1) AS one "
            "LEFT JOIN messages m ON m.sender = ? AND m.client_msg_id = ?",
            req.peer, sender, sender, cid,
        )
        if r[0] is not None:
            return (yield from _first_copy(r[0], r[1])), False
        if r[2] is not None:
            raise Forbidden("this user does not accept your messages")
    elif req.check == "group":
        _, (group,) = parse_conv(req.conv)
        r = yield one(
            f"SELECT {_DUP}, g.state, g.mute_all, m.role, m.left_seq, m.muted_until "
            "FROM chat_groups g LEFT JOIN conv_members m ON m.conv = ? AND m.user_id = ? "
            "WHERE g.group_id = ?",
            sender, cid, sender, cid, req.conv, sender, group,
        )
        if r is not None and r[0] is not None:
            return (yield from _first_copy(r[0], r[1])), False
        if r is None or r[2] != "active":
            dup = yield one(f"SELECT {_DUP}", sender, cid, sender, cid)
            if dup[0] is not None:  # a retry after the group was dissolved
                return (yield from _first_copy(dup[0], dup[1])), False
            raise NotFound("no such group")
        if r[4] is None or r[5] is not None:
            raise Forbidden("you are not a member of this group")
        privileged = r[4] in ("owner", "admin")
        # mute_all spares the owner and admins; a personal mute does not: the owner may
        # mute an admin, and that must silence them (nobody can mute the owner).
        if (not privileged and r[3]) or int(r[6]) > now:
            raise Forbidden("you are muted in this group")
        if req.mentions and "@all" in req.mentions and not privileged:
            raise Forbidden("only the owner or an admin may mention @all")
    elif cid is not None:
        dup = yield one(f"SELECT {_DUP}", sender, cid, sender, cid)
        if dup[0] is not None:
            return (yield from _first_copy(dup[0], dup[1])), False
    kind, parts = parse_conv(req.conv)
    r = yield one(
        "INSERT INTO conversations (conv, kind, last_seq, created_at) VALUES (?, ?, 1, ?) "
        "ON CONFLICT (conv) DO UPDATE SET last_seq = conversations.last_seq + 1 "
        "RETURNING last_seq",
        req.conv,
        kind,
        now,
    )
    seq = int(r[0])
    if kind == "dm" and seq == 1:
        for user in set(parts):
            yield execute(
                "INSERT INTO conv_members (conv, user_id, joined_seq, joined_at) "
                "VALUES (?, ?, 1, ?) ON CONFLICT (conv, user_id) DO NOTHING",
                req.conv,
                user,
                now,
            )
    msg = Message(
        conv=req.conv,
        seq=seq,
        msg_id=new_id(),
        sender=req.sender,
        sender_device=req.sender_device,
        ts=now,
        kind=req.kind,
        body=req.body,
        client_msg_id=req.client_msg_id,
        mentions=req.mentions or None,
    )
    yield execute(
        f"INSERT INTO messages ({MSG_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
        msg.conv,
        msg.seq,
        msg.msg_id,
        msg.sender,
        msg.sender_device,
        msg.client_msg_id,
        msg.kind,
        dumps(msg.body),
        dumps(msg.mentions) if msg.mentions else None,
        msg.ts,
    )
    # Whoever writes a message has read the conversation up to it.
    yield execute(
        "UPDATE conv_members SET read_seq = ?, delivered_seq = ? WHERE conv = ? AND user_id = ?",
        seq,
        seq,
        req.conv,
        req.sender,
    )
    if req.mentions and kind == "group":
        if "@all" in req.mentions:
            yield execute(
                "UPDATE conv_members SET mention_seq = ? "
                "WHERE conv = ? AND left_seq IS NULL AND user_id <> ?",
                seq,
                req.conv,
                req.sender,
            )
        else:
            for user in set(req.mentions):
                yield execute(
                    "UPDATE conv_members SET mention_seq = ? "
                    "WHERE conv = ? AND user_id = ? AND left_seq IS NULL",
                    seq,
                    req.conv,
                    user,
                )
    return msg, True


def get_message(conv: str, seq: int) -> Op[Message | None]:
    r = yield one(f"SELECT {MSG_COLS} FROM messages WHERE conv = ? AND seq = ?", conv, seq)
    return None if r is None else msg_from_row(r)


def history(
    conv: str, lo: int, hi: int | None, before: int | None, after: int | None, limit: int
) -> Op[tuple[list[Message], bool]]:
    """Messages of ``conv`` within the visible range [lo, hi], ascending by seq.

    ``after`` pages forward (sync), otherwise backward from ``before`` (default: newest).
    """
    upper = hi if hi is not None else 2**62
    if after is not None:
        rs = yield rows(
            f"SELECT {MSG_COLS} FROM messages WHERE conv = ? AND seq > ? AND seq >= ? "
            "AND seq <= ? ORDER BY seq ASC LIMIT ?",
            conv,
            after,
            lo,
            upper,
            limit + 1,
        )
        msgs = [msg_from_row(r) for r in rs]
        return msgs[:limit], len(msgs) > limit
    top = min(before - 1, upper) if before is not None else upper
    rs = yield rows(
        f"SELECT {MSG_COLS} FROM messages WHERE conv = ? AND seq <= ? AND seq >= ? "
        "ORDER BY seq DESC LIMIT ?",
        conv,
        top,
        lo,
        limit + 1,
    )
    msgs = [msg_from_row(r) for r in rs]
    has_more = len(msgs) > limit
    msgs = msgs[:limit]
    msgs.reverse()
    return msgs, has_more


def get_member(conv: str, user: str) -> Op[Member | None]:
    r = yield one(
        f"SELECT {MEMBER_COLS} FROM conv_members WHERE conv = ? AND user_id = ?", conv, user
    )
    return None if r is None else member_from_row(r)


def current_members(conv: str) -> Op[list[str]]:
    rs = yield rows("SELECT user_id FROM conv_members WHERE conv = ? AND left_seq IS NULL", conv)
    return [r[0] for r in rs]


def last_seq(conv: str) -> Op[int]:
    r = yield one("SELECT last_seq FROM conversations WHERE conv = ?", conv)
    return 0 if r is None else int(r[0])


def conv_list(user: str) -> Op[list[ConvSummary]]:
    """The user's conversations with read state and last visible message, newest first."""
    rs = yield rows(
        "SELECT m.conv, c.last_seq, m.read_seq, m.delivered_seq, m.mention_seq, m.left_seq, "
        "m.conv_muted, c.change_seq, "
        + ", ".join("msg." + c.strip() for c in MSG_COLS.split(","))
        + " FROM conv_members m JOIN conversations c ON c.conv = m.conv "
        "LEFT JOIN messages msg ON msg.conv = m.conv AND msg.seq = "
        "(CASE WHEN m.left_seq IS NULL THEN c.last_seq ELSE m.left_seq END) "
        "WHERE m.user_id = ?",
        user,
    )
    out = []
    for r in rs:
        last = int(r[1]) if r[5] is None else min(int(r[1]), int(r[5]))
        read = int(r[2])
        msg = msg_from_row(r[8:]) if r[8] is not None else None
        out.append(
            ConvSummary(
                conv=r[0],
                last_seq=last,
                read_seq=read,
                delivered_seq=int(r[3]),
                unread=max(0, last - read),
                mentioned=int(r[4]) > read,
                muted=bool(r[6]),
                left=r[5] is not None,
                last_message=msg,
                change_seq=int(r[7]),
            )
        )
    out.sort(key=lambda s: s.last_message.ts if s.last_message else 0, reverse=True)
    return out


def mark(
    conv: str, user: str, kind: str, seq: int, peer: str | None = None
) -> Op[tuple[int, bool, bool]]:
    """Advance the user's delivered/read position to ``seq`` (clamped to what they can see).

    Returns the user's position after it, whether it moved (when it did not, the stored
    position: never the seq asked for, which may lie beyond every message, or behind), and
    whether ``peer`` (a dm's other member) has blocked the user, asked in the same read.
    """
    col = "read_seq" if kind == "read" else "delivered_seq"
    m = yield one(
        f"SELECT m.left_seq, c.last_seq, m.{col}, "
        "(SELECT 1 FROM blocks b WHERE b.user_id = ? AND b.blocked = ?) "
        "FROM conv_members m JOIN conversations c "
        "ON c.conv = m.conv WHERE m.conv = ? AND m.user_id = ?",
        peer,
        user,
        conv,
        user,
    )
    if m is None:
        raise NotFound("no such conversation")
    blocked = m[3] is not None
    top = int(m[1]) if m[0] is None else min(int(m[0]), int(m[1]))
    seq = min(seq, top)
    if seq <= int(m[2]):
        return int(m[2]), False, blocked
    if kind == "read":
        n = yield count(
            "UPDATE conv_members SET read_seq = ?, delivered_seq = "
            "(CASE WHEN delivered_seq < ? THEN ? ELSE delivered_seq END) "
            "WHERE conv = ? AND user_id = ? AND read_seq < ?",
            seq,
            seq,
            seq,
            conv,
            user,
            seq,
        )
    else:
        n = yield count(
            "UPDATE conv_members SET delivered_seq = ? "
            "WHERE conv = ? AND user_id = ? AND delivered_seq < ?",
            seq,
            conv,
            user,
            seq,
        )
    if n:
        return seq, True, blocked
    # Moved past it since the read above (another node's receipt committed in between).
    r = yield one(f"SELECT {col} FROM conv_members WHERE conv = ? AND user_id = ?", conv, user)
    return int(r[0]), False, blocked


def recall(conv: str, seq: int, by: str, now: int, window_ms: int) -> Op[Message]:
    """Recall a message: its sender within the window, or a group owner/admin at any time."""
    msg = yield from get_message(conv, seq)
    if msg is None:
        raise NotFound("no such message")
    if msg.kind in ("notice", "call"):
        raise Forbidden("server-written messages cannot be recalled")
    if msg.recalled_by is not None:
        raise Conflict("message already recalled")
    allowed = msg.sender == by and now - msg.ts <= window_ms
    if not allowed and conv.startswith("g:"):
        m = yield one(
            "SELECT role FROM conv_members WHERE conv = ? AND user_id = ? AND left_seq IS NULL",
            conv,
            by,
        )
        allowed = m is not None and m[0] in ("owner", "admin")
    if not allowed:
        if msg.sender == by:
            raise Forbidden("the recall window has passed")
        raise Forbidden("you may not recall this message")
    # The conversation's next change number. On PostgreSQL this UPDATE takes the
    # conversation row's lock until commit, so recalls on several nodes get distinct,
    # gap-free numbers, in the order they commit; and it is taken before the message's row,
    # the order a send in the same batch takes them in (no deadlock).
    r = yield one(
        "UPDATE conversations SET change_seq = change_seq + 1 WHERE conv = ? "
        "RETURNING change_seq",
        conv,
    )
    change_seq = int(r[0])
    n = yield count(
        "UPDATE messages SET recalled_by = ?, recalled_at = ?, body = ?, change_seq = ? "
        "WHERE conv = ? AND seq = ? AND recalled_by IS NULL",
        by,
        now,
        "{}",
        change_seq,
        conv,
        seq,
    )
    if not n:
        # Another node recalled it after our check, and committed while we waited for the
        # conversation's lock (only possible with PostgreSQL). Give the number back (the
        # row is still ours) so that the refusal changes nothing, as every refusal must.
        yield execute(
            "UPDATE conversations SET change_seq = change_seq - 1 WHERE conv = ?", conv
        )
        raise Conflict("message already recalled")
    msg.recalled_by, msg.recalled_at, msg.body = by, now, {}
    msg.change_seq = change_seq
    return msg


def changes(
    conv: str, lo: int, hi: int | None, after: int, limit: int
) -> Op[tuple[list[Message], bool]]:
    """Messages of ``conv`` within the visible range [lo, hi] whose change number is above
    ``after``, ascending by it (each with ``change_seq`` set); and whether more follow."""
    upper = hi if hi is not None else 2**62
    rs = yield rows(
        f"SELECT {MSG_COLS}, change_seq FROM messages WHERE conv = ? AND change_seq > ? "
        "AND seq >= ? AND seq <= ? ORDER BY change_seq ASC LIMIT ?",
        conv,
        after,
        lo,
        upper,
        limit + 1,
    )
    msgs = []
    for r in rs[:limit]:
        msg = msg_from_row(r)
        msg.change_seq = int(r[12])
        msgs.append(msg)
    return msgs, len(rs) > limit


def set_conv_muted(conv: str, user: str, on: bool) -> Op[None]:
    n = yield count(
        "UPDATE conv_members SET conv_muted = ? WHERE conv = ? AND user_id = ?",
        1 if on else 0,
        conv,
        user,
    )
    if not n:
        raise NotFound("no such conversation")


# ---------------------------------------------------------------- blocks


def block_add(user: str, blocked: str, now: int) -> Op[None]:
    yield execute(
        "INSERT INTO blocks (user_id, blocked, created_at) VALUES (?, ?, ?) "
        "ON CONFLICT (user_id, blocked) DO NOTHING",
        user,
        blocked,
        now,
    )


def block_remove(user: str, blocked: str) -> Op[bool]:
    n = yield count("DELETE FROM blocks WHERE user_id = ? AND blocked = ?", user, blocked)
    return bool(n)


def block_list(user: str) -> Op[list[str]]:
    rs = yield rows("SELECT blocked FROM blocks WHERE user_id = ? ORDER BY blocked", user)
    return [r[0] for r in rs]


def is_blocked(user: str, by: str) -> Op[bool]:
    """True when ``by`` has blocked ``user``."""
    r = yield one("SELECT 1 FROM blocks WHERE user_id = ? AND blocked = ?", by, user)
    return r is not None
