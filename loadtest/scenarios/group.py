"""``group``: members of N groups of size M chatting; measures fan-out.

Set-up: every member connects, the first creates the group with the others as members.
Run: ``--group-senders`` members per group send (closed-loop window or open-loop rate);
every other member must get each message exactly once. Latency is per delivery, so its
count is the number of fan-out deliveries.

Receiving the fan-out is the heavy part, so a group's members are spread over the workers:
the group's home worker holds the creator and the senders (and its share of receivers);
a sender's window slot frees once its reply and the deliveries to the home worker's members
have arrived. Deliveries are counted wherever they land; the analyzer compares the global
sum with ``acked * (M - 1)``. Send timestamps are CLOCK_MONOTONIC, shared by all processes.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from loadtest.scenarios.base import Context, Scenario, register, request
from loadtest.wire import ConnectError, Frame, SioConn, WsConn

_NS = 1_000_000_000


class Member:
    """One member's connection and what it has received."""

    def __init__(self, group: Group, index: int, conn: WsConn | SioConn) -> None:
        self.group = group
        self.index = index
        self.conn = conn
        self.received: set[tuple[int, int]] = set()  # (sender member, k)
        # k -> [send time ns, replied, deliveries still expected]
        self.pending: dict[int, list[Any]] = {}
        self.overdue: dict[int, int] = {}  # k -> deliveries still missing after timeout
        self.next_k = 0
        self.window: asyncio.Semaphore | None = None
        conn.handler = self.on_frame

    def on_frame(self, frame: Frame) -> None:
        """Frames to a member: replies to its sends, deliveries of the others' messages."""
        g = self.group
        s = g.s
        rec = s.rec
        kind = frame.get("type")
        if kind == "msg.new":
            if frame.get("kind") != "text":
                rec.counts["notices"] += 1
                return
            now = time.monotonic_ns()
            try:
                _tag, sender_s, k_s = str(frame["client_msg_id"]).rsplit(".", 2)
                sender, k = int(sender_s), int(k_s)
                t_ns = int(frame["body"]["text"].split(" ", 1)[0])
            except (KeyError, IndexError, TypeError, ValueError):
                rec.error("deliver:unparsable")
                return
            if sender == self.index:
                rec.counts["echo"] += 1
                return
            key = (sender, k)
            if key in self.received:
                rec.counts["duplicates"] += 1
                return
            self.received.add(key)
            rec.counts["delivered"] += 1
            rec.latency("send_deliver", (now - t_ns) / 1000)
            origin = g.members.get(sender)
            if origin is None:
                return  # sent from another worker: counted, its window is tracked there
            entry = origin.pending.get(k)
            if entry is None:
                left = origin.overdue.get(k)
                if left:
                    rec.counts["late_deliveries"] += 1
                    origin.overdue[k] = left - 1
                return
            entry[2] -= 1
            if entry[1] and entry[2] <= 0:
                s.complete(origin, k)
        elif kind == "reply":
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
                rec.counts["expected_deliveries"] += s.size - 1
                rec.latency("send_reply", (time.monotonic_ns() - entry[0]) / 1000)
                entry[1] = True
                if entry[2] <= 0:
                    s.complete(self, k)
            else:
                rec.error(f"msg.send:{(frame.get('error') or {}).get('code', 'unknown')}")
                s.complete(self, k)
        elif kind == "error":
            rec.error(f"error:{frame.get('code', 'unknown')}")
        else:
            rec.counts[f"event:{kind}"] += 1


class Group:
    """One group: its members, its conversation id and the message template."""

    def __init__(self, scenario: GroupChat, unit: int) -> None:
        self.s = scenario
        self.unit = unit
        self.members: dict[int, Member] = {}  # only the members this worker holds
        self.group_id = ""
        self.conv = ""
        self.tag = f"{scenario.ctx.users.run}.g{unit}"




