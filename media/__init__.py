"""The media relay: rooms whose participants' encoded media is forwarded, never transcoded.

Entry points (nothing is imported here, so ``import media.host_addresses`` stays light):

- :class:`media.relay.Relay`: the relay in this process.
- :class:`media.pool.RelayPool`: rooms spread over worker processes (one per core by
  default) through :mod:`media.placement`; call ``await pool.start()`` first.
- Both implement :class:`media.service.RelayService`: ``join``, ``on_sdp``, ``on_ice``,
  ``leave``, ``participants``, ``close``; events reach each device through its ``emit``.

Modules: ``aiortc_adapter`` (the only code touching aiortc internals, version-pinned),
``frames`` (frame reassembly from RTP), ``forwarding`` (per-subscriber queues, keyframe
requests, bitrate choice), ``sdp_codecs`` (codec checks), ``relay``, ``pool``, ``worker``,
``placement``, ``service``, ``host_addresses`` (loopback ICE gathering), ``eventloop``
(the loop relay processes run on: UDP sockets drained per wake-up, not one datagram a
turn; asyncio internals, checked at start).
"""
