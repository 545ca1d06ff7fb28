"""Which offset of a partition may be committed.

Events of one partition finish out of order (a batch for one sink key is delivered while an
earlier event waits on a retry). The committable position is the lowest offset still pending, or
one past the highest offset seen when nothing is pending: committing it never skips an event that
is not yet delivered, filtered out or dead-lettered. That is the at-least-once rule; after a crash
the consumer re-reads from there, and the duplicates it may send carry the same idempotency keys.
"""

from __future__ import annotations

import heapq


class PartitionOffsets:
    def __init__(self) -> None:
        self._pending: set[int] = set()
        self._heap: list[int] = []
        self._next = -1  # one past the highest offset seen; -1 until the first
        self._first = -1  # the lowest offset seen
        self._committed = -1

    def start(self, offset: int) -> None:
        """An event at ``offset`` was read and is now in the router's hands."""
        self._pending.add(offset)
        heapq.heappush(self._heap, offset)
        self._next = max(self._next, offset + 1)
        self._first = offset if self._first < 0 else min(self._first, offset)

    def finish(self, offset: int) -> None:
        """The event is delivered, filtered out or dead-lettered."""
        self._pending.discard(offset)

    def committable(self) -> int | None:
        """The offset to commit (Kafka's "next offset to read"), or None when nothing new."""
        heap = self._heap
        while heap and heap[0] not in self._pending:
            heapq.heappop(heap)
        position = heap[0] if heap else self._next
        if position <= self._committed or position < 0:
            return None
        return position

    def committed(self, position: int) -> None:
        self._committed = max(self._committed, position)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def uncommitted(self) -> int:
        """Offsets read past the last commit: what the partition's next owner reads again.

        An upper bound on events (offsets can have gaps); finished events above a pending one
        count too, since the commit cannot pass the pending one.
        """
        if self._next < 0:
            return 0
        return self._next - max(self._committed, self._first)
