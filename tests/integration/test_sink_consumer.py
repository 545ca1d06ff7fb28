"""The sink consumer on the real broker, against the scripted fake destination.

Every routed event must end delivered or dead-lettered with its reason (none lost), offsets are
committed to the end once everything is finished, and one sink's outage does not touch another.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestServer
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry

import sinks
from router import dlq
from router.bus import KafkaBus, TopicSpec, ensure_topics
from router.consumer import SinkConsumer
from router.delivery.sink import idempotency_key
from router.dlq import Redactor
from router.events import Event, to_record
from router.rules.engine import RuleSet
from router.rules.live import LiveRules
from router.settings import Settings
from router.sink_metrics import SinkMetrics
from router.sink_runner import secret_values
from tests.fakes.destination import Destination, Fault
from tests.integration.conftest import Broker, make_settings, read_topic, unique_topic

pytestmark = pytest.mark.kafka

RULES = """\
sink: {sink}
rules:
  - id: tracks
    when: {{path: type, eq: track.event}}
    map:
      name: {{path: name}}
      visitor: {{path: visitor_id}}
      properties: {{path: properties}}
  - id: broken
    when: {{path: name, eq: broken}}
    map:
      name: {{path: properties.absent, required: true}}
tests:
  - name: a track event
    event: {{type: track.event, name: x, visitor_id: v}}
    expect: {{tracks: {{name: x, visitor: v, properties: {{}}}}}}
"""
TOKEN = "sekrit-token-123"


def track_event(i: int, name: str | None = None, type_: str = "track.event") -> Event:
    return msgspec.convert(
        {
            "id": f"evt-{i:06d}",
            "source": "track",
            "type": type_,
            "name": name or f"event_{i % 7}",
            "visitor_id": f"v{i % 13}",
            "account_id": "acct",
            "properties": {"i": i},
            "timestamp": 1_700_000_000_000 + i,
            "received_at": 1_700_000_000_000 + i,
        },
        Event,
    )


@dataclass
class Rig:
    broker: Broker
    topic: str
    settings: Settings
    destination: Destination
    url: str


@pytest.fixture
async def server() -> AsyncIterator[tuple[Destination, str]]:
    destination = Destination()
    test_server = TestServer(destination.app(), host="127.0.0.1")
    await test_server.start_server()
    try:
        yield destination, str(test_server.make_url("/collect"))
    finally:
        await test_server.close()


def rig_settings(broker: Broker, topic: str, rules_dir: Path, url: str, **env: str) -> Settings:
    values = {
        "ROUTER_RULES__DIR": str(rules_dir),
        "ROUTER_PLUGINS": "[tests.fakes.fake_sink]",
        "ROUTER_SINKS__FAKE__URL": url,
        "ROUTER_SINKS__FAKE__TOKEN": TOKEN,
        "ROUTER_SINKS__FAKE2__URL": url.replace("/collect", "/collect2"),
        "ROUTER_CONSUMER__GROUP_PREFIX": f"{topic}-",
        "ROUTER_CONSUMER__DLQ_TOPIC": f"{topic}.dlq.{{sink}}",
        "ROUTER_CONSUMER__RETRY_TOPIC": f"{topic}.retry.{{sink}}",
        "ROUTER_CONSUMER__COMMIT_INTERVAL_S": "0.2",
        "ROUTER_CONSUMER__RETRY_BASE_S": "0.05",
        "ROUTER_CONSUMER__RETRY_CAP_S": "0.3",
        "ROUTER_CONSUMER__PAUSE_PROBE_S": "0.3",
        "ROUTER_CONSUMER__SESSION_TIMEOUT_MS": "6000",
        "ROUTER_CONSUMER__REVOKE_TIMEOUT_S": "5",
        "ROUTER_CONSUMER__SHUTDOWN_TIMEOUT_S": "5",
    }
    values.update(env)
    return make_settings(broker, topic, **values)


def write_rules(directory: Path) -> Path:
    """The test rules for the fake sinks, in ``directory``."""
    directory.mkdir(exist_ok=True)
    for sink in ("fake", "fake2"):
        (directory / f"{sink}.yaml").write_text(RULES.format(sink=sink))
    return directory


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    return write_rules(tmp_path / "rules")


async def publish(settings: Settings, events: list[Event], garbage: list[bytes] = ()) -> None:  # type: ignore[assignment]
    bus = KafkaBus(settings.kafka)
    await bus.start()
    try:
        for start in range(0, len(events), 200):
            await bus.publish([to_record(e) for e in events[start : start + 200]])
    finally:
        await bus.stop()
    if garbage:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers)
        await producer.start()
        try:
            for value in garbage:
                await producer.send_and_wait(settings.kafka.topic, value=value, key=b"x")
        finally:
            await producer.stop()


class Running:
    def __init__(self, consumer: SinkConsumer, task: asyncio.Task[None], stop: asyncio.Event):
        self.consumer = consumer
        self.task = task
        self.stop = stop

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 30)


def make_consumer(settings: Settings, sink_name: str = "fake") -> SinkConsumer:
    sinks.load_plugins(settings.plugins)
    config = settings.sinks.get(sink_name, {})
    return SinkConsumer(
        settings,
        sinks.create(sink_name, config),
        LiveRules(Path(settings.rules.dir) / f"{sink_name}.yaml"),
        SinkMetrics(sink_name, CollectorRegistry()),
        Redactor(secret_values(config)),
    )


async def start_consumer(settings: Settings, sink_name: str = "fake") -> Running:
    consumer = make_consumer(settings, sink_name)
    await consumer.start()
    stop = asyncio.Event()
    return Running(consumer, asyncio.create_task(consumer.run(stop)), stop)


async def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def committed_count(settings: Settings, sink: str) -> int:
    """Events of the event topic below the sink group's committed positions."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id=settings.consumer.group_for(sink),
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        total = 0
        for p in range(settings.kafka.partitions):
            total += await consumer.committed(TopicPartition(settings.kafka.topic, p)) or 0
        return total
    finally:
        await consumer.stop()


