"""Limits on /api/register and /api/login: password guessing, and argon2's CPU.

Each attempt costs an argon2id hash (tens of ms of a core, in a thread). Unlimited, one
client could try a demo account's passwords as fast as the machine hashes, and keep every
core busy doing it. So attempts are limited per client address (a token bucket), and
failed logins per user id (a guesser spread over many addresses); the hashing itself runs
at most as many at once as the machine has cores (im_bridge/users.py).
"""

from __future__ import annotations

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


class LoginLimits:
    """``rate`` attempts per second per client address (``burst`` at once); rate 0 turns
    both limits off."""

    def __init__(self, rate: float, burst: int) -> None:
        self.on = rate > 0
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
