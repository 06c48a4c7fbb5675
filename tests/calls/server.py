"""Run a real talkbridge server process for the call tests; stopped by PID in finally."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt

REPO = Path(__file__).resolve().parents[2]
SECRET = "calls-test-secret-0123456789abcdef"


@dataclass
class RunningServer:
    """A talkbridge process: where to connect and how to mint tokens for it."""

    port: int
    pid: int
    log_path: Path

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, user: str, ttl: int = 3600) -> str:
        """An HS256 token for ``user`` signed with the server's secret."""
        now = int(time.time())
        return jwt.encode({"sub": user, "exp": now + ttl, "iat": now}, SECRET, algorithm="HS256")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=0.5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def run_talkbridge(workdir: Path, **settings: str) -> Iterator[RunningServer]:
    """Start ``python -m signaling serve`` on 127.0.0.1 with ``TALKBRIDGE_<NAME>`` settings."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALKBRIDGE_")}
    env.update({
        "TALKBRIDGE_JWT_SECRET": SECRET,
        "TALKBRIDGE_HOST": "127.0.0.1",
        "TALKBRIDGE_PORT": str(port),
        "TALKBRIDGE_DATA_DIR": str(workdir),
        "TALKBRIDGE_RATE_LIMIT": "0",
        "TALKBRIDGE_LOG_LEVEL": "WARNING",
    })
    env.update({f"TALKBRIDGE_{k.upper()}": v for k, v in settings.items()})
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "signaling", "serve"], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not _healthy(port):
            if proc.poll() is not None:
                raise RuntimeError(f"talkbridge exited {proc.returncode}: {log_path.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError("talkbridge did not become healthy within 20 s")
            time.sleep(0.05)
        yield RunningServer(port=port, pid=proc.pid, log_path=log_path)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


@contextlib.contextmanager
def run_redis(workdir: Path, port: int) -> Iterator[str]:
    """A redis-server on 127.0.0.1:``port`` (stopped by PID); yields the talkbridge URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                             text=True).stdout.strip() != "PONG":
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0?heartbeat=0.5&node_ttl=3"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
