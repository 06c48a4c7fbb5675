"""An async Python client for the talkbridge wire protocol.

    async with Client("ws://127.0.0.1:8080/ws", token) as c:
        data = await c.request("msg.send", to={"user": "bob"}, kind="text", body={"text": "hi"})
        event = await c.next_event("msg.new")

It authenticates (bearer header or first ``auth`` frame), matches replies to requests with
timeouts, queues events, and — unless told not to — reconnects by itself (trying each URL
in turn with backoff) and syncs: after a reconnect it asks ``conv.list`` and pages
``msg.history after_seq`` for every conversation that moved, and hands the missed messages
to the event queue as ``msg.new`` events with ``"synced": true``. A gap in a conversation's
sequence seen live (seq 7 arrives after 5) is filled the same way. Seqs that history skips
are not the user's to read (a group's messages from before they joined) and count as seen;
a sync hands out only what was sent before it began (later messages come live). Messages
are handed out once per (conv, seq) however they arrive. On its first connect the client syncs the
conversations whose ``watermark`` the app restored from local storage and takes the rest
as seen (``backlog=True`` hands everything out as synced events instead).

Changes to messages already handed out (recalls) are tracked per conversation by
``change_watermark``, the conversation's ``change_seq`` up to which they are known here
(apps persist and restore it with ``watermark``). A sync fetches ``msg.changes`` for every
conversation whose ``change_seq`` moved and hands out a ``msg.recalled`` event (with
``"synced": true``) for each message handed out before the sync that was recalled
meanwhile; the same recall may come both live and by sync, so apps apply it idempotently.

Besides the server's events, the client queues its own:

- ``client.disconnected {code}``: the connection closed (``code``: the close code).
- ``client.reconnected {node}``: it is connected again (and syncing).
- ``client.replaced {code: 4409}``: another connection of the same user and device took
  over (the server sent ``session.replaced`` first). The client does not reconnect: it
  would take the device back, and the two would replace each other in a loop. Neither
  does it after close code 4401 (the token was refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import msgspec

log = logging.getLogger(__name__)

_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()

TokenSource = str | Callable[[], Awaitable[str]]

# Close code of a session replaced by a newer connection of the same user and device.
CLOSE_REPLACED = 4409


class ClientError(Exception):
    """An ``ok: false`` reply or an ``error`` frame: ``code`` is the protocol error code."""

    def __init__(self, code: str, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data or {}


class ConnectionLost(ClientError):
    """The connection dropped before the reply came (retry with the same client_msg_id)."""

    def __init__(self, message: str = "connection lost") -> None:
        super().__init__("connection_lost", message)


class AuthFailed(ClientError):
    """The server refused the token (close code 4401); the client does not retry."""


class Client:
    """One device's connection to talkbridge."""

    def __init__(
        self,
        urls: str | Sequence[str],
        token: TokenSource,
        device: str | None = None,
        *,
        auth: str = "header",
        request_timeout: float = 10.0,
        reconnect: bool = True,
        sync: bool = True,
        max_backoff: float = 5.0,
        backlog: bool = False,
    ) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        self._token = token
        self.device = device
        self.auth_mode = auth
        self.request_timeout = request_timeout
        self.reconnect_enabled = reconnect
        self.sync_enabled = sync
        self.max_backoff = max_backoff
        self.backlog = backlog
        self._baselined = False
        self.auth_ok: dict[str, Any] = {}
        self.last_seq: dict[str, int] = {}
        self.reconnects = 0
        self._url_index = 0
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        self._connected = asyncio.Event()
        # Per conversation: every seq <= watermark was handed out; `_seen` holds those above.
        self.watermark: dict[str, int] = {}
        self._seen: dict[str, set[int]] = {}
        self._filling: set[str] = set()
        # Per conversation: every change (recall) up to this change_seq is known here.
        self.change_watermark: dict[str, int] = {}
        # While the first sync sets the watermarks, live messages wait here, per
        # conversation: against an unset watermark each would look like a gap, and its fill
        # would hand out the whole history (backlog=False) or hand it out of order.
        self._holding = False
        self._held: dict[str, list[dict[str, Any]]] = {}

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def user(self) -> str:
        return str(self.auth_ok.get("user", ""))

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def _token_value(self) -> str:
        return self._token if isinstance(self._token, str) else await self._token()

    async def connect(self) -> dict[str, Any]:
        """Open the WebSocket and authenticate; returns the ``auth.ok`` frame."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        self.auth_ok = await self._open(self.urls[self._url_index])
        first = self.sync_enabled and not self._baselined
        if first:
            self._baselined = True
            self._holding = True  # before the reader runs: no live message slips past
        self._reader = asyncio.get_running_loop().create_task(self._read_forever())
        if first:
            try:
                await self._first_sync()
            finally:
                self._release_held()
        return self.auth_ok

    async def _open(self, url: str) -> dict[str, Any]:
        assert self._session is not None
        token = await self._token_value()
        headers = {}
        params = {}
        if self.auth_mode == "header":
            headers["Authorization"] = f"Bearer {token}"
            if self.device:
                params["device"] = self.device
        ws = await self._session.ws_connect(url, headers=headers, params=params, heartbeat=30)
        if self.auth_mode != "header":
            frame: dict[str, Any] = {"type": "auth", "token": token}
            if self.device:
                frame["device"] = self.device
            await ws.send_str(_enc.encode(frame).decode())
        msg = await ws.receive(timeout=15)
        if msg.type != aiohttp.WSMsgType.TEXT:
            await ws.close()
            raise AuthFailed("unauthorized", f"connection closed during auth ({ws.close_code})")
        first = _dec.decode(msg.data)
        if first.get("type") != "auth.ok":
            await ws.close()
            raise AuthFailed(first.get("code", "unauthorized"), first.get("message", "refused"))
        self._ws = ws
        self.device = first.get("device", self.device)
        self._connected.set()
        return dict(first)

    async def close(self) -> None:
        """Close for good (no reconnect); pending requests fail with ConnectionLost."""
        self._closed = True
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        self._fail_pending("client closed")
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _fail_pending(self, why: str) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionLost(why))
        self._pending.clear()

    # ------------------------------------------------------------ reading

    async def _read_forever(self) -> None:
        while True:
            ws = self._ws
            assert ws is not None
            try:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        self._on_frame(_dec.decode(msg.data))
                    elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        break
            except (aiohttp.ClientError, ConnectionError):
                pass
            self._connected.clear()
            code = ws.close_code
            self._fail_pending(f"connection closed ({code})")
            self._events.put_nowait({"type": "client.disconnected", "code": code})
            if code == CLOSE_REPLACED:
                # A newer connection of this user and device took over: reconnecting would
                # replace it in turn, and two clients of one device would take it from
                # each other for ever. The app decides (e.g. asks the user).
                self._events.put_nowait({"type": "client.replaced", "code": code})
                return
            if self._closed or not self.reconnect_enabled or code == 4401:
                return
            await self._reconnect()

    def _on_frame(self, frame: dict[str, Any]) -> None:
        ftype = frame.get("type")
        if ftype in ("reply", "pong") and "id" in frame:
            fut = self._pending.pop(str(frame["id"]), None)
            if fut is not None and not fut.done():
                fut.set_result(frame)
                return
        if ftype == "error" and "id" in frame:
            fut = self._pending.pop(str(frame["id"]), None)
            if fut is not None and not fut.done():
                fut.set_result({"ok": False, "error": frame})
                return
        if ftype == "msg.new" and self._hold(frame):
            return  # handed out once the first sync has set the watermarks
        if ftype == "msg.new" and not self._note_message(frame):
            return  # already handed out (e.g. both live and by sync)
        if ftype == "msg.recalled":
            self._note_change(frame)
        self._events.put_nowait(frame)

    def _note_change(self, ev: dict[str, Any]) -> None:
        """A live change moves the change watermark only when it is the very next one:
        one skipped (made while offline, or not yet synced) is left for the next sync."""
        conv, change = ev.get("conv"), ev.get("change_seq")
        if not isinstance(conv, str) or not isinstance(change, int):
            return
        if change == self.change_watermark.get(conv, 0) + 1:
            self.change_watermark[conv] = change

    def _hold(self, m: dict[str, Any]) -> bool:
        """Keep a live message for :meth:`_release_held` while the first sync runs."""
        conv = m.get("conv")
        if not self._holding or not isinstance(conv, str) or not isinstance(m.get("seq"), int):
            return False
        self._held.setdefault(conv, []).append(m)
        return True

    def _release_held(self) -> None:
        """The first sync is done: hand out the held messages in seq order, each once (the
        sync may have handed some out already, with backlog=True)."""
        self._holding = False
        held, self._held = self._held, {}
        for msgs in held.values():
            for m in sorted(msgs, key=lambda m: int(m["seq"])):
                if self._note_message(m):
                    self._events.put_nowait(m)

    def _note_message(self, m: dict[str, Any]) -> bool:
        """Record a message; False if already handed out. Starts a gap fill when one shows."""
        conv, seq = m.get("conv"), m.get("seq")
        if not isinstance(conv, str) or not isinstance(seq, int):
            return True
        seen = self._seen.setdefault(conv, set())
        mark = self.watermark.get(conv, 0)
        if seq <= mark or seq in seen:
            return False
        seen.add(seq)
        if seq > self.last_seq.get(conv, 0):
            self.last_seq[conv] = seq
        self._advance(conv, mark)
        # No fill before the first sync has set the watermarks (an own send meanwhile).
        if (
            seen
            and self.sync_enabled
            and not self._holding
            and conv not in self._filling
            and self._connected.is_set()
        ):
            self._filling.add(conv)
            asyncio.get_running_loop().create_task(self._fill(conv))
        return True

    async def _fill(self, conv: str) -> None:
        try:
            await self._sync_conv(conv, self.last_seq.get(conv, 0))
        except ClientError as exc:
            log.warning("gap fill of %s failed: %s", conv, exc)
        finally:
            self._filling.discard(conv)

    async def _reconnect(self) -> None:
        delay = 0.1
        while not self._closed:
            self._url_index = (self._url_index + 1) % len(self.urls) if len(self.urls) > 1 else 0
            try:
                self.auth_ok = await self._open(self.urls[self._url_index])
            except AuthFailed:
                log.error("reconnect refused: token not accepted")
                self._closed = True
                return
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.debug("reconnect to %s failed: %s", self.urls[self._url_index], exc)
                await asyncio.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, self.max_backoff)
                continue
            self.reconnects += 1
            self._events.put_nowait(
                {"type": "client.reconnected", "node": self.auth_ok.get("node")}
            )
            if self.sync_enabled:
                asyncio.get_running_loop().create_task(self._sync_safely())
            return

    async def _sync_safely(self) -> None:
        try:
            await self.sync()
        except ClientError as exc:
            log.warning("sync after reconnect failed: %s", exc)

    async def sync(self) -> int:
        """Fetch every message missed since the last contiguous one seen, and the recalls of
        messages handed out before; returns how many messages."""
        data = await self.request("conv.list")
        n = 0
        for conv in data["conversations"]:
            n += await self._catch_up(conv)
        return n

    async def _catch_up(self, item: dict[str, Any]) -> int:
        """Sync one ``conv.list`` item: its history, then its changes; returns how many
        messages history handed out."""
        conv = item["conv"]
        # What was handed out before this sync: recalls of these are news to the app. The
        # messages the history pages hand out now show their recall already.
        mark, had = self.watermark.get(conv, 0), set(self._seen.get(conv, ()))
        n = await self._sync_conv(conv, item["last_seq"])
        await self._sync_changes(conv, int(item.get("change_seq", 0)), mark, had)
        return n

    async def _sync_changes(self, conv: str, target: int, mark: int, had: set[int]) -> None:
        """Page ``msg.changes`` from the change watermark up to ``target`` (the
        conversation's ``change_seq`` when the sync began; later changes come live), hand
        out a recall of each message at or below ``mark`` or in ``had``, then adopt
        ``target``: changes this user may not see (outside a former member's range) are
        skipped by the server but still counted."""
        after = self.change_watermark.get(conv, 0)
        while after < target:
            page = await self.request("msg.changes", conv=conv, after_change=after, limit=100)
            msgs = [m for m in page["messages"] if m["change_seq"] <= target]
            for m in msgs:
                if m["seq"] <= mark or m["seq"] in had:
                    self._recalled_meanwhile(conv, m)
            if not msgs or len(msgs) < len(page["messages"]) or not page["has_more"]:
                break
            after = msgs[-1]["change_seq"]
        self._adopt_changes(conv, target)

    def _recalled_meanwhile(self, conv: str, m: dict[str, Any]) -> None:
        """Hand out a changed message that the app already has as a ``msg.recalled`` event,
        the shape of the live one (marked synced)."""
        recalled = m.get("recalled")
        if not isinstance(recalled, dict):
            return  # a kind of change this client does not know
        self._events.put_nowait({
            "type": "msg.recalled",
            "conv": conv,
            "seq": m["seq"],
            "by": recalled.get("by"),
            "change_seq": m["change_seq"],
            "synced": True,
        })

    def _adopt_changes(self, conv: str, change_seq: int) -> None:
        """Every change up to ``change_seq`` is known here (never moves backwards: a live
        change may have moved it past what a sync's conv.list showed)."""
        if change_seq > self.change_watermark.get(conv, 0):
            self.change_watermark[conv] = change_seq

    async def _sync_conv(self, conv: str, last: int) -> int:
        n = 0
        after = self.watermark.get(conv, 0)
        prev = after  # every seq up to here is handed out or not readable by this user
        while after < last:
            page = await self.request("msg.history", conv=conv, after_seq=after, limit=100)
            msgs = page["messages"]
            for m in msgs:
                if m["seq"] > last:
                    # Sent after this sync began: it comes live on this connection (a
                    # copy taken from history here would beat it, marked "synced").
                    return n
                if m["seq"] > prev + 1:
                    self._not_readable(conv, prev, m["seq"])
                prev = m["seq"]
                if self._note_message(m):
                    n += 1
                    self._events.put_nowait({"type": "msg.new", "synced": True, **m})
            if not msgs or not page["has_more"]:
                break
            after = msgs[-1]["seq"]
        return n

    def _not_readable(self, conv: str, prev: int, seq: int) -> None:
        """History went from ``prev`` straight to ``seq``: the seqs between are not this
        user's to read (sent before they joined, or while they were out of the group), so
        they count as handed out. Without this a late joiner's watermark would never pass
        the seqs before its join, and every live message would start another fill."""
        if self.watermark.get(conv, 0) < prev:
            return  # an earlier seq is still missing: the watermark cannot move yet
        seen = self._seen.setdefault(conv, set())
        seen.difference_update([s for s in seen if s < seq])  # now under the watermark
        self._advance(conv, seq - 1)

    def _advance(self, conv: str, mark: int) -> None:
        """Set ``conv``'s watermark to ``mark``, then past the contiguous run seen above it
        (those seqs leave ``_seen``, which holds only seqs above the watermark)."""
        seen = self._seen.setdefault(conv, set())
        while mark + 1 in seen:
            mark += 1
            seen.discard(mark)
        self.watermark[conv] = mark

    async def _first_sync(self) -> None:
        """On the first connect: sync conversations the caller restored a ``watermark`` for
        (their changes too, from ``change_watermark``: from 0 when the app kept none); take
        the others as seen up to now (``backlog=True``: hand everything out instead). Either
        way the server's change counter is adopted where there is no local state: the
        messages this device has not had cannot have changed for it."""
        # What the app restored, taken before any await: an own send during this sync
        # sets a watermark too, which is no local state to sync from.
        restored = set(self.watermark)
        data = await self.request("conv.list")
        for conv in data["conversations"]:
            cid, last = conv["conv"], conv["last_seq"]
            if cid in restored:
                await self._catch_up(conv)
                continue
            if self.backlog:
                await self._sync_conv(cid, last)
            else:
                self._baseline(cid, last)
            self._adopt_changes(cid, int(conv.get("change_seq", 0)))

    def _baseline(self, conv: str, last: int) -> None:
        """Take ``conv`` as seen up to ``last`` (the first sync, backlog=False), except the
        messages that came live meanwhile: they are new however late conv.list read the
        store, and are handed out by :meth:`_release_held`."""
        held = [int(m["seq"]) for m in self._held.get(conv, ())]
        if held:
            last = min(last, min(held) - 1)
        # own sends noted meanwhile: those now under the watermark leave _seen
        seen = self._seen.setdefault(conv, set())
        seen.difference_update([s for s in seen if s <= last])
        self._advance(conv, max(last, self.watermark.get(conv, 0)))
        self.last_seq[conv] = max(last, self.last_seq.get(conv, 0))

    # ------------------------------------------------------------ requests

    async def request(
        self, type: str, timeout: float | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Send a request and return the reply's ``data``; raise ClientError on ``ok: false``."""
        # asyncio.timeout, not wait_for: on Python 3.11, wait_for returns the result when
        # the task is cancelled in the turn the result arrives, and the cancellation is
        # lost (a caller's loop that only ends by cancel then runs on for ever).
        if not self._connected.is_set():
            async with asyncio.timeout(timeout or self.request_timeout):
                await self._connected.wait()
        rid = f"r{next(self._ids)}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        assert self._ws is not None
        try:
            await self._ws.send_str(_enc.encode({"type": type, "id": rid, **fields}).decode())
            async with asyncio.timeout(timeout or self.request_timeout):
                reply = await fut
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise ConnectionLost(str(exc)) from None
        finally:
            self._pending.pop(rid, None)
        if reply.get("ok"):
            data: dict[str, Any] = reply.get("data") or {}
            if type == "msg.send" and "conv" in data and "seq" in data:
                self._note_own(data)
            return data
        err = reply.get("error") or {}
        raise ClientError(err.get("code", "internal"), err.get("message", ""), err)

    def _note_own(self, data: dict[str, Any]) -> None:
        self._note_message(data)

    async def send_raw(self, text: str) -> None:
        """Send a raw text frame (for tests of bad input)."""
        assert self._ws is not None
        await self._ws.send_str(text)

    async def send_text(
        self,
        text: str,
        *,
        user: str | None = None,
        group: str | None = None,
        client_msg_id: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Send a text message to a user or a group; returns {conv, seq, msg_id, ts}."""
        to = {"user": user} if user is not None else {"group": group}
        return await self.request(
            "msg.send",
            to=to,
            kind="text",
            body={"text": text},
            client_msg_id=client_msg_id or f"c{random.getrandbits(64):x}",
            **extra,
        )

    # ------------------------------------------------------------ events

    async def next_event(
        self,
        type: str | None = None,
        timeout: float = 5.0,
        where: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """The next event of ``type`` (matching ``where``); others before it are dropped."""
        async with asyncio.timeout(timeout):
            while True:
                ev = await self._events.get()
                if (type is None or ev.get("type") == type) and (where is None or where(ev)):
                    return ev

    def pending_events(self) -> list[dict[str, Any]]:
        """Everything queued now, without waiting."""
        out = []
        while not self._events.empty():
            out.append(self._events.get_nowait())
        return out

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Iterate over events as they come (forever, until cancelled)."""
        while True:
            yield await self._events.get()
