"""The event bus: Kafka through aiokafka's idempotent producer, and an in-memory bus for unit tests.

``publish()`` returns only when Kafka has acknowledged every record of the call (acks=all,
idempotent producer) and raises :class:`PublishError` otherwise, always within
``kafka.produce_timeout_ms``: aiokafka's idempotent producer never expires a batch on its own
(aio-libs/aiokafka#1101), so every wait here is bounded by ``asyncio.wait_for``.

A timed-out publish may still land later (cancelling the wait does not cancel the send); that is
a duplicate with the same event id, never a loss, and consumers tolerate it.

A producer that gets an error fatal to its producer id (``OutOfOrderSequenceNumber`` and the like)
is replaced by a new one: aiokafka 0.14 never recovers from these by itself. They happen after a
Kafka restart under load: a batch waiting longer than ``request_timeout_ms`` for a partition
leader is failed by aiokafka's accumulator (``drain_by_nodes``) after it has taken a sequence
number, so every later batch of that partition is out of sequence for the broker, for good.
The publishes that meet the error fail (503: the sender retries, same event ids).

Records of a multi-event request are grouped into one record batch per partition, built by us
(``create_batch``/``send_batch``) rather than through ``send()`` per record, which costs several
microseconds of Python per event. Partitions are chosen with Kafka's default murmur2 partitioner,
so a key lands where the Java client (or any other) would put it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)
from aiokafka.partitioner import murmur2

from router.events import Record
from router.settings import KafkaSettings

log = logging.getLogger(__name__)

# Kafka protocol error code for "topic already exists" (CreateTopics response).
_TOPIC_ALREADY_EXISTS = 36
_KEY_CACHE_LIMIT = 65_536
# After one of these an idempotent producer (its producer id) can never deliver again.
FATAL_PRODUCER_ERRORS = (
    OutOfOrderSequenceNumber,
    UnknownProducerId,
    InvalidProducerEpoch,
    ProducerFenced,
)


class PublishError(Exception):
    """Kafka did not acknowledge every record in time; nothing may be reported as accepted."""


class RecordTooLarge(PublishError):
    """One event is larger than the topic accepts."""


class EventBus(Protocol):
    async def publish(self, records: Sequence[Record]) -> None: ...

    async def ready(self) -> tuple[bool, str]: ...


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    configs: dict[str, str] = field(default_factory=dict)


def event_topic_spec(settings: KafkaSettings, name: str | None = None) -> TopicSpec:
    """The event topic, or with ``name`` another topic of events (a sink's retry topic)."""
    return TopicSpec(
        name=settings.topic if name is None else name,
        partitions=settings.partitions,
        replication_factor=settings.replication_factor,
        configs={
            "retention.ms": str(settings.retention_ms),
            "max.message.bytes": str(settings.max_message_bytes),
        },
    )


async def ensure_topics(settings: KafkaSettings, specs: Sequence[TopicSpec]) -> list[str]:
    """Create the topics that do not exist yet; return the names created.

    Broker-side auto-creation stays off, so this is the only place topics come from.
    """
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.client_id}-admin",
        request_timeout_ms=15_000,
    )
    try:
        await asyncio.wait_for(admin.start(), timeout=20)
        response = await asyncio.wait_for(
            admin.create_topics(
                [
                    NewTopic(
                        name=spec.name,
                        num_partitions=spec.partitions,
                        replication_factor=spec.replication_factor,
                        topic_configs=dict(spec.configs),
                    )
                    for spec in specs
                ],
                timeout_ms=15_000,
            ),
            timeout=20,
        )
        created: list[str] = []
        for entry in response.topic_errors:
            name, code = entry[0], entry[1]
            message = entry[2] if len(entry) > 2 else ""
            if code == 0:
                created.append(name)
            elif code != _TOPIC_ALREADY_EXISTS:
                detail = f"error {code} {message or ''}".strip()
                raise KafkaError(f"cannot create topic {name}: {detail}")
        if created:
            await _wait_for_leaders(admin, created)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(admin.close(), timeout=10)
    return created


