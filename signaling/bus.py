"""The Bus port: deliver an encoded event to a user's devices wherever they are connected.

``MemoryBus`` (embedded default) hands it to this node's hub. The Redis implementation
(scale-out) publishes to the channels of the nodes the presence registry names.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence

from signaling.hub import Hub

NodeMessageHook = Callable[[bytes], None]


class Bus(abc.ABC):
    """Route events to users' devices across nodes."""

    def __init__(self) -> None:
        # Called with each node message another node broadcast (see broadcast()).
        self.on_node_message: list[NodeMessageHook] = []

    @abc.abstractmethod
    def post_users(
        self, users: Sequence[str], data: bytes, exclude_session: str | None = None
    ) -> None:
        """Deliver ``data`` to every online device of ``users`` (minus one session): local
        devices at once, other nodes' through the engine's ordered outbox. Never waits."""

    async def publish_users(
        self, users: Sequence[str], data: bytes, exclude_session: str | None = None
    ) -> None:
        """:meth:`post_users`, for callers in coroutines."""
        self.post_users(users, data, exclude_session)

    @abc.abstractmethod
    async def publish_device(self, user: str, device: str, data: bytes) -> None:
        """Deliver ``data`` to one device of a user."""

    @abc.abstractmethod
    async def online_devices(self, user: str) -> list[str]:
        """The user's connected devices on any node (the presence registry)."""

    async def online_users(self, users: Sequence[str]) -> set[str]:
        """Which of ``users`` have a connected device anywhere (engines batch this)."""
        return {u for u in users if await self.online_devices(u)}

    async def broadcast(self, message: bytes) -> None:
        """Send a small message to every *other* node (e.g. "drop your cached members of
        g:x"); they hand it to their ``on_node_message`` hooks. Best effort, in order."""
        return None

    async def send_to_node(self, node: str, message: bytes) -> None:
        """Send a small message to one node's ``on_node_message`` hooks. It travels with
        the events for that node's devices, in order with them. (One process: no nodes.)"""
        return None

    def _node_message(self, message: bytes) -> None:
        for hook in self.on_node_message:
            hook(message)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> bool:
        return True


class MemoryBus(Bus):
    """One process: delivery and presence are the local hub."""

    def __init__(self, hub: Hub) -> None:
        super().__init__()
        self.hub = hub

    def post_users(
        self, users: Sequence[str], data: bytes, exclude_session: str | None = None
    ) -> None:
        self.hub.deliver_local(users, data, exclude_session)

    async def publish_device(self, user: str, device: str, data: bytes) -> None:
        self.hub.deliver_local_device(user, device, data)

    async def online_devices(self, user: str) -> list[str]:
        return self.hub.online_devices(user)

    async def online_users(self, users: Sequence[str]) -> set[str]:
        return {u for u in users if self.hub.online_devices(u)}
