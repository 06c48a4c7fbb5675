"""The aiohttp application factory: wires the ports to their implementations."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from types import ModuleType

from aiohttp import web

from im_bridge.messages import ChatService
from im_bridge.push import LogPusher, Pusher
from im_bridge.store import open_store
from im_bridge.users import UserService
from signaling.auth import TokenVerifier
from signaling.bus import Bus, MemoryBus
from signaling.codec import encode
from signaling.config import Config
from signaling.dispatch import load_handler_modules
from signaling.http_api import add_routes
from signaling.hub import Hub
from signaling.keys import STATE
from signaling.login_limits import LoginLimits, parse_networks
from signaling.metrics import Metrics, watch_loop_lag
from signaling.session import CLOSE_SHUTDOWN
from signaling.state import AppState

log = logging.getLogger(__name__)


def _make_bus(config: Config, hub: Hub) -> Bus:
    if config.redis:
        # Scale-out: node-addressed delivery and presence in Redis (signaling/redis_bus.py).
        from signaling.redis_bus import RedisBus, parse_redis_url

        url, settings = parse_redis_url(config.redis)
        return RedisBus(url, hub, config.node_id, settings)
    return MemoryBus(hub)


def _make_pusher(config: Config) -> Pusher:
    if config.push_webhook:
        from signaling.push_webhook import WebhookPusher

        return WebhookPusher(config.push_webhook, retries=config.push_retries)
    return LogPusher()


def create_app(config: Config) -> web.Application:
    """A talkbridge node for ``config``; services start with the app and stop with it."""
    secret_generated = not config.jwt_secret and not config.jwt_public_key
    config.ensure_jwt_secret()
    # Demo accounts mint HS256 tokens: never without a secret (a public key alone).
    demo_accounts = config.demo_accounts(secret_generated) and bool(config.jwt_secret)
    if demo_accounts and not secret_generated:
        log.warning(
            "demo accounts are on (TALKBRIDGE_ALLOW_REGISTRATION) with tokens your app mints: "
            "anyone may register a user id your app has not used yet and get tokens for it"
        )
    app = web.Application(client_max_size=1 << 20)
    modules = load_handler_modules()

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        store = open_store(config.store_url)
        await store.open()
        hub = Hub()
        bus = _make_bus(config, hub)
        await bus.start()
        state = AppState(
            config=config,
            store=store,
            chat=ChatService(store, recall_window_s=config.recall_window),
            users=UserService(store),
            hub=hub,
            bus=bus,
            pusher=_make_pusher(config),
            verifier=TokenVerifier(config),
            metrics=Metrics(),
            demo_accounts=demo_accounts,
            login_limits=LoginLimits(
                config.login_rate, config.login_burst, parse_networks(config.trusted_proxies)
            ),
        )
        app[STATE] = state
        await _run_module_hook(modules, "setup", state)
        lag = asyncio.get_running_loop().create_task(watch_loop_lag(state.metrics.loop_lag))
        log.info("talkbridge node %s ready (store %s)", config.node_id, store.url.split("@")[-1])
        yield
        lag.cancel()
        await asyncio.gather(lag, return_exceptions=True)
        await shutdown(state)
        await _run_module_hook(list(reversed(modules)), "teardown", state)
        await bus.close()
        await state.pusher.close()
        await store.close()

    app.cleanup_ctx.append(lifecycle)

    async def on_shutdown(app: web.Application) -> None:
        if STATE in app:
            await shutdown(app[STATE])

    app.on_shutdown.append(on_shutdown)
    add_routes(app)
    return app


async def _run_module_hook(modules: list[ModuleType], name: str, state: AppState) -> None:
    for module in modules:
        hook = getattr(module, name, None)
        if hook is not None:
            await hook(state)


async def shutdown(state: AppState) -> None:
    """Graceful stop: refuse readiness, tell clients to reconnect, finish in-flight requests."""
    if state.extras.get("shutting_down"):
        return
    state.extras["shutting_down"] = True
    notice = encode({"type": "server.shutdown", "reconnect_after_ms": 1000})
    await state.hub.close_all(CLOSE_SHUTDOWN, "server restarting", notice)
    inflight = list(state.extras.get("inflight", ()))
    if inflight:
        _, pending = await asyncio.wait(inflight, timeout=state.config.shutdown_grace)
        if pending:
            log.warning("%d requests still running at shutdown", len(pending))
