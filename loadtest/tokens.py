"""Users and their tokens: minted from the shared secret, or read from a file.

Users are named by a pattern (``{run}`` and ``{i}`` are filled in) so that runs against the
same deployment never collide.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import jwt


@dataclass(frozen=True)
class Identity:
    """One simulated device: who it is and what it presents."""

    user: str
    device: str
    token: str


class Users:
    """Maps a global client index to an identity."""

    def __init__(
        self,
        pattern: str = "lt{run}-{i}",
        run: str = "",
        secret: str = "",
        tokens_file: str | None = None,
        ttl: int = 6 * 3600,
    ) -> None:
        self.pattern = pattern
        self.run = run
        self.secret = secret
        self.ttl = ttl
        self.exp = int(time.time()) + ttl
        self.from_file: list[Identity] | None = None
        if tokens_file:
            self.from_file = load_tokens(tokens_file)

    def name(self, i: int) -> str:
        """The user id of client ``i``."""
        if self.from_file is not None:
            return self.from_file[i % len(self.from_file)].user
        return self.pattern.format(run=self.run, i=i)

    def identity(self, i: int, device: str = "d1") -> Identity:
        """User, device and token of client ``i``."""
        if self.from_file is not None:
            if i >= len(self.from_file):
                raise IndexError(
                    f"tokens file has {len(self.from_file)} entries, client {i} needs one"
                )
            return self.from_file[i]
        user = self.name(i)
        return Identity(user, device, mint(self.secret, user, device, self.exp))


def mint(secret: str, user: str, device: str, exp: int) -> str:
    """An HS256 token with ``sub``, ``exp`` and ``dev``."""
    if not secret:
        raise ValueError(
            "a JWT secret is needed to mint tokens (--secret or TALKBRIDGE_JWT_SECRET)"
        )
    return jwt.encode({"sub": user, "dev": device, "exp": exp}, secret, algorithm="HS256")


def load_tokens(path: str) -> list[Identity]:
    """Read identities: JSON lines ``{"user","token","device"?}`` or ``user token [device]``."""
    out: list[Identity] = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("{"):
                obj = json.loads(line)
                out.append(
                    Identity(str(obj["user"]), str(obj.get("device", "d1")), str(obj["token"]))
                )
            else:
                parts = line.split()
                out.append(Identity(parts[0], parts[2] if len(parts) > 2 else "d1", parts[1]))
    if not out:
        raise ValueError(f"no tokens in {path}")
    return out
