"""PostgreSQL store (scale-out): asyncpg pool, group commit into one transaction per batch.

Runs the same ops as SQLite; ``?`` placeholders are rewritten to ``$n`` once per statement.
Sequence allocation takes the conversation row's lock until commit, so several nodes
appending to one conversation still produce a gap-free sequence.

Batches commit in parallel (lanes, nodes), so a batch's probe for an earlier message with
the same ``(sender, client_msg_id)`` cannot see one that another batch has inserted but not
committed yet; the second insert would then fail on the unique index and roll back every
other op of its batch. So each batch first locks every ``(sender, client_msg_id)`` it may
insert (see :meth:`PostgresStore._run_batch`): the later batch waits for the earlier one's
commit, and its probe then finds the message and answers as to a retry.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from functools import lru_cache
from hashlib import blake2b
from typing import Any, TypeVar

import asyncpg

from im_bridge.errors import Internal, TalkbridgeError
from im_bridge.store import Store
from im_bridge.store.groupcommit import GroupCommit
from im_bridge.store.migrations import MIGRATIONS
from im_bridge.store.ops import MessageAppend, Op, Query, coalesced

log = logging.getLogger(__name__)
T = TypeVar("T")
_COUNT_RE = re.compile(r"(\d+)$")


@lru_cache(maxsize=512)
def pg_sql(sql: str) -> str:
    """Rewrite ``?`` placeholders to ``$1, $2, …`` (our SQL has no literal question marks)."""
    parts = sql.split("?")
    out = [parts[0]]
    for i, part in enumerate(parts[1:], start=1):
        out.append(f"${i}")
        out.append(part)
    return "".join(out)


async def _run(conn: asyncpg.Connection, q: Query) -> Any:
    sql, args, mode = q
    stmt = pg_sql(sql)
    if mode == "one":
        r = await conn.fetchrow(stmt, *args)
        return None if r is None else tuple(r)
    if mode == "all":
        return [tuple(r) for r in await conn.fetch(stmt, *args)]
    if mode == "many":
        await conn.executemany(stmt, args)
        return None
    status = await conn.execute(stmt, *args)
    if mode == "count":
        m = _COUNT_RE.search(status)
        return int(m.group(1)) if m else 0
    return None


# Group-commit lanes: transactions in flight at once, conversations hashed over them.
LANES = 4
# Ops in one batch (a lane's transaction). It bounds the client-id locks a transaction
# holds (one per op at most): PostgreSQL's shared lock table has room for about
# max_locks_per_transaction x max_connections of them (6,400 by default; one server took
# 12,500 in one transaction and failed at 13,000), and every node's four lanes hold theirs
# at once.
MAX_BATCH = 256
# Takes a transaction-level advisory lock on each key of an array, in the array's order.
_LOCK_CLIENT_IDS = "SELECT count(pg_advisory_xact_lock(k)) FROM unnest($1::bigint[]) AS k"


def client_id(op: Op[Any]) -> tuple[str, str] | None:
    """The ``(sender, client_msg_id)`` an op not yet started may insert into ``messages``;
    None for an op that inserts none, or none with a client_msg_id (group notices)."""
    if not isinstance(op, MessageAppend) or op.req.client_msg_id is None:
        return None
    return op.req.sender, op.req.client_msg_id


def client_id_locks(batch: list[Op[Any]]) -> list[int]:
    """The advisory lock keys of the client ids a batch may insert: 64-bit hashes of
    ``(sender, client_msg_id)``, the same on every node (user ids have no spaces), each
    once, sorted (every transaction takes them in one order)."""
    keys = set()
    for op in batch:
        key = client_id(op)
        if key is not None:
            digest = blake2b(f"{key[0]} {key[1]}".encode(), digest_size=8).digest()
            keys.add(int.from_bytes(digest, "big", signed=True))
    return sorted(keys)


async def drive(conn: asyncpg.Connection, op: Op[T]) -> T:
    """Run an op to completion on a connection."""
    try:
        q = next(op)
        while True:
            q = op.send(await _run(conn, q))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


class PostgresStore(Store):
    """Store over PostgreSQL."""

    def __init__(self, url: str, pool_size: int = 8, lanes: int = LANES) -> None:
        self.url = url
        self._pool_size = max(pool_size, lanes + 2)  # each lane holds a connection per batch
        self._pool: asyncpg.Pool | None = None
        self._commit = GroupCommit(self._run_batch, max_batch=MAX_BATCH, lanes=lanes)

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self.url, min_size=2, max_size=self._pool_size, statement_cache_size=512
        )
        async with self._pool.acquire() as conn:
            # One migrator at a time across nodes.
            await conn.execute("SELECT pg_advisory_lock(7340001)")
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
                )
                current = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
                for version, statements in enumerate(MIGRATIONS, start=1):
                    if version <= current:
                        continue
                    async with conn.transaction():
                        for stmt in statements:
                            await conn.execute(stmt)
                        await conn.execute(
                            "INSERT INTO schema_version (version) VALUES ($1)", version
                        )
                    log.info("postgres schema migrated to version %d", version)
            finally:
                await conn.execute("SELECT pg_advisory_unlock(7340001)")
        self._commit.start()

    async def close(self) -> None:
        await self._commit.close()
        if self._pool is not None:
            await self._pool.close()

    async def _run_batch(self, ops: list[Op[Any]]) -> list[Any]:
        """Run ``ops`` in one transaction; durable when it returns (synchronous_commit)."""
        assert self._pool is not None
        results: list[Any] = []
        locks = client_id_locks(ops)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                if locks:
                    # A batch inserting one of these client ids commits before this one
                    # goes on; then this one's probes (new statements, READ COMMITTED) see
                    # its message and answer as to a retry, instead of inserting again.
                    # No deadlock: a transaction waiting here holds no row lock, only
                    # smaller keys of these (sorted); one past here waits only for row
                    # locks (taken in the batch's key order), never for another's insert
                    # of one of its client ids (that one waits here).
                    await conn.execute(_LOCK_CLIENT_IDS, locks)
                for op, n in coalesced(ops, row_locks=True):
                    try:
                        r = await drive(conn, op)
                    except TalkbridgeError as exc:  # raised before the op's first write
                        results.extend([exc] * n)
                    else:
                        results.extend(r if n > 1 else [r])
            return results
        except Exception:
            # A database error mid-batch rolls the whole batch back; every caller gets
            # `internal` and may retry with the same client_msg_id (idempotent).
            log.exception("postgres batch of %d ops rolled back", len(ops))
            return [Internal("storage failure; nothing was stored")] * len(ops)

    async def write(self, op: Op[T], key: str = "") -> T:
        result: T = await self._commit.submit(op, key)
        return result

    def write_nowait(self, op: Op[Any], key: str, done: Callable[[Any], None]) -> None:
        self._commit.submit_nowait(op, key, done)

    async def read(self, op: Op[T]) -> T:
        assert self._pool is not None
        async with self._pool.acquire() as conn:
            return await drive(conn, op)

    async def ping(self) -> bool:
        try:
            assert self._pool is not None
            async with self._pool.acquire(timeout=2) as conn:
                await conn.fetchval("SELECT 1")
            return True
        except Exception:
            return False

    def stats(self) -> dict[str, Any]:
        return self._commit.stats()
