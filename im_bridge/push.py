"""The Pusher port: notify users who have no online device (offline push).

The default implementation logs; signaling/push_webhook.py POSTs to a webhook.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import msgspec

log = logging.getLogger("talkbridge.push")


class PushNotification(msgspec.Struct, kw_only=True):
    """One push to one user. ``kind`` is "message" or "call" (apps may use a VoIP push)."""

    user: str
    kind: str
    conv: str | None = None
    sender: str | None = None
    preview: str | None = None
    mentioned: bool = False
    data: dict[str, Any] = msgspec.field(default_factory=dict)


class Pusher(Protocol):
    """Deliver a push notification; must not raise and must not block for long."""

    async def push(self, note: PushNotification) -> None: ...

    async def close(self) -> None: ...


class LogPusher:
    """The embedded default: log each push (and keep the last ones for inspection)."""

    def __init__(self, keep: int = 1000) -> None:
        self.sent: list[PushNotification] = []
        self._keep = keep

    async def push(self, note: PushNotification) -> None:
        log.info("push to %s: %s %s", note.user, note.kind, note.conv or "")
        self.sent.append(note)
        del self.sent[: -self._keep]

    async def close(self) -> None:
        return None
