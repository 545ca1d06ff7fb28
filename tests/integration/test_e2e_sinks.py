"""End to end on the real broker: every shared fixture arrives as the goldens say.

Each fixture goes through the ingest, Kafka and a sink consumer, and reaches the sink's emulator
exactly as the reviewed golden requests say, once per idempotency key, also when the emulator
answers with faults first.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

import sinks
from router.consumer import SinkConsumer
from router.delivery.sink import sink_secrets
from router.dlq import Redactor
from router.ingest import create_app
from router.rules.live import LiveRules
from router.signature import sign
from router.sink_metrics import SinkMetrics
from tests.emulators.segment import Fault, SegmentEmulator
from tests.fixtures import fixture_paths, webhook_fixture_paths
from tests.integration.conftest import Broker, make_settings, unique_topic
from tests.integration.test_sink_consumer import Running, wait_until

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
ClientFactory = Callable[..., Any]


def golden_messages(sink: str) -> dict[str, dict[str, Any]]:
    """Map each messageId to the exact message the goldens say this sink sends."""
    messages: dict[str, dict[str, Any]] = {}
    for path in sorted((GOLDEN / sink).glob("*.json")):
        for request in json.loads(path.read_text()):
            for message in request["body"]["batch"]:
                messages[message["messageId"]] = message
    return messages


async def send_every_fixture(client: Any) -> None:
    for path in webhook_fixture_paths():
        body = path.read_bytes()
        headers = {"Content-Type": "application/json", "X-Pendo-Signature": sign(b"e2e", body)}
        response = await client.post("/webhooks/pendo", data=body, headers=headers)
        assert response.status == 200, await response.text()
    for path in fixture_paths("track"):
        headers = {"Content-Type": "application/json", "x-pendo-integration-key": "e2e-key"}
        response = await client.post("/data/track", data=path.read_bytes(), headers=headers)
        assert response.status == 200, await response.text()


async def start_sink(settings: Any, name: str, config: dict[str, Any]) -> Running:
    sink = sinks.create(name, config)
    live = LiveRules(ROOT / "rules" / f"{name}.yaml")
    consumer = SinkConsumer(
        settings, sink, live, SinkMetrics(name, CollectorRegistry()), Redactor(sink_secrets(sink))
    )
    await consumer.start()
    stop = asyncio.Event()
    return Running(consumer, asyncio.create_task(consumer.run(stop)), stop)


@pytest.mark.parametrize("faults", [False, True], ids=["clean", "429-then-500"])
async def test_segment_end_to_end(
    broker: Broker, aiohttp_client: ClientFactory, faults: bool
) -> None:
    emulator = SegmentEmulator()
    if faults:
        emulator.script = [Fault(status=429, retry_after="1"), Fault(status=500)]
    server = TestServer(emulator.app(), host="127.0.0.1")
    await server.start_server()
    topic = unique_topic()
    settings = make_settings(
        broker,
        topic,
        ROUTER_INGEST__WEBHOOK_SECRETS="e2e",
        ROUTER_INGEST__INTEGRATION_KEYS="e2e-key",
        ROUTER_CONSUMER__GROUP_PREFIX=f"{topic}-",
        ROUTER_CONSUMER__DLQ_TOPIC=f"{topic}.dlq.{{sink}}",
        ROUTER_CONSUMER__RETRY_TOPIC=f"{topic}.retry.{{sink}}",
        ROUTER_CONSUMER__RETRY_BASE_S="0.05",
    )
    client = await aiohttp_client(create_app(settings))
    await send_every_fixture(client)
    expected = golden_messages("segment")
    endpoint = str(server.make_url("")).rstrip("/")
    running = await start_sink(
        settings, "segment", {"endpoint": endpoint, "write_key": "test-write-key"}
    )
    try:
        await wait_until(lambda: set(emulator.ledger) >= set(expected), 60, "every golden message")
        await asyncio.sleep(0.5)  # anything extra would arrive now
    finally:
        await running.close()
        await server.close()
    assert set(emulator.ledger) == set(expected)  # nothing missing, nothing unexpected
    for message_id, message in expected.items():
        assert emulator.ledger[message_id].message == message
    assert all(entry.write_key == "test-write-key" for entry in emulator.ledger.values())
    if faults:
        statuses = [r.status for r in emulator.requests]
        assert statuses[:2] == [429, 500]
