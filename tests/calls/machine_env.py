"""An in-memory CallEnv for driving the call state machine in unit tests.

It is the machine's whole outside world, kept in plain data: who is online, what each device
was sent, pushes, call logs, blocks, and a manual clock whose timers fire on ``advance``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from im_bridge.errors import Forbidden
from signaling.calls import Call, CallLog

Event = dict[str, Any]


@dataclass
class ManualTimer:
    when: float
    seq: int
    callback: Callable[[], Awaitable[None]]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class RecordingEnv:
    """Online devices, delivered events per device, pushes, logs, blocks and a manual clock."""

    clock: float = 1_700_000_000.0
    online: dict[str, set[str]] = field(default_factory=dict)
    inbox: dict[tuple[str, str], list[Event]] = field(default_factory=dict)
    pushes: list[tuple[str, Event]] = field(default_factory=list)
    logs: list[CallLog] = field(default_factory=list)
    changes: list[tuple[str, str]] = field(default_factory=list)  # (call_id, state) announced
    blocks: set[tuple[str, str]] = field(default_factory=set)  # (blocker, blocked)
    timers: list[ManualTimer] = field(default_factory=list)
    presence_down: bool = False  # online_devices fails (e.g. Redis unreachable)
    slow_checks: int = 0  # event-loop turns check_may_call takes (a store round trip)
    _seq: int = 0

    # CallEnv
    def now(self) -> float:
        return self.clock

    def call_later(self, delay: float, callback: Callable[[], Awaitable[None]]) -> ManualTimer:
        self._seq += 1
        timer = ManualTimer(self.clock + delay, self._seq, callback)
        self.timers.append(timer)
        return timer

    async def send(self, user: str, device: str, event: Event) -> None:
        # Like the hub: an event for a device that is not connected is dropped.
        if device in self.online.get(user, set()):
            self.inbox.setdefault((user, device), []).append(event)

    async def online_devices(self, user: str) -> Collection[str]:
        if self.presence_down:
            raise ConnectionError("presence unavailable")
        return set(self.online.get(user, set()))

    async def push_call(self, user: str, invite: Event) -> None:
        self.pushes.append((user, invite))

    async def check_may_call(self, caller: str, callee: str) -> None:
        for _ in range(self.slow_checks):
            await asyncio.sleep(0)
        if (callee, caller) in self.blocks:
            raise Forbidden("you cannot call this user")

    async def write_call_log(self, entry: CallLog) -> None:
        self.logs.append(entry)

    async def call_changed(self, call: Call) -> None:
        self.changes.append((call.call_id, call.state))

    # test helpers
    def connect(self, user: str, *devices: str) -> None:
        self.online.setdefault(user, set()).update(devices)

    def disconnect(self, user: str, device: str) -> None:
        self.online.get(user, set()).discard(device)

    def take(self, user: str, device: str) -> list[Event]:
        """Events delivered to this device since the last take."""
        return self.inbox.pop((user, device), [])

    def all_events(self) -> list[tuple[str, str, Event]]:
        return [(u, d, e) for (u, d), evs in self.inbox.items() for e in evs]

    async def advance(self, seconds: float) -> None:
        """Move the clock forward, firing due timers in order."""
        target = self.clock + seconds
        while True:
            due = [t for t in self.timers if not t.cancelled and t.when <= target]
            if not due:
                break
            timer = min(due, key=lambda t: (t.when, t.seq))
            self.timers.remove(timer)
            self.clock = timer.when
            await timer.callback()
        self.clock = target
