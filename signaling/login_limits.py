"""Limits on /api/register and /api/login: password guessing, and argon2's CPU.

Each attempt costs an argon2id hash (tens of ms of a core, in a thread). Unlimited, one
client could try a demo account's passwords as fast as the machine hashes, and keep every
core busy doing it. So attempts are limited per client address (a token bucket), and
failed logins per user id (a guesser spread over many addresses); the hashing itself runs
at most as many at once as the machine has cores (im_bridge/users.py). Behind a load
balancer every client would share its address: the ones listed as trusted proxies are
looked through (X-Forwarded-For).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

from signaling.ratelimit import TokenBucket

# Failed logins per user id: a burst of this many, then one every USER_FAILURE_EVERY_S.
USER_FAILURES_BURST = 10
USER_FAILURE_EVERY_S = 6.0
# Buckets kept (least recently used dropped first: a dropped bucket starts full again).
MAX_KEYS = 10_000


class _Buckets:
    """Token buckets by key, at most ``MAX_KEYS`` of them."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._by_key: OrderedDict[str, TokenBucket] = OrderedDict()

    def get(self, key: str) -> TokenBucket:
        bucket = self._by_key.get(key)
        if bucket is None:
            bucket = self._by_key[key] = TokenBucket(self.rate, self.burst)
            if len(self._by_key) > MAX_KEYS:
                self._by_key.popitem(last=False)
        else:
            self._by_key.move_to_end(key)
        return bucket


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: list[str]) -> list[Network]:
    """``TALKBRIDGE_TRUSTED_PROXIES``: addresses or networks (``10.0.0.0/8``)."""
    return [ipaddress.ip_network(e.strip(), strict=False) for e in entries if e.strip()]


def client_address(remote: str, forwarded_for: str | None, proxies: list[Network]) -> str:
    """The client's address: the peer's, or when the peer is a trusted proxy, the last
    address in ``X-Forwarded-For`` that is not one (what the proxies before it appended;
    anything further left the client may have written itself)."""
    hops = [h.strip() for h in (forwarded_for or "").split(",") if h.strip()]
    address = remote
    while _trusted(address, proxies) and hops:
        address = hops.pop()
    return address


def _trusted(address: str, proxies: list[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in proxies)


class LoginLimits:
    """``rate`` attempts per second per client address (``burst`` at once); rate 0 turns
    both limits off."""

    def __init__(self, rate: float, burst: int, proxies: list[Network] | None = None) -> None:
        self.on = rate > 0
        self.proxies = proxies or []
        self._addresses = _Buckets(rate, burst)
        self._failures = _Buckets(1 / USER_FAILURE_EVERY_S, USER_FAILURES_BURST)

    def attempt(self, address: str) -> bool:
        """Count an attempt from ``address``; False when it is over its limit."""
        return not self.on or self._addresses.get(address).take()

    def may_log_in(self, user: str) -> bool:
        """False while ``user`` has used up its failed logins (even a right password then
        waits: otherwise the answer would tell a guesser which password was right)."""
        return not self.on or self._failures.get(user).peek()

    def failed(self, user: str) -> None:
        """Count a failed login for ``user``."""
        if self.on:
            self._failures.get(user).take()
