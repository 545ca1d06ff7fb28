"""End to end on the real broker: every shared fixture arrives as the goldens say.

Each fixture goes through the ingest, Kafka and a sink consumer, and reaches the sink's emulator
exactly as the reviewed golden requests say, once per idempotency key, also when the emulator
answers with faults first.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
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
from tests.emulators import amplitude as amplitude_emulator
from tests.emulators import mixpanel as mixpanel_emulator
from tests.emulators import segment as segment_emulator
from tests.emulators import slack as slack_emulator
from tests.fixtures import fixture_paths, webhook_fixture_paths
from tests.integration.conftest import Broker, make_settings, unique_topic
from tests.integration.test_sink_consumer import Running, wait_until

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
ClientFactory = Callable[..., Any]


def golden_bodies(sink: str) -> list[Any]:
    return [
        request["body"]
        for path in sorted((GOLDEN / sink).glob("*.json"))
        for request in json.loads(path.read_text())
    ]


def by_content(messages: Any) -> dict[str, Any]:
    """Slack has no idempotency key: a message is known by its content."""
    return {json.dumps(m, sort_keys=True): m for m in messages}


SLACK_HOOK_PATH = "/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"


@dataclass
class Case:
    """How one sink's end-to-end run is set up and judged."""

    sink: str
    emulator: Callable[[], Any]
    config: Callable[[str], dict[str, Any]]  # the emulator's base URL -> sinks.<name>
    expected: Callable[[], dict[str, Any]]  # idempotency key -> message, from the goldens
    delivered: Callable[[Any], dict[str, Any]]  # idempotency key -> message, at the emulator
    faults: Callable[[Any], None]  # script two retryable faults before normal answers


CASES = [
    Case(
        "segment",
        segment_emulator.SegmentEmulator,
        lambda url: {"endpoint": url, "write_key": "test-write-key"},
        lambda: {m["messageId"]: m for body in golden_bodies("segment") for m in body["batch"]},
        lambda emulator: {key: entry.message for key, entry in emulator.ledger.items()},
        lambda emulator: emulator.script.extend(
            [
                segment_emulator.Fault(status=429, retry_after="1"),
                segment_emulator.Fault(status=500),
            ]
        ),
    ),
    Case(
        "mixpanel",
        mixpanel_emulator.MixpanelEmulator,
        lambda url: {
            "endpoint": url,
            "project_id": "123456",
            "service_account": {
                "username": "sa-user.123.mp-service-account",
                "secret": "sa-secret",
            },
        },
        lambda: {
            e["properties"]["$insert_id"]: e for body in golden_bodies("mixpanel") for e in body
        },
        lambda emulator: {e["properties"]["$insert_id"]: e for e in emulator.events.values()},
        lambda emulator: emulator.script.extend(
            [
                mixpanel_emulator.Fault(status=429, retry_after="1"),
                mixpanel_emulator.Fault(status=500),
            ]
        ),
    ),
    Case(
        "amplitude",
        amplitude_emulator.AmplitudeEmulator,
        lambda url: {"endpoint": url, "api_key": "test-amplitude-api-key"},
        lambda: {e["insert_id"]: e for body in golden_bodies("amplitude") for e in body["events"]},
        lambda emulator: {entry.event["insert_id"]: entry.event for entry in emulator.ledger},
        lambda emulator: emulator.script.extend(
            # A 429 here means Amplitude's 30 s throttle pause: 5xx keeps the test short.
            [amplitude_emulator.Fault(status=503), amplitude_emulator.Fault(status=500)]
        ),
    ),
    Case(
        "slack",
        slack_emulator.SlackEmulator,
        lambda url: {"webhook_url": url + SLACK_HOOK_PATH},
        lambda: by_content(golden_bodies("slack/webhook")),
        lambda emulator: by_content(emulator.messages()),
        lambda emulator: emulator.script.extend(
            [
                slack_emulator.Fault(status=429, error="rate_limited", retry_after="1"),
                slack_emulator.Fault(status=500, error="rollup_error"),
            ]
        ),
    ),
]


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
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.sink)
async def test_end_to_end(
    broker: Broker, aiohttp_client: ClientFactory, case: Case, faults: bool
) -> None:
    emulator = case.emulator()
    if faults:
        case.faults(emulator)
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
    expected = case.expected()
    assert expected, "no golden messages"
    running = await start_sink(
        settings, case.sink, case.config(str(server.make_url("")).rstrip("/"))
    )
    try:
        await wait_until(
            lambda: set(case.delivered(emulator)) >= set(expected), 60, "every golden message"
        )
        await asyncio.sleep(0.5)  # anything extra would arrive now
    finally:
        await running.close()
        await server.close()
    delivered = case.delivered(emulator)
    assert set(delivered) == set(expected)  # nothing missing, nothing unexpected
    for key, message in expected.items():
        assert delivered[key] == message


