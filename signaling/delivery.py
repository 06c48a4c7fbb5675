"""Publishing stored messages and other events to the devices that should see them."""

from __future__ import annotations

from collections.abc import Coroutine, Sequence
from typing import Any

from im_bridge.models import Message
from im_bridge.push import PushNotification
from im_bridge.store import group_ops
from signaling.codec import encode
from signaling.state import AppState


def preview(msg: Message) -> str:
    """A short text for a push notification."""
    if msg.kind == "text":
        text = str(msg.body.get("text", ""))
        return text[:120]
    return f"[{msg.kind}]"


async def publish(
    state: AppState, users: Sequence[str], event: dict[str, Any], exclude_session: str | None = None
) -> None:
    """Encode ``event`` once and deliver it to every online device of ``users``."""
    await state.bus.publish_users(users, encode(event), exclude_session)


async def deliver_message(
    state: AppState,
    msg: Message,
    members: Sequence[str],
    exclude_session: str | None = None,
    push: bool = True,
) -> None:
    """Send ``msg.new`` to every member's devices (but the sending one); push the offline."""
    pushing = deliver_message_now(state, msg, members, exclude_session, push)
    if pushing is not None:
        await pushing


def deliver_message_now(
    state: AppState,
    msg: Message,
    members: Sequence[str],
    exclude_session: str | None = None,
    push: bool = True,
) -> Coroutine[Any, Any, None] | None:
    """Send ``msg.new`` now; returns the push of members who may be offline, to be awaited
    or run as a task, or None when every member has a device on this node."""
    state.bus.post_users(members, encode({"type": "msg.new", **msg.to_wire()}), exclude_session)
    if not push:
        return None
    # Members with a device on this node are online: a cheap local look-up spares the
    # presence port for all but the rest, which it answers in one batch.
    elsewhere = [u for u in state.hub.not_here(members) if u != msg.sender]  # never the sender
    return _push_offline(state, msg, elsewhere) if elsewhere else None


async def _push_offline(state: AppState, msg: Message, elsewhere: list[str]) -> None:
    online = await state.bus.online_users(elsewhere)
    offline = [u for u in elsewhere if u not in online]
    if not offline:
        return
    # A member who muted a group (conv.mute) is still pushed when mentioned. Not in a dm:
    # there a mention of the peer means nothing, and would make any mute moot.
    mentions = msg.mentions if msg.conv.startswith("g:") else None
    mentioned_all = bool(mentions and "@all" in mentions)
    muted = await state.store.read(group_ops.conv_muted_users(msg.conv, offline))
    for user in offline:
        mentioned = mentioned_all or bool(mentions and user in mentions)
        if user in muted and not mentioned:
            continue
        await state.pusher.push(
            PushNotification(
                user=user,
                kind="message",
                conv=msg.conv,
                sender=msg.sender,
                preview=preview(msg),
                mentioned=mentioned,
                data={"seq": msg.seq, "msg_id": msg.msg_id, "kind": msg.kind},
            )
        )
