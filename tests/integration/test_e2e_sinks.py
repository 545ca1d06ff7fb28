"""End to end on the real broker: every shared fixture arrives as the goldens say.

Each fixture goes through the ingest, Kafka and a sink consumer, and reaches the sink's emulator
exactly as the reviewed golden requests say, once per idempotency key, also when the emulator
answers with faults first. GA4 has its own test (``test_ga4_end_to_end``): its 72-hour window
needs the fixtures re-timed to the present, see there.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from aiohttp import web
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
from tests.emulators import SLACK_HOOK_PATH
from tests.emulators import amplitude as amplitude_emulator
from tests.emulators import ga4 as ga4_emulator
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


def e2e_settings(broker: Broker, retry_base_s: str | None = "0.05") -> Any:
    """A fresh topic, its own groups, DLQ and retry topics; the ingest's test secret and key.

    ``retry_base_s``: fast retries by default; None keeps the configured default.
    """
    topic = unique_topic()
    fast = {} if retry_base_s is None else {"ROUTER_CONSUMER__RETRY_BASE_S": retry_base_s}
    return make_settings(
        broker,
        topic,
        ROUTER_INGEST__WEBHOOK_SECRETS="e2e",
        ROUTER_INGEST__INTEGRATION_KEYS="e2e-key",
        ROUTER_CONSUMER__GROUP_PREFIX=f"{topic}-",
        ROUTER_CONSUMER__DLQ_TOPIC=f"{topic}.dlq.{{sink}}",
        ROUTER_CONSUMER__RETRY_TOPIC=f"{topic}.retry.{{sink}}",
        **fast,
    )


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
    settings = e2e_settings(broker)
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


# ---- GA4: the fixtures re-timed to the present ---------------------------------------------

GA4_CONFIG = {"measurement_id": "G-TEST123", "api_secret": "fake/api+secret"}  # the goldens'
_TIMESTAMP = re.compile(rb'("timestamp"\s*:\s*)("[^"]*"|-?\d+)')
_ISO_SECONDS = "%Y-%m-%dT%H:%M:%SZ"


@dataclass
class Retimed:
    """One shared fixture with its event times moved by ``shift_s`` whole seconds."""

    golden: Path  # tests/golden/ga4/<shape>__<name>.json
    route: str
    body: bytes
    shift_s: int


def _seconds(shape: str, value: bytes) -> int:
    """A fixture timestamp in whole seconds: ISO 8601 (dotted), seconds (URL), ms (track)."""
    if shape == "webhook-dotted":
        when = datetime.strptime(json.loads(value), _ISO_SECONDS).replace(tzinfo=UTC)
        return int(when.timestamp())
    if shape == "webhook-url":
        return int(value)
    return int(value) // 1000  # ms (Track API); the shift stays whole seconds either way


def _shifted(shape: str, value: bytes, shift_s: int) -> bytes:
    if shape == "webhook-dotted":
        moved = datetime.fromtimestamp(_seconds(shape, value) + shift_s, UTC)
        return json.dumps(moved.strftime(_ISO_SECONDS)).encode()
    return str(int(value) + shift_s * (1000 if shape == "track" else 1)).encode()


def _without_timestamps(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: None if k == "timestamp" else _without_timestamps(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_timestamps(v) for v in value]
    return value


def retime(path: Path, earliest_s: int) -> Retimed:
    """The fixture's bytes with every ``timestamp`` moved: its earliest event at ``earliest_s``.

    One shift for the whole file, so a batch keeps its spacing. Nothing else in the bytes
    changes (checked).
    """
    shape = path.parent.name
    raw = path.read_bytes()
    stamps = [value for _, value in _TIMESTAMP.findall(raw)]
    assert stamps, f"{path}: no timestamp"
    shift_s = earliest_s - min(_seconds(shape, value) for value in stamps)
    body = _TIMESTAMP.sub(lambda m: m.group(1) + _shifted(shape, m.group(2), shift_s), raw)
    assert _without_timestamps(json.loads(body)) == _without_timestamps(json.loads(raw))
    assert [_seconds(shape, v) for _, v in _TIMESTAMP.findall(body)] == [
        _seconds(shape, v) + shift_s for v in stamps
    ]
    route = "/data/track" if shape == "track" else "/webhooks/pendo"
    return Retimed(GOLDEN / "ga4" / f"{shape}__{path.stem}.json", route, body, shift_s)


def one_event_requests(body: dict[str, Any]) -> list[str]:
    """A GA4 request body as one-event bodies (canonical JSON).

    The sink may send several events of one client in one request; each golden has one.
    """
    return [json.dumps({**body, "events": [e]}, sort_keys=True) for e in body["events"]]


@pytest.mark.parametrize("faults", [False, True], ids=["clean", "429-then-500"])
async def test_ga4_end_to_end(broker: Broker, aiohttp_client: ClientFactory, faults: bool) -> None:
    """Every shared fixture reaches the GA4 emulator as the goldens say, with real clocks.

    The fixtures are 2021-2024 events and GA4 takes events of the last 72 hours only; the sink
    (sinks/ga4.py) refuses older ones and the emulator drops them, as GA4 does. Neither is made
    more lenient and no clock is injected: a test clock for both would have to move to each
    event's time (the fixtures span years), i.e. be derived from what is being validated. Instead
    each fixture is re-timed before the ingest: all its timestamps (ISO 8601, seconds or ms as
    the shape has them) moved by one whole-second shift, so that its earliest event is an hour
    ago or a little more (each fixture ten minutes before the previous one: no two fixtures share
    a time, and a batch keeps its spacing); no other byte of the body changes (checked), and the
    webhooks are signed anew over the new bytes. The expectation is the golden requests
    (tests/golden/ga4/, made by tests/unit/test_sink_ga4.py::test_golden_requests at each event's
    own time) with ``timestamp_micros`` moved by exactly that fixture's shift and every other
    field equal, the URL's query and the headers included.

    GA4 has no idempotency key and the sink may merge events of one client that agree on the
    request-level fields into one request, so requests are compared event by event: each 2xx
    request to /mp/collect split into one-event bodies, counted. The counts must match exactly
    (nothing missing, nothing extra, no duplicate), and the emulator must have dropped nothing.
    """
    emulator = ga4_emulator.Ga4Emulator(
        api_secrets={GA4_CONFIG["api_secret"]}, streams={GA4_CONFIG["measurement_id"]}
    )
    if faults:
        emulator.script.extend(
            [ga4_emulator.Fault(status=429, retry_after="1"), ga4_emulator.Fault(status=500)]
        )
    app = emulator.app()
    seen: list[tuple[str, dict[str, str], int]] = []  # URL, headers and status of each request

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        seen.append((request.raw_path, dict(request.headers), response.status))
        return response

    app.middlewares.append(record)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    settings = e2e_settings(broker)
    client = await aiohttp_client(create_app(settings))
    an_hour_ago = int(time.time()) - 3600
    paths = webhook_fixture_paths() + fixture_paths("track")
    fixtures = [retime(path, an_hour_ago - 600 * i) for i, path in enumerate(paths)]
    for fixture in fixtures:
        headers = {"Content-Type": "application/json"}
        if fixture.route == "/data/track":
            headers["x-pendo-integration-key"] = "e2e-key"
        else:
            headers["X-Pendo-Signature"] = sign(b"e2e", fixture.body)
        response = await client.post(fixture.route, data=fixture.body, headers=headers)
        assert response.status == 200, await response.text()

    expected: Counter[str] = Counter()
    golden_requests: list[dict[str, Any]] = []
    for fixture in fixtures:
        for request in json.loads(fixture.golden.read_text()):
            body = request["body"]
            body["timestamp_micros"] += fixture.shift_s * 1_000_000
            expected.update(one_event_requests(body))
            golden_requests.append(request)
    assert sum(expected.values()) == 10, "the goldens have ten GA4 events"
    assert len(expected) == 10, "re-timed, no two golden events are alike"

    def sent() -> list[int]:  # indexes of the requests /mp/collect accepted (2xx)
        return [
            i
            for i, r in enumerate(emulator.requests)
            if r.path == "/mp/collect" and 200 <= r.status < 300
        ]

    config = {**GA4_CONFIG, "endpoint": str(server.make_url("")).rstrip("/")}
    running = await start_sink(settings, "ga4", config)
    try:
        await wait_until(
            lambda: (
                sum(len(json.loads(emulator.requests[i].body)["events"]) for i in sent())
                >= sum(expected.values())
            ),
            60,
            "every golden GA4 event",
        )
        await asyncio.sleep(0.5)  # anything extra would arrive now
    finally:
        await running.close()
        await server.close()

    delivered: Counter[str] = Counter()
    for index in sent():
        delivered.update(one_event_requests(json.loads(emulator.requests[index].body)))
    assert delivered == expected  # every event once, each exactly as its golden request
    assert emulator.dropped == []  # nothing GA4 would have dropped behind its 204
    assert len(emulator.ledger) == sum(expected.values())
    # The URL and headers of every request are the goldens' (the api_secret masked there;
    # compared decoded: the HTTP client may normalise the quoting of the query).
    delivering = [(urlsplit(p), h) for p, h, status in seen if 200 <= status < 300]
    assert len(delivering) == len(sent())
    for url, headers in delivering:
        for golden in golden_requests:
            golden_url = urlsplit(golden["url"])
            assert url.path == golden_url.path
            query = {
                k: "***" if v == GA4_CONFIG["api_secret"] else v for k, v in parse_qsl(url.query)
            }
            assert query == dict(parse_qsl(golden_url.query))
            assert {name: headers.get(name) for name in golden["headers"]} == golden["headers"]
    statuses = [r.status for r in emulator.requests]
    if faults:
        assert statuses[:2] == [429, 500]  # the faults were met, and retried
    else:
        assert all(s == 204 for s in statuses)


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
    settings = e2e_settings(broker, retry_base_s=None)
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
