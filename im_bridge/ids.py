"""Identifiers: user ids, conversation ids, message ids."""

from __future__ import annotations

import functools
import os
import random
import re
import time

from im_bridge.errors import BadRequest

USER_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Device ids are stored with every message (so no NUL, which PostgreSQL cannot hold).
DEVICE_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
GROUP_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def valid_user_id(user: object) -> bool:
    """True for ids matching the protocol's ``[A-Za-z0-9_.-]{1,64}``."""
    return isinstance(user, str) and USER_ID_RE.fullmatch(user) is not None


def check_user_id(user: object, field: str = "user") -> str:
    """Return ``user`` if valid, else raise BadRequest naming the field."""
    if not valid_user_id(user):
        raise BadRequest(f"'{field}' is not a valid user id", field=field)
    assert isinstance(user, str)
    return user


def check_group_id(group: object, field: str = "group") -> str:
    """Return ``group`` if it is a valid group id, else raise BadRequest."""
    if not isinstance(group, str) or GROUP_ID_RE.fullmatch(group) is None:
        raise BadRequest(f"'{field}' is not a valid group id", field=field)
    return group


def no_nul(value: str, field: str) -> str:
    """``value``, or BadRequest naming the field when it holds a NUL character.

    For free text stored in a column of its own (client_msg_id, group names, ...):
    PostgreSQL's TEXT cannot hold a NUL (SQLite can), and the refused write would roll
    back the whole group-commit batch, other users' writes with it. Message bodies and
    mentions are stored as JSON text, where a NUL is the escape ``\\u0000``: no check.
    """
    if "\x00" in value:
        raise BadRequest(f"'{field}' must not contain NUL characters", field=field)
    return value


def dm_conv(a: str, b: str) -> str:
    """The direct conversation id of two users: ``dm:<a>:<b>`` with the ids sorted."""
    x, y = sorted((a, b))
    return f"dm:{x}:{y}"


def group_conv(group: str) -> str:
    """The conversation id of a group."""
    return f"g:{group}"


def parse_conv(conv: object) -> tuple[str, tuple[str, ...]]:
    """Split a conversation id into its kind and parts: ("dm", (a, b)) or ("group", (g,))."""
    if isinstance(conv, str):
        return _parse_conv(conv)
    raise BadRequest("'conv' is not a valid conversation id", field="conv")


@functools.lru_cache(maxsize=65536)
def _parse_conv(conv: str) -> tuple[str, tuple[str, ...]]:
    # Conversation ids repeat on every message of a conversation: parse each once.
    if conv.startswith("dm:"):
        parts = conv[3:].split(":")
        if len(parts) == 2 and all(valid_user_id(p) for p in parts) and parts == sorted(parts):
            return "dm", (parts[0], parts[1])
    elif conv.startswith("g:"):
        g = conv[2:]
        if GROUP_ID_RE.fullmatch(g):
            return "group", (g,)
    raise BadRequest("'conv' is not a valid conversation id", field="conv")


def now_ms() -> int:
    """Server time in milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


_prng = random.Random(int.from_bytes(os.urandom(16)))


def new_id(prefix: str = "") -> str:
    """A time-ordered unique id: 12 hex digits of milliseconds, then 64 random bits.

    Ids are not secrets, so a PRNG seeded from the OS (no syscall per id) is enough.
    """
    # One 112-bit number, one format: half the time of two (one is made per message).
    return f"{prefix}{now_ms() << 64 | _prng.getrandbits(64):028x}"
