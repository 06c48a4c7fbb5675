"""Request dispatch: a registry from frame type to handler.

A handler is ``async def h(ctx, req) -> dict | None``; what it returns is the reply's
``data``. It raises a TalkbridgeError for an error reply. Feature modules register with
``@handler("type")``; modules named ``*handlers*`` in this package are imported at start-up
(see :func:`load_handler_modules`), and may define ``async def setup(state)`` and
``async def teardown(state)``.

The hottest requests (``msg.send``) are *direct* handlers instead: a plain function
``h(ctx, req, reply)`` that the reader calls at once, which validates (raising a
TalkbridgeError for an error reply) and hands the rest to callbacks that end by calling
``reply.ok(data)`` or ``reply.fail(exc)`` exactly once. No task, future or coroutine chain
per request: on the chat benchmark that is a sixth of the event loop's time per message.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from signaling.session import Session
    from signaling.state import AppState


@dataclass(slots=True)
class RequestContext:
    """Who sent a request, and the node's services."""

    state: AppState
    session: Session


Handler = Callable[[RequestContext, dict[str, Any]], Awaitable[dict[str, Any] | None]]
HANDLERS: dict[str, Handler] = {}
# Request types whose reply must reach the device before any event sent to it meanwhile.
HOLDS_EVENTS: set[str] = set()


class Reply(Protocol):
    """How a direct handler answers its request (exactly one call, of either)."""

    def ok(self, data: dict[str, Any] | None) -> None:
        """Reply ``ok`` with ``data``."""

    def fail(self, err: BaseException) -> None:
        """Reply with the error (a TalkbridgeError's code, else ``internal``)."""


DirectHandler = Callable[[RequestContext, dict[str, Any], Reply], None]
DIRECT_HANDLERS: dict[str, DirectHandler] = {}


def direct_handler(name: str) -> Callable[[DirectHandler], DirectHandler]:
    """Register ``fn`` as the direct handler of request type ``name`` (see module doc)."""

    def register(fn: DirectHandler) -> DirectHandler:
        if name in HANDLERS or DIRECT_HANDLERS.get(name, fn) is not fn:
            raise RuntimeError(f"two handlers for {name!r}")
        DIRECT_HANDLERS[name] = fn
        return fn

    return register


def handler(name: str, *, hold_events: bool = False) -> Callable[[Handler], Handler]:
    """Register ``fn`` as the handler of request type ``name``.

    ``hold_events``: the device's events wait while the request runs and follow its reply
    (for requests that cause events the client can only read with the reply in hand).
    """

    def register(fn: Handler) -> Handler:
        if name in DIRECT_HANDLERS or HANDLERS.get(name, fn) is not fn:
            raise RuntimeError(f"two handlers for {name!r}")
        HANDLERS[name] = fn
        if hold_events:
            HOLDS_EVENTS.add(name)
        return fn

    return register


def load_handler_modules() -> list[ModuleType]:
    """Import every ``signaling/*handlers*.py`` module (sorted, so start-up is deterministic)."""
    import signaling

    names = sorted(m.name for m in pkgutil.iter_modules(signaling.__path__) if "handlers" in m.name)
    return [importlib.import_module(f"signaling.{n}") for n in names]
