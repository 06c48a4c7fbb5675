"""A throwaway redis-server on a free loopback port, stopped by PID."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from tests.support import free_port


class RedisServer:
    """``redis-server --save '' --appendonly no`` that a test can stop and start again."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start and wait until it answers PING."""
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        with open(self.workdir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.ping():
                return
            if self.proc.poll() is not None:
                raise RuntimeError((self.workdir / "redis.log").read_text())
            time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        """SIGKILL (data is not persisted anyway) and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self) -> redis.Redis:
        """A synchronous redis-py client (for assertions about what is stored)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2,
                           decode_responses=True)

    def ping(self) -> bool:
        try:
            with self.client() as r:
                return bool(r.ping())
        except (redis.RedisError, OSError):
            return False

    def command_calls(self, name: str) -> int:
        """How many times Redis ran command ``name`` (also from scripts) since RESETSTAT."""
        with self.client() as r:
            stats = r.info("commandstats")
        entry = stats.get(f"cmdstat_{name}")
        return int(entry["calls"]) if entry else 0
