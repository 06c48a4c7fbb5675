"""The node's registry of connected devices and local delivery to them.

The hub only knows this node's sessions. Delivery to a user wherever they are connected
goes through the Bus port (signaling/bus.py), whose subscriber calls back into
:meth:`Hub.deliver_local` on the node that holds the sessions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from signaling.session import CLOSE_REPLACED, Session, frame_text

log = logging.getLogger(__name__)

SessionHook = Callable[[Session], Awaitable[None]]


class Hub:
    """Sessions by user and device on this node, with connect/disconnect hooks."""

    def __init__(self) -> None:
        self._by_user: dict[str, dict[str, Session]] = {}
        self.on_connect: list[SessionHook] = []
        self.on_disconnect: list[SessionHook] = []

    def __len__(self) -> int:
        return sum(len(d) for d in self._by_user.values())

    def sessions(self) -> list[Session]:
        return [s for d in self._by_user.values() for s in d.values()]

    def sessions_of(self, user: str) -> list[Session]:
        return list(self._by_user.get(user, {}).values())

    def session(self, user: str, device: str) -> Session | None:
        return self._by_user.get(user, {}).get(device)

    def online_devices(self, user: str) -> list[str]:
        return list(self._by_user.get(user, {}))

    def not_here(self, users: Iterable[str]) -> list[str]:
        """The users with no device on this node (one dict probe each: fan-out asks per message)."""
        by_user = self._by_user
        return [u for u in users if u not in by_user]

    async def register(self, session: Session) -> None:
        """Add a session; an older session of the same device is replaced and closed."""
        devices = self._by_user.setdefault(session.user, {})
        old = devices.get(session.device)
        devices[session.device] = session
        if old is not None and old is not session:
            old.send_obj({"type": "session.replaced", "session": session.session_id})
            old.close_soon(CLOSE_REPLACED, "replaced by a newer connection of this device")
        await self._run_hooks(self.on_connect, session)

    async def unregister(self, session: Session) -> None:
        devices = self._by_user.get(session.user)
        if devices is None or devices.get(session.device) is not session:
            return  # already replaced by a newer session of the same device
        del devices[session.device]
        if not devices:
            del self._by_user[session.user]
        await self._run_hooks(self.on_disconnect, session)

    async def _run_hooks(self, hooks: list[SessionHook], session: Session) -> None:
        for hook in hooks:
            try:
                await hook(session)
            except Exception:
                log.exception("session hook %r failed", hook)

    def deliver_local(
        self, users: Iterable[str], data: bytes, exclude_session: str | None = None
    ) -> int:
        """Queue ``data`` to every local device of ``users``; returns devices reached."""
        n = 0
        frame = frame_text(data)  # framed once for every recipient
        by_user = self._by_user
        for user in users:
            devices = by_user.get(user)
            if not devices:
                continue
            for s in devices.values():
                if s.session_id != exclude_session and s.send_framed(frame):
                    n += 1
        return n

    def deliver_local_device(self, user: str, device: str, data: bytes) -> bool:
        s = self._by_user.get(user, {}).get(device)
        return s.send(data) if s is not None else False

    async def close_all(self, code: int, message: str, notice: bytes | None = None) -> None:
        """Tell every session (optionally with a final frame) and close them."""
        sessions = self.sessions()
        if notice is not None:
            for s in sessions:
                s.send(notice)
        await asyncio.gather(
            *(s.flush_and_close(code, message) for s in sessions), return_exceptions=True
        )
