"""SQLite store (the embedded default): WAL, group commit, reader threads.

Python's sqlite3 is used directly rather than through aiosqlite, which hops to a thread per
statement. A group-commit batch's statements run on the event loop's thread, in chunks
between which the loop serves sockets: SQLite's work for a message is ~15 us of CPU, less
than what a writer thread costs in GIL hand-offs (every statement releases and retakes the
GIL, and each retake waits for the busy loop thread; measured: +15% messages/s). What can
wait on the disk runs in the writer thread: BEGIN IMMEDIATE (the write lock) and COMMIT
(the fsync). Reads run in reader threads on their own connections.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from im_bridge.errors import Internal, TalkbridgeError
from im_bridge.store import Store
from im_bridge.store.groupcommit import GroupCommit
from im_bridge.store.migrations import MIGRATIONS
from im_bridge.store.ops import Op, Query, coalesced

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a batch waits for another process's write lock (the readers' busy timeout too).
WRITE_LOCK_WAIT_S = 10.0
# Ops run between two turns of the event loop (a message's op is ~15 us).
OPS_PER_TURN = 32
# The writer's page cache (KiB): the default 2 MiB makes a growing database's index pages
# fall out between batches and come back through a read syscall each.
WRITER_CACHE_KIB = 64 * 1024
# WAL checkpoints run in a thread of their own every CHECKPOINT_EVERY_S, off the commit
# path (SQLite's automatic checkpoint runs inside a committing transaction, every 1,000
# pages by default: every second batch under load). The automatic one stays as a backstop
# for a WAL that grows past this many pages anyway.
CHECKPOINT_EVERY_S = 1.0
AUTOCHECKPOINT_PAGES = 16_384


def _run(db: sqlite3.Connection | sqlite3.Cursor, q: Query) -> Any:
    sql, args, mode = q
    if mode == "many":
        db.executemany(sql, args)
        return None
    cur = db.execute(sql, args)
    if mode == "one":
        return cur.fetchone()
    if mode == "all":
        return cur.fetchall()
    if mode == "count":
        return cur.rowcount
    return None


def _begin_waiting(conn: sqlite3.Connection, wait_s: float) -> None:
    """BEGIN IMMEDIATE, retrying while another process holds the write lock (up to
    ``wait_s``; in the writer thread)."""
    deadline = time.monotonic() + wait_s
    delay = 0.001
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def drive(db: sqlite3.Connection | sqlite3.Cursor, op: Op[T]) -> T:
    """Run an op to completion on a connection (or a cursor of it: reusing one spares a
    cursor object per statement on the write path)."""
    try:
        q = next(op)
        while True:
            q = op.send(_run(db, q))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


class SqliteStore(Store):
    """Store over one SQLite file in WAL mode (synchronous=FULL: durable at commit)."""

    def __init__(self, url: str, readers: int = 2) -> None:
        self.url = url
        self.path = url.removeprefix("sqlite:///")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="sqlite-reader")
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-checkpoint")
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._local = threading.local()
        self._wconn: sqlite3.Connection | None = None
        self._commit = GroupCommit(self._run_batch)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={int(WRITE_LOCK_WAIT_S * 1000)}")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _open_sync(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        current = row[0] or 0
        for version, statements in enumerate(MIGRATIONS, start=1):
            if version <= current:
                continue
            conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in statements:
                    conn.execute(stmt)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            log.info("sqlite schema migrated to version %d", version)
        conn.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
        conn.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
        conn.execute("PRAGMA busy_timeout=0")  # see _begin: the event loop never waits
        self._wconn = conn

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._open_sync)
        self._commit.start()
        if self.path != ":memory:":
            self._checkpoint_task = loop.create_task(self._checkpoints(), name="sqlite-checkpoint")

    async def close(self) -> None:
        await self._commit.close()
        loop = asyncio.get_running_loop()
        if self._checkpoint_task is not None:
            self._checkpoint_task.cancel()
            await asyncio.gather(self._checkpoint_task, return_exceptions=True)
        if self._wconn is not None:
            await loop.run_in_executor(self._writer, self._wconn.close)
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._checkpointer.shutdown(wait=True)

    async def _checkpoints(self) -> None:
        loop = asyncio.get_running_loop()
        conn = await loop.run_in_executor(self._checkpointer, self._connect)
        try:
            while True:
                await asyncio.sleep(CHECKPOINT_EVERY_S)
                try:
                    # PASSIVE: copies what no reader still needs, never blocks the writer.
                    await loop.run_in_executor(
                        self._checkpointer, conn.execute, "PRAGMA wal_checkpoint(PASSIVE)"
                    )
                except sqlite3.Error as exc:
                    log.warning("sqlite checkpoint failed: %s", exc)
        finally:
            await asyncio.shield(loop.run_in_executor(self._checkpointer, conn.close))

    async def _run_batch(self, ops: list[Op[Any]]) -> list[Any]:
        try:
            return await self._transaction(ops)
        except Exception:
            # A database error mid-batch rolls the whole batch back; every caller gets
            # `internal` and may retry with the same client_msg_id (idempotent).
            log.exception("sqlite batch of %d ops rolled back", len(ops))
            return [Internal("storage failure; nothing was stored")] * len(ops)

    async def _transaction(self, ops: list[Op[Any]]) -> list[Any]:
        """Run ``ops`` in one transaction; their results once it has committed."""
        conn = self._wconn
        assert conn is not None
        cur = conn.cursor()
        results: list[Any] = []
        try:
            await self._begin(conn)
            since_turn = 0
            for op, n in coalesced(ops):
                if since_turn >= OPS_PER_TURN:
                    await asyncio.sleep(0)  # let the loop serve sockets between chunks
                    since_turn = 0
                since_turn += n
                try:
                    r = drive(cur, op)
                except TalkbridgeError as exc:  # raised before the op's first write
                    results.extend([exc] * n)
                else:
                    results.extend(r if n > 1 else [r])
            await self._in_writer(conn, "COMMIT")
        except BaseException:
            if conn.in_transaction:  # also after a failed COMMIT, which may leave it open
                conn.execute("ROLLBACK")
            raise
        return results

    async def _begin(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE: here when the write lock is free (always, unless another
        process writes to the file), else waiting for it in the writer thread."""
        try:
            conn.execute("BEGIN IMMEDIATE")  # the connection's busy timeout is 0: no wait
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise
            loop = asyncio.get_running_loop()
            begun = loop.run_in_executor(self._writer, _begin_waiting, conn, WRITE_LOCK_WAIT_S)
            try:
                await asyncio.shield(begun)
            except asyncio.CancelledError:
                await asyncio.wait([begun])
                raise

    async def _in_writer(self, conn: sqlite3.Connection, sql: str) -> None:
        """Run a statement that may wait on the disk or a lock in the writer thread. Even
        when cancelled, return only once it has finished: until then the connection is
        the thread's."""
        done = asyncio.get_running_loop().run_in_executor(self._writer, conn.execute, sql)
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            await asyncio.wait([done])
            raise

    async def write(self, op: Op[T], key: str = "") -> T:
        result: T = await self._commit.submit(op, key)
        return result

    def write_nowait(self, op: Op[Any], key: str, done: Callable[[Any], None]) -> None:
        self._commit.submit_nowait(op, key, done)

    def _reader_conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
        return conn

    def _read_sync(self, op: Op[T]) -> T:
        return drive(self._reader_conn(), op)

    async def read(self, op: Op[T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._read_sync, op)

    async def ping(self) -> bool:
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(
                self._readers, lambda: self._reader_conn().execute("SELECT 1").fetchone()
            )
            return True
        except Exception:
            return False

    def stats(self) -> dict[str, Any]:
        return {"batches": self._commit.batches, "ops": self._commit.ops}
