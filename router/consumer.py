"""One sink's consumer: the event topic -> rules -> batches -> HTTP, at least once.

``router sink NAME`` runs one of these per process; processes of one sink share the partitions of
the event topic (and of the sink's retry topic, which only replays feed) through the Kafka consumer
group ``router-sink-NAME``.

The guarantee rests on one rule: an offset is committed only when every event before it is
delivered, filtered out by the rules, or safely written to the dead-letter topic (acknowledged by
Kafka). Commits are explicit (``offset + 1`` of the last finished event, per partition); a crash
re-reads from the last commit and re-sends with the same idempotency keys. Memory is bounded: past
``max_inflight_events`` unfinished events the consumer pauses its partitions (it keeps polling,
so the group never thinks it died) until deliveries catch up.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import heapq
import itertools
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from router import dlq
from router.bus import (
    FATAL_PRODUCER_ERRORS,
    TopicSpec,
    ensure_topics,
    event_topic_spec,
    kafka_answers,
    keep_trying,
    start_producer,
    stop_quietly,
)
from router.delivery.batching import Batcher
from router.delivery.offsets import PartitionOffsets
from router.delivery.ratelimit import RateLimiter
from router.delivery.retry import RetryPolicy
from router.delivery.sink import (
    Delivered,
    HttpRequest,
    HttpResponse,
    Outcome,
    Partial,
    Pause,
    Prepared,
    Reject,
    Retry,
    Sink,
    Split,
    excerpt,
    idempotency_key,
)
from router.events import Event, decode_event, now_ms
from router.rules.engine import Failed, Routed
from router.rules.live import LiveRules
from router.settings import Settings
from router.sink_metrics import SinkMetrics

log = logging.getLogger(__name__)

HEALTHY, DEGRADED, PAUSED = "healthy", "degraded", "paused"
# How often the lag of paused partitions is asked of the broker (it has no fetches to go by).
_END_OFFSETS_EVERY_S = 5.0
NULL = msgspec.Raw(b"null")  # a dead letter's event when it had to be left out
# At max_inflight_events: wait this long for deliveries to free room, and pause the partitions
# only once the cap has held for _PAUSE_AFTER_FULL_S (aiokafka drops what it prefetched for a
# paused partition when getmany runs, and fetches it again after the resume).
_FULL_WAIT_S = 0.02
# Failed requests since the last success from which a success counts as a recovery.
_RECOVERY_FAILURES = 2
_PAUSE_AFTER_FULL_S = 1.0


class _LogThrottle:
    """At most one log line per kind per interval; the lines it held back are counted in the next.

    A long outage retries every in-flight batch again and again (10,000 events at batch 25 wrote
    ~2,000 lines a minute); the counts are in the metrics, the log needs a sample and a total.
    Vector rate-limits its internal logs the same way (10 s by default).
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, kind: str) -> tuple[bool, str]:
        """Whether to log this one, and a suffix naming the lines held back since the last."""
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            self._held[kind] = self._held.get(kind, 0) + 1
            return False, ""
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        suffix = f" (+{held} similar in the last {now - last:.0f}s)" if held and last else ""
        return True, suffix

    def overdue(self, final: bool = False) -> list[tuple[str, int, float]]:
        """Held-back lines that no later line has counted yet: (kind, lines, seconds).

        A kind is due once its interval is over (every kind when ``final``, at shutdown).
        Counted here, its lines are not counted again by the next line of the kind.
        """
        now = time.monotonic()
        due = []
        for kind, held in list(self._held.items()):
            since = now - self._last.get(kind, now)
            if final or since >= self.interval_s:
                due.append((kind, held, since))
                del self._held[kind]
        return due


@dataclass(eq=False, slots=True)
class _Ticket:
    """One Kafka record in the router's hands; finished when all its outputs are."""

    offsets: PartitionOffsets
    offset: int
    remaining: int


@dataclass(eq=False, slots=True)
class Item:
    """One rule output on its way to the destination."""

    ticket: _Ticket
    tp: TopicPartition
    event_id: str
    rule_id: str
    key: str
    body: bytes
    group: str | None
    payload: Any
    value: bytes  # the record value (the canonical event), for dead letters
    ruleset: str
    attempts: int = 0
    first_attempt_ms: int | None = None
    last_attempt_ms: int | None = None
    first_attempt_mono: float | None = None


@dataclass(order=True)
class _Scheduled:
    due: float
    seq: int
    items: list[Item] = field(compare=False)
    # Not sent before this even when the destination recovers: a Retry-After or a quota hold.
    not_before: float = field(default=0.0, compare=False)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: SinkConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._owner.on_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._owner.on_assigned(list(assigned))