async def _wait_for_leaders(admin: AIOKafkaAdminClient, topics: list[str]) -> None:
    """Wait (at most 10 s) until the broker's metadata shows every new topic with leaders.

    A topic is created asynchronously: clients that ask for it at once get "unknown topic" or
    "not leader" and log errors at ERROR level (aiokafka) before they retry. Not fatal if slow.
    """
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        with contextlib.suppress(KafkaError, TimeoutError, OSError):
            described = await asyncio.wait_for(admin.describe_topics(topics), timeout=5)
            ready = {
                t["topic"]
                for t in described
                if t["error_code"] == 0
                and t["partitions"]
                and all(p["leader"] >= 0 for p in t["partitions"])
            }
            if ready >= set(topics):
                return
        if asyncio.get_running_loop().time() >= deadline:
            log.warning("new topics %s not yet visible in metadata; continuing", topics)
            return
        await asyncio.sleep(0.1)


async def keep_trying(
    settings: KafkaSettings,
    attempt: Callable[[], Awaitable[None]],
    undo: Callable[[], Awaitable[None]],
) -> None:
    """Run ``attempt`` until it succeeds, retrying for ``kafka.startup_timeout_s``.

    Kafka, network and timeout errors are retried every 2 s at most; after each failed or
    cancelled attempt, ``undo`` closes what it started. Once the time is up: PublishError naming
    the servers and the last error.
    """
    deadline = time.monotonic() + settings.startup_timeout_s
    tries = 0
    while True:
        tries += 1
        try:
            await attempt()
            return
        except (KafkaError, OSError, TimeoutError) as exc:
            await undo()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishError(
                    f"kafka at {settings.bootstrap_servers} not usable after {tries} "
                    f"attempts: {exc!r}"
                ) from exc
            log.warning("kafka not ready (attempt %d): %r; retrying", tries, exc)
            await asyncio.sleep(min(2.0, remaining))
        except BaseException:
            await undo()
            raise


async def kafka_answers(client: Any, topic: str | None = None) -> str:
    """Whether Kafka answers a metadata round trip in 2 s (and ``topic`` exists): "ok" or why not.

    For /readyz: ``client`` is an aiokafka client (a producer's ``client``, a consumer's).
    """
    try:
        metadata = await asyncio.wait_for(client.fetch_all_metadata(), timeout=2)
    except (TimeoutError, KafkaError, OSError) as exc:
        return f"kafka unreachable: {exc.__class__.__name__}"
    if topic is not None and topic not in metadata.topics():
        return f"topic {topic} does not exist"
    return "ok"


async def start_producer(producer: Any) -> None:
    """Start ``producer`` within 15 s; if that fails or is cancelled, close it and re-raise."""
    try:
        await asyncio.wait_for(producer.start(), timeout=15)
    except BaseException:
        await stop_quietly(producer)
        raise


