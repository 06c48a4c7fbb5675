"""``receipts``: chat pairs whose receivers answer every message as real apps do.

On each ``msg.new`` the receiver sends ``receipt.delivered`` and then ``receipt.read`` for
its seq; the sender measures send -> read-receipt latency from the ``receipt`` events.
At the end, every sender must have seen a read receipt for its last acknowledged message.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

from loadtest.scenarios.base import fire, register
from loadtest.scenarios.chat import Chat, Pair
from loadtest.wire import Frame, WsConn, encode


class Receipts(Chat):
    """Chat plus delivered/read receipts for every message."""

    name = "receipts"
    help = "chat pairs whose receivers send delivered+read receipts for every message"
    transports = ("ws",)
    baseline_ok = False
    headline = ("receipts_read", "send_read")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Per pair: (seq, send time) in reply order, and the highest read seq seen.
        self.acked_seqs: dict[int, collections.deque[tuple[int, int]]] = {}
        self.max_acked: dict[int, int] = {}
        self.read_seq: dict[int, int] = {}
        self.receipt_id = 0

    @classmethod
    def add_arguments(cls, parser: Any) -> None:
        """Shares ``--pairs`` with chat."""

    @classmethod
    def fixed_clients(cls, opts: Any) -> int:
        """Follows the mix (``--pairs`` belongs to chat)."""
        return 0

    @classmethod
    def checks(cls, counts: dict[str, int], errors: dict[str, int]) -> dict[str, Any]:
        """Chat's checks, every receipt answered, every sender saw its last message read."""
        out = Chat.checks(counts, errors)
        sent = counts.get("receipts_sent", 0)
        replied = counts.get("receipt_replies", 0)
        behind = counts.get("read_behind", 0)
        out.update({"receipts_sent": sent, "receipt_replies": replied, "read_behind": behind})
        out["ok"] = bool(out["ok"]) and sent > 0 and replied == sent and behind == 0
        return out

    def on_acked(self, pair: Pair, frame: Frame, t_ns: int) -> None:
        """Remember when the message with this seq was sent."""
        seq = int((frame.get("data") or {}).get("seq", 0))
        self.acked_seqs.setdefault(pair.unit, collections.deque()).append((seq, t_ns))
        if seq > self.max_acked.get(pair.unit, 0):
            self.max_acked[pair.unit] = seq

    def on_delivered(self, pair: Pair, frame: Frame) -> None:
        """Answer with delivered, then read, receipts (fire and forget, replies counted)."""
        conv, seq = frame.get("conv"), frame.get("seq")
        conn = pair.receiver
        for kind in ("receipt.delivered", "receipt.read"):
            self.receipt_id += 1
            text = encode({"type": kind, "id": f"r{self.receipt_id}", "conv": conv, "seq": seq})
            if isinstance(conn, WsConn):
                fire(self.rec, conn.send_text(text))
            self.rec.counts["receipts_sent"] += 1

    def on_receiver_frame(self, pair: Pair, frame: Frame) -> None:
        """Replies to the receipts."""
        if frame.get("type") == "reply":
            if frame.get("ok"):
                self.rec.counts["receipt_replies"] += 1
            else:
                self.rec.counts["receipt_replies"] += 1
                self.rec.error(f"receipt:{(frame.get('error') or {}).get('code', 'unknown')}")
        else:
            self.rec.counts["other_events"] += 1

    def on_sender_event(self, pair: Pair, frame: Frame) -> None:
        """``receipt`` events: the receiver has delivered/read up to seq."""
        if frame.get("type") != "receipt":
            self.rec.counts["other_events"] += 1
            return
        seq = int(frame.get("seq") or 0)
        if frame.get("kind") == "read":
            self.rec.counts["receipts_read"] += 1
            if seq > self.read_seq.get(pair.unit, 0):
                self.read_seq[pair.unit] = seq
            q = self.acked_seqs.get(pair.unit)
            now = time.monotonic_ns()
            while q and q[0][0] <= seq:
                s, t = q.popleft()
                if s == seq:
                    self.rec.latency("send_read", (now - t) / 1000)
        else:
            self.rec.counts["receipts_delivered"] += 1

    async def drain(self, deadline: float) -> None:
        """Also wait for each sender to see its last message read."""
        await super().drain(deadline)
        loop = asyncio.get_running_loop()
        while loop.time() < deadline and any(  # noqa: ASYNC110
            self.read_seq.get(u, 0) < s for u, s in self.max_acked.items()
        ):
            await asyncio.sleep(0.05)

    def finish(self) -> dict[str, Any]:
        """Count pairs whose sender never saw its last message read."""
        behind = sum(1 for u, s in self.max_acked.items() if self.read_seq.get(u, 0) < s)
        self.rec.counts["read_behind"] += behind
        return super().finish()


register(Receipts)
