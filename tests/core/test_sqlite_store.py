"""The SQLite store's writer: statements on the event loop, waits in the writer thread,
answers and readers only after the fsync."""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from im_bridge.errors import Internal
from im_bridge.messages import ChatService
from im_bridge.store import open_store
from im_bridge.store.sqlite import SqliteStore
from tests.support import until


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
        async with asyncio.timeout(5):
            sent = await send
        assert (sent.message.seq, sent.created) == (1, True)
        stored, _ = await chat.history("bob", sent.message.conv, None, None, 10)
        assert [m.body["text"] for m in stored] == ["hi"]
    finally:
        other.close()
        await store.close()


async def test_a_send_is_answered_and_readable_only_once_its_commit_is_fsynced(
    sqlite_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    syncing = threading.Event()  # a COMMIT has returned and its fsync began
    real_fdatasync = os.fdatasync

    def slow_disk(fd: int) -> None:
        syncing.set()
        gate.wait(10)
        real_fdatasync(fd)

    store = open_store(f"sqlite:///{sqlite_path}")
    assert isinstance(store, SqliteStore)
    await store.open()
    chat = ChatService(store)
    try:
        first = await chat.send("alice", "d1", {"user": "bob"}, "c1", "text", {"text": "one"})
        monkeypatch.setattr("im_bridge.store.sqlite.os.fdatasync", slow_disk)
        send = asyncio.ensure_future(
            chat.send("alice", "d1", {"user": "bob"}, "c2", "text", {"text": "two"})
        )
        # Committed (the WAL holds it), not yet on disk: no answer, and a reader that
        # starts now must not see it either.
        await until(syncing.is_set, 5, every=0.01)
        read = asyncio.ensure_future(chat.history("bob", first.message.conv, None, None, 10))
        await asyncio.sleep(0.3)
        assert not send.done() and not read.done()
        gate.set()
        async with asyncio.timeout(5):
            sent = await send
        async with asyncio.timeout(5):
            msgs, _ = await read
        assert sent.message.seq == 2
        assert [m.body["text"] for m in msgs] == ["one", "two"]
    finally:
        gate.set()
        await store.close()


async def test_a_failed_fsync_fails_the_send_and_the_store_refuses_writes_after_it(
    sqlite_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_disk(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    store = open_store(f"sqlite:///{sqlite_path}")
    await store.open()
    chat = ChatService(store)
    try:
        monkeypatch.setattr("im_bridge.store.sqlite.os.fdatasync", broken_disk)
        with pytest.raises(Internal):
            await chat.send("alice", "d1", {"user": "bob"}, "c1", "text", {"text": "one"})
        monkeypatch.undo()  # the disk "recovers": a later fsync would report success
        with pytest.raises(Internal):
            await chat.send("alice", "d1", {"user": "bob"}, "c2", "text", {"text": "two"})
    finally:
        await store.close()


@asynccontextmanager
async def _checkpointed_store(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[SqliteStore, ChatService]]:
    """A store whose checkpoint thread runs every 20 ms and restarts the WAL at 64 pages."""
    monkeypatch.setattr("im_bridge.store.sqlite.CHECKPOINT_EVERY_S", 0.02)
    monkeypatch.setattr("im_bridge.store.sqlite.RESTART_WAL_PAGES", 64)
    store = open_store(f"sqlite:///{path}")
    assert isinstance(store, SqliteStore)
    await store.open()
    try:
        yield store, ChatService(store)
    finally:
        await store.close()


async def _send_rounds(chat: ChatService, pause: float) -> None:
    """300 rounds of 50 concurrent 1 KB sends, ``pause`` seconds apart."""
    text = "x" * 1000
    for round_ in range(300):
        await asyncio.gather(*(
            chat.send(f"u{i}", "d1", {"user": f"v{i}"}, f"{round_}.{i}", "text",
                      {"text": text})
            for i in range(50)
        ))
        if pause:
            await asyncio.sleep(pause)


async def test_under_steady_writes_the_wal_file_stops_growing(
    sqlite_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Writes without a pause leave the checkpoint thread no moment to copy the whole WAL:
    # once the WAL is long, the writer finishes the job at once.
    monkeypatch.setattr("im_bridge.store.sqlite.CATCH_UP_ROUNDS", 0)
    async with _checkpointed_store(sqlite_path, monkeypatch) as (store, chat):
        await _send_rounds(chat, pause=0)
        wal = os.stat(f"{sqlite_path}-wal").st_size
        db = os.stat(sqlite_path).st_size
        # 15,000 messages of 1 KB reached the database file. Without restarts the WAL
        # holds every frame written since the test began (~95 MB here); restarted
        # whenever it holds 64 pages, it stays at a few MB at most even on a loaded
        # machine (between two checkpoints of the thread, stretched by the load, batches
        # add their frames: 2.6-4.5 MB measured beside three CPU burners).
        assert db > 15_000_000
        assert wal < 8_000_000, f"WAL {wal} bytes for a database of {db}"
        assert store.finished_checkpoints > 0
        msgs, _ = await chat.history("v7", "dm:u7:v7", None, None, 100)
        assert len(msgs) == 100  # the last page of 300


async def test_when_writes_pause_the_wal_restarts_without_holding_up_the_writer(
    sqlite_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server waits for its clients now and then (a few ms): one of the checkpoint
    # thread's quick rounds falls into such a gap, copies the whole WAL, and the next
    # commit restarts it; the writer never pauses to finish a checkpoint.
    async with _checkpointed_store(sqlite_path, monkeypatch) as (store, chat):
        await _send_rounds(chat, pause=0.003)
        # It restarted (without restarts ~95 MB, see above); the thread's rounds until a
        # gap let the WAL grow past its 64 pages: 11-14 MB beside three CPU burners.
        wal = os.stat(f"{sqlite_path}-wal").st_size
        assert wal < 32_000_000, f"WAL {wal} bytes"
        assert store.finished_checkpoints == 0
