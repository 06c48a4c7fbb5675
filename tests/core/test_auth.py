"""Authentication: bearer header, first auth frame, token checks, demo accounts."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from im_bridge.errors import Conflict, Unauthorized
from im_bridge.messages import ChatService
from im_bridge.store import Store, ops
from im_bridge.users import UserService
from signaling.auth import TokenVerifier
from signaling.client import AuthFailed, Client
from signaling.config import load_config
from signaling.login_limits import client_address, parse_networks
from tests.support import SECRET, Node, running_node, start_node, token


@pytest.fixture
async def demo_node(tmp_path: Path) -> AsyncIterator[Node]:
    """A node whose tokens come from a configured secret, with demo accounts turned on."""
    async with running_node(
        f"sqlite:///{tmp_path / 's.db'}", tmp_path, allow_registration=True
    ) as n:
        yield n


async def _register(url: str, user: str, password: str = "correct horse") -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as s:
        r = await s.post(f"{url}/api/register", json={"user": user, "password": password})
        await r.read()
        return r


def _hs512_token() -> str:
    """A token valid but for its algorithm: HS512, signed with the server's own secret.
    (pyjwt warns that the secret is short for HS512; the server refuses the token for its
    algorithm whatever the key, so the warning would only clutter every test run.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        return jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, SECRET, algorithm="HS512")


async def _refusal(ws_url: str, frame: dict | None = None, headers: dict | None = None):
    """Connect, optionally send a frame, and return (first frame, close code)."""
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url, headers=headers or {}) as ws:
        if frame is not None:
            await ws.send_str(json.dumps(frame))
        msg = await ws.receive(timeout=5)
        first = json.loads(msg.data) if msg.type == aiohttp.WSMsgType.TEXT else None
        closing = await ws.receive(timeout=5)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        return first, ws.close_code


def _unsigned(payload: dict) -> str:
    def b64(d: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(payload)}."


async def test_bearer_header_authenticates(node: Node):
    c = Client(node.ws_url, token("alice", name="Alice"), device="phone")
    ok = await c.connect()
    assert (ok["type"], ok["user"], ok["device"], ok["name"]) == (
        "auth.ok",
        "alice",
        "phone",
        "Alice",
    )
    assert ok["session"] and abs(ok["server_time"] - time.time() * 1000) < 5000
    assert ok["ice_servers"] == []  # nothing configured: never a public STUN server
    await c.close()


async def test_first_auth_frame_authenticates(node: Node):
    c = Client(node.ws_url, token("alice"), device="browser", auth="frame")
    ok = await c.connect()
    assert (ok["user"], ok["device"]) == ("alice", "browser")
    await c.close()