async def committed_everything(settings: Settings, sink: str) -> bool:
    """The sink's group has committed the end offset of every partition of the event topic."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id=settings.consumer.group_for(sink),
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        # The tests create the topic with this many partitions.
        tps = [TopicPartition(settings.kafka.topic, p) for p in range(settings.kafka.partitions)]
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            committed = await consumer.committed(tp)
            if ends[tp] and committed != ends[tp]:
                return False
        return bool(tps)
    finally:
        await consumer.stop()


async def dead_letters(settings: Settings, sink: str, expected: int) -> list[dlq.DeadLetter]:
    records = await read_topic(
        settings.kafka.bootstrap_servers,
        settings.consumer.dlq_topic_for(sink),
        expected=expected,
        timeout_s=15,
    )
    return [dlq.decode(r.value) for r in records]


async def test_delivers_filters_and_dead_letters_every_reason(
    broker: Broker,
    server: tuple[Destination, str],
    rules_dir: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    destination, url = server
    topic = unique_topic()
    settings = rig_settings(broker, topic, rules_dir, url)
    evaluate = RuleSet.evaluate

    def engine_with_a_bug(self: RuleSet, event: Event) -> Any:
        if event.name == "engine-bug":
            raise KeyError("an engine bug meeting an odd event")
        return evaluate(self, event)

    monkeypatch.setattr(RuleSet, "evaluate", engine_with_a_bug)
    tracks = [track_event(i) for i in range(300)]
    filtered = [track_event(1000 + i, type_="guide.viewed") for i in range(20)]
    broken = [track_event(2000 + i, name="broken") for i in range(5)]
    unencodable = [track_event(3000 + i, name="unencodable") for i in range(3)]
    crashing = [track_event(4000 + i, name="crashing") for i in range(2)]
    engine_bug = [track_event(5000 + i, name="engine-bug") for i in range(2)]
    await publish(
        settings,
        tracks + filtered + broken + unencodable + crashing + engine_bug,
        garbage=[b"not json"],
    )

    running = await start_consumer(settings)
    try:
        expected = {e.id for e in tracks + broken}
        await wait_until(lambda: destination.delivered_event_ids() >= expected, 60, "deliveries")
        await wait_until_async(lambda: committed_everything(settings, "fake"), 30)
    finally:
        await running.close()

    assert destination.delivered_event_ids() == expected
    assert len(destination.ledger) == len(expected)  # no duplicates in a clean run
    assert destination.authorizations == {f"Bearer {TOKEN}"}
    letters = await dead_letters(settings, "fake", expected=13)
    reasons: dict[str, set[str | None]] = {}
    for letter in letters:
        reasons.setdefault(letter.reason, set()).add(letter.event_id)
    assert reasons == {
        "mapping_error": {e.id for e in broken + engine_bug},
        "invalid_payload": {e.id for e in unencodable + crashing},
        "invalid_event": {None},
    }
    crashed = next(x for x in letters if x.event_id == crashing[0].id)
    assert crashed.detail.startswith("fake could not encode it: TypeError(")
    bug = next(x for x in letters if x.event_id == engine_bug[0].id)
    assert bug.detail.startswith("the rules could not be evaluated: KeyError(")
    mapping = next(x for x in letters if x.event_id == broken[0].id)
    assert mapping.rule_id == "broken"
    # the key its output would have carried, for a replay after the rule is fixed
    assert mapping.idempotency_key == idempotency_key(broken[0].id, "fake", "broken")
    assert mapping.detail == "name: required value missing (path properties.absent)"
    assert mapping.ruleset == running.consumer.rules.current.hash
    assert msgspec.json.decode(bytes(mapping.event))["id"] == broken[0].id  # type: ignore[arg-type]
    garbage = next(x for x in letters if x.reason == "invalid_event")
    assert dlq.original_value(garbage) == b"not json"
    for letter in letters:
        assert TOKEN not in dlq.encode(letter).decode()
    assert TOKEN not in caplog.text


async def wait_until_async(check: Callable[[], Any], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "timed out waiting for the commits"
        await asyncio.sleep(0.2)


async def test_transient_faults_are_retried_until_delivered(
    broker: Broker, server: tuple[Destination, str], rules_dir: Path
) -> None:
    destination, url = server
    destination.script = [
        Fault(status=429, retry_after="1"),
        Fault(status=500),
        Fault(hang_s=3.0),  # past the fake sink's 2 s timeout
        Fault(reset=True),
        Fault(status=503, retry_after="Wed, 21 Oct 2015 07:28:00 GMT"),  # in the past: no wait
        Fault(status=408),
        Fault(status=502, body=b"classify-bug"),  # the sink raises: retried, not stalled
    ]
    topic = unique_topic()
    settings = rig_settings(broker, topic, rules_dir, url, ROUTER_SINKS__FAKE__CONCURRENCY="1")
    events = [track_event(i) for i in range(40)]
    await publish(settings, events)
    running = await start_consumer(settings)
    try:
        await wait_until(
            lambda: destination.delivered_event_ids() >= {e.id for e in events}, 60, "deliveries"
        )
        await wait_until_async(lambda: committed_everything(settings, "fake"), 30)
    finally:
        await running.close()
    statuses = [status for _, status, _ in destination.requests]
    assert statuses[:2] == [429, 500]
    # Retry-After: 1 was honoured: the attempt after the 429 came at least a second later.
    assert destination.requests[1][0] - destination.requests[0][0] >= 1.0
    keys = [entry[0] for entry in destination.ledger]
    assert len(set(keys)) == len(events)
    assert 502 in statuses
    assert running.consumer.metrics.retried._value.get() >= 7  # type: ignore[attr-defined]
    letters = await read_topic(
        broker.bootstrap, settings.consumer.dlq_topic_for("fake"), expected=0, timeout_s=2
    )
    assert letters == []


async def test_rejections_are_dead_lettered_with_the_api_reason(
    broker: Broker, server: tuple[Destination, str], rules_dir: Path
) -> None:
    destination, url = server
    events = [track_event(i) for i in range(60)]
    destination.poison = {events[3].id, events[40].id}
    destination.script = [Fault(status=400, body=b'{"error":"bad batch"}')]
    topic = unique_topic()
    settings = rig_settings(broker, topic, rules_dir, url, ROUTER_SINKS__FAKE__MAX_EVENTS="10")
    await publish(settings, events)
    running = await start_consumer(settings)
    try:
        await wait_until_async(lambda: committed_everything(settings, "fake"), 60)
    finally:
        await running.close()
    letters = await dead_letters(settings, "fake", expected=12)
    rejected = [x for x in letters if x.reason == "rejected_by_api"]
    by_status: dict[int | None, set[str | None]] = {}
    for letter in rejected:
        by_status.setdefault(letter.status, set()).add(letter.event_id)
    whole_batch = by_status[400]
    assert len(whole_batch) == 10
    assert all(x.response == '{"error":"bad batch"}' for x in rejected if x.status == 400)
    poisoned = by_status[200]
    assert poisoned <= {events[3].id, events[40].id}
    assert all("is poison" in x.detail for x in rejected if x.status == 200)
    delivered = destination.delivered_event_ids()
    # None lost: every event is delivered or dead-lettered.
    assert delivered | whole_batch | poisoned == {e.id for e in events}
    assert all(x.attempts == 1 and x.idempotency_key for x in rejected)


async def test_unauthorized_pauses_without_dead_letters_then_resumes(
    broker: Broker, server: tuple[Destination, str], rules_dir: Path
) -> None:
    destination, url = server
    destination.script = [Fault(status=401)] * 4
    topic = unique_topic()
    settings = rig_settings(broker, topic, rules_dir, url)
    events = [track_event(i) for i in range(30)]
    await publish(settings, events)
    running = await start_consumer(settings)
    states: set[str] = set()
    try:

        def done() -> bool:
            states.add(running.consumer.state)
            return destination.delivered_event_ids() >= {e.id for e in events}

        await wait_until(done, 60, "deliveries after the pause")
        await wait_until_async(lambda: committed_everything(settings, "fake"), 30)
        assert running.consumer.state == "healthy"
    finally:
        await running.close()
    assert "paused" in states
    letters = await read_topic(
        broker.bootstrap, settings.consumer.dlq_topic_for("fake"), expected=0, timeout_s=2
    )
    assert letters == []


async def test_retries_end_in_dead_letters_when_exhausted(
    broker: Broker, server: tuple[Destination, str], rules_dir: Path
) -> None:
    destination, url = server
    destination.default = Fault(status=503)
    topic = unique_topic()
    settings = rig_settings(broker, topic, rules_dir, url, ROUTER_CONSUMER__RETRY_MAX_TOTAL_S="1.5")
    events = [track_event(i) for i in range(15)]
    await publish(settings, events)
    running = await start_consumer(settings)
    try:
        await wait_until_async(lambda: committed_everything(settings, "fake"), 60)
    finally:
        await running.close()
    letters = await dead_letters(settings, "fake", expected=15)
    assert {x.event_id for x in letters} == {e.id for e in events}
    assert {x.reason for x in letters} == {"retries_exhausted"}
    assert all(x.attempts >= 2 and x.status == 503 for x in letters)
    assert all(x.first_attempt_at and x.last_attempt_at for x in letters)
    assert all(x.last_attempt_at >= x.first_attempt_at for x in letters)  # type: ignore[operator]


async def test_one_sinks_outage_does_not_touch_another(broker: Broker, rules_dir: Path) -> None:
    down, up = Destination(default=Fault(status=503)), Destination()
    servers = [TestServer(d.app(), host="127.0.0.1") for d in (down, up)]
    for s in servers:
        await s.start_server()
    try:
        topic = unique_topic()
        settings = rig_settings(
            broker,
            topic,
            rules_dir,
            str(servers[0].make_url("/collect")),
            ROUTER_SINKS__FAKE2__URL=str(servers[1].make_url("/collect")),
        )
        events = [track_event(i) for i in range(100)]
        await publish(settings, events)
        failing = await start_consumer(settings, "fake")
        healthy = await start_consumer(settings, "fake2")
        try:
            await wait_until(
                lambda: up.delivered_event_ids() >= {e.id for e in events}, 60, "fake2 deliveries"
            )
            await wait_until_async(lambda: committed_everything(settings, "fake2"), 30)
            assert failing.consumer.state == "degraded"
            assert not await committed_everything(settings, "fake")
        finally:
            await failing.close()
            await healthy.close()
        assert down.ledger == []
        assert len(up.ledger) == len(events)
    finally:
        for s in servers:
            await s.close()


async def test_rate_limit_is_respected(
    broker: Broker, server: tuple[Destination, str], rules_dir: Path
) -> None:
    destination, url = server
    topic = unique_topic()
    rate = 20
    settings = rig_settings(
        broker,
        topic,
        rules_dir,
        url,
        ROUTER_SINKS__FAKE__MAX_EVENTS="1",
        ROUTER_SINKS__FAKE__RATE_PER_S=str(rate),
        ROUTER_SINKS__FAKE__CONCURRENCY="4",
    )
    events = [track_event(i) for i in range(70)]
    await publish(settings, events)
    running = await start_consumer(settings)
    try:
        await wait_until(
            lambda: destination.delivered_event_ids() >= {e.id for e in events}, 60, "deliveries"
        )
    finally:
        await running.close()
    times = sorted(t for t, _, _ in destination.requests)
    # The token bucket allows a burst of `rate`, then `rate` per second: no one-second window
    # may hold more than burst + rate requests (+1 for the window's edge).
    for i, start in enumerate(times):
        in_window = sum(1 for t in times[i:] if t < start + 1.0)
        assert in_window <= 2 * rate + 1, (i, in_window)
    assert running.consumer.metrics.throttled_seconds._value.get() > 0  # type: ignore[attr-defined]


async def test_tombstones_and_oversized_dead_letters_do_not_stall(
    broker: Broker, server: tuple[Destination, str], rules_dir: Path
) -> None:
    destination, url = server
    topic = unique_topic()
    settings = rig_settings(broker, topic, rules_dir, url)
    # An existing DLQ topic with a small limit (the consumer leaves existing topics as they are).
    await ensure_topics(
        settings.kafka,
        [TopicSpec(settings.consumer.dlq_topic_for("fake"), 3, 1, {"max.message.bytes": "100000"})],
    )
    huge = track_event(1)
    huge.properties["blob"] = "x" * 200_000  # too large for the fake sink and for the DLQ
    after = [track_event(i) for i in range(2, 12)]
    await publish(settings, [huge])
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value=None, key=b"tombstone")
    finally:
        await producer.stop()
    await publish(settings, after)
    running = await start_consumer(settings)
    try:
        await wait_until(
            lambda: destination.delivered_event_ids() >= {e.id for e in after}, 30, "deliveries"
        )
        await wait_until_async(lambda: committed_everything(settings, "fake"), 30)
    finally:
        await running.close()
    letters = await dead_letters(settings, "fake", expected=2)
    by_reason = {x.reason: x for x in letters}
    assert set(by_reason) == {"too_large", "invalid_event"}
    cut = by_reason["too_large"]
    assert cut.event_id == huge.id
    assert "event and payload omitted: too large for the dead-letter topic" in cut.detail
    assert dlq.original_value(cut) is None
    assert cut.payload is None
    assert cut.topic == topic  # where the original still is
    assert cut.offset is not None
    assert dlq.original_value(by_reason["invalid_event"]) == b""


async def test_a_413_splits_the_batch(
    broker: Broker, server: tuple[Destination, str], rules_dir: Path
) -> None:
    destination, url = server
    destination.script = [Fault(status=413), Fault(status=413)]
    topic = unique_topic()
    settings = rig_settings(
        broker, topic, rules_dir, url, ROUTER_SINKS__FAKE__MAX_EVENTS="8",
        ROUTER_SINKS__FAKE__CONCURRENCY="1", ROUTER_SINKS__FAKE__LINGER_S="1",
    )  # fmt: skip
    events = [track_event(i) for i in range(8)]
    await publish(settings, events)
    running = await start_consumer(settings)
    try:
        await wait_until(
            lambda: destination.delivered_event_ids() >= {e.id for e in events}, 30, "deliveries"
        )
    finally:
        await running.close()
    sizes = [items for _, _, items in destination.requests]
    assert sizes[:2] == [8, 4]  # the batch of 8, then its first half, both refused as too large
    assert sorted(sizes[2:]) == [2, 2, 4]  # halves again, then the rest: all delivered once
    assert len(destination.ledger) == len(events)


async def test_in_flight_events_stay_bounded_during_an_outage(
    broker: Broker, server: tuple[Destination, str], rules_dir: Path
) -> None:
    destination, url = server
    destination.default = Fault(status=503)
    topic = unique_topic()
    cap, poll = 50, 20
    settings = rig_settings(
        broker, topic, rules_dir, url,
        ROUTER_CONSUMER__MAX_INFLIGHT_EVENTS=str(cap),
        ROUTER_CONSUMER__MAX_POLL_RECORDS=str(poll),
    )  # fmt: skip
    await publish(settings, [track_event(i) for i in range(1000)])
    running = await start_consumer(settings)
    try:
        await wait_until(lambda: running.consumer.inflight_events >= cap, 30, "the cap")
        peak = 0
        for _ in range(30):  # three seconds of outage
            peak = max(peak, running.consumer.inflight_events)
            await asyncio.sleep(0.1)
        paused = running.consumer._consumer.paused()
    finally:
        await running.close()
    # Fetching stops at the cap: at most one poll's worth of records beyond it.
    assert peak <= cap + poll
    assert paused  # the partitions are paused while the consumer keeps polling


async def test_recovery_releases_backed_off_batches_but_keeps_retry_after(
    broker: Broker, server: tuple[Destination, str], rules_dir: Path
) -> None:
    """Once the destination answers again, batches waiting on their own backoff go at once.

    Ten batches fail with 503 and back off for up to 60 s each (full jitter); one other batch got
    a 429 with Retry-After: 30. The first success (a fresh event) releases the ten, so they
    arrive within seconds; the Retry-After batch keeps waiting, as the destination asked.
    """
    destination, url = server
    destination.script = [Fault(status=429, retry_after="30")]
    destination.default = Fault(status=503)
    topic = unique_topic()
    settings = rig_settings(
        broker, topic, rules_dir, url,
        ROUTER_SINKS__FAKE__MAX_EVENTS="10",
        ROUTER_CONSUMER__RETRY_BASE_S="60",
        ROUTER_CONSUMER__RETRY_CAP_S="60",
    )  # fmt: skip
    events = [track_event(i) for i in range(110)]
    await publish(settings, events)
    running = await start_consumer(settings)
    try:
        await wait_until(lambda: len(destination.requests) >= 11, 30, "every first attempt")
        destination.default = Fault()
        fresh = track_event(1000)
        await publish(settings, [fresh])
        await wait_until(lambda: len(destination.delivered_event_ids()) >= 101, 15, "recovery")
        await asyncio.sleep(1.0)
        delivered = destination.delivered_event_ids()
    finally:
        await running.close()
    assert fresh.id in delivered
    # Everything but the batch that was told to wait 30 s.
    assert len(delivered) == 101
    first_statuses = [status for _, status, _ in destination.requests[:11]]
    assert first_statuses == [429] + [503] * 10
