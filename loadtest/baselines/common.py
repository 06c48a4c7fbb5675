"""What both baseline relays share: token check and the reply/event shapes."""

from __future__ import annotations

import time
from typing import Any

import jwt


class Auth:
    """Checks HS256 tokens with the shared secret, or trusts ``sub`` when no secret is set."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def user_of(self, token: str) -> str | None:
        """The user id in ``token``, or None when it is not acceptable."""
        try:
            if self.secret:
                claims = jwt.decode(token, self.secret, algorithms=["HS256"])
            else:
                claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return None
        sub = claims.get("sub")
        return sub if isinstance(sub, str) and sub else None


class Relay:
    """The per-conversation counters a relay hands out so replies look like talkbridge's."""

    def __init__(self) -> None:
        self.seqs: dict[str, int] = {}
        self.msg_ids = 0

    def accept(
        self, sender: str, device: str, frame: dict[str, Any]
    ) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
        """For a 1:1 ``msg.send``: (recipient, reply, msg.new event); None for anything else."""
        to = frame.get("to")
        recipient = to.get("user") if isinstance(to, dict) else None
        if not isinstance(recipient, str):
            return None
        a, b = sorted((sender, recipient))
        conv = f"dm:{a}:{b}"
        seq = self.seqs.get(conv, 0) + 1
        self.seqs[conv] = seq
        self.msg_ids += 1
        ts = int(time.time() * 1000)
        msg_id = str(self.msg_ids)
        reply = {
            "type": "reply",
            "id": frame.get("id"),
            "ok": True,
            "data": {"conv": conv, "seq": seq, "msg_id": msg_id, "ts": ts},
        }
        event = {
            "type": "msg.new",
            "conv": conv,
            "seq": seq,
            "msg_id": msg_id,
            "from": sender,
            "from_device": device,
            "ts": ts,
            "kind": frame.get("kind", "text"),
            "body": frame.get("body"),
            "client_msg_id": frame.get("client_msg_id"),
        }
        return recipient, reply, event


def auth_ok(user: str, device: str) -> dict[str, Any]:
    """The auth.ok frame."""
    return {
        "type": "auth.ok",
        "user": user,
        "device": device,
        "session": f"{user}/{device}",
        "server_time": int(time.time() * 1000),
        "ice_servers": [],
    }


def error_reply(frame_id: Any, code: str) -> dict[str, Any]:
    """A failed reply."""
    return {"type": "reply", "id": frame_id, "ok": False, "error": {"code": code, "message": code}}
