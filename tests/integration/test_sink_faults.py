"""Process and broker faults under a running sink consumer: nothing lost, duplicates bounded.

- kill -9 of a `router sink` process mid-batch, then a restart;
- two consumers of one group with rebalances in the middle (one joins, one leaves);
- Kafka stopped and started again under a running consumer.

Duplicates are counted on the destination's ledger (same idempotency key delivered twice); the
bound is what the commit design allows: events read but not yet committed when the fault hit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from router.settings import Settings
from tests.fakes.destination import Destination, Fault
from tests.integration.conftest import Broker, free_port, unique_topic
from tests.integration.test_sink_consumer import (
    committed_count,
    committed_everything,
    dead_letters,
    make_consumer,
    publish,
    rig_settings,
    start_consumer,
    track_event,
    wait_until,
    wait_until_async,
    write_rules,
)

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
MAX_INFLIGHT = 400


async def check_health_endpoints(port: int) -> None:
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/healthz") as response:
            assert response.status == 200
        async with session.get(base + "/readyz") as response:
            assert response.status == 200
            ready = await response.json()
            assert ready["status"] == "ready"
            assert ready["state"] == "healthy"
            assert ready["kafka"] == "ok"
            assert len(ready["ruleset"]) == 16
        async with session.get(base + "/metrics") as response:
            text = await response.text()
    for sample in (
        'router_sink_delivered_total{rule="tracks",sink="fake"}',
        'router_sink_routed_total{rule="tracks",sink="fake"}',
        'router_sink_consumed_total{sink="fake"}',
        'router_sink_state{sink="fake",state="healthy"} 1.0',
        "router_sink_request_seconds_bucket",
        "router_sink_batch_size_bucket",
        "router_sink_consumer_lag",
        'router_rules_ruleset{hash="',
    ):
        assert sample in text, sample


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    return write_rules(tmp_path / "rules")


def duplicates(destination: Destination) -> int:
    return len(destination.ledger) - len(destination.delivered_keys())


def report(name: str, **figures: object) -> None:
    """Print the measured figures (pytest -s shows them; they go into the closing note)."""
    print(f"\n[{name}] " + ", ".join(f"{k}={v}" for k, v in figures.items()))


async def test_kill_9_mid_batch_then_restart(
    broker: Broker, rules_dir: Path, tmp_path: Path
) -> None:
    # Slow enough that several commits happen before the kill (about 500 events/s).
    destination = Destination(default=Fault(hang_s=0.05))
    server = TestServer(destination.app(), host="127.0.0.1")
    await server.start_server()
    topic = unique_topic()
    url = str(server.make_url("/collect"))
    settings = rig_settings(broker, topic, rules_dir, url)
    events = [track_event(i) for i in range(3000)]
    await publish(settings, events)
    config = tmp_path / "router.yaml"
    health_port = free_port()
    config.write_text(
        f"kafka: {{bootstrap_servers: '{broker.bootstrap}', topic: {topic}, partitions: 3}}\n"
        f"rules: {{dir: '{rules_dir}'}}\n"
        "plugins: [tests.fakes.fake_sink]\n"
        f"sinks: {{fake: {{url: '{url}', max_events: 25, concurrency: 2}}}}\n"
        f"consumer: {{group_prefix: '{topic}-', dlq_topic: '{topic}.dlq.{{sink}}',\n"
        f"  retry_topic: '{topic}.retry.{{sink}}', commit_interval_s: 0.5,\n"
        f"  max_inflight_events: {MAX_INFLIGHT}, session_timeout_ms: 6000,\n"
        f"  revoke_timeout_s: 5, health_port: {health_port}}}\n"
    )

    def spawn(log_name: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "router.cli", "--config", str(config), "sink", "fake"],
            cwd=ROOT,
            stdout=(tmp_path / log_name).open("wb"),
            stderr=subprocess.STDOUT,
        )

    first = spawn("first.log")
    second: subprocess.Popen[bytes] | None = None
    try:
        await wait_until(lambda: len(destination.ledger) >= 1000, 90, "first deliveries")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        at_kill = len(destination.ledger)
        committed_at_kill = await committed_count(settings, "fake")
        second = spawn("second.log")
        everything = {e.id for e in events}
        await wait_until(lambda: destination.delivered_event_ids() >= everything, 120, "all")
        await wait_until_async(lambda: committed_everything(settings, "fake"), 60)
        await check_health_endpoints(health_port)
        second.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(second.wait, 30) == 0
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        await server.close()
    dups = duplicates(destination)
    report(
        "kill -9",
        events=len(events),
        delivered_at_kill=at_kill,
        committed_at_kill=committed_at_kill,
        duplicates=dups,
        lost=0,
    )
    assert len(destination.delivered_event_ids()) == len(events)  # none lost
    assert committed_at_kill > 0  # the kill came after commits, as intended
    # Re-sent at most what was delivered beyond the committed position when it died.
    assert dups <= at_kill - committed_at_kill


async def test_rebalance_with_two_consumers(
    broker: Broker, rules_dir: Path, server_slow: tuple[Destination, str]
) -> None:
    destination, url = server_slow
    topic = unique_topic()
    settings = rig_settings(
        broker,
        topic,
        rules_dir,
        url,
        ROUTER_CONSUMER__MAX_INFLIGHT_EVENTS=str(MAX_INFLIGHT),
        ROUTER_SINKS__FAKE__MAX_EVENTS="25",
    )
    events = [track_event(i) for i in range(2500)]
    await publish(settings, events)
    everything = {e.id for e in events}
    a = await start_consumer(settings)
    b = None
    try:
        await wait_until(lambda: len(destination.ledger) >= 400, 60, "a's first deliveries")
        b = await start_consumer(settings)  # joins: the group rebalances
        await wait_until(lambda: len(destination.ledger) >= 1400, 90, "deliveries by a and b")
        await a.close()  # leaves: b takes every partition
        await wait_until(lambda: destination.delivered_event_ids() >= everything, 120, "all")
        await wait_until_async(lambda: committed_everything(settings, "fake"), 60)
    finally:
        if not a.task.done():
            await a.close()
        if b is not None:
            await b.close()
    dups = duplicates(destination)
    report("rebalance", events=len(events), duplicates=dups, lost=0)
    assert len(destination.delivered_event_ids()) == len(events)
    assert dups <= 2 * MAX_INFLIGHT


@pytest.fixture
async def server_slow() -> Iterator[tuple[Destination, str]]:  # type: ignore[misc]
    destination = Destination(default=Fault(hang_s=0.01))
    server = TestServer(destination.app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield destination, str(server.make_url("/collect"))
    finally:
        await server.close()


async def test_kafka_restarted_under_a_running_consumer(
    outage_broker: Broker, rules_dir: Path, server_slow: tuple[Destination, str]
) -> None:
    destination, url = server_slow
    topic = unique_topic()
    settings = rig_settings(outage_broker, topic, rules_dir, url)
    first = [track_event(i) for i in range(500)]
    second = [track_event(10_000 + i) for i in range(500)]
    await publish(settings, first)
    running = await start_consumer(settings)
    try:
        await wait_until(lambda: len(destination.ledger) >= 100, 60, "first deliveries")
        await asyncio.to_thread(outage_broker.ctl, "stop")
        stopped_at = time.monotonic()
        await asyncio.sleep(3)
        await asyncio.to_thread(outage_broker.ctl, "start")
        down_s = time.monotonic() - stopped_at
        await publish(settings, second)
        everything = {e.id for e in first + second}
        await wait_until(lambda: destination.delivered_event_ids() >= everything, 120, "all")
        await wait_until_async(lambda: committed_everything(settings, "fake"), 60)
    finally:
        await running.close()
    report(
        "kafka restart", events=1000, down_s=round(down_s, 1), duplicates=duplicates(destination)
    )
    assert len(destination.delivered_event_ids()) == 1000


async def test_a_sink_started_while_kafka_is_down_waits_for_it(
    outage_broker: Broker, rules_dir: Path, server_slow: tuple[Destination, str]
) -> None:
    """`router sink` deployed before its Kafka answers waits (startup_timeout_s), as serve does.

    It used to exit 1 at once, so a sink pod scheduled before Kafka crash-looped.
    """
    destination, url = server_slow
    topic = unique_topic()
    settings = rig_settings(outage_broker, topic, rules_dir, url)
    events = [track_event(i) for i in range(50)]
    await publish(settings, events)
    await asyncio.to_thread(outage_broker.ctl, "stop")
    running = _Later(settings)
    try:
        await asyncio.sleep(4)
        assert not running.started.done(), "start gave up while Kafka was down"
        assert running.consumer._consumer is None  # the failed attempts' clients were closed
        await asyncio.to_thread(outage_broker.ctl, "start")
        await asyncio.wait_for(running.started, 60)
        await wait_until(
            lambda: destination.delivered_event_ids() >= {e.id for e in events}, 60, "all"
        )
    finally:
        await running.close()


class _Later:
    """A consumer whose start() runs as a task, then run() once it has started."""

    def __init__(self, settings: Settings) -> None:
        self.consumer = make_consumer(settings)
        self.stop = asyncio.Event()
        self.started = asyncio.create_task(self.consumer.start())
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        await self.started
        await self.consumer.run(self.stop)

    async def close(self) -> None:
        self.stop.set()
        if not self.started.done():
            self.started.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def test_dead_letters_in_flight_through_a_kafka_restart_are_all_written(
    outage_broker: Broker, rules_dir: Path, server_slow: tuple[Destination, str]
) -> None:
    """Dead letters are being written when Kafka stops; once it is back, every one is written.

    The outage outlasts the dead-letter producer's request timeout (5 s): aiokafka 0.14's
    idempotent producer then fails every later write with OutOfOrderSequenceNumber, for good.
    The consumer replaces the producer instead of retrying the letter forever (a stalled sink).
    """
    destination, url = server_slow
    destination.default = Fault(status=400, hang_s=0.05, body=b'{"error":"bad batch"}')
    topic = unique_topic()
    settings = rig_settings(
        outage_broker, topic, rules_dir, url,
        ROUTER_SINKS__FAKE__MAX_EVENTS="5",
        ROUTER_CONSUMER__DLQ_TIMEOUT_MS="5000",
    )  # fmt: skip
    events = [track_event(i) for i in range(1_500)]
    await publish(settings, events)
    running = await start_consumer(settings)
    dead = running.consumer.metrics.dead_lettered.labels("rejected_by_api")
    try:
        await wait_until(lambda: dead._value.get() >= 100, 30, "dead letters flowing")
        await asyncio.to_thread(outage_broker.ctl, "stop")
        await asyncio.sleep(8)
        await asyncio.to_thread(outage_broker.ctl, "start")
        await wait_until(lambda: dead._value.get() >= len(events), 90, "every dead letter")
        await wait_until_async(lambda: committed_everything(settings, "fake"), 60)
    finally:
        await running.close()
    letters = await dead_letters(settings, "fake", expected=len(events))
    assert {letter.event_id for letter in letters} == {e.id for e in events}
    assert {letter.status for letter in letters} == {400}
