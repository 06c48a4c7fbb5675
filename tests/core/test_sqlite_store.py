"""The SQLite store's writer: statements on the event loop, waits in the writer thread."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from im_bridge.messages import ChatService
from im_bridge.store import open_store
from im_bridge.store.sqlite import SqliteStore


@pytest.fixture
async def sqlite_path(tmp_path: Path) -> AsyncIterator[Path]:
    path = tmp_path / "db.sqlite3"
    store = open_store(f"sqlite:///{path}")
    await store.open()  # creates the schema
    await store.close()
    yield path


async def test_a_send_waits_for_another_connections_write_lock_and_the_loop_keeps_serving(
    sqlite_path: Path,
) -> None:
    store = open_store(f"sqlite:///{sqlite_path}")
    assert isinstance(store, SqliteStore)
    await store.open()
    other = sqlite3.connect(sqlite_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # e.g. an admin's sqlite3 shell, mid-transaction
        chat = ChatService(store)
        send = asyncio.ensure_future(
            chat.send("alice", "d1", {"user": "bob"}, "c1", "text", {"text": "hi"})
        )
        # Were the event loop the one waiting for the lock, this sleep would only end once
        # the send had failed (no COMMIT could come from this thread meanwhile).
        await asyncio.sleep(0.3)
        assert not send.done()
        other.execute("COMMIT")
        sent = await asyncio.wait_for(send, 5)
        assert (sent.message.seq, sent.created) == (1, True)
        stored, _ = await chat.history("bob", sent.message.conv, None, None, 10)
        assert [m.body["text"] for m in stored] == ["hi"]
    finally:
        other.close()
        await store.close()
