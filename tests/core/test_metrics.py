"""/metrics: what an operator reads to see how loaded a node is."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Node


async def _scrape(node: Node) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{node.url}/metrics") as r:
        return await r.text()


def _histogram(text: str, name: str) -> tuple[float, float]:
    """From a scrape: (observations of histogram ``name``, those above 0.25 s)."""
    for fam in text_string_to_metric_families(text):
        if fam.name == name:
            le = {s.labels["le"]: s.value for s in fam.samples if s.name.endswith("_bucket")}
            return le["+Inf"], le["+Inf"] - le["0.25"]
    raise AssertionError(f"no {name} in /metrics")


def _lag(text: str) -> tuple[float, float]:
    """From a scrape: (loop-lag samples taken, samples later than 0.25 s)."""
    return _histogram(text, "talkbridge_event_loop_lag_seconds")


async def test_event_loop_lag_shows_a_stalled_node(node: Node) -> None:
    await asyncio.sleep(0.6)  # an idle node: sampled, never late by much
    idle = await _scrape(node)
    samples, late = _lag(idle)
    assert samples >= 1
    assert "talkbridge_store_pending_ops 0.0" in idle
    time.sleep(0.6)  # noqa: ASYNC251 (on purpose: the node shares this loop; it stalls)
    await asyncio.sleep(0.3)  # the late sample is taken
    samples_after, late_after = _lag(await _scrape(node))
    assert samples_after > samples
    assert late_after >= late + 1


def _batches(text: str) -> tuple[float, float, float]:
    """From a scrape: (batches committed, batches timed, those slower than 0.25 s)."""
    committed = next(fam.samples[0].value for fam in text_string_to_metric_families(text)
                     if fam.name == "talkbridge_store_batches")
    return (committed, *_histogram(text, "talkbridge_store_batch_seconds"))


async def test_a_batch_held_up_on_its_way_to_disk_shows_in_the_batch_times(
    node: Node, tmp_path: Path
) -> None:
    alice = await node.client("alice")
    await alice.request("msg.send", to={"user": "bob"}, body={"text": "first"})
    committed, timed, slow = _batches(await _scrape(node))
    assert committed >= 1 and timed == committed
    # Another connection (a backup tool's, say) holds the database's write lock for 0.4 s:
    # the next batch waits for it.
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
    committed_after, timed_after, slow_after = _batches(await _scrape(node))
    assert committed_after > committed and timed_after == committed_after
    assert slow_after == slow + 1
