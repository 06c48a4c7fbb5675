"""Schema migrations applied to a database that an earlier release created (both stores)."""

from __future__ import annotations

import re
import sqlite3
import time
from typing import Any

import asyncpg

from im_bridge.messages import ChatService
from im_bridge.store import open_store
from im_bridge.store.migrations import MIGRATIONS

DM = "dm:alice:bob"
# The last schema before the change counter (migration 3).
BEFORE_CHANGES = 2


def _rows(now: int) -> list[tuple[str, tuple[Any, ...]]]:
    """Rows as the version-2 schema holds them: a conversation of three messages sent
    ``now``, the second already recalled (before change counters existed)."""
    return [
        (
            "INSERT INTO conversations (conv, kind, last_seq, created_at) VALUES (?, 'dm', 3, 1)",
            (DM,),
        ),
        *[
            (
                "INSERT INTO conv_members (conv, user_id, joined_seq, joined_at) "
                "VALUES (?, ?, 1, 1)",
                (DM, user),
            )
            for user in ("alice", "bob")
        ],
        *[
            (
                "INSERT INTO messages (conv, seq, msg_id, sender, sender_device, kind, body, ts, "
                "recalled_by, recalled_at) VALUES (?, ?, ?, 'alice', 'a1', 'text', ?, ?, ?, ?)",
                (DM, seq, f"m{seq}", body, now, by, None if by is None else now),
            )
            for seq, body, by in (
                (1, '{"text":"one"}', None),
                (2, "{}", "alice"),
                (3, '{"text":"x"}', None),
            )
        ],
    ]


def _numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2, …``."""
    n = iter(range(1, 1000))
    return re.sub(r"\?", lambda _: f"${next(n)}", sql)


def _old_statements() -> list[tuple[str, tuple[Any, ...]]]:
    stmts: list[tuple[str, tuple[Any, ...]]] = [
        ("CREATE TABLE schema_version (version INTEGER NOT NULL)", ())
    ]
    for version, statements in enumerate(MIGRATIONS[:BEFORE_CHANGES], start=1):
        stmts += [(s, ()) for s in statements]
        stmts.append((f"INSERT INTO schema_version (version) VALUES ({version})", ()))
    return stmts + _rows(int(time.time() * 1000))


async def _create_old_database(url: str) -> None:
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            for sql, args in _old_statements():
                conn.execute(sql, args)
        finally:
            conn.close()
        return
    pg = await asyncpg.connect(url)
    try:
        for sql, args in _old_statements():
            await pg.execute(_numbered(sql), *args)
    finally:
        await pg.close()


async def test_change_counter_migration_on_a_database_of_the_previous_schema(store_url: str):
    await _create_old_database(store_url)
    store = open_store(store_url)
    await store.open()  # applies what is missing
    try:
        chat = ChatService(store)
        [summary] = await chat.conversations("bob")
        assert (summary.last_seq, summary.change_seq) == (3, 0)
        # the old recall has no change number: nothing to fetch, the history still shows it
        assert await chat.changes("bob", DM, 0, 50) == ([], False)
        hist, _ = await chat.history("bob", DM, None, None, 50)
        assert hist[1].recalled_by == "alice" and hist[1].body == {}
        msg, _ = await chat.recall("alice", DM, 3)
        assert msg.change_seq == 1
        changes, more = await chat.changes("bob", DM, 0, 50)
        assert [(m.seq, m.change_seq, m.body) for m in changes] == [(3, 1, {})] and not more
        # new conversations start at 0 as well
        await chat.send("alice", "a1", {"user": "carol"}, None, "text", {"text": "hi"})
        convs = {c.conv: c.change_seq for c in await chat.conversations("alice")}
        assert convs == {DM: 1, "dm:alice:carol": 0}
    finally:
        await store.close()
    reopened = open_store(store_url)
    await reopened.open()  # nothing left to apply
    try:
        [summary] = await ChatService(reopened).conversations("bob")
        assert summary.change_seq == 1
    finally:
        await reopened.close()