@register
class GroupChat(Scenario):
    """Members of groups chatting; every message fans out to the other members."""

    name = "group"
    help = "members of N groups of size M chatting (fan-out)"
    headline = ("delivered", "send_deliver")

    def __init__(self, ctx: Context, units: list[int], first_client: int, total_units: int) -> None:
        super().__init__(ctx, units, first_client, total_units)
        self.groups: list[Group] = []
        self.size = int(self.opts.group_size)
        self.senders = max(1, min(int(self.opts.group_senders), self.size))
        self.window = int(self.opts.window)
        self.rate = float(self.opts.rate)
        self.timeout_ns = int(float(self.opts.msg_timeout) * _NS)
        self.pad = "x" * max(0, int(self.opts.size) - 20)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Group size, senders per group, number of groups."""
        parser.add_argument("--group-size", type=int, default=10, help="group: members per group")
        parser.add_argument("--group-senders", type=int, default=1,
                            help="group: members of each group that send")
        parser.add_argument("--groups", type=int, default=0,
                            help="group: number of groups (default: from --clients)")

    @classmethod
    def units_for(cls, worker: int, workers: int, total_units: int) -> list[int]:
        """Every worker takes part in every group (it holds a share of the members)."""
        return list(range(total_units))

    def home(self, unit: int) -> bool:
        """Whether this worker holds the group's creator and senders."""
        return unit % self.ctx.workers == self.ctx.worker

    def owner(self, unit: int, member: int) -> int:
        """The worker that holds ``member`` of group ``unit``."""
        home = unit % self.ctx.workers
        return home if member < self.senders else (home + member) % self.ctx.workers

    @classmethod
    def per_unit(cls, opts: argparse.Namespace) -> int:
        """A unit is a whole group."""
        return int(opts.group_size)

    @classmethod
    def unit_count(cls, clients: int, opts: argparse.Namespace) -> int:
        """``--groups`` or as many whole groups as the clients make."""
        return int(opts.groups) or max(1, clients // int(opts.group_size))

    @classmethod
    def fixed_clients(cls, opts: argparse.Namespace) -> int:
        """``--groups`` fixes the count."""
        return int(getattr(opts, "groups", 0) or 0) * int(opts.group_size)

    @classmethod
    def checks(cls, counts: dict[str, int], errors: dict[str, int]) -> dict[str, Any]:
        """Every acked message reached every other member exactly once."""
        sent, acked = counts.get("sent", 0), counts.get("acked", 0)
        expected, delivered = counts.get("expected_deliveries", 0), counts.get("delivered", 0)
        lost, dups = counts.get("lost", 0), counts.get("duplicates", 0)
        return {
            "sent": sent,
            "acked": acked,
            "expected_deliveries": expected,
            "delivered": delivered,
            "lost": lost,
            "duplicates": dups,
            "ok": sent > 0 and sent == acked and expected == delivered
            and not lost and not dups and not errors,
        }

    async def setup(self) -> None:
        """Connect the members, then create each group from its first member."""
        sem = asyncio.Semaphore(int(self.opts.connect_concurrency))

        async def member(g: Group, i: int) -> Member | None:
            async with sem:
                try:
                    conn = await self.connect(self.client_index(g.unit, i))
                except ConnectError:
                    return None
            m = Member(g, i, conn)
            conn.start()
            return m

        async def make(unit: int) -> None:
            g = Group(self, unit)
            mine = [i for i in range(self.size) if self.owner(unit, i) == self.ctx.worker]
            members = await asyncio.gather(*(member(g, i) for i in mine))
            # A member that failed to connect is counted by code; its deliveries will be
            # missing from the total, so the run fails its check rather than hiding it.
            g.members = {m.index: m for m in members if m is not None}
            if not self.home(unit):
                self.groups.append(g)
                return
            creator = g.members.get(0)
            if creator is None:
                return
            names = [self.ctx.users.name(self.client_index(unit, i)) for i in range(1, self.size)]
            try:
                reply = await request(creator.conn, {
                    "type": "group.create", "id": f"create-{unit}", "name": f"load {g.tag}",
                    "members": names, "join_policy": "invite_only",
                })
            except (TimeoutError, ConnectionError, RuntimeError) as exc:
                self.rec.error(f"group.create:{type(exc).__name__}")
                return
            if not reply.get("ok"):
                self.rec.error(f"group.create:{(reply.get('error') or {}).get('code', 'unknown')}")
                return
            data = reply.get("data") or {}
            g.group_id = str(data.get("group", ""))
            g.conv = str(data.get("conv", f"g:{g.group_id}"))
            self.groups.append(g)

        await asyncio.gather(*(make(u) for u in self.units))
        # Creation notices may still be in flight; they are counted, not measured.
        await asyncio.sleep(0.2)

    def complete(self, m: Member, k: int) -> None:
        """Message ``k`` of member ``m`` is done (or failed): free its window slot."""
        del m.pending[k]
        self.rec.in_flight -= 1
        if m.window is not None:
            m.window.release()

    async def _send(self, m: Member, t_ns: int) -> None:
        k = m.next_k
        m.next_k = k + 1
        others = len(m.group.members) - 1  # deliveries this worker will see
        m.pending[k] = [t_ns, False, others]
        self.rec.in_flight += 1
        await m.conn.send({
            "type": "msg.send", "id": str(k), "to": {"group": m.group.group_id},
            "client_msg_id": f"{m.group.tag}.{m.index}.{k}", "kind": "text",
            "body": {"text": f"{t_ns} {self.pad}"},
        })
        self.rec.counts["sent"] += 1

    async def run(self, stop_at: float) -> None:
        """Senders of every group send until ``stop_at``."""
        loop = asyncio.get_running_loop()
        sweeper = loop.create_task(self._sweep_loop())
        n_senders = max(1, self.total_units * self.senders)
        try:
            await asyncio.gather(*(
                self._drive(g, g.members[i], loop.time(), stop_at, n_senders)
                for g in self.groups if g.group_id
                for i in range(self.senders) if i in g.members
            ))
        finally:
            sweeper.cancel()

    async def _drive(
        self, g: Group, m: Member, run_start: float, stop_at: float, n_senders: int
    ) -> None:
        loop = asyncio.get_running_loop()
        delay = self.ramp_delay(g.unit)
        if delay:
            await asyncio.sleep(delay)
        try:
            if self.rate > 0:
                interval = n_senders / self.rate
                # Fixed schedule from the run start (loop.time() is time.monotonic()).
                start = run_start + delay + (m.index / max(1, self.senders)) * interval
                origin, n = int(start * _NS), 0
                while start + n * interval < stop_at and not m.conn.closed:
                    wait = start + n * interval - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    await self._send(m, origin + int(n * interval * _NS))
                    n += 1
            else:
                window = m.window = asyncio.Semaphore(self.window)
                while True:
                    await window.acquire()
                    if loop.time() >= stop_at or m.conn.closed:
                        window.release()
                        return
                    await self._send(m, time.monotonic_ns())
        except (ConnectionError, RuntimeError) as exc:
            self.rec.error(f"send:{type(exc).__name__}")

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic_ns()
            for g in self.groups:
                for m in g.members.values():
                    for k in [k for k, e in m.pending.items() if now - e[0] > self.timeout_ns]:
                        entry = m.pending[k]
                        self.rec.counts["timeouts"] += 1
                        if entry[1] and entry[2] > 0:
                            m.overdue[k] = entry[2]
                        elif not entry[1]:
                            self.rec.error("msg.send:no_reply")
                        self.complete(m, k)

    async def drain(self, deadline: float) -> None:
        """Wait until nothing is pending here and deliveries have stopped arriving.

        Deliveries of messages sent from other workers can still be on their way; half a
        second without any is taken as the end of them.
        """
        loop = asyncio.get_running_loop()
        last = self.rec.counts["delivered"]
        quiet_since = loop.time()
        while loop.time() < deadline:
            await asyncio.sleep(0.05)
            now_count = self.rec.counts["delivered"]
            if now_count != last:
                last, quiet_since = now_count, loop.time()
            pending = any(m.pending for g in self.groups for m in g.members.values())
            if not pending and loop.time() - quiet_since >= 0.5:
                return

    def finish(self) -> dict[str, Any]:
        """Deliveries owed to acked messages and never made are lost."""
        lost = 0
        no_reply = 0
        for g in self.groups:
            for m in g.members.values():
                lost += sum(m.overdue.values())
                for entry in m.pending.values():
                    if entry[1]:
                        lost += max(0, entry[2])
                    else:
                        no_reply += 1
                m.pending.clear()
        self.rec.in_flight = 0
        self.rec.counts["lost"] += lost
        if no_reply:
            self.rec.error("msg.send:no_reply", no_reply)
        homed = sum(1 for g in self.groups if g.group_id)
        return {"groups": homed, "group_size": self.size}
