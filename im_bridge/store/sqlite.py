"""SQLite store (the embedded default): WAL, group commit, reader threads.

Python's sqlite3 is used directly rather than through aiosqlite, which hops to a thread per
statement. A group-commit batch's statements run on the event loop's thread, in chunks
between which the loop serves sockets: SQLite's work for a message is ~10 us of CPU, less
than what a writer thread costs in GIL hand-offs (every statement, and every row of an
executemany, releases and retakes the GIL, and each retake waits for the busy loop thread;
measured: +15% messages/s). The COMMIT and the fsync that makes it durable need no GIL:
they run in the writer thread, one hand-off a batch, while the loop serves sockets. So does
waiting for another process's write lock.

The writer commits with ``synchronous=NORMAL`` (the WAL frames reach the OS) and then
fdatasyncs the WAL file itself, in the same trip to the writer thread; a batch's callers
hear once that returned. (A thread of its own that synced while the next batch executed
was measured slower on the 2-core machine: one more thread hand-off per batch, ~3 ms
under load, against a sync of ~0.3 ms.) Reads run in reader threads on their own
connections, and only over durable data: between the COMMIT and its fsync a reader could
see the batch, so a reader pins its snapshot, then waits until every commit the snapshot
may hold is synced, and no reader sees a message that a power cut could take back.
"""

from __future__ import annotations

import asyncio
import logging
import os
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
from im_bridge.store.ops import Op, Query, coalesced, rows

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a batch waits for another process's write lock (the readers' busy timeout too).
WRITE_LOCK_WAIT_S = 10.0
# Ops run between two turns of the event loop (a message's op is ~10 us).
OPS_PER_TURN = 32
# The writer's page cache (KiB): the default 2 MiB makes a growing database's index pages
# fall out between batches and come back through a read syscall each.
WRITER_CACHE_KIB = 64 * 1024
# WAL checkpoints: every CHECKPOINT_EVERY_S a thread of their own copies the WAL into the
# database without blocking the writer. SQLite restarts the WAL from its start at the next
# write transaction once a checkpoint has copied all of it; under steady writes the round
# that copied the bulk never has (new frames came in meanwhile), and the WAL would grow
# without end, and with it the cost of every page look-up in it. So once the WAL holds
# RESTART_WAL_PAGES, the thread catches up: rounds at once, each copying the frames that
# came in during the one before, and once a round saw fewer than SMALL_ROUND_PAGES come
# in, rounds CATCH_UP_PAUSE_S apart: one of them soon falls between two commits, copies
# everything, and the next batch restarts the WAL (measured: within 3-13 rounds at ~24,000
# msgs/s). Failing that within CATCH_UP_ROUNDS, the writer finishes the job between two
# batches (a pause of ~10 ms in the batch pipeline). (SQLite's automatic checkpoint is
# off: it would run inside a COMMIT and hold up the batches behind it.)
CHECKPOINT_EVERY_S = 1.0
RESTART_WAL_PAGES = 16_384
SMALL_ROUND_PAGES = 512
CATCH_UP_PAUSE_S = 0.002
CATCH_UP_ROUNDS = 24
# A reader waits at most this long for the fsync of what its snapshot holds.
DURABLE_WAIT_S = 30.0


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


def _passive_checkpoint(conn: sqlite3.Connection) -> int:
    """A PASSIVE checkpoint (in a thread): it copies the WAL's frames that no reader still
    needs and never waits for the writer. Returns the WAL's size in pages when it began
    (it copies those; frames written meanwhile wait)."""
    # Stepped to its end (mode "all"): a statement left with a row to step keeps its read
    # snapshot open (the WAL cannot restart) and its connection busy (on the writer's, the
    # next COMMIT fails).
    _busy, wal_pages, _copied = _run(conn, rows("PRAGMA wal_checkpoint(PASSIVE)"))[0]
    return int(wal_pages)


class _SyncFailed(Exception):
    """The WAL's fsync failed after a COMMIT (see SqliteStore._commit_durably)."""


