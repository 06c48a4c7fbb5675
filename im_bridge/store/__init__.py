"""The message store port.

``Store`` is the interface; ``store/sqlite.py`` (embedded default) and ``store/postgres.py``
(scale-out) implement it by running the shared ops of ``store/ops.py``. Writes go through
group commit: concurrent write ops are batched into one transaction, and each caller's
result is released only after that transaction has committed (durable before the ack).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, TypeVar

from im_bridge.store.ops import Op

T = TypeVar("T")


class Store(abc.ABC):
    """Run storage ops: ``write`` (group-committed, durable on return) and ``read``."""

    url: str

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and apply pending schema migrations."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish in-flight writes, then disconnect."""

    @abc.abstractmethod
    async def write(self, op: Op[T], key: str = "") -> T:
        """Run a write op in the next group-commit batch; return after it is committed.

        ``key`` (the conversation id, where there is one) keeps ops of one conversation in
        order; ops with different keys may commit in parallel transactions.
        """

    @abc.abstractmethod
    def write_nowait(self, op: Op[Any], key: str, done: Callable[[Any], None]) -> None:
        """Like :meth:`write`, but returns at once; ``done`` gets the op's result (or the
        exception it raised) after the commit. Raises RuntimeError while closing."""

    @abc.abstractmethod
    async def read(self, op: Op[T]) -> T:
        """Run a read-only op."""

    @abc.abstractmethod
    async def ping(self) -> bool:
        """True when the database answers."""

    def stats(self) -> dict[str, Any]:
        """Counters for /metrics (batches, ops committed; pending: ops queued;
        batch_seconds: a histogram row of im_bridge/histogram.py)."""
        return {}


def open_store(url: str) -> Store:
    """The store for a URL: ``sqlite:///path`` or ``postgresql://…``."""
    if url.startswith("sqlite:///"):
        from im_bridge.store.sqlite import SqliteStore

        return SqliteStore(url)
    if url.startswith(("postgresql://", "postgres://")):
        from im_bridge.store.postgres import PostgresStore

        return PostgresStore(url)
    raise ValueError(f"unsupported store URL {url!r} (sqlite:///path or postgresql://...)")