@pytest.mark.parametrize("flagged", [False, True], ids=["valid", "flagged-by-debug"])
async def test_ga4_validates_with_the_debug_endpoint_first(broker: Broker, flagged: bool) -> None:
    """With validate_with_debug_endpoint, GA4's own validator sees each request first.

    Events it flags are dead-lettered with its message and never reach /mp/collect.
    """
    import time

    from router.events import Event, now_ms
    from tests.emulators.ga4 import Ga4Emulator
    from tests.integration.test_sink_consumer import dead_letters, publish

    emulator = Ga4Emulator()
    if flagged:
        # GA4's clock 100 h ahead: to it the events are past the 72 h window; to us they are not.
        emulator.now = lambda: time.time() + 100 * 3600
    server = TestServer(emulator.app(), host="127.0.0.1")
    await server.start_server()
    topic = unique_topic()
    settings = make_settings(
        broker,
        topic,
        ROUTER_CONSUMER__GROUP_PREFIX=f"{topic}-",
        ROUTER_CONSUMER__DLQ_TOPIC=f"{topic}.dlq.{{sink}}",
        ROUTER_CONSUMER__RETRY_TOPIC=f"{topic}.retry.{{sink}}",
    )
    events = [
        Event(
            id=f"ga4-{i}",
            source="track",
            type="track.event",
            name="feature_used",
            visitor_id=f"visitor-{i}",
            timestamp=now_ms(),
            received_at=now_ms(),
        )
        for i in range(3)
    ]
    await publish(settings, events)
    config = {
        "endpoint": str(server.make_url("")).rstrip("/"),
        "measurement_id": "G-TEST123",
        "api_secret": "test-secret",
        "validate_with_debug_endpoint": True,
    }
    running = await start_sink(settings, "ga4", config)
    try:
        if flagged:
            letters = await dead_letters(settings, "ga4", expected=3)
        else:
            await wait_until(lambda: len(emulator.ledger) >= 3, 30, "GA4 deliveries")
    finally:
        await running.close()
        await server.close()
    paths = {request.path for request in emulator.requests}
    if flagged:
        assert {x.reason for x in letters} == {"rejected_by_api"}
        assert {x.event_id for x in letters} == {e.id for e in events}
        assert paths == {"/debug/mp/collect"}  # nothing was sent for real
        assert emulator.ledger == []
        assert all("test-secret" not in dlq_text for dlq_text in (x.detail for x in letters))
    else:
        assert paths == {"/debug/mp/collect", "/mp/collect"}
        assert len(emulator.ledger) == 3
        assert emulator.dropped == []


async def test_mixpanel_partial_400_dead_letters_with_mixpanels_reason(
    broker: Broker, aiohttp_client: ClientFactory
) -> None:
    """A 400 naming failed_records: those records are dead-lettered with Mixpanel's message.

    The rest are delivered once; nothing accepted is sent again.
    """
    from tests.integration.test_sink_consumer import dead_letters

    (case,) = [c for c in CASES if c.sink == "mixpanel"]
    expected = case.expected()
    poisoned = sorted(expected)[:2]
    emulator = mixpanel_emulator.MixpanelEmulator()
    emulator.poison = {
        key: ("properties.guide_id", "'properties.guide_id' is invalid: poisoned for the test")
        for key in poisoned
    }
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
    )
    client = await aiohttp_client(create_app(settings))
    await send_every_fixture(client)
    running = await start_sink(
        settings, "mixpanel", case.config(str(server.make_url("")).rstrip("/"))
    )
    try:
        letters = await dead_letters(settings, "mixpanel", expected=len(poisoned))
        await wait_until(
            lambda: set(case.delivered(emulator)) >= set(expected) - set(poisoned), 60, "the rest"
        )
    finally:
        await running.close()
        await server.close()
    assert sorted(x.idempotency_key for x in letters) == poisoned  # type: ignore[type-var]
    assert {x.reason for x in letters} == {"rejected_by_api"}
    assert all("poisoned for the test" in x.detail for x in letters)
    assert all(x.status == 400 for x in letters)
    delivered = case.delivered(emulator)
    assert set(delivered) == set(expected) - set(poisoned)
    received = [e["properties"]["$insert_id"] for e in emulator.received]
    assert len(received) == len(set(received))  # nothing accepted was sent again