def _durability_unknown() -> Internal:
    """What a caller hears when the fsync after its batch's COMMIT failed."""
    return Internal("storage failure; the message may not have been stored")


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
    """Store over one SQLite file in WAL mode; a write's result is released once the WAL
    holding it is fsynced."""

    def __init__(self, url: str, readers: int = 2) -> None:
        self.url = url
        self.path = url.removeprefix("sqlite:///")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="sqlite-reader")
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-checkpoint")
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._finish_checkpoint = False  # the thread could not restart the WAL: the writer
        self.finished_checkpoints = 0  # how often the writer had to (tests look)
        self._local = threading.local()
        self._wconn: sqlite3.Connection | None = None
        self._commit = GroupCommit(self._run_batch)
        # Durability (files only; an in-memory database has nothing to sync).
        self._wal_fd: int | None = None
        self._commits = 0  # COMMITs begun: a snapshot pinned now holds at most these
        self._durable_upto = 0  # every COMMIT up to this one is on disk
        self._durable_changed = threading.Condition()
        self._sync_failed: OSError | None = None

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
        conn.execute("PRAGMA wal_autocheckpoint=0")  # see CHECKPOINT_EVERY_S
        conn.execute("PRAGMA busy_timeout=0")  # see _begin: the event loop never waits
        if self.path != ":memory:":
            # The writer's handle on the WAL, to fsync it. SQLite deletes the WAL file only
            # when its last connection closes, and this one stays open until close(): the
            # handle stays the file's. The directory is synced once so that the file itself
            # survives.
            self._wal_fd = os.open(self.path + "-wal", os.O_RDONLY)
            dir_fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            conn.execute("PRAGMA synchronous=NORMAL")  # _commit_durably fsyncs instead
        self._wconn = conn

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._open_sync)
        self._commit.start()
        if self.path != ":memory:":
            self._checkpoint_task = loop.create_task(self._checkpoints(), name="sqlite-checkpoint")

    async def close(self) -> None:
        await self._commit.close()  # returns once every batch is durable and answered
        loop = asyncio.get_running_loop()
        if self._checkpoint_task is not None:
            self._checkpoint_task.cancel()
            await asyncio.gather(self._checkpoint_task, return_exceptions=True)
        if self._wconn is not None:
            await loop.run_in_executor(self._writer, self._wconn.close)
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._checkpointer.shutdown(wait=True)
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    async def _checkpoints(self) -> None:
        loop = asyncio.get_running_loop()
        conn = await loop.run_in_executor(self._checkpointer, self._connect)

        def round_() -> asyncio.Future[int]:
            return loop.run_in_executor(self._checkpointer, _passive_checkpoint, conn)

        try:
            while True:
                await asyncio.sleep(CHECKPOINT_EVERY_S)
                if self._finish_checkpoint:
                    continue  # the writer's turn (two checkpoints at once: one gives up)
                try:
                    wal_pages = await round_()
                    if wal_pages < RESTART_WAL_PAGES:
                        continue
                    for _ in range(CATCH_UP_ROUNDS):
                        before, wal_pages = wal_pages, await round_()
                        if wal_pages < before:
                            break  # the WAL restarted
                        if wal_pages - before < SMALL_ROUND_PAGES:
                            await asyncio.sleep(CATCH_UP_PAUSE_S)
                    else:
                        self._finish_checkpoint = True
                except sqlite3.Error as exc:
                    log.warning("sqlite checkpoint failed: %s", exc)
        finally:
            await asyncio.shield(loop.run_in_executor(self._checkpointer, conn.close))

    async def _run_batch(self, ops: list[Op[Any]]) -> list[Any]:
        if self._sync_failed is not None:
            return [Internal("storage failure; nothing was stored")] * len(ops)
        try:
            return await self._transaction(ops)
        except Exception:
            # A database error mid-batch rolls the whole batch back; every caller gets
            # `internal` and may retry with the same client_msg_id (idempotent).
            log.exception("sqlite batch of %d ops rolled back", len(ops))
            return [Internal("storage failure; nothing was stored")] * len(ops)

    async def _transaction(self, ops: list[Op[Any]]) -> list[Any]:
        """Run ``ops`` in one transaction and commit it durably; their results."""
        conn = self._wconn
        assert conn is not None
        cur = conn.cursor()
        results: list[Any] = []
        if self._finish_checkpoint:
            try:
                await self._in_writer(_passive_checkpoint, conn)
            except sqlite3.Error as exc:  # the batch goes on; the WAL restarts later
                log.warning("sqlite checkpoint failed: %s", exc)
            finally:
                self._finish_checkpoint = False  # the thread's next round may start
                self.finished_checkpoints += 1
        try:
            await self._begin(conn)
            since_turn = 0
            for op, n in coalesced(ops, row_locks=False):
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
            self._commits += 1
            gen = self._commits
            # Without an automatic checkpoint, COMMIT only hands the WAL frames to the OS
            # (~4 us a message), and the fsync waits on the disk: in the writer thread,
            # where neither holds the GIL.
            try:
                await self._in_writer(self._commit_durably, conn, gen)
            except _SyncFailed:  # committed, but whether it is on disk is unknown
                return [_durability_unknown()] * len(ops)
        except BaseException:
            if conn.in_transaction:  # also after a failed COMMIT, which may leave it open
                conn.execute("ROLLBACK")
            raise
        return results

    def _commit_durably(self, conn: sqlite3.Connection, gen: int) -> None:
        """In the writer thread: COMMIT generation ``gen``, then fdatasync the WAL, which
        is append-only between checkpoints (they sync before they copy): the sync covers
        this commit and every one before it."""
        try:
            _run(conn, rows("COMMIT"))
        except BaseException:
            # Nothing of `gen` is visible, everything before it is durable: readers that
            # counted it need not wait for it.
            self._durable(gen)
            raise
        if self._wal_fd is None:
            self._durable(gen)
            return
        try:
            os.fdatasync(self._wal_fd)
        except OSError as exc:
            # Whether the data reached the disk is unknown, and a later fsync may succeed
            # without it (the kernel drops the error): stop writing at all.
            log.critical("sqlite WAL fsync failed; the store refuses writes: %s", exc)
            self._sync_failed = exc
            with self._durable_changed:
                self._durable_changed.notify_all()
            raise _SyncFailed from exc
        self._durable(gen)

    def _durable(self, gen: int) -> None:
        with self._durable_changed:
            self._durable_upto = gen
            self._durable_changed.notify_all()

    def _wait_durable(self, gen: int) -> None:
        """Block (a reader thread) until COMMIT ``gen`` and all before it are on disk."""
        with self._durable_changed:
            if not self._durable_changed.wait_for(
                lambda: self._durable_upto >= gen or self._sync_failed is not None,
                timeout=DURABLE_WAIT_S,
            ):
                raise Internal("storage is not syncing; try again")
        if self._sync_failed is not None:
            raise Internal("storage failure")

    async def _begin(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE: here when the write lock is free (always, unless another
        process writes to the file), else waiting for it in the writer thread."""
        try:
            conn.execute("BEGIN IMMEDIATE")  # the connection's busy timeout is 0: no wait
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise
            await self._in_writer(_begin_waiting, conn, WRITE_LOCK_WAIT_S)

    async def _in_writer(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` (work that holds no GIL for long: COMMIT, fsync, a checkpoint,
        waiting for the write lock) in the writer thread. Even when cancelled, return only
        once it has finished: until then the connection is the thread's."""
        done = asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)
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
        conn = self._reader_conn()
        if self._wal_fd is None:
            return drive(conn, op)
        conn.execute("BEGIN")
        try:
            # The first read pins the snapshot; it holds no COMMIT begun after it.
            conn.execute("SELECT 1 FROM schema_version LIMIT 1").fetchone()
            self._wait_durable(self._commits)
            return drive(conn, op)
        finally:
            conn.execute("ROLLBACK")  # a read: nothing to keep, and any statement may pend

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
        return self._commit.stats()