class SinkConsumer:
    def __init__(
        self,
        settings: Settings,
        sink: Sink,
        rules: LiveRules,
        metrics: SinkMetrics,
        redact: dlq.Redactor | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = settings.consumer
        self.sink = sink
        self.rules = rules
        self.metrics = metrics
        self.redact = redact or dlq.Redactor(())
        limits = sink.limits
        self.policy = RetryPolicy(
            base_s=self.cfg.retry_base_s,
            cap_s=self.cfg.retry_cap_s,
            max_total_s=self.cfg.retry_max_total_s,
        )
        self.batcher: Batcher[Item] = Batcher(
            limits.max_events, limits.max_bytes, limits.linger_s, limits.per_item_overhead
        )
        self.limiter = RateLimiter(
            limits.rate_per_s, limits.burst, limits.per_key_rate_per_s, limits.per_key_burst
        )
        self.topics = [settings.kafka.topic, self.cfg.retry_topic_for(sink.name)]
        self.dlq_topic = self.cfg.dlq_topic_for(sink.name)
        self.state = HEALTHY
        self._offsets: dict[TopicPartition, PartitionOffsets] = {}
        # A deque: at batch size 1 thousands of batches can be ready, and list.pop(0) is O(n).
        self._ready: collections.deque[list[Item]] = collections.deque()
        self._scheduled: list[_Scheduled] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._sending: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(limits.concurrency)
        self._consumer: Any = None
        self._producer: Any = None
        self._session: aiohttp.ClientSession | None = None
        self.started = False
        self.stopping = False
        self._dispatch_done = False
        self._full_since: float | None = None
        self._failed_since_success = 0
        self._kafka_checked: tuple[float, str] = (0.0, "not started")
        self._ends_checked = 0.0
        self._log_throttle = _LogThrottle()
        self._producer_lock = asyncio.Lock()
        self.health = "not run"
        self._routed: dict[str, int] = {}

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Create the topics, start the dead-letter producer and join the group.

        Retried until ``kafka.startup_timeout_s``, as the ingest does: a sink deployed before its
        Kafka answers (a restarted cluster, a pod scheduled first) waits instead of exiting at once.
        Whatever a failed or cancelled attempt started is closed before it goes on.
        """
        await keep_trying(self.settings.kafka, self._connect, self._close_clients)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.sink.limits.timeout_s),
            connector=aiohttp.TCPConnector(limit=self.sink.limits.concurrency * 2),
        )
        self.started = True
        self._set_state(HEALTHY)
        log.info(
            "sink %s consuming %s as group %s",
            self.sink.name,
            ", ".join(self.topics),
            self.cfg.group_for(self.sink.name),
        )

    async def _close_clients(self) -> None:
        """Close the Kafka clients a failed or cancelled start left behind (bounded, quiet)."""
        consumer, self._consumer = self._consumer, None
        producer, self._producer = self._producer, None
        if consumer is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(consumer.stop(), timeout=5)
        if producer is not None:
            await stop_quietly(producer)

    async def _connect(self) -> None:
        kafka = self.settings.kafka
        specs = [
            event_topic_spec(kafka),
            event_topic_spec(kafka, self.topics[1]),
            # A dead letter carries the event and its rendered payload: room for both.
            TopicSpec(
                self.dlq_topic,
                kafka.partitions,
                kafka.replication_factor,
                {
                    "retention.ms": str(self.cfg.dlq_retention_ms),
                    "max.message.bytes": str(2 * kafka.max_message_bytes),
                },
            ),
        ]
        await ensure_topics(kafka, specs)
        self._producer = self._new_producer()
        await asyncio.wait_for(self._producer.start(), timeout=30)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka.bootstrap_servers,
            client_id=f"{kafka.client_id}-{self.sink.name}",
            group_id=self.cfg.group_for(self.sink.name),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=self.cfg.session_timeout_ms,
            heartbeat_interval_ms=max(1000, self.cfg.session_timeout_ms // 5),
            max_poll_interval_ms=self.cfg.max_poll_interval_ms,
            rebalance_timeout_ms=self.cfg.rebalance_timeout_ms,
            fetch_max_bytes=self.cfg.fetch_max_bytes,
            max_partition_fetch_bytes=self.cfg.max_partition_fetch_bytes,
        )
        self._consumer.subscribe(self.topics, listener=_Listener(self))
        await asyncio.wait_for(self._consumer.start(), timeout=30)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then shut down in order (see :meth:`shutdown`)."""
        dispatcher = asyncio.create_task(self._dispatch_loop(), name="dispatch")
        committer = asyncio.create_task(self._commit_loop(stop), name="commit")
        try:
            while not stop.is_set():
                await self._poll_once()
        finally:
            await self.shutdown(dispatcher, committer)

    async def shutdown(self, *tasks: asyncio.Task[None]) -> None:
        """Stop fetching, send what is batched, wait for sends, commit, leave the group.

        Every step is bounded: in-flight sends get ``shutdown_timeout_s`` together, then are
        abandoned (their events stay uncommitted and are re-read by the next owner).
        """
        self.stopping = True
        deadline = time.monotonic() + self.cfg.shutdown_timeout_s
        consumer = self._consumer
        if consumer is not None:
            with contextlib.suppress(Exception):
                consumer.pause(*consumer.assignment())
        self._ready.extend(self.batcher.drain())
        self._wake.set()
        while (self._ready or self._sending) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # several conditions and a deadline: a short poll is clearer
        self._dispatch_done = True
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            task.cancel()
        for task in list(self._sending):
            task.cancel()
        await asyncio.gather(*tasks, *self._sending, return_exceptions=True)
        await self._commit(self._offsets)
        if consumer is not None:
            try:
                await asyncio.wait_for(consumer.stop(), timeout=10)
            except (TimeoutError, KafkaError) as exc:
                log.warning("consumer stop incomplete: %r", exc)
            except asyncio.CancelledError:
                # aiokafka's Fetcher.close re-raises its own fetch task's cancellation while
                # Kafka is down; ours (a second SIGTERM's) must still propagate.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
                log.warning("consumer stop incomplete: aiokafka's fetcher was cancelled")
        if self._producer is not None:
            try:
                await asyncio.wait_for(self._producer.stop(), timeout=10)
            except (TimeoutError, KafkaError) as exc:
                log.warning("dead-letter producer stop incomplete: %r", exc)
        if self._session is not None:
            await self._session.close()
        self._log_held_lines(final=True)
        pending = sum(o.pending for o in self._offsets.values())
        again = sum(o.uncommitted for o in self._offsets.values())
        log.info(
            "sink %s stopped; %d event(s) unfinished, up to %d read past the last commit "
            "will be read again by the next consumer",
            self.sink.name,
            pending,
            again,
        )

    async def kafka_reachable(self) -> str:
        """Whether Kafka answers a metadata round trip: "ok" or why not (cached for a second)."""
        now = time.monotonic()
        if now - self._kafka_checked[0] < 1.0:
            return self._kafka_checked[1]
        consumer = self._consumer
        verdict = "not started" if consumer is None else await kafka_answers(consumer._client)
        self._kafka_checked = (time.monotonic(), verdict)
        return verdict

    # ---- Kafka in ------------------------------------------------------------------------

    @property
    def inflight_events(self) -> int:
        """Events read and not yet finished, in the partitions this process owns."""
        return sum(tracker.pending for tracker in self._offsets.values())

    async def _poll_once(self) -> None:
        consumer = self._consumer
        assignment = consumer.assignment()
        inflight = self.inflight_events
        room = self.cfg.max_inflight_events - inflight
        now = time.monotonic()
        if room > 0:
            self._full_since = None
        elif self._full_since is None:
            self._full_since = now
        # Bounded memory: past the cap take nothing more. Pause the partitions only when the cap
        # has held for a while (the destination is down) or it refuses our credentials.
        full = self._full_since is not None and now - self._full_since >= _PAUSE_AFTER_FULL_S
        if full or self.state == PAUSED:
            consumer.pause(*assignment)
        else:
            consumer.resume(*assignment)
        self.metrics.inflight.set(inflight)
        if room <= 0 and not (full or self.state == PAUSED):
            # Full for a moment: deliveries free room within milliseconds; aiokafka keeps its
            # prefetched records meanwhile.
            await asyncio.sleep(_FULL_WAIT_S)
            batches = {}
        else:
            # Keep polling even when paused: that is what keeps this member in the group.
            batches = await consumer.getmany(
                timeout_ms=self.cfg.poll_timeout_ms,
                max_records=max(1, min(self.cfg.max_poll_records, room)),
            )
        for tp, records in batches.items():
            offsets = self._offsets.get(tp)
            if offsets is None:  # revoked between fetch and here
                continue
            self.metrics.consumed.inc(len(records))
            for record in records:
                await self._take(tp, offsets, record.offset, record.value)
        if self._routed:
            for rule_id, count in self._routed.items():
                self.metrics.rule(rule_id).routed.inc(count)
            self._routed.clear()
        self._ready.extend(self.batcher.due(time.monotonic()))
        if self._ready:
            self._wake.set()

    async def _take(
        self, tp: TopicPartition, offsets: PartitionOffsets, offset: int, value: bytes
    ) -> None:
        offsets.start(offset)
        # remaining starts at 1, a guard released once every output is handed over, so an
        # event cannot finish while its later outputs are still being prepared.
        ticket = _Ticket(offsets, offset, 1)
        value = value or b""  # a tombstone (null value) is just an undecodable record
        try:
            event = decode_event(value)
        except Exception as exc:
            await self._dead_letter(
                dlq.INVALID_EVENT,
                f"not a canonical event: {exc}",
                ticket=ticket,
                tp=tp,
                value=value,
                key=f"{tp.topic}:{tp.partition}:{offset}".encode(),
            )
            self._finish_ticket(ticket)
            return
        ruleset = self.rules.current
        try:
            outputs = ruleset.evaluate(event)
        except Exception as exc:
            # evaluate turns a rule's failure into a Failed output; reaching here is an engine
            # bug meeting an odd event, which must not stop the consumer on this record.
            if self._log_throttle.allow("rules_error")[0]:
                log.exception("sink %s: rules raised (a bug in the engine)", self.sink.name)
            detail = f"the rules could not be evaluated: {exc!r}"
            hash_ = ruleset.hash
            await self._dead_event(dlq.MAPPING_ERROR, detail, event, ticket, tp, value, hash_)
            self._finish_ticket(ticket)
            return
        routed = [o for o in outputs if isinstance(o, Routed)]
        for failure in (o for o in outputs if isinstance(o, Failed)):
            self.metrics.rule(failure.rule_id).failed.inc()
            # The ticket stays open: the event's other outputs are still to come.
            await self._dead_event(
                dlq.MAPPING_ERROR, f"{failure.field}: {failure.reason}",
                event, ticket, tp, value, ruleset.hash, rule_id=failure.rule_id,
            )  # fmt: skip
        if not outputs:
            self.metrics.filtered.inc()
        now = time.monotonic()
        for output in routed:
            self._routed[output.rule_id] = self._routed.get(output.rule_id, 0) + 1
            key = idempotency_key(event.id, self.sink.name, output.rule_id)
            refused: tuple[str, str] | None = None
            try:
                prepared = self.sink.prepare(output, key, event)
            except ValueError as exc:
                refused = (dlq.INVALID_PAYLOAD, str(exc))
            except Exception as exc:
                # A sink is pure, so any other error here is a sink bug meeting an odd value;
                # raised, it would stop the consumer on this record after every restart.
                refused = (dlq.INVALID_PAYLOAD, f"{self.sink.name} could not encode it: {exc!r}")
                if self._log_throttle.allow("prepare_error")[0]:
                    log.exception("sink %s: prepare failed (a bug in the sink)", self.sink.name)
            else:
                size = len(prepared.body)
                limits = self.sink.limits
                if size > limits.max_event_bytes or not self.batcher.fits_alone(size):
                    most = min(limits.max_event_bytes, limits.max_bytes)
                    refused = (
                        dlq.TOO_LARGE,
                        f"{size} bytes; {self.sink.name} accepts at most {most}",
                    )
            if refused is not None:
                reason, detail = refused
                await self._dead_event(
                    reason, detail, event, ticket, tp, value, ruleset.hash,
                    rule_id=output.rule_id, idempotency_key=key, payload=output.payload,
                )  # fmt: skip
                continue
            item = Item(
                ticket,
                tp,
                event.id,
                output.rule_id,
                key,
                prepared.body,
                prepared.key,
                output.payload,
                value,
                ruleset.hash,
            )
            ticket.remaining += 1
            self._ready.extend(self.batcher.add(item, size, prepared.key, now))
        self._finish_ticket(ticket)

    def _finish_ticket(self, ticket: _Ticket) -> None:
        ticket.remaining -= 1
        if ticket.remaining == 0:
            ticket.offsets.finish(ticket.offset)

    # ---- HTTP out ------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while not self._dispatch_done:
            now = time.monotonic()
            while self._scheduled and self._scheduled[0].due <= now:
                self._ready.append(heapq.heappop(self._scheduled).items)
            while self._ready and not (self.state == PAUSED and self._sending):
                # While paused, one batch at a time probes the destination.
                batch = self._ready.popleft()
                if not batch:
                    continue
                await self._slots.acquire()
                task = asyncio.create_task(self._send_batch(batch))
                self._sending.add(task)
                task.add_done_callback(self._sent)
            timeout = 0.5
            if self._scheduled:
                timeout = min(timeout, max(0.0, self._scheduled[0].due - time.monotonic()))
            deadline = self.batcher.next_deadline()
            if deadline is not None:
                timeout = min(timeout, max(0.0, deadline - time.monotonic()))
                if deadline <= time.monotonic():
                    self._ready.extend(self.batcher.due(time.monotonic()))
                    continue
            self._wake.clear()
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that
            # races with the event being set, leaving this loop running after shutdown.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self._slots.release()
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("send task failed: %r", task.exception())

    async def _send_batch(self, batch: list[Item]) -> None:
        sink = self.sink
        requests = sink.build([Prepared(i.body, i.group) for i in batch])
        covered = {index for request in requests for index in request.items}
        left_out = [item for index, item in enumerate(batch) if index not in covered]
        if left_out:
            # A sink bug must not strand events (their offsets could never be committed).
            await self._dead_items(
                left_out, dlq.INVALID_PAYLOAD, f"{sink.name} built no request for it", None, b""
            )
        preflight = getattr(sink, "preflight", None)
        for request in requests:
            items = [batch[i] for i in request.items]
            if callable(preflight) and (check := preflight(request)) is not None:
                items = await self._preflight(check, items)
                if not items:
                    continue
                if len(items) < len(request.items):
                    # Rebuild without the events the validation rejected; the rest were
                    # validated, so these requests go out without another preflight.
                    for again in sink.build([Prepared(i.body, i.group) for i in items]):
                        sub = [items[i] for i in again.items]
                        await self._throttle(sub[0].group)
                        outcome, status, body = await self._send(again, sub)
                        await self._settle(outcome, sub, status, body)
                    continue
            await self._throttle(items[0].group)
            outcome, status, body = await self._send(request, items)
            await self._settle(outcome, items, status, body)

    async def _preflight(self, check: HttpRequest, items: list[Item]) -> list[Item]:
        """Send a sink's validation request; return the items that may be sent for real.

        ``Partial`` dead-letters the items it rejects (``rejected_by_api``, with the
        destination's message) and schedules those it asks to retry or hold; any other outcome
        but ``Delivered`` is settled as usual (retry, pause, reject) and nothing is sent.
        """
        await self._throttle(items[0].group)
        outcome, status, body = await self._send(check, items)
        if isinstance(outcome, Delivered):
            return items
        if isinstance(outcome, Partial):
            # Only a check was sent: items it rejects are dead-lettered, items it asks to retry
            # or hold wait, and the rest go out for real (none counts as delivered here).
            outcome = self._checked(outcome, len(items))
            await self._set_aside(outcome, items, status, body)
            return _unnamed(outcome, items)
        await self._settle(outcome, items, status, body)
        return []

    async def _throttle(self, key: str | None) -> None:
        while True:
            now = time.monotonic()
            wait = self.limiter.wait_time(now, key)
            if wait <= 0:
                self.limiter.take(now, key)
                return
            self.metrics.throttled_seconds.inc(wait)
            await asyncio.sleep(wait)

    async def _send(
        self, request: HttpRequest, items: Sequence[Item]
    ) -> tuple[Outcome, int | None, bytes]:
        now_wall = now_ms()
        now = time.monotonic()
        for item in items:
            item.attempts += 1
            item.last_attempt_ms = now_wall
            if item.first_attempt_ms is None:
                item.first_attempt_ms = now_wall
                item.first_attempt_mono = now
        self.metrics.batch_size.observe(len(items))
        if getattr(self.sink, "dry_run", False):
            # No credentials configured: show what would be sent, send nothing.
            log.info(
                "dry run %s: %s %s %s",
                self.sink.name,
                request.method,
                self.redact(request.url),
                self.redact(excerpt(request.body, 2000)),
            )
            return Delivered(), None, b""
        started = time.perf_counter()
        try:
            result = await self._request(request)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.metrics.request_seconds.labels("error").observe(time.perf_counter() - started)
            return Retry(f"network: {exc.__class__.__name__}: {exc}"), None, b""
        self.metrics.request_seconds.labels(str(result.status)).observe(
            time.perf_counter() - started
        )
        return self._classify(request, result), result.status, result.body

    def _classify(self, request: HttpRequest, response: HttpResponse) -> Outcome:
        """The sink's verdict; a sink that raises on an odd answer gets its batch retried.

        Retrying is the choice that loses nothing: the request may have been applied (any
        2xx), and the idempotency keys make a second send harmless where the API dedups.
        """
        try:
            return self.sink.classify(request, response)
        except Exception as exc:
            if self._log_throttle.allow("classify_error")[0]:
                log.exception("sink %s: classify failed (a bug in the sink)", self.sink.name)
            return Retry(f"HTTP {response.status}: {self.sink.name} could not read it: {exc!r}")

    async def _request(self, request: HttpRequest) -> HttpResponse:
        """The one place the consumer does HTTP: the sink's request, the answer for classify."""
        assert self._session is not None
        async with self._session.request(
            request.method, request.url, headers=dict(request.headers), data=request.body
        ) as response:
            return HttpResponse(
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                await response.read(),
            )

    async def healthcheck(self) -> str:
        """Send the sink's start-up probe once, as Vector does; the result is logged, not fatal.

        "passed", "skipped: ..." (no probe: a dry run, or an API without a free check) or
        "failed: ...". A failed check stops nothing: the pause and retry logic deals with the
        destination when events flow; this tells the operator at once.
        """
        probe = getattr(self.sink, "health_request", None)
        request = probe() if callable(probe) else None
        if request is None:
            self.health = "skipped: the sink has no probe request (dry run, or none free)"
            log.info("sink %s healthcheck %s", self.sink.name, self.health)
            return self.health
        try:
            result = await self._request(request)
            outcome = self._classify(request, result)
            if isinstance(outcome, Delivered):
                self.health = "passed"
            else:
                reason = getattr(outcome, "reason", "") or type(outcome).__name__
                self.health = f"failed: HTTP {result.status}: {reason}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.health = f"failed: network: {exc.__class__.__name__}: {exc}"
        self.health = self.redact(self.health)
        if self.health == "passed":
            log.info("sink %s healthcheck passed", self.sink.name)
        else:
            log.error("sink %s healthcheck %s", self.sink.name, self.health)
        return self.health

    async def _settle(
        self, outcome: Outcome, items: list[Item], status: int | None, body: bytes
    ) -> None:
        if isinstance(outcome, Delivered):
            self._delivered(items)
            self._accepted()
            return
        if isinstance(outcome, Partial):
            outcome = self._checked(outcome, len(items))
            delivered = _unnamed(outcome, items)
            self._delivered(delivered)
            if status is not None and (delivered or outcome.rejected):
                # The destination took the request and judged its events one by one (Mixpanel's
                # failed_records, Amplitude's per-event 400s): it accepts our requests again.
                # A paused sink that never saw this as a success never resumed, and fetched
                # nothing more. (Before the retries below are scheduled: those are not the
                # outage's, and must not be released by it.)
                self._accepted()
            await self._set_aside(outcome, items, status, body)
            return
        if isinstance(outcome, Retry):
            self._failed_since_success += 1
            await self._retry(items, outcome, status, body)
            return
        if isinstance(outcome, Pause):
            self._failed_since_success += 1
            if self.state != PAUSED:
                log.error("sink %s paused: %s", self.sink.name, self.redact(outcome.reason))
            self._set_state(PAUSED)
            # Not the events' fault: no attempt limit, no dead letter; probe again later.
            self._schedule(items, self.cfg.pause_probe_s)
            return
        if isinstance(outcome, Split):
            if len(items) > 1:
                half = len(items) // 2
                self._ready.extend([items[:half], items[half:]])
                self._wake.set()
            else:
                await self._dead_items(items, dlq.TOO_LARGE, outcome.reason, status, body)
            return
        assert isinstance(outcome, Reject)
        await self._dead_items(items, dlq.REJECTED_BY_API, outcome.reason, status, body)

    def _accepted(self) -> None:
        """A request the destination accepted: resume, and after an outage release the rest."""
        if self.state == PAUSED:
            log.info("sink %s resumed: the destination accepts requests again", self.sink.name)
        if self._scheduled and self._failed_since_success >= _RECOVERY_FAILURES:
            # The destination answers again after an outage: what waits on a backoff or a
            # pause probe may go now (the concurrency and rate limits pace it), not after
            # its own backoff. A single failure between successes is not an outage but a
            # request the destination refuses (a poison event): it keeps its backoff, or it
            # would be re-sent after every success until its retries run out.
            self._release_scheduled()
        self._failed_since_success = 0
        if self.state != HEALTHY and not self._scheduled:
            self._set_state(HEALTHY)

    async def _set_aside(
        self, outcome: Partial, items: list[Item], status: int | None, body: bytes
    ) -> None:
        """A checked Partial's named items: dead letters, retries and holds."""
        for index, reason in outcome.rejected.items():
            await self._dead_items([items[index]], dlq.REJECTED_BY_API, reason, status, body)
        if outcome.retry:
            retry = Retry(outcome.reason or "partial", outcome.after_s)
            await self._retry([items[i] for i in outcome.retry], retry, status, body)
        if outcome.hold:
            held = [items[i] for i in outcome.hold]
            self._hold(held, outcome.hold_s or self.cfg.retry_cap_s, outcome.reason)

    def _checked(self, outcome: Partial, count: int) -> Partial:
        """The Partial with each of ``count`` items named at most once, and only real indexes.

        A sink's indexes that repeat, overlap (rejected before retry before hold) or fall
        outside the request would settle an item twice (its event's offset committed while
        another output of it waits) or not at all (the partition stalls).
        """
        rejected = {i: r for i, r in outcome.rejected.items() if 0 <= i < count}
        taken: set[int] = set(rejected)
        retry = tuple(i for i in dict.fromkeys(outcome.retry) if 0 <= i < count and i not in taken)
        taken.update(retry)
        hold = tuple(i for i in dict.fromkeys(outcome.hold) if 0 <= i < count and i not in taken)
        if (len(rejected), len(retry), len(hold)) != (
            len(outcome.rejected),
            len(outcome.retry),
            len(outcome.hold),
        ) and self._log_throttle.allow("partial_indexes")[0]:
            log.error("sink %s: a Partial named items twice or out of range", self.sink.name)
        return dataclasses.replace(outcome, rejected=rejected, retry=retry, hold=hold)

    def _delivered(self, items: Iterable[Item]) -> None:
        per_rule: dict[str, int] = {}
        for item in items:
            per_rule[item.rule_id] = per_rule.get(item.rule_id, 0) + 1
            self._finish_ticket(item.ticket)
        # One increment per rule and batch: a counter's lock per event cost ~5% of the CPU.
        for rule_id, count in per_rule.items():
            self.metrics.rule(rule_id).delivered.inc(count)

    async def _retry(
        self, items: list[Item], outcome: Retry, status: int | None, body: bytes
    ) -> None:
        now = time.monotonic()
        first = min((i.first_attempt_mono or now) for i in items)
        if self.policy.exhausted(first, now):
            await self._dead_items(
                items,
                dlq.RETRIES_EXHAUSTED,
                f"still failing after {self.policy.max_total_s:g}s: {outcome.reason}",
                status,
                body,
            )
            return
        self._set_state(DEGRADED)
        attempts = max(i.attempts for i in items)
        delay = self.policy.delay(attempts, outcome.after_s)
        after = min(outcome.after_s, self.policy.max_retry_after_s) if outcome.after_s else 0.0
        key = items[0].group
        if status == 429 and key is not None and after:
            # Rate-limited per key (Slack: per channel): the messages queued for the same key
            # wait too, not only the ones that got the 429.
            self.limiter.hold(now, key, after)
        self.metrics.retried.inc(len(items))
        logged, more = self._log_throttle.allow("retry")
        if logged:
            log.warning(
                "sink %s: %d event(s) retry in %.1fs (attempt %d): %s%s",
                self.sink.name,
                len(items),
                delay,
                attempts,
                self.redact(outcome.reason),
                more,
            )
        self._schedule(items, delay, not_before=now + after)

    def _hold(self, items: list[Item], delay: float, reason: str) -> None:
        """Park items until a quota window passes: no attempt limit, the retry clock restarts."""
        self._set_state(DEGRADED)
        self.metrics.retried.inc(len(items))
        logged, more = self._log_throttle.allow("hold")
        if logged:
            log.warning(
                "sink %s: %d event(s) held %.0fs: %s%s",
                self.sink.name, len(items), delay, self.redact(reason or "quota"), more,
            )  # fmt: skip
        restart = time.monotonic() + delay
        for item in items:
            item.first_attempt_mono = restart
        self._schedule(items, delay, not_before=restart)

    def _schedule(self, items: list[Item], delay: float, not_before: float = 0.0) -> None:
        heapq.heappush(
            self._scheduled,
            _Scheduled(time.monotonic() + delay, next(self._seq), items, not_before),
        )
        self._wake.set()

    def _release_scheduled(self) -> None:
        """Send every scheduled batch now, except those a Retry-After or quota hold keeps."""
        now = time.monotonic()
        kept = [s for s in self._scheduled if s.not_before > now]
        released = sorted(s for s in self._scheduled if s.not_before <= now)
        if released:
            self._scheduled = kept
            heapq.heapify(self._scheduled)
            self._ready.extend(s.items for s in released)
            self._wake.set()

    def _set_state(self, state: str) -> None:
        self.state = state
        for name in (HEALTHY, DEGRADED, PAUSED):
            self.metrics.state.labels(name).set(1 if name == state else 0)

    # ---- dead letters --------------------------------------------------------------------

    async def _dead_letter(
        self,
        reason: str,
        detail: str,
        *,
        ticket: _Ticket,
        tp: TopicPartition,
        value: bytes,
        key: bytes,
        status: int | None = None,
        body: bytes = b"",
        **fields: Any,
    ) -> None:
        """Write one dead letter (the event, where it was, why); the caller finishes the ticket."""
        letter = dlq.DeadLetter(
            sink=self.sink.name,
            reason=reason,
            detail=self.redact(detail),
            status=status,
            response=self.redact(excerpt(body)) if body else None,
            topic=tp.topic,
            partition=tp.partition,
            offset=ticket.offset,
            **fields,
            **dlq.event_fields(value),
        )
        await self._write_dead(letter, key)

    async def _dead_event(
        self,
        reason: str,
        detail: str,
        event: Event,
        ticket: _Ticket,
        tp: TopicPartition,
        value: bytes,
        ruleset: str,
        **fields: Any,
    ) -> None:
        """A dead letter for a decoded event (a rule's failure, an output the sink refused)."""
        rule_id = fields.get("rule_id")
        if rule_id is not None and fields.get("idempotency_key") is None:
            # The key the output would have carried, so a replay after a fix is recognisable
            # as the same delivery (a mapping error has no output to take it from).
            fields["idempotency_key"] = idempotency_key(event.id, self.sink.name, rule_id)
        await self._dead_letter(
            reason, detail, ticket=ticket, tp=tp, value=value, key=event.id.encode(),
            event_id=event.id, ruleset=ruleset, **fields,
        )  # fmt: skip

    async def _dead_items(
        self, items: Sequence[Item], reason: str, detail: str, status: int | None, body: bytes
    ) -> None:
        for item in items:
            await self._dead_letter(
                reason,
                detail,
                ticket=item.ticket,
                tp=item.tp,
                value=item.value,
                key=item.key.encode(),
                status=status,
                body=body,
                event_id=item.event_id,
                rule_id=item.rule_id,
                idempotency_key=item.key,
                payload=item.payload,
                attempts=item.attempts,
                first_attempt_at=item.first_attempt_ms,
                last_attempt_at=item.last_attempt_ms,
                ruleset=item.ruleset,
            )
            self._finish_ticket(item.ticket)

    def _new_producer(self) -> AIOKafkaProducer:
        kafka = self.settings.kafka
        return AIOKafkaProducer(
            bootstrap_servers=kafka.bootstrap_servers,
            client_id=f"{kafka.client_id}-{self.sink.name}-dlq",
            enable_idempotence=True,
            max_request_size=kafka.max_message_bytes * 2,
            request_timeout_ms=max(5_000, self.cfg.dlq_timeout_ms),
        )

    async def _replace_producer(self, broken: Any, exc: KafkaError) -> None:
        """Swap the dead-letter producer for a new one (once per broken producer).

        The same aiokafka 0.14 failure as the ingest's (router/bus.py): after a Kafka restart
        while a dead letter waits, the producer's sequence numbers run ahead of the broker's
        and every later write fails with OutOfOrderSequenceNumber; retrying never helps.
        """
        async with self._producer_lock:
            if self._producer is not broken:
                return  # another writer replaced it already
            log.warning("dead-letter producer unusable (%r): replacing it", exc)
            producer = self._new_producer()
            try:
                await start_producer(producer)
            except (TimeoutError, KafkaError, OSError) as start_exc:
                log.warning("new dead-letter producer not started: %r", start_exc)
                return  # the writer retries, and replaces it on the next fatal error
            self._producer = producer
        await stop_quietly(broken)

    async def _write_dead(self, letter: dlq.DeadLetter, key: bytes) -> None:
        """Until Kafka has the dead letter, the event is not finished: retry, never drop."""
        letter.dead_at = now_ms()
        value = dlq.encode(letter)
        while True:
            producer = self._producer
            try:
                await asyncio.wait_for(
                    producer.send_and_wait(self.dlq_topic, value=value, key=key),
                    timeout=self.cfg.dlq_timeout_ms / 1000,
                )
            except MessageSizeTooLargeError as exc:
                if letter.payload is None and letter.event_b64 is None and letter.event == NULL:
                    # Still too large without them (a DLQ topic made elsewhere with a smaller
                    # max.message.bytes): a configuration problem; wait as for any other error
                    # rather than spin.
                    log.error("dead letter not written (retrying): %r", exc)
                    await asyncio.sleep(1.0)
                    continue
                # Retrying cannot help: keep the letter, without the event and payload; the
                # original stays on its topic at the recorded partition and offset.
                letter = msgspec.structs.replace(
                    letter,
                    event=NULL,
                    event_b64=None,
                    payload=None,
                    detail=f"{letter.detail} (event and payload omitted: too large for the "
                    f"dead-letter topic; the original is at {letter.topic}[{letter.partition}] "
                    f"offset {letter.offset})",
                )
                value = dlq.encode(letter)
                continue
            except (TimeoutError, KafkaError) as exc:
                log.error("dead letter not written (retrying): %r", exc)
                if isinstance(exc, FATAL_PRODUCER_ERRORS):
                    await self._replace_producer(producer, exc)
                await asyncio.sleep(1.0)
                continue
            self.metrics.dead_lettered.labels(letter.reason).inc()
            logged, more = self._log_throttle.allow("dead_letter:" + letter.reason)
            if logged:
                log.warning(
                    "sink %s dead-lettered %s (event %s, rule %s): %s%s",
                    self.sink.name,
                    letter.reason,
                    letter.event_id or "-",
                    letter.rule_id or "-",
                    letter.detail,  # already redacted
                    more,
                )
            return

    # ---- commits and rebalances ----------------------------------------------------------

    def _log_held_lines(self, final: bool = False) -> None:
        """The count of log lines the throttle held back, once no later line will carry it."""
        for kind, lines, since in self._log_throttle.overdue(final):
            log.warning(
                "sink %s: %d more %s line(s) in the last %.0fs (not logged one by one)",
                self.sink.name,
                lines,
                kind.replace("_", " ").replace(":", " "),
                since,
            )

    async def _commit_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.cfg.commit_interval_s)
            self._log_held_lines()
            try:
                await self._commit(self._offsets)
                await self._update_lag()
            except Exception:
                # Never let the periodic commit end: without it nothing is committed until
                # the next rebalance, and a crash would re-send everything since.
                if self._log_throttle.allow("commit_loop")[0]:
                    log.exception("sink %s: periodic commit failed; continuing", self.sink.name)

    async def _commit(self, offsets: dict[TopicPartition, PartitionOffsets]) -> None:
        positions = {}
        for tp, tracker in offsets.items():
            position = tracker.committable()
            if position is not None:
                positions[tp] = position
        if not positions or self._consumer is None:
            return
        try:
            await asyncio.wait_for(self._consumer.commit(positions), timeout=10)
        except (TimeoutError, KafkaError) as exc:
            # A rebalance or a broker outage: the next commit (or the new owner) catches up.
            log.warning("commit failed (%r); will retry", exc)
            return
        for tp, position in positions.items():
            still = offsets.get(tp)  # revoked while the commit was in flight: gone
            if still is not None:
                still.committed(position)

    async def _update_lag(self) -> None:
        consumer = self._consumer
        # The highwater mark comes with fetches, and paused partitions fetch nothing: ask the
        # broker for their end offsets instead (bounded, every few seconds), or a paused sink
        # would report no lag while events pile up.
        ends: dict[TopicPartition, int] = {}
        paused = [tp for tp in consumer.paused() if tp in self._offsets]
        now = time.monotonic()
        if paused and now - self._ends_checked >= _END_OFFSETS_EVERY_S:
            self._ends_checked = now
            with contextlib.suppress(Exception):
                ends = await asyncio.wait_for(consumer.end_offsets(paused), timeout=2.0)
        for tp in list(self._offsets):
            high = max(consumer.highwater(tp) or -1, ends.get(tp, -1))
            if high < 0:
                continue  # nothing fetched yet: no lag to tell
            with contextlib.suppress(Exception):
                # position() waits until the position is known, without a bound; this runs in
                # the commit loop, which must not wait on it.
                position = await asyncio.wait_for(consumer.position(tp), timeout=1.0)
                self.metrics.lag.labels(str(tp.partition), tp.topic).set(max(0, high - position))

    def on_assigned(self, assigned: list[TopicPartition]) -> None:
        for tp in assigned:
            self._offsets[tp] = PartitionOffsets()
        log.info("sink %s assigned %s", self.sink.name, _names(assigned))

    async def on_revoked(self, revoked: list[TopicPartition]) -> None:
        """Hand revoked partitions over cleanly, before the rebalance completes.

        Send what is batched, wait (bounded) for the revoked partitions' in-flight events, commit
        what is done and abandon the rest: the new owner re-reads it, and duplicates carry the
        same idempotency keys.
        """
        if not revoked:
            return
        gone = set(revoked)
        self._ready.extend(self.batcher.drain())
        self._wake.set()
        deadline = time.monotonic() + self.cfg.revoke_timeout_s
        trackers = {tp: self._offsets[tp] for tp in revoked if tp in self._offsets}
        while any(t.pending for t in trackers.values()) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await self._commit(trackers)
        for tp in revoked:
            self._offsets.pop(tp, None)
        # Scheduled retries of abandoned partitions are dropped: the new owner re-reads them.
        kept = [s for s in self._scheduled if not any(i.tp in gone for i in s.items)]
        abandoned = sum(len(s.items) for s in self._scheduled) - sum(len(s.items) for s in kept)
        self._scheduled = kept
        heapq.heapify(self._scheduled)
        left = sum(t.pending for t in trackers.values())
        log.info(
            "sink %s revoked %s; %d event(s) left for the next owner, %d retries abandoned",
            self.sink.name,
            _names(revoked),
            left,
            abandoned,
        )


def _names(tps: Sequence[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps)) or "nothing"


def _unnamed(outcome: Partial, items: list[Item]) -> list[Item]:
    """The items a (checked) Partial does not name: accepted as they are."""
    named = set(outcome.rejected) | set(outcome.retry) | set(outcome.hold)
    return [item for index, item in enumerate(items) if index not in named]
