"""Group commit: batch concurrent write ops into one transaction.

While one batch commits, new ops queue up and form the next batch, so the number of
commits (fsyncs) per second stays bounded while throughput grows with concurrency.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from im_bridge.store.ops import Op

log = logging.getLogger(__name__)

# Runs a batch and returns one result per op: a value or the exception that op raised.
BatchRunner = Callable[[list[Op[Any]]], Awaitable[list[Any]]]


class GroupCommit:
    """Queue of write ops drained by one task into batches of at most ``max_batch``."""

    def __init__(self, run_batch: BatchRunner, max_batch: int = 1024) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._pending: list[tuple[Op[Any], asyncio.Future[Any]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.batches = 0
        self.ops = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._drain(), name="group-commit")

    async def submit(self, op: Op[Any]) -> Any:
        """Queue an op; return its result once its batch has committed."""
        if self._closing:
            op.close()
            raise RuntimeError("store is closing")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((op, fut))
        self._wakeup.set()
        return await fut

    async def _drain(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                try:
                    results = await self._run_batch([op for op, _ in batch])
                except Exception as exc:  # the runner failed as a whole: fail the batch
                    log.exception("group commit batch failed")
                    results = [exc] * len(batch)
                self.batches += 1
                self.ops += len(batch)
                for (_, fut), res in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(res, BaseException):
                        fut.set_exception(res)
                    else:
                        fut.set_result(res)
            if self._closing:
                return

    async def close(self) -> None:
        """Stop accepting ops and wait for the queued ones to commit."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
