"""Token buckets: per connection (frames), per client address and user (logins)."""

from __future__ import annotations

import time


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; rate 0 means unlimited."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.tokens = float(self.burst)
        self.updated = time.monotonic()

    def take(self) -> bool:
        """Spend one token; False when the bucket is empty."""
        if self.rate <= 0:
            return True
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def peek(self) -> bool:
        """Whether :meth:`take` would succeed now (spends nothing)."""
        if self.rate <= 0:
            return True
        return self.tokens + (time.monotonic() - self.updated) * self.rate >= 1
