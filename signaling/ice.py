"""ICE servers handed to clients: configured STUN URLs and TURN URLs with TURN REST credentials.

The TURN REST scheme (what coturn's ``use-auth-secret`` checks): username ``"<expiry>:<user>"``
where expiry is a unix time in seconds, password ``base64(HMAC-SHA1(secret, username))``.
Nothing is ever added by default: with no STUN/TURN configured the list is empty, so no
client is sent to a public STUN server it did not ask for.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from typing import Any

from signaling.config import Config

log = logging.getLogger(__name__)

_warned_no_secret = False


def turn_password(secret: str, username: str) -> str:
    """The TURN REST password for ``username``: base64(HMAC-SHA1(secret, username))."""
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def turn_credentials(secret: str, user: str, expiry: int) -> tuple[str, str]:
    """``(username, password)`` valid until the unix time ``expiry`` for ``user``."""
    username = f"{int(expiry)}:{user}"
    return username, turn_password(secret, username)


def ice_servers_for(config: Config, user: str, now: float) -> list[dict[str, Any]]:
    """The ``ice_servers`` list for ``user`` at unix time ``now`` (auth.ok, /api/ice-servers).

    STUN URLs are passed as they are; TURN URLs get REST credentials expiring ``turn_ttl``
    seconds after ``now``. TURN URLs without a ``turn_secret`` are left out (coturn would
    refuse every allocation) and a warning is logged once.
    """
    global _warned_no_secret
    servers: list[dict[str, Any]] = []
    if config.stun_urls:
        servers.append({"urls": list(config.stun_urls)})
    if config.turn_urls:
        if not config.turn_secret:
            if not _warned_no_secret:
                log.warning("TALKBRIDGE_TURN_URLS is set but TALKBRIDGE_TURN_SECRET is not: "
                            "TURN servers are not offered to clients")
                _warned_no_secret = True
        else:
            username, password = turn_credentials(
                config.turn_secret, user, int(now) + int(config.turn_ttl))
            servers.append({"urls": list(config.turn_urls), "username": username,
                            "credential": password})
    return servers


def ice_ttl(config: Config) -> int:
    """Seconds the credentials in :func:`ice_servers_for` stay valid (the ``ttl`` field)."""
    return int(config.turn_ttl)
