"""The services of one running node, shared by the gateway, HTTP routes and handlers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from im_bridge.messages import ChatService
from im_bridge.push import Pusher
from im_bridge.store import Store
from im_bridge.users import UserService
from signaling.auth import TokenVerifier
from signaling.bus import Bus
from signaling.config import Config
from signaling.hub import Hub
from signaling.ice import ice_servers_for
from signaling.login_limits import LoginLimits
from signaling.metrics import Metrics

if TYPE_CHECKING:
    from im_bridge.groups import GroupService
    from signaling.calls import CallManager
    from signaling.rooms import RoomManager


@dataclass
class AppState:
    """Everything a handler may need. Feature modules attach their services in ``setup``."""

    config: Config
    store: Store
    chat: ChatService
    users: UserService
    hub: Hub
    bus: Bus
    pusher: Pusher
    verifier: TokenVerifier
    metrics: Metrics
    # /api/register and /api/login serve demo accounts (Config.demo_accounts), limited so
    demo_accounts: bool = False
    login_limits: LoginLimits = field(default_factory=lambda: LoginLimits(0, 1))
    # Filled by feature modules' setup(state): the call manager, group service, rooms.
    calls: CallManager = field(init=False)
    groups: GroupService = field(init=False)
    rooms: RoomManager = field(init=False)
    extras: dict[str, Any] = field(default_factory=dict)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run request work that outlives its reply; graceful shutdown waits for it."""
        tasks: set[asyncio.Task[None]] = self.extras.setdefault("inflight", set())
        task = asyncio.get_running_loop().create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    def ice_servers(self, user: str) -> list[dict[str, Any]]:
        """ICE servers (with fresh TURN credentials) for a user's device."""
        return ice_servers_for(self.config, user, time.time())
