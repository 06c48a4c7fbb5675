"""aiohttp application keys."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from signaling.state import AppState

STATE: web.AppKey[AppState] = web.AppKey("talkbridge_state")