@pytest.mark.parametrize(
    "bad_token, reason",
    [
        (token("alice", ttl=-60), "expired"),
        (token("alice", secret="not-the-secret-but-long-enough-000000"), "invalid"),
        (_unsigned({"sub": "alice", "exp": int(time.time()) + 60}), "algorithm"),
        (jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"), "exp"),
        (token("al ice"), "sub"),
        (token("alice", dev="a\x00b"), "dev"),  # device ids are stored with messages
        (
            _hs512_token(),
            "algorithm",
        ),
        ("not.a.token", "malformed"),
    ],
)
async def test_bad_tokens_get_unauthorized_and_close_4401(node: Node, bad_token: str, reason: str):
    for frame, headers in (
        ({"type": "auth", "token": bad_token}, None),
        (None, {"Authorization": f"Bearer {bad_token}"}),
    ):
        first, code = await _refusal(node.ws_url, frame, headers)
        assert first["type"] == "error" and first["code"] == "unauthorized"
        assert reason in first["message"]
        assert code == 4401


async def test_first_frame_that_is_not_auth_is_refused(node: Node):
    first, code = await _refusal(node.ws_url, {"type": "msg.send", "id": "1"})
    assert (first["code"], code) == ("unauthorized", 4401)


async def test_deeply_nested_auth_frame_is_refused_with_4401(node: Node):
    raw = '{"type":"auth","token":' + "[" * 3000 + "]" * 3000 + "}"
    async with aiohttp.ClientSession() as s, s.ws_connect(node.ws_url) as ws:
        await ws.send_str(raw)
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        assert json.loads(msg.data)["code"] == "unauthorized"
        await ws.receive(timeout=5)
        assert ws.close_code == 4401


async def test_auth_frame_over_the_frame_limit_in_bytes_is_refused(tmp_path: Path):
    async with running_node(f"sqlite:///{tmp_path / 's.db'}", tmp_path, max_frame=1024) as n:
        frame = {"type": "auth", "token": token("alice"), "pad": "\U0001f600" * 300}
        assert len(json.dumps(frame, ensure_ascii=False)) < 1024  # characters, not bytes
        async with aiohttp.ClientSession() as s, s.ws_connect(n.ws_url) as ws:
            await ws.send_str(json.dumps(frame, ensure_ascii=False))
            first = json.loads((await ws.receive(timeout=5)).data)
            await ws.receive(timeout=5)
        assert (first["code"], ws.close_code) == ("unauthorized", 4401)
        assert "too large" in first["message"]


async def test_silent_connection_is_refused_after_auth_timeout(tmp_path: Path):
    n = await start_node(f"sqlite:///{tmp_path / 's.db'}", tmp_path, auth_timeout=0.3)
    try:
        first, code = await _refusal(n.ws_url)
        assert (first["code"], code) == ("unauthorized", 4401)
    finally:
        await n.stop()


async def test_websocket_pings_do_not_extend_the_auth_timeout(tmp_path: Path):
    async with running_node(f"sqlite:///{tmp_path / 's.db'}", tmp_path, auth_timeout=0.5) as n:
        async with aiohttp.ClientSession() as s, s.ws_connect(n.ws_url) as ws:

            async def keep_pinging() -> None:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    while not ws.closed:
                        await ws.ping()
                        await asyncio.sleep(0.1)

            pinger = asyncio.create_task(keep_pinging())
            t0 = time.monotonic()
            try:
                # (one deadline: receive(timeout=…) restarts at every pong here too)
                async with asyncio.timeout(3):
                    msg = await ws.receive()
                    assert msg.type == aiohttp.WSMsgType.TEXT, msg
                    assert json.loads(msg.data)["code"] == "unauthorized"
                    await ws.receive()
            finally:
                pinger.cancel()
            assert ws.close_code == 4401 and time.monotonic() - t0 < 2.5  # deadline 0.5 s


async def test_auth_timeout_0_waits_for_the_auth_frame_without_limit(tmp_path: Path):
    async with running_node(f"sqlite:///{tmp_path / 's.db'}", tmp_path, auth_timeout=0) as n:
        async with aiohttp.ClientSession() as s, s.ws_connect(n.ws_url) as ws:
            await asyncio.sleep(0.3)
            await ws.send_str(json.dumps({"type": "auth", "token": token("alice")}))
            msg = await ws.receive(timeout=5)
            assert json.loads(msg.data)["type"] == "auth.ok"


async def test_client_leaving_before_auth_is_neither_an_error_nor_an_auth_failure(
    node: Node, caplog: pytest.LogCaptureFixture
):
    def failures() -> float | None:
        return node.state.metrics.registry.get_sample_value("talkbridge_auth_failures_total")

    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(node.ws_url)
        await ws.close()
    await asyncio.sleep(0.3)  # the server's handler sees the close
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert failures() == 0
    _, code = await _refusal(node.ws_url, {"type": "auth", "token": "not.a.token"})
    assert code == 4401 and failures() == 1  # a refusal still counts


async def test_token_bound_to_a_device_refuses_another_device(node: Node):
    c = Client(node.ws_url, token("alice", dev="d1"), device="d2")
    with pytest.raises(AuthFailed):
        await c.connect()
    await c.close()


_CURVES: dict[str, ec.EllipticCurve] = {
    "ES256": ec.SECP256R1(),
    "ES384": ec.SECP384R1(),
    "ES512": ec.SECP521R1(),
    "ES256K": ec.SECP256K1(),
}


def _keypair(kind: str, tmp_path: Path):
    if kind == "RS256":
        key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = rsa.generate_private_key(65537, 2048)
    else:
        key = ec.generate_private_key(_CURVES[kind])
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path / f"{kind}-{id(key)}.pem"
    path.write_bytes(pem)
    return key, path, pem


@pytest.mark.parametrize("alg", ["RS256", "ES256", "ES384", "ES512"])
async def test_tokens_minted_by_an_app_backend_with_a_public_key(tmp_path: Path, alg: str):
    key, path, pem = _keypair(alg, tmp_path)
    n = await start_node(f"sqlite:///{tmp_path / 's.db'}", tmp_path, jwt_public_key=str(path))
    try:
        good = jwt.encode({"sub": "carol", "exp": int(time.time()) + 60}, key, algorithm=alg)
        c = Client(n.ws_url, good)
        assert (await c.connect())["user"] == "carol"
        await c.close()
        # Algorithm confusion: an HS256 token whose HMAC key is the public key's PEM.
        header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
        claims = json.dumps({"sub": "carol", "exp": int(time.time()) + 60}).encode()
        body = base64.urlsafe_b64encode(claims).rstrip(b"=")
        mac = hmac.new(pem, header + b"." + body, hashlib.sha256).digest()
        confused = b".".join([header, body, base64.urlsafe_b64encode(mac).rstrip(b"=")]).decode()
        first, code = await _refusal(n.ws_url, {"type": "auth", "token": confused})
        assert (first["code"], code) == ("unauthorized", 4401)
        # A token signed by another key of the same kind.
        wrong, _, _ = _keypair(alg, tmp_path)
        bad = jwt.encode({"sub": "carol", "exp": int(time.time()) + 60}, wrong, algorithm=alg)
        first, code = await _refusal(n.ws_url, {"type": "auth", "token": bad})
        assert (first["code"], code) == ("unauthorized", 4401)
    finally:
        await n.stop()


def test_an_ec_public_key_on_another_curve_is_refused_at_startup(tmp_path: Path):
    _, path, _ = _keypair("ES256K", tmp_path)
    config = load_config(env={}, overrides={"jwt_public_key": str(path)})
    with pytest.raises(ValueError, match=r"secp256k1.*P-256, P-384 or P-521"):
        TokenVerifier(config)


async def test_a_server_with_only_a_public_key_accepts_only_tokens_of_that_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    key, path, _ = _keypair("RS256", tmp_path)
    # An earlier development run left a generated HS256 secret in the data dir.
    leftover = "left-over-development-secret-0123456789"
    (tmp_path / "dev-jwt-secret").write_text(leftover)
    with caplog.at_level(logging.INFO):
        n = await start_node(
            f"sqlite:///{tmp_path / 's.db'}", tmp_path, jwt_secret="", jwt_public_key=str(path)
        )
    try:
        good = jwt.encode({"sub": "carol", "exp": int(time.time()) + 60}, key, algorithm="RS256")
        c = Client(n.ws_url, good)
        assert (await c.connect())["user"] == "carol"
        await c.close()
        first, code = await _refusal(
            n.ws_url, {"type": "auth", "token": token("carol", secret=leftover)}
        )
        assert (first["code"], code) == ("unauthorized", 4401)
        assert "algorithm 'HS256'" in first["message"]
        # Demo accounts would mint HS256 tokens: they are off, and the log says why.
        async with aiohttp.ClientSession() as s:
            for api in ("/api/register", "/api/login"):
                r = await s.post(f"{n.url}{api}", json={"user": "carol", "password": "pass-pass"})
                assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        assert "TALKBRIDGE_JWT_PUBLIC_KEY" in caplog.text and "/api/register" in caplog.text
    finally:
        await n.stop()


async def test_register_then_login_returns_a_token_that_connects(demo_node: Node):
    node = demo_node
    async with aiohttp.ClientSession() as s:
        r = await s.post(
            f"{node.url}/api/register", json={"user": "dave", "password": "correct horse"}
        )
        assert r.status == 200
        r = await s.post(
            f"{node.url}/api/register", json={"user": "dave", "password": "correct horse"}
        )
        assert r.status == 409 and (await r.json())["error"]["code"] == "conflict"
        r = await s.post(
            f"{node.url}/api/login", json={"user": "dave", "password": "wrong password"}
        )
        assert r.status == 401
        r = await s.post(f"{node.url}/api/login", json={"user": "nobody", "password": "whatever1"})
        assert r.status == 401
        r = await s.post(
            f"{node.url}/api/login", json={"user": "dave", "password": "correct horse"}
        )
        assert r.status == 200
        body = await r.json()
        assert body["expires_at"] > time.time()
        r = await s.post(f"{node.url}/api/register", json={"user": "x", "password": "short"})
        assert r.status == 400
        r = await s.post(  # a name PostgreSQL could not store
            f"{node.url}/api/register",
            json={"user": "nul", "password": "correct horse", "name": "a\x00b"},
        )
        assert r.status == 400 and (await r.json())["error"]["code"] == "bad_request"
    c = Client(node.ws_url, body["token"])
    assert (await c.connect())["user"] == "dave"
    await c.close()


@pytest.mark.parametrize("path", ["/api/register", "/api/login"])
async def test_deeply_nested_account_body_gets_a_400_json_error(demo_node: Node, path: str):
    node = demo_node
    body = "[" * 5000 + "]" * 5000  # 10 KB, under the body limit
    async with aiohttp.ClientSession() as s:
        r = await s.post(
            f"{node.url}{path}", data=body, headers={"Content-Type": "application/json"}
        )
        assert r.status == 400, await r.text()
        assert (await r.json())["error"]["code"] == "bad_request"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_account_body_over_16_kib_gets_413_too_large(demo_node: Node, chunked: bool):
    node = demo_node
    head, pad, tail = b'{"user":"zed","password":"pass-pass","name":"', b"x" * 10_000, b'"}'

    async def chunks() -> AsyncIterator[bytes]:  # a streamed body: no Content-Length
        yield head
        for _ in range(50):
            yield pad
        yield tail

    data = chunks() if chunked else head + pad * 2 + tail
    async with aiohttp.ClientSession() as s:
        r = await s.post(
            f"{node.url}/api/register", data=data, headers={"Content-Type": "application/json"}
        )
        assert r.status == 413, await r.text()
        assert (await r.json())["error"]["code"] == "too_large"
    assert await node.state.users.get("zed") is None


async def test_password_is_stored_as_argon2_hash(demo_node: Node):
    node = demo_node
    async with aiohttp.ClientSession() as s:
        await s.post(
            f"{node.url}/api/register", json={"user": "erin", "password": "hunter2hunter2"}
        )
    user = await node.state.users.get("erin")
    assert user is not None and user.password_hash is not None
    assert user.password_hash.startswith("$argon2id$") and "hunter2" not in user.password_hash


async def test_registration_can_be_turned_off(tmp_path: Path):
    n = await start_node(f"sqlite:///{tmp_path / 's.db'}", tmp_path, allow_registration=False)
    try:
        async with aiohttp.ClientSession() as s:
            r = await s.post(
                f"{n.url}/api/register", json={"user": "dave", "password": "correct horse"}
            )
            assert r.status == 404
    finally:
        await n.stop()


async def test_demo_accounts_are_off_by_default_when_an_app_mints_the_tokens(node: Node):
    # The node's tokens are signed with a configured secret: an app backend's users.
    r = await _register(node.url, "bob")
    assert r.status == 404


async def test_demo_accounts_are_on_by_default_with_the_generated_development_secret(
    tmp_path: Path,
):
    async with running_node(f"sqlite:///{tmp_path / 's.db'}", tmp_path, jwt_secret="") as n:
        async with aiohttp.ClientSession() as s:
            r = await s.post(
                f"{n.url}/api/register", json={"user": "dave", "password": "correct horse"}
            )
            assert r.status == 200
            body = await r.json()
        c = Client(n.ws_url, body["token"])
        assert (await c.connect())["user"] == "dave"
        await c.close()


async def test_a_user_who_already_chats_cannot_be_registered_by_someone_else(demo_node: Node):
    alice = await demo_node.client("alice")
    await alice.send_text("bob, the door code is 4711", user="bob")
    carol = await demo_node.client("carol")  # has no conversation, only a block
    await carol.request("block.add", user="mallory")
    for taken in ("bob", "alice", "carol"):
        r = await _register(demo_node.url, taken)
        assert r.status == 409, taken
    assert (await _register(demo_node.url, "dave")).status == 200


async def test_registration_refuses_ids_in_use_on_each_store(store: Store):
    users, chat = UserService(store), ChatService(store)
    await chat.send("alice", "a1", {"user": "bob"}, None, "text", {"text": "hi"})
    await store.write(ops.block_add("carol", "mallory", 1))
    for taken in ("alice", "bob", "carol"):
        with pytest.raises(Conflict):
            await users.register(taken, "correct horse")
    assert (await users.register("dave", "correct horse")).id == "dave"
    with pytest.raises(Conflict):
        await users.register("dave", "another horse")


async def _login(
    url: str, user: str, password: str, forwarded_for: str | None = None
) -> aiohttp.ClientResponse:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    async with aiohttp.ClientSession() as s:
        r = await s.post(
            f"{url}/api/login", json={"user": user, "password": password}, headers=headers
        )
        await r.read()
        return r


async def test_an_address_trying_too_fast_is_told_to_wait(tmp_path: Path):
    async with running_node(
        f"sqlite:///{tmp_path / 's.db'}", tmp_path, allow_registration=True,
        login_rate=0.5, login_burst=3,
    ) as n:
        answers = [(await _login(n.url, "dave", "not the one")).status for _ in range(4)]
        assert answers == [401, 401, 401, 429]
        r = await _register(n.url, "dave")
        assert r.status == 429 and int(r.headers["Retry-After"]) > 0


async def test_a_user_with_too_many_failed_logins_waits_even_with_the_right_password(
    tmp_path: Path,
):
    async with running_node(
        f"sqlite:///{tmp_path / 's.db'}", tmp_path, allow_registration=True,
        login_rate=1000, login_burst=1000,
    ) as n:
        for user in ("dave", "erin"):
            assert (await _register(n.url, user)).status == 200
        for _ in range(10):
            assert (await _login(n.url, "dave", "a wrong guess")).status == 401
        assert (await _login(n.url, "dave", "correct horse")).status == 429
        assert (await _login(n.url, "erin", "correct horse")).status == 200


@pytest.mark.parametrize("trusted", [True, False])
async def test_behind_a_trusted_proxy_each_client_address_has_its_own_limit(
    tmp_path: Path, trusted: bool
):
    async with running_node(
        f"sqlite:///{tmp_path / 's.db'}", tmp_path, allow_registration=True,
        login_rate=0.5, login_burst=2, trusted_proxies="127.0.0.1" if trusted else "",
    ) as n:
        first = [(await _login(n.url, "dave", "nope", f"10.0.0.1, {ip}")).status
                 for ip in ("192.0.2.1", "192.0.2.1", "192.0.2.1")]
        other = (await _login(n.url, "dave", "nope", "192.0.2.2")).status
    # Trusted: the proxy's X-Forwarded-For names the client (its last entry; what the
    # client wrote itself, further left, is not believed). Untrusted: the header is
    # anybody's to forge, and every attempt counts against the peer's address.
    assert first == [401, 401, 429]
    assert other == (401 if trusted else 429)


def test_the_client_address_is_the_last_one_no_trusted_proxy_added():
    proxies = parse_networks(["10.0.0.0/8", "127.0.0.1"])
    assert client_address("127.0.0.1", "203.0.113.9, 10.1.2.3", proxies) == "203.0.113.9"
    assert client_address("127.0.0.1", "1.1.1.1, 203.0.113.9", proxies) == "203.0.113.9"
    assert client_address("198.51.100.7", "203.0.113.9", proxies) == "198.51.100.7"
    assert client_address("127.0.0.1", None, proxies) == "127.0.0.1"
    assert client_address("127.0.0.1", "garbage", proxies) == "garbage"


@pytest.mark.parametrize("user", ["bad\x00id", "no spaces", "x" * 65])
async def test_a_login_for_an_id_no_account_can_have_is_refused_as_any_other(
    store: Store, user: str
):
    with pytest.raises(Unauthorized):
        await UserService(store).authenticate(user, "correct horse")


async def test_audience_and_issuer_when_configured_are_required(tmp_path: Path):
    async with running_node(
        f"sqlite:///{tmp_path / 's.db'}", tmp_path, allow_registration=True,
        jwt_audience="talkbridge", jwt_issuer="https://app.example",
    ) as n:
        good = token("carol", aud="talkbridge", iss="https://app.example")
        c = Client(n.ws_url, good)
        assert (await c.connect())["user"] == "carol"
        await c.close()
        for bad in (
            token("carol"),
            token("carol", aud="talkbridge"),
            token("carol", aud="billing", iss="https://app.example"),
            token("carol", aud="talkbridge", iss="https://evil.example"),
        ):
            first, code = await _refusal(n.ws_url, {"type": "auth", "token": bad})
            assert (first["code"], code) == ("unauthorized", 4401), jwt.decode(
                bad, options={"verify_signature": False}
            )
        # The demo accounts' tokens carry both, so they connect.
        assert (await _register(n.url, "dave")).status == 200
        r = await _login(n.url, "dave", "correct horse")
        minted = Client(n.ws_url, (await r.json())["token"])
        assert (await minted.connect())["user"] == "dave"
        await minted.close()


async def test_a_token_for_another_audience_is_refused_by_default(node: Node):
    first, code = await _refusal(
        node.ws_url, {"type": "auth", "token": token("carol", aud="billing")}
    )
    assert (first["code"], code) == ("unauthorized", 4401)


async def test_ice_servers_endpoint_needs_a_valid_token(node: Node):
    async with aiohttp.ClientSession() as s:
        r = await s.get(f"{node.url}/api/ice-servers")
        assert r.status == 401
        r = await s.get(
            f"{node.url}/api/ice-servers", headers={"Authorization": f"Bearer {token('alice')}"}
        )
        assert r.status == 200 and (await r.json())["ice_servers"] == []


async def test_a_second_connection_of_the_same_device_replaces_the_first(node: Node):
    first = await node.client("alice", "phone", reconnect=False)
    await node.client("alice", "phone")
    ev = await first.next_event("session.replaced")
    assert ev["type"] == "session.replaced"
    closed = await first.next_event("client.disconnected")
    assert closed["code"] == 4409
