"""The event loop the relay runs on: asyncio's, with UDP transports that read every queued
datagram per wake-up.

asyncio's selector loop reads ONE datagram per socket per turn of the loop. A publisher's
socket takes ~150-200 packets/s, so once a busy loop turns less often than that, the rest
waits in the kernel's receive buffer, and it stays behind: a PLI or a keyframe then sat
behind up to 0.5 s of queued media (measured: 12 KB queued -> 70 ms, 77 KB -> 524 ms), and
every audio and video packet with it. Here a wake-up reads up to ``READS_PER_WAKEUP``
datagrams (libuv reads 32), so the loop pays one turn per burst instead of per packet and
catches up. Everything else is the stock loop.

The transport is a subclass of asyncio's private ``_SelectorDatagramTransport`` (the one
place that decides how much to read). :func:`new_event_loop` checks that what it relies on
is there and otherwise returns the stock loop, logging why.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from asyncio import selector_events
from typing import Any

log = logging.getLogger(__name__)

READS_PER_WAKEUP = 32

_Base: Any = getattr(selector_events, "_SelectorDatagramTransport", None)


def _supported() -> bool:
    """True when this Python's asyncio has the transport and the loop hook this module
    builds on, with the signatures it expects."""
    if _Base is None or not hasattr(_Base, "_read_ready"):
        return False
    hook = getattr(asyncio.SelectorEventLoop, "_make_datagram_transport", None)
    if hook is None:
        return False
    params = list(inspect.signature(hook).parameters)
    return params[:3] == ["self", "sock", "protocol"]


if _supported():

    class _DrainingDatagramTransport(_Base):  # type: ignore[misc]
        """A datagram transport that reads until the socket is empty (or the cap)."""

        def _read_ready(self) -> None:
            sock, protocol, size = self._sock, self._protocol, self.max_size
            for _ in range(READS_PER_WAKEUP):
                # The protocol may close the transport from datagram_received.
                if self._conn_lost or self._closing:
                    return
                try:
                    data, addr = sock.recvfrom(size)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    protocol.error_received(exc)
                    return  # as the stock transport: the next wake-up reads on
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    self._fatal_error(exc, "Fatal read error on datagram transport")
                    return
                protocol.datagram_received(data, addr)

    class MediaEventLoop(asyncio.SelectorEventLoop):
        """asyncio's selector loop whose UDP endpoints drain their socket per wake-up."""

        def _make_datagram_transport(
            self,
            sock: Any,
            protocol: Any,
            address: Any = None,
            waiter: Any = None,
            extra: Any = None,
        ) -> Any:
            return _DrainingDatagramTransport(self, sock, protocol, address, waiter, extra)

else:  # pragma: no cover - another Python's asyncio internals
    MediaEventLoop = asyncio.SelectorEventLoop  # type: ignore[misc,assignment]


def drains_datagrams() -> bool:
    """Whether :func:`new_event_loop` gives the draining loop on this Python."""
    return MediaEventLoop is not asyncio.SelectorEventLoop


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new loop for a process that relays media (the server, a relay worker)."""
    if not drains_datagrams():
        log.warning(
            "asyncio internals differ from what media/eventloop.py expects: UDP sockets "
            "read one datagram per turn of the loop (a busy relay falls behind)"
        )
    return MediaEventLoop()
