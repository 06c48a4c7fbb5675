"""``chat``: sender/receiver pairs exchanging 1:1 messages.

Each sender keeps ``--window`` messages in flight (closed loop) or sends at its share of
``--rate`` msgs/s (open loop, latency measured from the intended send time so a slow server
cannot hide behind a slowed-down generator). The body carries the send timestamp; the
receiver counts every ``client_msg_id`` so lost and duplicated deliveries are detected.
A message is complete when both its reply and its delivery have arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import time
from typing import Any, ClassVar

from loadtest.scenarios.base import Context, Scenario, register
from loadtest.wire import ConnectError, Frame, SioConn, WsConn

_NS = 1_000_000_000


class Pair:
    """One sender, one receiver, and the messages between them.

    With ``--devices D`` both users have D devices: the sender's first device sends, every
    receiver device must get each message once, and so must the sender's other devices
    (the protocol syncs a user's own messages to their other devices).
    """

    def __init__(
        self,
        scenario: Chat,
        unit: int,
        senders: list[WsConn | SioConn],
        receivers: list[WsConn | SioConn],
    ) -> None:
        self.s = scenario
        self.unit = unit
        self.sender = senders[0]
        self.receiver = receivers[0]
        self.receivers = receivers
        self.syncs = senders[1:]
        # Deliveries each message owes: every receiver device and the sender's other devices.
        self.owed = len(receivers) + len(self.syncs)
        self.tag = f"{scenario.ctx.users.run}.{scenario.name}.{unit}"
        # k -> [send time ns, replied, deliveries still owed]
        self.pending: dict[int, list[Any]] = {}
        # Per receiving device (receivers first, then the sender's other devices).
        self.seen: list[set[int]] = [set() for _ in range(self.owed)]
        self.received = self.seen[0]
        self.overdue: dict[int, int] = {}  # acked, timed out: deliveries still owed
        self.next_k = 0
        self.window: asyncio.Semaphore | None = None
        self.refill_until: float | None = None  # see _refill
        pad = "x" * max(0, scenario.size - 20)
        # Pre-built frame text: the hot path only formats two numbers in.
        self.template = (
            '{{"type":"msg.send","id":"{k}","to":{{"user":"' + self.receiver.user + '"}},'
            '"client_msg_id":"' + self.tag + '.{k}",'
            '"kind":"text","body":{{"text":"{t} ' + pad + '"}}}}'
        )
        self.sender.handler = self.on_sender_frame
        for i, conn in enumerate([*receivers, *self.syncs]):
            conn.handler = functools.partial(self.on_receiver_frame, i)

    def frame_text(self, k: int, t_ns: int) -> str:
        """The msg.send frame for message ``k`` stamped ``t_ns``."""
        return self.template.format(k=k, t=t_ns)

    async def send(self, t_ns: int) -> None:
        """Send the next message, stamped with ``t_ns`` (its intended send time)."""
        if isinstance(self.sender, WsConn):
            self.send_now(t_ns)
            return
        k = self._track(t_ns)
        await self.sender.send(self.s.frame_dict(self, k, t_ns))
        self.s.rec.counts["sent"] += 1

    def send_now(self, t_ns: int) -> None:
        """:meth:`send` on a WebSocket, which writes synchronously."""
        assert isinstance(self.sender, WsConn)
        k = self._track(t_ns)
        self.sender.send_bytes_now(self.frame_text(k, t_ns).encode())
        self.s.rec.counts["sent"] += 1

    def _track(self, t_ns: int) -> int:
        k = self.next_k
        self.next_k = k + 1
        self.pending[k] = [t_ns, False, self.owed]
        self.s.rec.in_flight += 1
        return k

    def _complete(self, k: int) -> None:
        del self.pending[k]
        self.s.rec.in_flight -= 1
        if self.refill_until is not None:
            self._refill()
        elif self.window is not None:
            self.window.release()

    def _refill(self) -> None:
        """Closed loop on a WebSocket: a completed message's slot sends the next one at once
        (no task wake-up per message), until the run's end."""
        assert self.refill_until is not None
        if time.monotonic() >= self.refill_until or self.sender.closed:
            return
        try:
            self.send_now(time.monotonic_ns())
        except ConnectionError as exc:  # counted as _drive counts it; the slot stays empty
            self.s.rec.error(f"send:{type(exc).__name__}")

    def on_sender_frame(self, frame: Frame) -> None:
        """Replies to our msg.send."""
        kind = frame.get("type")
        rec = self.s.rec
        if kind == "reply":
            try:
                k = int(frame["id"])
            except (KeyError, TypeError, ValueError):
                rec.error("reply:unknown_id")
                return
            entry = self.pending.get(k)
            if entry is None:
                rec.counts["late_replies"] += 1
                return
            if frame.get("ok"):
                rec.counts["acked"] += 1
                rec.counts["expected_deliveries"] += len(self.receivers)
                if self.syncs:
                    rec.counts["expected_synced"] += len(self.syncs)
                rec.latency("send_reply", (time.monotonic_ns() - entry[0]) / 1000)
                entry[1] = True
                self.s.on_acked(self, frame, entry[0])
                if entry[2] <= 0:
                    self._complete(k)
            else:
                err = frame.get("error") or {}
                rec.error(f"msg.send:{err.get('code', 'unknown')}")
                if entry[2] < self.owed:
                    rec.counts["delivered_unacked"] += 1
                self._complete(k)
        elif kind == "error":
            rec.error(f"error:{frame.get('code', 'unknown')}")
        elif kind == "msg.new":
            rec.counts["echo"] += 1  # our own message on our own device: not expected
        else:
            self.s.on_sender_event(self, frame)

    def on_receiver_frame(self, device: int, frame: Frame) -> None:
        """Deliveries to receiving device ``device`` (0: the receiver's first device)."""
        kind = frame.get("type")
        rec = self.s.rec
        if kind != "msg.new":
            if kind == "error":
                rec.error(f"error:{frame.get('code', 'unknown')}")
            elif device == 0:
                self.s.on_receiver_frame(self, frame)
            else:
                rec.counts["other_events"] += 1
            return
        now = time.monotonic_ns()
        try:
            k = int(str(frame["client_msg_id"]).rsplit(".", 1)[1])
            t_ns = int(frame["body"]["text"].split(" ", 1)[0])
        except (KeyError, IndexError, TypeError, ValueError):
            rec.error("deliver:unparsable")
            return
        seen = self.seen[device]
        if k in seen:
            rec.counts["duplicates"] += 1
            return
        seen.add(k)
        if device < len(self.receivers):
            rec.counts["delivered"] += 1
            rec.latency("send_deliver", (now - t_ns) / 1000)
            if device == 0:
                self.s.on_delivered(self, frame)
        else:
            rec.counts["synced"] += 1
            rec.latency("send_sync", (now - t_ns) / 1000)
        entry = self.pending.get(k)
        if entry is None:
            left = self.overdue.get(k)
            if left:
                self.overdue[k] = left - 1
                rec.counts["late_deliveries"] += 1
            return
        entry[2] -= 1
        if entry[1] and entry[2] <= 0:
            self._complete(k)

    def sweep(self, now_ns: int, timeout_ns: int) -> None:
        """Give up on messages older than the timeout (frees their window slots)."""
        old = [k for k, e in self.pending.items() if now_ns - e[0] > timeout_ns]
        for k in old:
            entry = self.pending[k]
            self.s.rec.counts["timeouts"] += 1
            if entry[1] and entry[2] > 0:
                self.overdue[k] = entry[2]
            elif not entry[1]:
                self.s.rec.error("msg.send:no_reply")
            self._complete(k)


@register
class Chat(Scenario):
    """1:1 chat between sender/receiver pairs."""

    name = "chat"
    help = "N sender/receiver pairs; closed-loop window or open-loop rate"
    clients_per_unit = 2
    transports: ClassVar[tuple[str, ...]] = ("ws", "socketio")
    baseline_ok = True
    headline = ("delivered", "send_deliver")

    def __init__(self, ctx: Context, units: list[int], first_client: int, total_units: int) -> None:
        super().__init__(ctx, units, first_client, total_units)
        self.pairs: list[Pair] = []
        self.size = int(self.opts.size)
        self.window = int(self.opts.window)
        self.rate = float(self.opts.rate)
        self.timeout_ns = int(float(self.opts.msg_timeout) * _NS)
        self.devices = max(1, int(getattr(self.opts, "devices", 1) or 1))

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """``--pairs`` fixes the number of pairs regardless of ``--clients`` and weights."""
        parser.add_argument(
            "--pairs", type=int, default=0, help="chat: number of sender/receiver pairs"
        )
        parser.add_argument(
            "--devices", type=int, default=1,
            help="chat/receipts: devices per user (every one gets every message)",
        )

    @classmethod
    def fixed_clients(cls, opts: argparse.Namespace) -> int:
        """``--pairs`` wins over the share of ``--clients``."""
        return 2 * int(getattr(opts, "pairs", 0) or 0)

    @classmethod
    def checks(cls, counts: dict[str, int], errors: dict[str, int]) -> dict[str, Any]:
        """Every acked message delivered exactly once to every device, nothing failed."""
        sent, acked, delivered = (
            counts.get("sent", 0),
            counts.get("acked", 0),
            counts.get("delivered", 0),
        )
        expected = counts.get("expected_deliveries", acked)
        synced, expected_synced = counts.get("synced", 0), counts.get("expected_synced", 0)
        lost, dups = counts.get("lost", 0), counts.get("duplicates", 0)
        out = {
            "sent": sent,
            "acked": acked,
            "delivered": delivered,
            "lost": lost,
            "duplicates": dups,
            "ok": sent > 0
            and sent == acked
            and delivered == expected
            and synced == expected_synced
            and not lost
            and not dups
            and not errors,
        }
        if expected != acked or expected_synced:
            out.update({"expected_deliveries": expected, "synced": synced,
                        "expected_synced": expected_synced})
        return out

    def frame_dict(self, pair: Pair, k: int, t_ns: int) -> Frame:
        """The msg.send frame as an object (socket.io encodes it itself)."""
        pad = "x" * max(0, self.size - 20)
        return {
            "type": "msg.send",
            "id": str(k),
            "to": {"user": pair.receiver.user},
            "client_msg_id": f"{pair.tag}.{k}",
            "kind": "text",
            "body": {"text": f"{t_ns} {pad}"},
        }

    def on_delivered(self, pair: Pair, frame: Frame) -> None:
        """Hook: a new message reached the receiver (receipts answers it)."""

    def on_acked(self, pair: Pair, frame: Frame, t_ns: int) -> None:
        """Hook: the sender got an ok reply for a message stamped ``t_ns``."""

    def on_sender_event(self, pair: Pair, frame: Frame) -> None:
        """Hook: any other frame to the sender."""
        self.rec.counts["other_events"] += 1

    def on_receiver_frame(self, pair: Pair, frame: Frame) -> None:
        """Hook: any frame to the receiver other than msg.new and error."""
        self.rec.counts["other_events"] += 1

    async def setup(self) -> None:
        """Connect both sides of every pair."""
        sem = asyncio.Semaphore(int(self.opts.connect_concurrency))

        devices = [f"d{j + 1}" for j in range(self.devices)]

        async def make(unit: int) -> None:
            async with sem:
                try:
                    s = [await self.connect(self.client_index(unit, 0), d) for d in devices]
                    r = [await self.connect(self.client_index(unit, 1), d) for d in devices]
                except ConnectError:
                    return  # counted by code; the pair just does not take part
            pair = Pair(self, unit, s, r)
            self.pairs.append(pair)
            for conn in (*s, *r):
                conn.start()

        await asyncio.gather(*(make(u) for u in self.units))

    async def run(self, stop_at: float) -> None:
        """Drive every sender until ``stop_at``; sweep timeouts meanwhile."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        sweeper = loop.create_task(self._sweep_loop())
        try:
            await asyncio.gather(*(self._drive(p, start, stop_at) for p in self.pairs))
        finally:
            sweeper.cancel()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic_ns()
            for p in self.pairs:
                p.sweep(now, self.timeout_ns)

    async def _drive(self, pair: Pair, start: float, stop_at: float) -> None:
        delay = self.ramp_delay(pair.unit)
        if delay:
            await asyncio.sleep(delay)
        try:
            if self.rate > 0:
                # The schedule is fixed from the run start (a sender that starts late
                # catches up), and senders are phase-shifted so they do not send in bursts.
                phase = (pair.unit % max(1, self.total_units)) / max(1, self.total_units)
                interval = max(1, self.total_units) / self.rate
                await self._open_loop(pair, start + delay + phase * interval, stop_at)
            else:
                await self._closed_loop(pair, stop_at)
        except (ConnectionError, RuntimeError) as exc:
            self.rec.error(f"send:{type(exc).__name__}")

    async def _closed_loop(self, pair: Pair, stop_at: float) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(pair.sender, WsConn):
            # Fill the window; each completion refills its slot (Pair._refill).
            pair.refill_until = stop_at
            for _ in range(self.window):
                if loop.time() >= stop_at or pair.sender.closed:
                    return
                pair.send_now(time.monotonic_ns())
            await asyncio.sleep(max(0.0, stop_at - loop.time()))
            return
        window = pair.window = asyncio.Semaphore(self.window)
        while True:
            await window.acquire()
            if loop.time() >= stop_at or pair.sender.closed:
                window.release()
                return
            await pair.send(time.monotonic_ns())

    async def _open_loop(self, pair: Pair, start: float, stop_at: float) -> None:
        loop = asyncio.get_running_loop()
        senders = max(1, self.total_units)
        interval = senders / self.rate
        # loop.time() is time.monotonic(): the intended send instants in the same clock.
        origin_ns = int(start * _NS)
        n = 0
        while True:
            due = start + n * interval
            if due >= stop_at or pair.sender.closed:
                return
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            # Stamp the intended time: latency includes any lag in sending it.
            await pair.send(origin_ns + int(n * interval * _NS))
            n += 1

    async def drain(self, deadline: float) -> None:
        """Wait until nothing is pending or the deadline passes."""
        loop = asyncio.get_running_loop()
        while loop.time() < deadline and any(p.pending for p in self.pairs):  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    def finish(self) -> dict[str, Any]:
        """Acked messages never delivered are lost; unanswered ones are errors."""
        lost = 0
        no_reply = 0
        for p in self.pairs:
            # Counted in deliveries: one per device that never got an acked message.
            lost += sum(p.overdue.values())
            for entry in p.pending.values():
                if entry[1] and entry[2] > 0:
                    lost += entry[2]
                elif not entry[1]:
                    no_reply += 1
            p.pending.clear()
        self.rec.in_flight = 0
        self.rec.counts["lost"] += lost
        if no_reply:
            self.rec.error("msg.send:no_reply", no_reply)
        return {"pairs": len(self.pairs)}
