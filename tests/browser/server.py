"""Run the real talkbridge server as a subprocess on 127.0.0.1 for the browser tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
JWT_SECRET = "browser-tests-secret-0123456789abcdef"


def free_tcp_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A talkbridge node; ``restart()`` stops it and starts it again on the same port and data."""

    data_dir: Path
    env: dict[str, str]
    port: int = field(default_factory=free_tcp_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def start(self) -> None:
        env = {**os.environ, **self.env}
        log = self.log_path.open("ab")
        # The interpreter running the tests has talkbridge installed (make test's venv).
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "signaling", "serve", "--host", "127.0.0.1",
             "--port", str(self.port), "--data-dir", str(self.data_dir)],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        log.close()
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"talkbridge exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as res:
                    if res.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"talkbridge did not answer /healthz within 20 s:\n{self.log()}")
            time.sleep(0.1)

    def stop(self) -> None:
        proc = self.proc
        self.proc = None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def register(self, user: str, password: str = "password-123", name: str | None = None) -> str:
        """Create a demo account over HTTP; returns its token."""
        body: dict[str, str] = {"user": user, "password": password}
        if name:
            body["name"] = name
        req = urllib.request.Request(
            f"{self.url}/api/register", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as res:
            return str(json.loads(res.read())["token"])


@contextlib.contextmanager
def run_server(data_dir: Path, extra_env: dict[str, str] | None = None) -> Iterator[Server]:
    """A started server for the ``with`` block; stopped by PID in ``finally``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "TALKBRIDGE_JWT_SECRET": JWT_SECRET,
        "TALKBRIDGE_ALLOW_REGISTRATION": "true",  # the demo page's accounts
        "TALKBRIDGE_RELAY_ADDRESSES": "127.0.0.1",
        "TALKBRIDGE_RATE_LIMIT": "0",
        "TALKBRIDGE_LOGIN_RATE": "0",  # tests register many accounts from one address
        "TALKBRIDGE_LOG_LEVEL": "INFO",
        **(extra_env or {}),
    }
    server = Server(data_dir=data_dir, env=env)
    try:
        server.start()
        yield server
    finally:
        server.stop()
