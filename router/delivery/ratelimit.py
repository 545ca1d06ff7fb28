"""Token buckets: a sink-wide rate, and optionally one per key (Slack: per channel).

Pure arithmetic on a clock passed in, so tests need no sleeping; the delivery loop asks how long
to wait and sleeps itself. Keys unused for a while are forgotten, so memory stays bounded however
many channels or users pass through.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: float  # bucket size
    tokens: float = field(init=False)
    updated: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def wait_time(self, now: float, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens are available (0 when they are now)."""
        self._refill(now)
        if self.tokens >= cost:
            return 0.0
        return (cost - self.tokens) / self.rate

    def take(self, now: float, cost: float = 1.0) -> None:
        self._refill(now)
        self.tokens -= cost

    def hold(self, now: float, seconds: float) -> None:
        """Empty the bucket so that the next token comes ``seconds`` from now, not sooner."""
        self._refill(now)
        self.tokens = min(self.tokens, 1.0 - seconds * self.rate)


class RateLimiter:
    """A sink-wide bucket and, when ``per_key_rate`` is set, one bucket per key."""

    def __init__(
        self,
        rate: float | None,
        burst: float | None = None,
        per_key_rate: float | None = None,
        per_key_burst: float | None = None,
        idle_forget_s: float = 300.0,
    ) -> None:
        self._global = TokenBucket(rate, burst or max(1.0, rate)) if rate else None
        self._per_key_rate = per_key_rate
        self._per_key_burst = per_key_burst or (max(1.0, per_key_rate) if per_key_rate else 1.0)
        self._keys: dict[str, TokenBucket] = {}
        self._idle_forget_s = idle_forget_s

    def _bucket(self, key: str, now: float) -> TokenBucket:
        bucket = self._keys.get(key)
        if bucket is None:
            if len(self._keys) > 10_000:
                self._forget(now)
            assert self._per_key_rate is not None
            bucket = self._keys[key] = TokenBucket(self._per_key_rate, self._per_key_burst, now)
        return bucket

    def _forget(self, now: float) -> None:
        # Only buckets full again: a forgotten bucket comes back full, so one still under a
        # hold (a Retry-After of an hour) must be kept.
        stale = [
            k
            for k, b in self._keys.items()
            if now - b.updated > self._idle_forget_s and b.wait_time(now, b.burst) == 0.0
        ]
        for key in stale:
            del self._keys[key]

    def wait_time(self, now: float, key: str | None = None, cost: float = 1.0) -> float:
        wait = self._global.wait_time(now, cost) if self._global else 0.0
        if key is not None and self._per_key_rate:
            wait = max(wait, self._bucket(key, now).wait_time(now, 1.0))
        return wait

    def take(self, now: float, key: str | None = None, cost: float = 1.0) -> None:
        if self._global:
            self._global.take(now, cost)
        if key is not None and self._per_key_rate:
            self._bucket(key, now).take(now, 1.0)

    def hold(self, now: float, key: str, seconds: float) -> bool:
        """The destination said "not before ``seconds``" for ``key``: hold that key's bucket.

        Returns False (nothing held) when this limiter has no per-key buckets.
        """
        if not self._per_key_rate or seconds <= 0:
            return False
        self._bucket(key, now).hold(now, seconds)
        return True

    @property
    def keys(self) -> int:
        return len(self._keys)
