"""Start and stop local servers to load: talkbridge itself and the baseline relays.

Used by ``--baseline``, ``talkbridge-load profile``, bench/chat_bench.py and the tests.
Every server started here is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The PostgreSQL server benchmarks and tests create their databases on (trust auth).
PG_ADMIN = os.environ.get("TALKBRIDGE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A server process this tool started."""

    kind: str  # "talkbridge" | "bare" | "socketio"
    proc: subprocess.Popen[bytes]
    port: int
    host: str = "127.0.0.1"
    data_dir: str | None = None
    log_path: str | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        """The server's process id (for RSS and CPU sampling)."""
        return self.proc.pid

    @property
    def url(self) -> str:
        """The URL clients connect to with this server's transport."""
        if self.kind == "socketio":
            return f"http://{self.host}:{self.port}"
        return f"ws://{self.host}:{self.port}/ws"

    @property
    def transport(self) -> str:
        """``socketio`` for the socket.io relay, ``ws`` otherwise."""
        return "socketio" if self.kind == "socketio" else "ws"

    def log_tail(self, n: int = 40) -> str:
        """The last lines the server wrote (for error messages)."""
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time; remove its temp dir."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://{server.host}:{server.port}/healthz"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.kind} server exited with {server.proc.returncode}:\n{server.log_tail()}"
            )
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{server.kind} server not ready after {timeout}s:\n{server.log_tail()}")


def _python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def start_baseline(
    kind: str,
    secret: str = "",
    port: int | None = None,
    timeout: float = 20.0,
    extra_args: list[str] | None = None,
) -> Server:
    """Start the ``bare`` or ``socketio`` relay on loopback and wait until it answers."""
    module = {"bare": "loadtest.baselines.bare", "socketio": "loadtest.baselines.sio"}[kind]
    port = port or free_port()
    tmp = tempfile.TemporaryDirectory(prefix=f"tb-{kind}-")
    log_path = os.path.join(tmp.name, "server.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                _python(),
                "-m",
                module,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--secret",
                secret,
                *(extra_args or []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
        )
    server = Server(kind, proc, port, log_path=log_path, _tmp=tmp)
    _wait_ready(server, timeout)
    return server


def talkbridge_command(port: int, data_dir: str) -> list[str]:
    """The command line that serves talkbridge on loopback."""
    exe = REPO / ".venv" / "bin" / "talkbridge"
    base = [str(exe)] if exe.exists() else [_python(), "-m", "signaling"]
    return [*base, "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", data_dir]


def start_talkbridge(
    secret: str,
    port: int | None = None,
    store: str | None = None,
    extra_env: dict[str, str] | None = None,
    wrap: list[str] | None = None,
    timeout: float = 30.0,
) -> Server:
    """Start talkbridge with a temp data dir, rate limiting off; ``wrap`` prefixes a profiler."""
    port = port or free_port()
    tmp = tempfile.TemporaryDirectory(prefix="tb-server-")
    data_dir = os.path.join(tmp.name, "data")
    os.makedirs(data_dir)
    env = dict(os.environ)
    env.update({"TALKBRIDGE_JWT_SECRET": secret, "TALKBRIDGE_RATE_LIMIT": "0"})
    if store:
        env["TALKBRIDGE_STORE"] = store
    env.update(extra_env or {})
    log_path = os.path.join(tmp.name, "server.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*(wrap or []), *talkbridge_command(port, data_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
            env=env,
        )
    server = Server("talkbridge", proc, port, data_dir=data_dir, log_path=log_path, _tmp=tmp)
    _wait_ready(server, timeout)
    return server


def start(kind: str, secret: str, **kwargs: object) -> Server:
    """Start a server of ``kind``: talkbridge, bare or socketio."""
    if kind == "talkbridge":
        return start_talkbridge(secret, **kwargs)  # type: ignore[arg-type]
    return start_baseline(kind, secret, **kwargs)  # type: ignore[arg-type]


def which(name: str) -> str | None:
    """An executable from the venv or PATH."""
    venv = REPO / ".venv" / "bin" / name
    return str(venv) if venv.exists() else shutil.which(name)


async def create_database(prefix: str, admin: str = PG_ADMIN) -> str:
    """Create an empty PostgreSQL database named ``<prefix><random>``; returns its URL."""
    import asyncpg

    name = f"{prefix}{secrets.token_hex(4)}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return f"{admin.rsplit('/', 1)[0]}/{name}"


async def drop_database(url: str, admin: str = PG_ADMIN) -> None:
    """Drop the database of ``url`` (FORCE: connections left to it go with it)."""
    import asyncpg

    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await conn.close()
