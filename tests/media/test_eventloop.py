"""The relay's event loop: a UDP socket's queued datagrams are read in one wake-up.

Real sockets on 127.0.0.1 (no WebRTC: these run on the host network too).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest

from media.eventloop import READS_PER_WAKEUP, MediaEventLoop, drains_datagrams, new_event_loop


class _Counter(asyncio.DatagramProtocol):
    def __init__(self, close_after: int | None = None) -> None:
        self.received: list[bytes] = []
        self.close_after = close_after
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)
        if self.close_after is not None and len(self.received) == self.close_after:
            assert self.transport is not None
            self.transport.close()


def _run(factory: Callable[[], asyncio.AbstractEventLoop], queued: int,
         close_after: int | None = None) -> list[int]:
    """Queue ``queued`` datagrams on a fresh endpoint, then count how many the protocol
    has after each of the next few turns of the loop."""

    async def scenario() -> list[int]:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_datagram_endpoint(
            lambda: _Counter(close_after), local_addr=("127.0.0.1", 0)
        )
        assert proto.transport is not None
        addr = proto.transport.get_extra_info("sockname")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for i in range(queued):  # on loopback, in the receiver's queue on return
                tx.sendto(b"%d" % i, addr)
        counts = []
        for _ in range(4):
            await asyncio.sleep(0)
            counts.append(len(proto.received))
        proto.transport.close()
        return counts

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(scenario())


def test_this_python_gets_the_draining_loop() -> None:
    assert drains_datagrams()
    loop = new_event_loop()
    try:
        assert isinstance(loop, MediaEventLoop)
    finally:
        loop.close()


def test_one_wakeup_reads_every_queued_datagram() -> None:
    # The stock loop reads one a turn: a relay that turns slower than its publishers send
    # falls behind for good (the contrast shows the test can tell the two apart).
    assert _run(asyncio.SelectorEventLoop, 20) == [0, 1, 2, 3]
    assert _run(new_event_loop, 20) == [0, 20, 20, 20]


def test_a_wakeup_reads_at_most_the_cap_so_other_sockets_get_their_turn() -> None:
    n = READS_PER_WAKEUP
    assert _run(new_event_loop, 2 * n + 5) == [0, n, 2 * n, 2 * n + 5]


@pytest.mark.parametrize("close_after", [1, 5])
def test_no_datagram_reaches_a_protocol_after_it_closed_its_transport(close_after: int) -> None:
    assert _run(new_event_loop, 20, close_after=close_after)[-1] == close_after


async def test_tests_run_on_the_relay_loop() -> None:
    # tests/conftest.py: in-process servers and relays meet what production runs on.
    assert isinstance(asyncio.get_running_loop(), MediaEventLoop)
