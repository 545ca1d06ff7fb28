"""The shared retry table: which responses are delivered, retried, rejected or pause the sink.

| response                         | outcome                                               |
|----------------------------------|-------------------------------------------------------|
| 2xx                              | delivered                                             |
| 408, 429, 5xx except 501         | retry: exponential backoff, full jitter, capped, and  |
|                                  | never sooner than Retry-After (seconds or HTTP date)  |
| network error, timeout           | retry, as above                                       |
| 401, 403                         | pause the sink (a configuration problem): no drop, no |
|                                  | dead letter; probe periodically, resume on success    |
| any other 4xx, 501               | reject: dead-letter (per event where the API says     |
|                                  | which events were bad)                                |

Retries stop after ``max_total_s`` since the first attempt (default 4 hours); the events are then
dead-lettered as ``retries_exhausted``. A sink may classify a response more finely (a partial
success), but starts from this table.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import Enum


class Verdict(Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    REJECT = "reject"
    PAUSE = "pause"


def verdict_for_status(status: int) -> Verdict:
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if status in (401, 403):
        return Verdict.PAUSE
    if status in (408, 429) or (status >= 500 and status != 501):
        return Verdict.RETRY
    return Verdict.REJECT


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None if absent."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    # isascii: str.isdigit() is also true for "²", which float() refuses.
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float = 1.0
    cap_s: float = 300.0
    max_total_s: float = 4 * 3600.0
    # A Retry-After longer than this is treated as this: a buggy or hostile header must not park
    # a sink for a day.
    max_retry_after_s: float = 3600.0

    def delay(
        self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None
    ) -> float:
        """Seconds before attempt number ``attempt + 1`` (``attempt`` >= 1 failed so far)."""
        # The exponent is capped first: 2 ** 1024 is past a float (attempts reach that when a
        # poison request is re-sent after every success).
        ceiling = min(self.cap_s, self.base_s * (2.0 ** min(max(0, attempt - 1), 64)))
        jittered = (rng or random).uniform(0, ceiling)
        if retry_after is not None:
            return max(min(retry_after, self.max_retry_after_s), jittered)
        return jittered

    def exhausted(self, first_attempt_at: float, now: float) -> bool:
        return now - first_attempt_at >= self.max_total_s
