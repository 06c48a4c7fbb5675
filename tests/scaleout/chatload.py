"""Steady 1:1 chat across nodes that counts every delivery per ``client_msg_id``.

Each pair has a sender (one device) and a receiver with two devices, all three homed on
different nodes. Senders retry a send that lost its connection with the same
``client_msg_id`` until it is acknowledged, as an app does. Every receiver device counts the
``msg.new`` events its client hands out (live or synced). At the end each sender sends one
last message; a receiver that missed anything sees the sequence gap and fills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field

from signaling.client import Client, ClientError
from tests.scaleout.cluster import Cluster
from tests.support import until


@dataclass
class Device:
    """One receiving device and what it got."""

    client: Client
    label: str
    got: Counter[str] = field(default_factory=Counter)
    task: asyncio.Task[None] | None = None

    async def collect(self) -> None:
        async for ev in self.client.events():
            if ev.get("type") == "msg.new" and isinstance(ev.get("client_msg_id"), str):
                self.got[ev["client_msg_id"]] += 1


@dataclass
class Pair:
    """A sender and the receiving devices of its peer."""

    index: int
    sender: Client
    receiver_user: str
    devices: list[Device]
    acked: dict[str, int] = field(default_factory=dict)  # client_msg_id -> seq
    retries: int = 0


class ChatLoad:
    """``pairs`` senders sending ``rate`` msgs/s each to receivers on other nodes."""

    def __init__(self, cluster: Cluster, pairs: int, rate: float, tag: str = "load") -> None:
        self.cluster = cluster
        self.n_pairs = pairs
        self.interval = 1.0 / rate
        self.tag = tag
        self.pairs: list[Pair] = []
        self._running = False
        self._senders: list[asyncio.Task[None]] = []
        self.missing_before_last = 0  # filled by the last message's gap fill (or a sync)

    async def connect(self) -> None:
        n = self.cluster.n
        for i in range(self.n_pairs):
            s_user, r_user = f"{self.tag}s{i}", f"{self.tag}r{i}"
            sender = await self.cluster.client(s_user, "phone", home=i % n)
            devices = []
            for k, dev in enumerate(("phone", "laptop")):
                c = await self.cluster.client(r_user, dev, home=(i + 1 + k) % n)
                devices.append(Device(c, f"{r_user}/{dev}"))
            self.pairs.append(Pair(i, sender, r_user, devices))
        for p in self.pairs:
            for d in p.devices:
                d.task = asyncio.get_running_loop().create_task(d.collect())

    def start(self) -> None:
        self._running = True
        self._senders = [asyncio.get_running_loop().create_task(self._send_loop(p))
                         for p in self.pairs]

    async def _send_one(self, p: Pair, cmid: str, text: str) -> None:
        """Send until acknowledged (same client_msg_id on every try), for up to 60 s."""
        deadline = time.monotonic() + 60
        while True:
            try:
                data = await p.sender.send_text(text, user=p.receiver_user, client_msg_id=cmid)
                p.acked[cmid] = int(data["seq"])
                return
            except (ClientError, TimeoutError) as exc:
                if isinstance(exc, ClientError) and exc.code not in ("connection_lost",
                                                                     "internal"):
                    raise
                if time.monotonic() > deadline:
                    raise
                p.retries += 1
                await asyncio.sleep(0.05)

    async def _send_loop(self, p: Pair) -> None:
        k = 0
        next_at = time.monotonic()
        while self._running:
            k += 1
            await self._send_one(p, f"{self.tag}-{p.index}-{k}", f"m{k}")
            next_at += self.interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def stop(self, settle: float = 30.0) -> None:
        """Stop sending, send each pair's last message, wait until deliveries are complete."""
        self._running = False
        await asyncio.gather(*self._senders)
        self.missing_before_last = len(self.missing())
        await asyncio.gather(*(self._send_one(p, f"{self.tag}-{p.index}-last", "last")
                               for p in self.pairs))
        with contextlib.suppress(TimeoutError):  # what is still missing then is reported
            await until(lambda: not self.missing(), settle, every=0.2)
        await asyncio.sleep(0.5)  # late duplicates would show up now
        for p in self.pairs:
            for d in p.devices:
                if d.task is not None:
                    d.task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await d.task

    def summary(self) -> str:
        reconnects = sum(c.reconnects for p in self.pairs
                         for c in [p.sender, *(d.client for d in p.devices)])
        return (f"{self.tag}: acked {self.acked_total}, send retries "
                f"{sum(p.retries for p in self.pairs)}, client reconnects {reconnects}, "
                f"missing before the last message {self.missing_before_last}")

    @property
    def acked_total(self) -> int:
        return sum(len(p.acked) for p in self.pairs)

    def missing(self) -> list[str]:
        """``device: client_msg_id`` for every acknowledged message a device has not got."""
        return [f"{d.label}: {cmid}" for p in self.pairs for d in p.devices
                for cmid in p.acked if d.got[cmid] == 0]

    def duplicated(self) -> list[str]:
        """``device: client_msg_id xN`` for every message handed out more than once."""
        return [f"{d.label}: {cmid} x{n}" for p in self.pairs for d in p.devices
                for cmid, n in d.got.items() if n > 1]

    def unexpected(self) -> list[str]:
        """Deliveries of messages never acknowledged to their sender."""
        return [f"{d.label}: {cmid}" for p in self.pairs for d in p.devices
                for cmid in d.got if cmid not in p.acked]
