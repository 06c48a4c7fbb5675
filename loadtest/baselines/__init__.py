"""Reference relays that store nothing, to put talkbridge's figures in proportion.

``bare``: an aiohttp WebSocket relay, the ceiling for a Python server on this machine.
``socketio``: a python-socketio relay, what a Python team would reach for first.
Both speak only what the chat scenario needs: auth, ``msg.send`` -> ``reply`` + ``msg.new``.
"""

from __future__ import annotations

KINDS = ("bare", "socketio")
