"""Start a real coturn (Debian ``turnserver``) on 127.0.0.1 with TURN REST auth, for tests.

Used by tests/turn and the relay-only end-to-end call tests. Run inside scripts/netns-run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TURNSERVER = "/usr/bin/turnserver"
REALM = "talkbridge.test"


@dataclass
class Coturn:
    """A running coturn: where it listens and the shared secret it checks."""

    port: int
    secret: str
    pid: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"turn:127.0.0.1:{self.port}"


def free_udp_port() -> int:
    """A UDP port that is free on 127.0.0.1 now (also free for TCP, which coturn listens on too)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            try:
                t.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def _ready(port: int) -> bool:
    # turnutils_stunclient never retransmits: bound every probe with `timeout`.
    probe = subprocess.run(
        ["timeout", "1", "turnutils_stunclient", "-p", str(port), "127.0.0.1"],
        capture_output=True, text=True,
    )
    return probe.returncode == 0


@contextlib.contextmanager
def run_coturn(workdir: Path, secret: str = "turn-test-secret") -> Iterator[Coturn]:
    """Run coturn for the duration of the ``with`` block; stopped by PID (SIGTERM) in finally."""
    port = free_udp_port()
    min_port = 49152 + (port % 1000) * 10
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "turnserver.conf"
    log_path = workdir / "turnserver.log"
    conf.write_text("\n".join([
        "listening-ip=127.0.0.1",
        "relay-ip=127.0.0.1",
        f"listening-port={port}",
        f"min-port={min_port}",
        f"max-port={min_port + 200}",
        f"realm={REALM}",
        "use-auth-secret",
        f"static-auth-secret={secret}",
        "fingerprint",
        "no-tls",
        "no-dtls",
        "no-cli",
        "allow-loopback-peers",
        "no-multicast-peers",
        f"userdb={workdir / 'turndb.sqlite'}",
        f"pidfile={workdir / 'turnserver.pid'}",
        f"log-file={log_path}",
        "simple-log",
        "no-stdout-log",
        "",
    ]))
    proc = subprocess.Popen([TURNSERVER, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _ready(port):
            if proc.poll() is not None:
                raise RuntimeError(f"turnserver exited with {proc.returncode}: "
                                   f"{log_path.read_text() if log_path.exists() else ''}")
            if time.monotonic() > deadline:
                raise RuntimeError("turnserver did not answer STUN within 10 s")
            time.sleep(0.1)
        yield Coturn(port=port, secret=secret, pid=proc.pid, log_path=log_path)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def uclient_allocates(port: int, username: str, password: str) -> int:
    """Exit code of ``turnutils_uclient`` allocating with these credentials (0 ok, 255 refused)."""
    res = subprocess.run(
        ["timeout", "20", "turnutils_uclient", "-y", "-n", "10", "-u", username, "-w", password,
         "-p", str(port), "127.0.0.1"],
        capture_output=True, text=True,
    )
    return res.returncode