async def stop_quietly(producer: Any) -> None:
    """Stop a producer that is broken or unwanted: bounded, errors ignored."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(producer.stop(), timeout=5)


class KafkaBus:
    """Publishes canonical events to the event topic with acks=all and bounded waits."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._topic = settings.topic
        self._timeout = settings.produce_timeout_ms / 1000
        self._producer: Any = None
        self._partitions: list[int] = []
        self._key_partition: dict[bytes, int] = {}
        self._partition_locks: dict[int, asyncio.Lock] = {}
        self._ready_cache: tuple[float, bool, str] = (0.0, False, "not started")
        self._replacing: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None

    def _new_producer(self) -> Any:
        s = self._settings
        return AIOKafkaProducer(
            bootstrap_servers=s.bootstrap_servers,
            client_id=s.client_id,
            enable_idempotence=True,  # forces acks=all
            max_batch_size=s.max_batch_bytes,
            max_request_size=s.max_message_bytes,
            linger_ms=s.linger_ms,
            compression_type=s.compression_type,
            request_timeout_ms=max(5_000, s.produce_timeout_ms),
            retry_backoff_ms=100,
        )

    async def start(self) -> None:
        """Connect and create the event topic, retrying until ``kafka.startup_timeout_s``."""
        producer: Any = None

        async def attempt() -> None:
            nonlocal producer
            producer = self._new_producer()
            await start_producer(producer)
            created = await ensure_topics(self._settings, [event_topic_spec(self._settings)])
            if created:
                log.info("created topic %s", ", ".join(created))
            partitions = await asyncio.wait_for(producer.partitions_for(self._topic), timeout=15)
            self._partitions = sorted(partitions)
            self._producer = producer
            log.info(
                "kafka ready: %s, topic %s with %d partitions",
                self._settings.bootstrap_servers,
                self._topic,
                len(self._partitions),
            )

        async def undo() -> None:
            if producer is not None:
                await stop_quietly(producer)

        await keep_trying(self._settings, attempt, undo)

    async def stop(self, grace_s: float = 10.0) -> None:
        """Flush what is buffered and close, waiting at most ``grace_s`` for each step."""
        for task in (self._replacing, self._refreshing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._replacing = self._refreshing = None
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            await asyncio.wait_for(producer.flush(), timeout=grace_s)
        except (TimeoutError, KafkaError) as exc:
            log.warning("producer flush incomplete at shutdown: %r", exc)
        try:
            await asyncio.wait_for(producer.stop(), timeout=grace_s)
        except (TimeoutError, KafkaError) as exc:
            log.warning("producer stop incomplete at shutdown: %r", exc)

    def partition_for(self, key: bytes) -> int:
        """Kafka's default partitioner: toPositive(murmur2(key)) % partitions, memoised per key."""
        index = self._key_partition.get(key)
        if index is None:
            if len(self._key_partition) >= _KEY_CACHE_LIMIT:
                self._key_partition.clear()
            index = (murmur2(key) & 0x7FFFFFFF) % len(self._partitions)
            self._key_partition[key] = index
        return self._partitions[index]

    async def publish(self, records: Sequence[Record]) -> None:
        producer = self._producer
        if producer is None:
            raise PublishError("kafka producer is not running")
        limit = self._settings.max_message_bytes
        # Size-check everything before anything is sent: a request is published whole or
        # refused whole, never half.
        for record in records:
            if len(record.value) > limit:
                raise RecordTooLarge(
                    f"event {record.id} is {len(record.value)} bytes; the limit is {limit}"
                )
        try:
            # asyncio.timeout, not wait_for: no extra Task per publish on the hot path.
            async with asyncio.timeout(self._timeout):
                await self._publish(producer, records)
        except TimeoutError:
            raise PublishError(f"kafka did not acknowledge within {self._timeout:g}s") from None
        except MessageSizeTooLargeError:
            # The topic's max.message.bytes (a topic made elsewhere may be smaller than
            # kafka.max_message_bytes) refuses it for good: retrying the same request cannot help.
            raise RecordTooLarge(
                f"kafka refused the request's {len(records)} event(s) as larger than the topic "
                "accepts (max.message.bytes); send smaller events or fewer per request"
            ) from None
        except KafkaError as exc:
            if isinstance(exc, FATAL_PRODUCER_ERRORS):
                self._replace(producer, exc)
            raise PublishError(f"kafka error: {exc!r}") from exc
        except Exception as exc:
            # aiokafka raises plain errors too: AssertionError("Unrecognized partition") once
            # the topic was re-created with fewer partitions than we picked from. Whatever it
            # is, the client gets 503 (retrying is safe: same ids), and the partitions are
            # read again in case they changed.
            log.error("publish failed unexpectedly: %r; refreshing the topic's partitions", exc)
            self._refresh_partitions(producer)
            raise PublishError(f"kafka client error: {exc!r}") from exc

    def _refresh_partitions(self, producer: Any) -> None:
        """Read the topic's partitions again (once at a time), in the background."""
        if self._refreshing is not None:
            return

        async def refresh() -> None:
            try:
                await producer.client.force_metadata_update()
                partitions = await producer.partitions_for(self._topic)
                if partitions and sorted(partitions) != self._partitions:
                    log.warning(
                        "topic %s now has %d partitions (was %d)",
                        self._topic,
                        len(partitions),
                        len(self._partitions),
                    )
                    self._partitions = sorted(partitions)
                    self._key_partition.clear()
            except Exception as exc:
                log.warning("could not refresh the partitions of %s: %r", self._topic, exc)
            finally:
                self._refreshing = None

        self._refreshing = asyncio.create_task(asyncio.wait_for(refresh(), timeout=15))

    def _replace(self, broken: Any, exc: KafkaError) -> None:
        """Start replacing ``broken`` with a new producer (once; publishes go on failing fast)."""
        if self._producer is not broken or self._replacing is not None:
            return
        log.warning("kafka producer unusable (%r): replacing it", exc)
        self._replacing = asyncio.create_task(self._replace_producer(broken))

    async def _replace_producer(self, broken: Any) -> None:
        try:
            while True:
                producer = self._new_producer()
                try:
                    await start_producer(producer)  # closed again if stop() cancels us
                    break
                except (KafkaError, OSError, TimeoutError) as exc:
                    log.warning("new kafka producer not started: %r; retrying", exc)
                    await asyncio.sleep(1.0)
            if self._producer is broken:
                self._producer = producer
                log.info("kafka producer replaced")
            else:  # stopped meanwhile
                await stop_quietly(producer)
        finally:
            self._replacing = None
        # Stop the broken one; bounded: its pending batches can only fail.
        await stop_quietly(broken)

    async def _publish(self, producer: Any, records: Sequence[Record]) -> None:
        topic = self._topic
        if len(records) == 1:
            # One record: send() lets concurrent single-event requests share a record batch.
            record = records[0]
            future = await producer.send(
                topic,
                value=record.value,
                key=record.key,
                partition=self.partition_for(record.key),
                headers=record.headers,
            )
            await future
            return
        builders: dict[int, Any] = {}
        futures: list[asyncio.Future[Any]] = []
        for record in records:
            partition = self.partition_for(record.key)
            builder = builders.get(partition)
            if builder is None:
                builder = builders[partition] = producer.create_batch()
            if (
                builder.append(
                    timestamp=None, key=record.key, value=record.value, headers=record.headers
                )
                is None
            ):
                futures.append(await self._send_batch(producer, builder, partition))
                builder = builders[partition] = producer.create_batch()
                builder.append(
                    timestamp=None, key=record.key, value=record.value, headers=record.headers
                )
        for partition, builder in builders.items():
            futures.append(await self._send_batch(producer, builder, partition))
        await asyncio.gather(*futures)

    async def _send_batch(self, producer: Any, builder: Any, partition: int) -> Any:
        """Queue one record batch, one caller per partition at a time.

        aiokafka 0.14's ``add_batch`` waits for the partition's previous batch to drain and counts
        its timeout cumulatively across wake-ups, so concurrent callers time out within a second
        under load (a spurious 503). Queueing here avoids the contention; a timeout from aiokafka
        means the batch was not enqueued, so trying again is safe, and publish()'s deadline
        bounds the whole wait.
        """
        lock = self._partition_locks.get(partition)
        if lock is None:
            lock = self._partition_locks[partition] = asyncio.Lock()
        async with lock:
            while True:
                try:
                    return await producer.send_batch(builder, self._topic, partition=partition)
                except KafkaTimeoutError:
                    continue

    async def ready(self) -> tuple[bool, str]:
        """Kafka reachable and the event topic present; cached for a second."""
        now = time.monotonic()
        cached_at, ok, reason = self._ready_cache
        if now - cached_at < 1.0:
            return ok, reason
        producer = self._producer
        if producer is None:
            ok, reason = False, "kafka producer is not running"
        else:
            reason = await kafka_answers(producer.client, self._topic)
            ok = reason == "ok"
        self._ready_cache = (time.monotonic(), ok, reason)
        return ok, reason


class MemoryBus:
    """An in-process bus for fast unit tests: keeps the records, can fail or stall."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.fail: PublishError | None = None
        self.stall: asyncio.Event | None = None
        self.timeout = 1.0

    async def publish(self, records: Sequence[Record]) -> None:
        if self.stall is not None:
            try:
                await asyncio.wait_for(self.stall.wait(), timeout=self.timeout)
            except TimeoutError:
                raise PublishError("memory bus stalled") from None
        if self.fail is not None:
            raise self.fail
        self.records.extend(records)

    async def ready(self) -> tuple[bool, str]:
        if self.fail is not None:
            return False, str(self.fail)
        return True, "ok"
