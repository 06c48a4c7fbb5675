"""/metrics: what an operator reads to see how loaded a node is."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Node


def _lag(text: str) -> tuple[float, float]:
    """From a scrape: (loop-lag samples taken, samples later than 0.25 s)."""
    for fam in text_string_to_metric_families(text):
        if fam.name == "talkbridge_event_loop_lag_seconds":
            le = {s.labels["le"]: s.value for s in fam.samples if s.name.endswith("_bucket")}
            return le["+Inf"], le["+Inf"] - le["0.25"]
    raise AssertionError("no talkbridge_event_loop_lag_seconds in /metrics")


async def test_event_loop_lag_shows_a_stalled_node(node: Node) -> None:
    async with aiohttp.ClientSession() as s:

        async def scrape() -> str:
            r = await s.get(f"{node.url}/metrics")
            return await r.text()

        await asyncio.sleep(0.6)  # an idle node: sampled, never late by much
        idle = await scrape()
        samples, late = _lag(idle)
        assert samples >= 1
        assert "talkbridge_store_pending_ops 0.0" in idle
        time.sleep(0.6)  # noqa: ASYNC251 (on purpose: the node shares this loop; it stalls)
        await asyncio.sleep(0.3)  # the late sample is taken
        samples_after, late_after = _lag(await scrape())
        assert samples_after > samples
        assert late_after >= late + 1


def _batches(text: str) -> tuple[float, float, float]:
    """From a scrape: (batches committed, batches timed, those slower than 0.25 s)."""
    committed = timed = slow = -1.0
    for fam in text_string_to_metric_families(text):
        if fam.name == "talkbridge_store_batches":
            committed = fam.samples[0].value
        if fam.name == "talkbridge_store_batch_seconds":
            le = {s.labels["le"]: s.value for s in fam.samples if s.name.endswith("_bucket")}
            timed, slow = le["+Inf"], le["+Inf"] - le["0.25"]
    return committed, timed, slow


async def test_a_batch_held_up_on_its_way_to_disk_shows_in_the_batch_times(
    node: Node, tmp_path: Path
) -> None:
    alice = await node.client("alice")
    await alice.request("msg.send", to={"user": "bob"}, body={"text": "first"})
    async with aiohttp.ClientSession() as s:

        async def scrape() -> str:
            r = await s.get(f"{node.url}/metrics")
            return await r.text()

        committed, timed, slow = _batches(await scrape())
        assert committed >= 1 and timed == committed
        # Another connection (a backup tool's, say) holds the database's write lock for
        # 0.4 s: the next batch waits for it.
        other = sqlite3.connect(tmp_path / "store.sqlite3", isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            sent = asyncio.ensure_future(
                alice.request("msg.send", to={"user": "bob"}, body={"text": "second"})
            )
            await asyncio.sleep(0.4)
            other.execute("COMMIT")
        finally:
            other.close()
        await sent
        committed_after, timed_after, slow_after = _batches(await scrape())
    assert committed_after > committed and timed_after == committed_after
    assert slow_after == slow + 1
