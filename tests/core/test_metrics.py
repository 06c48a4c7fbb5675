"""/metrics: what an operator reads to see how loaded a node is."""

from __future__ import annotations

import asyncio
import time

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
