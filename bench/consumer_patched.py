"""``router`` with proposed consumer optimisations applied at run time, to measure them.

Nothing in ``router/`` is changed: this wrapper patches the imported modules, then runs
``router.cli.main`` in the same process, so ``consumer_bench.py --router-cmd`` can measure a
proposal end to end before anyone edits the code. ``CONSUMER_PATCHES`` (comma-separated, or
``all`` for every one but ``nometrics``) picks the patches:

- ``gc``: after start-up, ``gc.freeze()`` (start-up objects leave the collector's generations)
  and a gen-0 threshold of 50,000 instead of 700: the consumer allocates several container
  objects per event (the decoded event's dicts, the rule outputs, the items) and keeps up to
  ``max_inflight_events`` of them alive, so the default thresholds run a collection every few
  hundred events, each one walking the live items again;
- ``key``: ``idempotency_key`` by slicing the SHA-256 hex digest (the same string as
  ``str(uuid.UUID(bytes=digest[:16]))``, without building a UUID object);
- ``slots``: the consumer's ``Item`` and ``_Ticket`` as ``slots=True`` dataclasses;
- ``poll``: at ``max_inflight_events`` the consumer no longer pauses its partitions at once:
  it waits 20 ms for deliveries instead of sitting in ``getmany`` for ``poll_timeout_ms`` with
  every partition paused, and it asks ``getmany`` for at most the room left
  (``max_records``). aiokafka drops the records it has prefetched for a partition that is paused
  when ``getmany`` runs (``PartitionRecords.check_assignment``), so every pause at the cap threw
  away up to ``max_partition_fetch_bytes`` (4 MiB) per partition, fetched again after the
  resume. It still pauses when the cap has held for 1 s (a destination outage) or the sink is
  paused, and keeps calling ``getmany`` then, as the group needs;
- ``release``: when a request is delivered while batches wait on a retry backoff, those batches
  go now (except the ones a ``Retry-After`` or a quota hold still holds back), as the consumer
  already does when it leaves the ``paused`` state. Without it, after an outage every batch
  waits out its own full-jitter backoff (up to ``retry_cap_s``, 300 s) after the destination is
  back, and while those batches hold the ``max_inflight_events`` cap nothing new is read either;
- ``nometrics``: the per-event Prometheus counter increments become no-ops (an upper bound for
  what counting per poll or per batch, then one ``inc(n)``, would save).

Usage: ``CONSUMER_PATCHES=gc,key python bench/consumer_patched.py --config CFG sink fake``; the
benchmark passes ``--router-cmd "python bench/consumer_patched.py"`` and the variable through.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hashlib
import heapq
import os
import sys
import time
from typing import Any

PATCHES = {"gc", "key", "slots", "poll", "release", "nometrics"}
STUCK_S = 1.0  # the "poll" patch pauses the partitions once the cap has held this long


def fast_idempotency_key(event_id: str, sink: str, rule_id: str) -> str:
    digest = hashlib.sha256(f"{event_id}\0{sink}\0{rule_id}".encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


class _NoCounter:
    def inc(self, amount: float = 1) -> None:
        return None


class _NoRule:
    routed = delivered = failed = _NoCounter()


def apply(chosen: set[str]) -> None:
    from router import consumer
    from router.delivery import sink

    if "key" in chosen:
        sink.idempotency_key = fast_idempotency_key
        consumer.idempotency_key = fast_idempotency_key
    if "slots" in chosen:
        consumer.Item = dataclasses.dataclass(eq=False, slots=True)(  # type: ignore[misc]
            type("Item", (), {"__annotations__": consumer.Item.__annotations__, **_defaults()})
        )
        consumer._Ticket = dataclasses.dataclass(eq=False, slots=True)(  # type: ignore[misc]
            type("_Ticket", (), {"__annotations__": consumer._Ticket.__annotations__})
        )
    if "gc" in chosen:
        start = consumer.SinkConsumer.start

        async def start_then_freeze(self: Any) -> None:
            await start(self)
            gc.collect()
            gc.freeze()
            gc.set_threshold(50_000, 20, 100)

        consumer.SinkConsumer.start = start_then_freeze  # type: ignore[method-assign]
    if "poll" in chosen:
        consumer.SinkConsumer._poll_once = _poll_once  # type: ignore[method-assign]
    if "release" in chosen:
        _patch_release(consumer)
    if "nometrics" in chosen:
        from router.sink_metrics import SinkMetrics

        init = SinkMetrics.__init__

        def init_then_silence(self: Any, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            self.consumed = _NoCounter()
            self.rule = lambda rule_id: _NoRule()

        SinkMetrics.__init__ = init_then_silence  # type: ignore[method-assign]


async def _poll_once(self: Any) -> None:
    """SinkConsumer._poll_once with the "poll" patch (the rest as in router/consumer.py)."""
    consumer = self._consumer
    assignment = consumer.assignment()
    inflight = self.inflight_events
    room = self.cfg.max_inflight_events - inflight
    now = time.monotonic()
    if room > 0:
        self._full_since = None
    elif getattr(self, "_full_since", None) is None:
        self._full_since = now
    full_since = getattr(self, "_full_since", None)
    stuck = full_since is not None and now - full_since >= STUCK_S
    if stuck or self.state == "paused":
        consumer.pause(*assignment)
    else:
        consumer.resume(*assignment)
    self.metrics.inflight.set(inflight)
    if room <= 0 and not stuck and self.state != "paused":
        # Full for a moment: let deliveries finish, keep aiokafka's prefetched records.
        await asyncio.sleep(0.02)
        batches = {}
    else:
        batches = await consumer.getmany(
            timeout_ms=self.cfg.poll_timeout_ms,
            max_records=max(1, min(self.cfg.max_poll_records, room)),
        )
    for tp, records in batches.items():
        offsets = self._offsets.get(tp)
        if offsets is None:  # revoked between fetch and here
            continue
        for record in records:
            await self._take(tp, offsets, record.offset, record.value)
    self._ready.extend(self.batcher.due(time.monotonic()))
    if self._ready:
        self._wake.set()


def _patch_release(consumer: Any) -> None:
    cls = consumer.SinkConsumer
    retry, settle = cls._retry, cls._settle

    async def retry_noting_retry_after(
        self: Any, items: list[Any], outcome: Any, status: Any, body: bytes
    ) -> None:
        if outcome.after_s:
            held = self.__dict__.setdefault("_held_until", {})
            cap = self.policy.max_retry_after_s
            held[id(items)] = time.monotonic() + min(outcome.after_s, cap)
        await retry(self, items, outcome, status, body)

    async def settle_then_release(
        self: Any, outcome: Any, items: list[Any], status: Any, body: bytes
    ) -> None:
        await settle(self, outcome, items, status, body)
        if not isinstance(outcome, consumer.Delivered) or not self._scheduled:
            return
        now = time.monotonic()
        held = self.__dict__.setdefault("_held_until", {})
        keep = [s for s in self._scheduled if held.get(id(s.items), 0.0) > now]
        go = [s for s in self._scheduled if held.get(id(s.items), 0.0) <= now]
        if go:
            self._scheduled = keep
            heapq.heapify(self._scheduled)
            for scheduled in sorted(go):
                held.pop(id(scheduled.items), None)
                self._ready.append(scheduled.items)
            self._wake.set()

    cls._retry = retry_noting_retry_after
    cls._settle = settle_then_release
    hold = getattr(cls, "_hold", None)  # quota holds (Amplitude), where the consumer has them
    if hold is not None:

        def hold_noting_deadline(self: Any, items: list[Any], delay: float, reason: str) -> None:
            held = self.__dict__.setdefault("_held_until", {})
            held[id(items)] = time.monotonic() + delay
            hold(self, items, delay, reason)

        cls._hold = hold_noting_deadline


def _defaults() -> dict[str, Any]:
    from router import consumer

    return {
        f.name: f.default
        for f in dataclasses.fields(consumer.Item)
        if f.default is not dataclasses.MISSING
    }


def main() -> int:
    raw = os.environ.get("CONSUMER_PATCHES", "")
    chosen = {p.strip() for p in raw.split(",") if p.strip()}
    if "all" in chosen:
        chosen = (chosen - {"all"}) | (PATCHES - {"nometrics"})
    unknown = chosen - PATCHES
    if unknown:
        sys.stderr.write(f"unknown CONSUMER_PATCHES {sorted(unknown)}; choose from {PATCHES}\n")
        return 2
    apply(chosen)
    sys.stderr.write(f"consumer_patched: applied {sorted(chosen) or 'nothing'}\n")
    from router.cli import main as router_main

    return router_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
