"""Grouping items into batches within a sink's declared limits: events, bytes and linger time.

One open batch per group key: a sink that must not mix keys in one request (GA4: one
``client_id`` per request; Slack: one message per request) gives each item its key, the others
use a single group. A batch closes when the next item would break a limit or when its linger
time has passed since its first item. Pure: the caller passes the clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Open(Generic[T]):
    opened_at: float
    items: list[T] = field(default_factory=list)
    size: int = 0


class Batcher(Generic[T]):
    def __init__(
        self, max_events: int, max_bytes: int, linger_s: float, per_item_overhead: int = 1
    ) -> None:
        if max_events < 1 or max_bytes < 1:
            raise ValueError("a batch needs room for at least one event and one byte")
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.linger_s = linger_s
        self.per_item_overhead = per_item_overhead
        self._open: dict[str | None, _Open[T]] = {}
        self._count = 0

    def fits_alone(self, size: int) -> bool:
        """Whether an item of ``size`` bytes can be sent at all (else it is too large)."""
        return size + self.per_item_overhead <= self.max_bytes

    def add(self, item: T, size: int, key: str | None, now: float) -> list[list[T]]:
        """Add an item; returns the batches this closed (full ones), possibly none."""
        if not self.fits_alone(size):
            raise ValueError(f"item of {size} bytes exceeds the batch limit {self.max_bytes}")
        closed: list[list[T]] = []
        cost = size + self.per_item_overhead
        batch = self._open.get(key)
        if batch is not None and batch.size + cost > self.max_bytes:
            closed.append(self._close(key))
            batch = None
        if batch is None:
            batch = self._open[key] = _Open(opened_at=now)
        batch.items.append(item)
        batch.size += cost
        self._count += 1
        if len(batch.items) >= self.max_events:
            closed.append(self._close(key))
        return closed

    def _close(self, key: str | None) -> list[T]:
        batch = self._open.pop(key)
        self._count -= len(batch.items)
        return batch.items

    def due(self, now: float) -> list[list[T]]:
        """Batches whose linger time has passed."""
        # The same arithmetic as next_deadline(), so a caller woken at the deadline finds it due.
        keys = [k for k, b in self._open.items() if now >= b.opened_at + self.linger_s]
        return [self._close(k) for k in keys]

    def drain(self) -> list[list[T]]:
        """Every open batch, now (shutdown, partition revocation)."""
        return [self._close(k) for k in list(self._open)]

    def next_deadline(self) -> float | None:
        if not self._open:
            return None
        return min(b.opened_at for b in self._open.values()) + self.linger_s

    def __len__(self) -> int:
        return self._count
