"""The load generator's WebSocket connection (loadtest/wire.py, on picows) against a scripted
aiohttp server: what it hands the scenario, in which order, and how it reports the end."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from loadtest.wire import ConnectError, Frame, Target, WsConn, connect_ws

Script = Callable[[web.Request, web.WebSocketResponse], Awaitable[None]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Script], Awaitable[str]]]:
    """Start a server on 127.0.0.1 that runs ``script`` for each WebSocket; returns its URL."""
    runners: list[web.AppRunner] = []

    async def start(script: Script) -> str:
        async def handler(request: web.Request) -> web.StreamResponse:
            if request.headers.get("Authorization", "Bearer good") != "Bearer good":
                raise web.HTTPForbidden()
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await script(request, ws)
            return ws

        app = web.Application()
        app.router.add_get("/ws", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"ws://127.0.0.1:{port}/ws"

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_frames_before_start_wait_in_order_and_the_close_code_is_reported(serve):
    async def script(request: web.Request, ws: web.WebSocketResponse) -> None:
        await ws.send_str('{"type":"auth.ok"}')
        await ws.send_str('{"type":"a"}')
        # One message in two fragments (TEXT without FIN, then CONTINUATION with FIN),
        # written raw: aiohttp's writer never fragments.
        assert request.transport is not None
        request.transport.write(b"\x01\x08" + b'{"type":')
        request.transport.write(b"\x80\x08" + b'"frag"}\n')
        await ws.send_str('{"type":"b"}')
        msg = await ws.receive()
        await ws.send_str(json.dumps({"type": "echo", "of": json.loads(msg.data)}))
        await ws.close(code=4000, message=b"test over")

    conn = await connect_ws(Target(await serve(script)), "u1", "d1", "good")
    got: list[Frame] = []
    ended: list[int | None] = []
    conn.handler = got.append
    gone = asyncio.Event()

    def on_close(c: WsConn) -> None:
        ended.append(c.close_code)
        gone.set()

    conn.on_close = on_close
    await asyncio.sleep(0.2)  # the early frames arrive before the scenario starts the conn
    assert got == []
    conn.start()
    assert got == [{"type": "a"}, {"type": "frag"}, {"type": "b"}]
    await conn.send({"type": "ping", "n": 1})
    async with asyncio.timeout(5):
        await gone.wait()
    assert conn.closed
    assert got[3:] == [{"type": "echo", "of": {"type": "ping", "n": 1}}]
    assert conn.close_code == 4000
    assert ended == [4000]  # once
    with pytest.raises(ConnectionError):
        await conn.send_text('{"type":"late"}')


async def test_refused_auth_and_refused_upgrade_are_connect_errors(serve):
    async def refuse(request: web.Request, ws: web.WebSocketResponse) -> None:
        await ws.send_str('{"type":"error","code":"unauthorized"}')
        await ws.close(code=4401)

    url = await serve(refuse)
    with pytest.raises(ConnectError) as refused:
        await connect_ws(Target(url), "u1", "d1", "good")
    assert refused.value.code == "unauthorized"
    with pytest.raises(ConnectError) as forbidden:
        await connect_ws(Target(url), "u1", "d1", "bad")
    assert forbidden.value.code == "http_403"


async def test_a_server_that_never_answers_auth_times_out(serve):
    async def silent(request: web.Request, ws: web.WebSocketResponse) -> None:
        await asyncio.sleep(1)  # past the client's timeout

    with pytest.raises(ConnectError) as silence:
        await connect_ws(Target(await serve(silent)), "u1", "d1", "good", timeout=0.3)
    assert silence.value.code == "auth_timeout"


async def test_frame_auth_sends_the_token_first(serve):
    seen: list[Any] = []

    async def check(request: web.Request, ws: web.WebSocketResponse) -> None:
        seen.append(json.loads((await ws.receive()).data))
        await ws.send_str('{"type":"auth.ok"}')
        await ws.receive()  # until the client closes

    conn = await connect_ws(Target(await serve(check), auth="frame"), "u1", "d7", "good")
    assert isinstance(conn, WsConn)
    assert seen == [{"type": "auth", "token": "good", "device": "d7"}]
    await conn.close()
    assert conn.closed
