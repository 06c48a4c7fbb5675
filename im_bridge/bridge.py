"""The bridge between calls and chats: who may call whom, and the call log in the dm.

Transport-free like the rest of im_bridge: the signaling layer asks it before ringing
anyone and hands it each finished call; it returns what was stored so signaling can fan
the ``msg.new`` out.
"""

from __future__ import annotations

from typing import Any

from im_bridge.errors import BadRequest, Forbidden
from im_bridge.ids import check_user_id, dm_conv
from im_bridge.messages import ChatService, Sent

CALL_OUTCOMES = ("completed", "missed", "declined", "cancelled", "busy", "failed")


class CallBridge:
    """Call rules and call logs over the chat service."""

    def __init__(self, chat: ChatService) -> None:
        self.chat = chat

    async def check_may_call(self, caller: str, callee: str) -> None:
        """Raise when ``caller`` may not call ``callee``: Forbidden when the callee blocked them.

        The message is the one a blocked sender gets for messages, so a call attempt reveals
        no more than a message does.
        """
        check_user_id(callee, "to.user")
        if caller == callee:
            raise BadRequest("cannot call yourself", field="to")
        if await self.chat.is_blocked(caller, by=callee):
            raise Forbidden("this user does not accept your calls")

    async def record_call(
        self,
        caller: str,
        callee: str,
        call_id: str,
        media: dict[str, bool],
        outcome: str,
        duration_s: int,
    ) -> Sent:
        """Append the ``call`` message for a finished call to the two users' dm conversation.

        Written as the caller's message (the caller placed the call), keyed on the call id
        so writing the same call twice stores one message.
        """
        if outcome not in CALL_OUTCOMES:
            raise BadRequest(f"unknown call outcome {outcome!r}")
        body: dict[str, Any] = {
            "call_id": call_id,
            "media": {"audio": bool(media.get("audio")), "video": bool(media.get("video"))},
            "outcome": outcome,
            "duration_s": int(duration_s),
        }
        return await self.chat.post_system(
            dm_conv(caller, callee), "call", body, actor=caller,
            client_msg_id=f"call:{call_id}",
        )
