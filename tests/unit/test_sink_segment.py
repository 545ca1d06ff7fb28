"""The Segment sink (sinks/segment.py) and its emulator (tests/emulators/segment.py).

- prepare/build/classify: exact messages (built by segment-analytics-python), Basic auth,
  endpoints, dry run, limits, secrets;
- golden requests for every shared Pendo fixture (tests/golden/segment/);
- the emulator's limits, error answers and dedup (sinks.md §1);
- conformance: segment-analytics-python's real Client sends to the emulator, which accepts
  exactly what it sent (so the emulator is not stricter than Segment's own library);
- end to end: what the sink builds is accepted by the emulator over HTTP.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import json
import logging
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from segment.analytics import Client  # type: ignore[import-untyped]
from segment.analytics.request import APIError, post  # type: ignore[import-untyped]

from router.delivery.batching import Batcher
from router.delivery.sink import (
    Delivered,
    HttpRequest,
    HttpResponse,
    Pause,
    Prepared,
    Reject,
    Retry,
    Split,
    idempotency_key,
)
from router.events import Event
from router.rules.engine import Routed
from router.rules.loader import load_rules
from sinks import segment
from sinks.segment import LIMITS, MAX_BATCH_BYTES, SegmentSink, create
from tests.emulators.segment import Fault, SegmentEmulator
from tests.golden import ROOT, check_golden, fixture_events, golden_requests

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]
ServerFactory = Callable[..., Awaitable[TestServer]]

WRITE_KEY = "test-write-key"  # fake: the golden files show base64("test-write-key:")
CONFIG = {"write_key": WRITE_KEY}
BASIC = "Basic " + base64.b64encode(b"test-write-key:").decode()
LIBRARY = {"name": "analytics-python", "version": "2.4.0"}
EVENT_MS = 1705329000000  # 2024-01-15T14:30:00Z
KEY = idempotency_key("evt-1", "segment", "rule-1")


def event(**overrides: Any) -> Event:
    fields: dict[str, Any] = {
        "id": "evt-1",
        "source": "webhook",
        "type": "track.event",
        "name": "custom_feature_used",
        "visitor_id": "user_123",
        "account_id": "account_456",
        "timestamp": EVENT_MS,
        "received_at": EVENT_MS + 1500,
    }
    return Event(**{**fields, **overrides})


def routed(kind: str, **payload: Any) -> Routed:
    return Routed(rule_id="rule-1", kind=kind, payload=payload, ruleset="test")


def sink(**config: Any) -> SegmentSink:
    return create({**CONFIG, **config})


def body_of(prepared: Prepared) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(prepared.body)
    return decoded


def response(status: int, body: bytes = b"", **headers: str) -> HttpResponse:
    return HttpResponse(status, {k.replace("_", "-"): v for k, v in headers.items()}, body)


# ---- prepare ------------------------------------------------------------------------------


def test_track_is_the_librarys_message_with_our_id_and_the_event_time() -> None:
    output = routed("track", event="Pendo Guide Viewed", userId="user_123", properties={"a": 1})
    prepared = sink().prepare(output, KEY, event())
    assert prepared.key is None  # one batch group
    assert body_of(prepared) == {
        "integrations": {},
        "anonymousId": None,
        "properties": {"a": 1},
        "timestamp": "2024-01-15T14:30:00.000+00:00",
        "context": {"library": LIBRARY},
        "userId": "user_123",
        "type": "track",
        "event": "Pendo Guide Viewed",
        "messageId": KEY,
    }
    # Serialised as the library serialises it (json.dumps: its 32 KB measure is ours).
    assert prepared.body == json.dumps(body_of(prepared)).encode()


def test_identify_and_group_messages() -> None:
    identify = sink().prepare(
        routed("identify", userId="user_123", traits={"plan": "pro"}), KEY, event()
    )
    assert body_of(identify) == {
        "integrations": {},
        "anonymousId": None,
        "timestamp": "2024-01-15T14:30:00.000+00:00",
        "context": {"library": LIBRARY},
        "type": "identify",
        "userId": "user_123",
        "traits": {"plan": "pro"},
        "messageId": KEY,
    }
    group = sink().prepare(
        routed("group", groupId="account_456", userId="user_123", traits={}), KEY, event()
    )
    assert body_of(group) == {
        "integrations": {},
        "anonymousId": None,
        "timestamp": "2024-01-15T14:30:00.000+00:00",
        "groupId": "account_456",
        "context": {"library": LIBRARY},
        "userId": "user_123",
        "traits": {},
        "type": "group",
        "messageId": KEY,
    }


def test_context_integrations_and_anonymous_id_pass_through_without_mutating_the_output() -> None:
    context = {"ip": "203.0.113.7"}
    output = routed(
        "track",
        event="E",
        anonymousId="anon-1",
        context=context,
        integrations={"All": False, "Mixpanel": True},
    )
    message = body_of(sink().prepare(output, KEY, event()))
    assert message["anonymousId"] == "anon-1"
    assert message["userId"] is None
    assert message["context"] == {"ip": "203.0.113.7", "library": LIBRARY}
    assert message["integrations"] == {"All": False, "Mixpanel": True}
    assert context == {"ip": "203.0.113.7"}  # the rule output is dead-lettered as it was


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        (None, "2024-01-15T14:30:00.000+00:00"),  # the event time
        ("2024-01-16T09:12:00Z", "2024-01-16T09:12:00.000+00:00"),  # what the rule maps
        ("2024-01-16T10:12:00.123456+01:00", "2024-01-16T10:12:00.123+01:00"),
        ("2024-01-16T09:12:00", "2024-01-16T09:12:00.000+00:00"),  # naive = UTC
        (1705396320, "2024-01-16T09:12:00.000+00:00"),  # seconds
        (1705396320250, "2024-01-16T09:12:00.250+00:00"),  # milliseconds
        (datetime(2024, 1, 16, 9, 12, tzinfo=UTC), "2024-01-16T09:12:00.000+00:00"),
    ],
)
def test_timestamp(timestamp: Any, expected: str) -> None:
    payload: dict[str, Any] = {"event": "E", "userId": "u"}
    if timestamp is not None:
        payload["timestamp"] = timestamp
    message = body_of(sink().prepare(routed("track", **payload), KEY, event()))
    assert message["timestamp"] == expected


def test_event_time_keeps_milliseconds() -> None:
    message = body_of(
        sink().prepare(routed("track", event="E", userId="u"), KEY, event(timestamp=EVENT_MS + 7))
    )
    assert message["timestamp"] == "2024-01-15T14:30:00.007+00:00"


def test_calls_the_library_refuses_are_value_errors() -> None:
    with pytest.raises(ValueError, match="refuses"):
        sink().prepare(routed("track", event="E"), KEY, event())  # no user at all
    with pytest.raises(ValueError, match="no output kind"):
        sink().prepare(routed("page", userId="u"), KEY, event())
    with pytest.raises(ValueError, match="ISO 8601"):
        sink().prepare(routed("track", event="E", userId="u", timestamp="soon"), KEY, event())
    nan = routed("track", event="E", userId="u", properties={"score": float("nan")})
    with pytest.raises(ValueError, match="not encodable as JSON"):
        sink().prepare(nan, KEY, event())


def _padded(size: int) -> Prepared:
    """A track whose serialised message is exactly ``size`` bytes."""
    output = routed("track", event="E", userId="u", properties={"pad": ""})
    base = len(sink().prepare(output, KEY, event()).body)
    padded = routed("track", event="E", userId="u", properties={"pad": "x" * (size - base)})
    prepared = sink().prepare(padded, KEY, event())
    assert len(prepared.body) == size
    return prepared


def test_our_size_is_the_librarys_32kb_measure() -> None:
    assert LIMITS.max_event_bytes == 32 * 1024
    # At the limit the library builds it (no fallback), one byte more and it refuses: so the
    # delivery layer's too_large check (len(body) > max_event_bytes) is the library's check.
    at_limit = body_of(_padded(32 * 1024))
    client = Client("x", send=False)
    del at_limit["context"]["library"]
    client.track(
        user_id="u",
        event="E",
        properties=at_limit["properties"],
        message_id=KEY,
        timestamp=datetime(2024, 1, 15, 14, 30, tzinfo=UTC),
    )
    over = body_of(_padded(32 * 1024 + 1))
    with pytest.raises(RuntimeError) as info:
        client.track(
            user_id="u",
            event="E",
            properties=over["properties"],
            message_id=KEY,
            timestamp=datetime(2024, 1, 15, 14, 30, tzinfo=UTC),
        )
    assert info.value.args[0] == "Message exceeds %skb limit. (%s)"


def test_an_oversized_message_is_returned_whole_for_the_delivery_layer_to_dead_letter() -> None:
    big = {f"k{i}": "v" * 100 for i in range(400)}
    prepared = sink().prepare(routed("track", event="E", userId="u", properties=big), KEY, event())
    assert len(prepared.body) > LIMITS.max_event_bytes
    message = body_of(prepared)
    assert message["properties"] == big
    assert message["messageId"] == KEY
    assert message["context"] == {"library": LIBRARY}
    big_traits = {"t": "x" * 40_000}
    identify = sink().prepare(routed("identify", userId="u", traits=big_traits), KEY, event())
    assert body_of(identify)["traits"] == big_traits


# ---- build --------------------------------------------------------------------------------


def test_build_posts_one_batch_with_basic_auth() -> None:
    s = sink()
    items = [
        s.prepare(routed("track", event=f"E{i}", userId="u"), f"key-{i}", event()) for i in range(3)
    ]
    (request,) = s.build(items)
    assert request.method == "POST"
    assert request.url == "https://api.segment.io/v1/batch"
    assert request.headers == {
        "Content-Type": "application/json",
        "Authorization": BASIC,
        "User-Agent": "pendo-event-router analytics-python/2.4.0",
    }
    assert base64.b64decode(request.headers["Authorization"].split()[1]) == b"test-write-key:"
    assert request.items == (0, 1, 2)
    body = json.loads(request.body)
    assert list(body) == ["batch"]  # no writeKey in the body: the header authenticates
    assert [m["messageId"] for m in body["batch"]] == ["key-0", "key-1", "key-2"]
    assert [m["event"] for m in body["batch"]] == ["E0", "E1", "E2"]


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("https://events.eu1.segmentapis.com", "https://events.eu1.segmentapis.com/v1/batch"),
        ("https://events.eu1.segmentapis.com/", "https://events.eu1.segmentapis.com/v1/batch"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/v1/batch"),
        ("https://proxy.example/segment", "https://proxy.example/segment/v1/batch"),
    ],
)
def test_endpoint_override(endpoint: str, url: str) -> None:
    s = sink(endpoint=endpoint)
    assert s.build([Prepared(b"{}")])[0].url == url
    health = s.health_request()
    assert health is not None
    assert health.url == url


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"endpoint": "api.segment.io"}, "not an http"),
        ({"endpoint": "ftp://api.segment.io"}, "not an http"),
        ({"endpoint": "https://api.segment.io/v1/batch"}, "host only"),
        ({"endpoint": "https://api.segment.io?x=1"}, "query"),
        ({"writekey": "abc"}, "unknown field"),
        ({"write_key": ""}, "empty"),
        ({"write_key": 42}, "Expected"),
    ],
)
def test_bad_settings_are_value_errors(config: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        create(config)


def test_write_key_from_env_and_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SEGMENT_WRITE_KEY", "env-key")
    from_env = create({"write_key": {"env": "SEGMENT_WRITE_KEY"}})
    assert from_env.build([Prepared(b"{}")])[0].headers["Authorization"] == (
        "Basic " + base64.b64encode(b"env-key:").decode()
    )
    path = tmp_path / "key"
    path.write_text("file-key\n")
    from_file = create({"write_key": {"file": str(path)}})
    assert base64.b64decode(from_file.build([])[0].headers["Authorization"][6:]) == b"file-key:"
    monkeypatch.delenv("SEGMENT_WRITE_KEY")
    with pytest.raises(ValueError, match="SEGMENT_WRITE_KEY is unset") as info:
        create({"write_key": {"env": "SEGMENT_WRITE_KEY"}})
    assert "env-key" not in str(info.value)


def test_no_write_key_is_a_dry_run() -> None:
    s = create({})
    assert s.dry_run is True
    assert s.endpoint == "https://api.segment.io"
    assert s.health_request() is None
    (request,) = s.build([s.prepare(routed("track", event="E", userId="u"), KEY, event())])
    assert "Authorization" not in request.headers
    assert sink().dry_run is False


def test_secrets_never_in_repr_logs_or_bodies(caplog: pytest.LogCaptureFixture) -> None:
    secret = "sk-very-secret-write-key"
    caplog.set_level(logging.DEBUG)
    s = create({"write_key": secret})
    prepared = s.prepare(routed("track", event="E", userId="u"), KEY, event())
    (request,) = s.build([prepared])
    s.classify(request, response(401, b'{"code":"unauthorized"}'))
    encoded = base64.b64encode(f"{secret}:".encode()).decode()
    for text in (repr(s), str(s), caplog.text, request.body.decode(), repr(s._client.__dict__)):
        assert secret not in text
        assert encoded not in text
    assert repr(s) == "SegmentSink(endpoint='https://api.segment.io', dry_run=False)"


def test_limits_fill_a_batch_up_to_500kb_and_2500_messages() -> None:
    assert LIMITS.max_events == 2500
    s = sink()
    item = _padded(1000)
    batcher: Batcher[Prepared] = Batcher(
        LIMITS.max_events, LIMITS.max_bytes, LIMITS.linger_s, LIMITS.per_item_overhead
    )
    closed: list[list[Prepared]] = []
    while not closed:
        closed = batcher.add(item, len(item.body), item.key, 0.0)
    (request,) = s.build(closed[0])
    assert len(request.body) <= MAX_BATCH_BYTES
    assert len(request.body) + 1 + len(item.body) > MAX_BATCH_BYTES  # one more would not fit
    # The smallest real message is ~290 bytes, so bytes close a batch before 2,500 messages;
    # the count still caps it (tiny items stand in for what no rule can produce).
    smallest = s.prepare(routed("track", event="E", userId="u"), KEY, event())
    assert len(smallest.body) * LIMITS.max_events > LIMITS.max_bytes
    tiny = Prepared(b"{}")
    batcher = Batcher(LIMITS.max_events, LIMITS.max_bytes, LIMITS.linger_s)
    closed = []
    while not closed:
        closed = batcher.add(tiny, len(tiny.body), None, 0.0)
    assert len(closed[0]) == 2500
    # The largest possible single message fits a request.
    assert batcher.fits_alone(LIMITS.max_event_bytes)


# ---- classify -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, Delivered),
        (202, Delivered),
        (400, Reject),
        (422, Reject),
        (501, Reject),
        (401, Pause),
        (403, Pause),
        (404, Pause),
        (301, Pause),
        (307, Pause),
        (413, Split),
        (408, Retry),
        (429, Retry),
        (500, Retry),
        (503, Retry),
    ],
)
def test_classify(status: int, expected: type) -> None:
    request = HttpRequest("POST", "https://api.segment.io/v1/batch", {}, b"{}", (0,))
    outcome = sink().classify(request, response(status, b'{"code":"x","message":"y"}'))
    assert isinstance(outcome, expected)


def test_classify_keeps_retry_after_and_the_answer() -> None:
    request = HttpRequest("POST", "https://api.segment.io/v1/batch", {}, b"{}", (0,))
    outcome = sink().classify(request, response(429, b"slow down", retry_after="7"))
    assert outcome == Retry("HTTP 429: slow down", 7.0)
    reject = sink().classify(request, response(400, b'{"code":"invalid_json"}'))
    assert reject == Reject('HTTP 400: {"code":"invalid_json"}')
    pause = sink().classify(request, response(404, b"not found"))
    assert isinstance(pause, Pause)
    assert "sinks.segment.endpoint" in pause.reason


# ---- golden -------------------------------------------------------------------------------


def test_golden_requests() -> None:
    check_golden("segment", golden_requests(sink(), CONFIG))


def test_module_exports_the_factory_and_outputs() -> None:
    assert segment.OUTPUTS.sink == "segment"
    assert set(segment.OUTPUTS.kinds) == {"track", "identify", "group"}
    assert isinstance(segment.create(CONFIG), SegmentSink)


def test_importing_the_sinks_does_not_import_the_library() -> None:
    # Every router process imports sinks (for OUTPUTS); only a Segment consumer needs the library.
    code = "import sys, sinks; assert 'segment.analytics' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


# ---- the emulator -------------------------------------------------------------------------


@pytest.fixture
def emulator() -> SegmentEmulator:
    return SegmentEmulator()


@pytest.fixture
async def api(aiohttp_client: ClientFactory, emulator: SegmentEmulator) -> TestClient[Any, Any]:
    return await aiohttp_client(emulator.app())


def track(i: int = 0, **fields: Any) -> dict[str, Any]:
    return {"type": "track", "userId": "u", "event": "E", "messageId": f"m-{i}", **fields}


async def post_batch(
    api: TestClient[Any, Any], batch: list[Any], auth: str | None = BASIC, **top: Any
) -> tuple[int, Any]:
    headers = {"Authorization": auth} if auth else {}
    async with api.post("/v1/batch", json={"batch": batch, **top}, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_emulator_accepts_a_valid_batch(
    api: TestClient[Any, Any], emulator: SegmentEmulator
) -> None:
    status, answer = await post_batch(api, [track(0), track(1)])
    assert (status, answer) == (200, {"success": True})
    assert [m["messageId"] for m in emulator.messages()] == ["m-0", "m-1"]
    assert {entry.write_key for entry in emulator.ledger.values()} == {WRITE_KEY}


async def test_emulator_write_key_in_body_or_basic(
    api: TestClient[Any, Any], emulator: SegmentEmulator
) -> None:
    assert (await post_batch(api, [track(0)], auth=None, writeKey="body-key"))[0] == 200
    assert emulator.ledger["m-0"].write_key == "body-key"
    # No key at all: 200, as Segment answers everything but size and JSON errors; not accepted.
    assert (await post_batch(api, [track(1)], auth=None))[0] == 200
    no_password_colon = "Basic " + base64.b64encode(b"key-without-colon").decode()
    assert (await post_batch(api, [track(2)], auth=no_password_colon))[0] == 200
    assert list(emulator.ledger) == ["m-0"]
    assert [reason for reason, _ in emulator.dropped] == ["no_write_key", "no_write_key"]


async def test_emulator_unknown_write_key_is_dropped(aiohttp_client: ClientFactory) -> None:
    emulator = SegmentEmulator(write_keys={WRITE_KEY})
    api = await aiohttp_client(emulator.app())
    other = "Basic " + base64.b64encode(b"other:").decode()
    assert (await post_batch(api, [track(0)], auth=other))[0] == 200
    assert emulator.ledger == {}
    assert emulator.dropped[0][0] == "invalid_write_key"


async def test_emulator_drops_invalid_messages_and_keeps_the_rest(
    api: TestClient[Any, Any], emulator: SegmentEmulator
) -> None:
    batch = [
        track(0),
        {"userId": "u", "event": "E", "messageId": "m-1"},  # no type
        track(2, userId=None),  # no_user_anon_id
        track(3, userId="", anonymousId=""),
        track(4, userId=None, anonymousId="anon"),  # fine
        track(5, event=None),
        {"type": "group", "userId": "u", "messageId": "m-6"},  # no groupId
        {"type": "identify", "userId": "u", "messageId": "x" * 100},
        {"type": "identify", "userId": "u", "messageId": "y" * 99},
        track(9, timestamp="yesterday"),
        track(10, timestamp="2024-01-15T14:30:00.000Z"),
        {"type": "purchase", "userId": "u", "messageId": "m-11"},
        "not an object",
    ]
    status, _ = await post_batch(api, batch)
    assert status == 200
    assert list(emulator.ledger) == ["m-0", "m-4", "y" * 99, "m-10"]
    assert [reason for reason, _ in emulator.dropped] == [
        "missing_type",
        "no_user_anon_id",
        "no_user_anon_id",
        "missing_event",
        "missing_group_id",
        "invalid_message_id",
        "invalid_timestamp",
        "invalid_type",
        "invalid_message",
    ]


async def test_emulator_merges_top_level_context_and_assigns_missing_ids(
    api: TestClient[Any, Any], emulator: SegmentEmulator
) -> None:
    batch = [
        {"type": "track", "userId": "u", "event": "E", "context": {"ip": "own"}},
        track(1),
    ]
    await post_batch(api, batch, context={"ip": "top", "locale": "fr"}, integrations={"All": True})
    first, second = emulator.messages()
    assert first["context"] == {"ip": "own", "locale": "fr"}
    assert second["context"] == {"ip": "top", "locale": "fr"}
    assert second["integrations"] == {"All": True}
    assert len(first["messageId"]) == 36


async def test_emulator_400s(api: TestClient[Any, Any], emulator: SegmentEmulator) -> None:
    async def raw(body: bytes, content_type: str = "application/json") -> tuple[int, Any]:
        headers = {"Authorization": BASIC, "Content-Type": content_type}
        async with api.post("/v1/batch", data=body, headers=headers) as resp:
            return resp.status, await resp.json()

    assert await raw(b"{not json") == (
        400,
        {"code": "invalid_json", "message": "the body is not valid JSON"},
    )
    assert (await raw(b"[]"))[0] == 400
    nan = b'{"batch": [{"type": "track", "userId": "u", "event": "E", "n": NaN}]}'
    assert (await raw(nan))[0] == 400
    assert (await raw(b'{"batch": {}}'))[0] == 400
    assert (await raw(b'{"batch": []}', "text/plain"))[0] == 400
    # One message over 32 KB: the whole request is refused, the valid message too.
    over = track(1, properties={"pad": "x" * (32 * 1024)})
    status, answer = await post_batch(api, [track(0), over])
    assert status == 400
    assert answer["code"] == "message_too_large"
    # Exactly 32 KB (the library's json.dumps measure) is fine.
    exact = track(2, properties={"pad": ""})
    exact["properties"]["pad"] = "x" * (32 * 1024 - len(json.dumps(exact)))
    assert len(json.dumps(exact)) == 32 * 1024
    assert (await post_batch(api, [exact]))[0] == 200
    # Over 500 KB of body: 400, nothing accepted.
    many = [track(10 + i, properties={"pad": "x" * 30_000}) for i in range(17)]
    status, answer = await post_batch(api, many)
    assert (status, answer["code"]) == (400, "request_too_large")
    assert list(emulator.ledger) == ["m-2"]


async def test_emulator_takes_2500_messages_and_drops_the_excess_with_a_200(
    api: TestClient[Any, Any], emulator: SegmentEmulator
) -> None:
    status, _ = await post_batch(api, [track(i) for i in range(2501)])
    assert status == 200
    assert len(emulator.ledger) == 2500
    assert [(reason, m["messageId"]) for reason, m in emulator.dropped] == [
        ("too_many_events", "m-2500")
    ]


async def test_emulator_dedups_on_message_id_only(
    api: TestClient[Any, Any], emulator: SegmentEmulator
) -> None:
    assert (await post_batch(api, [track(0)]))[0] == 200
    other_key = "Basic " + base64.b64encode(b"another-source:").decode()
    assert (await post_batch(api, [track(0, event="Different")], auth=other_key))[0] == 200
    assert (await post_batch(api, [track(0), track(1)]))[0] == 200
    assert list(emulator.ledger) == ["m-0", "m-1"]
    assert emulator.ledger["m-0"].message["event"] == "E"  # the first copy is kept
    assert emulator.duplicates == ["m-0", "m-0"]


async def test_emulator_single_call_endpoints(
    api: TestClient[Any, Any], emulator: SegmentEmulator
) -> None:
    body = {"userId": "u", "event": "E", "messageId": "single", "writeKey": WRITE_KEY}
    async with api.post("/v1/track", json=body) as resp:
        assert resp.status == 200
    assert emulator.ledger["single"].message["type"] == "track"
    big = {**body, "messageId": "big", "properties": {"pad": "x" * 33_000}}
    async with api.post("/v1/track", json=big) as resp:
        assert resp.status == 400


async def test_emulator_scripted_faults(
    api: TestClient[Any, Any], emulator: SegmentEmulator
) -> None:
    emulator.script = [Fault(429, retry_after="3"), Fault(503)]
    async with api.post(
        "/v1/batch", json={"batch": [track(0)]}, headers={"Authorization": BASIC}
    ) as r:
        assert r.status == 429
        assert r.headers["Retry-After"] == "3"
        assert r.headers["X-RateLimit-Reset"] == "3"
    assert (await post_batch(api, [track(0)]))[0] == 503
    assert emulator.ledger == {}
    assert (await post_batch(api, [track(0)]))[0] == 200
    assert [r.status for r in emulator.requests] == [429, 503, 200]


# ---- conformance: Segment's own library against the emulator -------------------------------


@pytest.fixture
def library_clients() -> Iterator[list[Client]]:
    clients: list[Client] = []
    yield clients
    for client in clients:
        atexit.unregister(client.join)
        if client.consumers:
            client.join()


def _stamp() -> datetime:
    return datetime(2024, 1, 15, 14, 30, 0, 123000, tzinfo=UTC)


@pytest.mark.parametrize("gzip", [False, True])
async def test_library_sync_mode_is_accepted_exactly(
    aiohttp_server: ServerFactory, library_clients: list[Client], gzip: bool
) -> None:
    emulator = SegmentEmulator(write_keys={WRITE_KEY})
    server = await aiohttp_server(emulator.app())
    host = str(server.make_url("")).rstrip("/")
    client = Client(WRITE_KEY, host=host, send=True, sync_mode=True, gzip=gzip)
    library_clients.append(client)

    def calls() -> list[dict[str, Any]]:
        sent = [
            client.track(
                user_id="user_123",
                event="Pendo Guide Viewed",
                properties={"guide_id": "ABC123", "é": "ü"},
                timestamp=_stamp(),
                message_id="m-track",
            ),
            client.identify(user_id="user_123", traits={"plan": "pro"}, message_id="m-id"),
            client.group(user_id="user_123", group_id="account_456", traits={"n": 1}),
            client.page(anonymous_id="anon-1", name="Home"),
            client.screen(user_id="user_123", name="Main"),
            client.alias(previous_id="anon-1", user_id="user_123"),
        ]
        return [message for ok, message in sent if ok]

    sent = await asyncio.to_thread(calls)
    assert len(sent) == 6
    assert emulator.messages() == sent
    assert emulator.dropped == []
    for request in emulator.requests:
        assert request.headers["Authorization"] == BASIC
        assert request.body["writeKey"] == WRITE_KEY
        assert set(request.body) == {"batch", "sentAt", "writeKey"}
        assert request.headers.get("Content-Encoding") == ("gzip" if gzip else None)


async def test_library_background_mode_batches_are_accepted(
    aiohttp_server: ServerFactory, library_clients: list[Client]
) -> None:
    emulator = SegmentEmulator()
    server = await aiohttp_server(emulator.app())
    host = str(server.make_url(""))
    client = Client(WRITE_KEY, host=host, upload_interval=0.05, upload_size=10)
    library_clients.append(client)

    def calls() -> list[dict[str, Any]]:
        sent = [client.track(user_id=f"u{i}", event="E", properties={"i": i}) for i in range(25)]
        client.flush()
        return [message for _, message in sent]

    sent = await asyncio.to_thread(calls)
    assert emulator.messages() == sent
    assert all(len(r.body["batch"]) <= 10 for r in emulator.requests)
    # Sending the same messages again (a retry) does not count them twice.
    await asyncio.to_thread(lambda: post(WRITE_KEY, host, batch=sent[:5]))
    assert len(emulator.ledger) == 25
    assert len(emulator.duplicates) == 5


async def test_library_parses_the_emulators_error_body(aiohttp_server: ServerFactory) -> None:
    emulator = SegmentEmulator()
    server = await aiohttp_server(emulator.app())
    host = str(server.make_url(""))
    batch = [
        {"type": "track", "userId": "u", "event": "E", "properties": {"pad": "x" * 30_000}}
        for _ in range(17)
    ]
    with pytest.raises(APIError) as info:
        await asyncio.to_thread(lambda: post(WRITE_KEY, host, batch=batch))
    assert (info.value.status, info.value.code) == (400, "request_too_large")
    emulator.script = [Fault(429, retry_after="1")]
    with pytest.raises(APIError) as info:
        await asyncio.to_thread(lambda: post(WRITE_KEY, host, batch=batch[:1]))
    assert (info.value.status, info.value.code) == (429, "injected")


# ---- end to end: the sink's requests against the emulator over HTTP ------------------------


async def send(request: HttpRequest) -> HttpResponse:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            request.method, request.url, headers=dict(request.headers), data=request.body
        ) as resp,
    ):
        headers = {k.lower(): v for k, v in resp.headers.items()}
        return HttpResponse(resp.status, headers, await resp.read())


def fixture_items(s: SegmentSink) -> list[Prepared]:
    ruleset = load_rules(ROOT / "rules" / "segment.yaml").ruleset
    assert ruleset is not None
    items = []
    for events in fixture_events().values():
        for ev in events:
            for output in ruleset.evaluate(ev):
                assert isinstance(output, Routed)
                items.append(s.prepare(output, idempotency_key(ev.id, s.name, output.rule_id), ev))
    return items


async def test_sink_requests_are_accepted_end_to_end(aiohttp_server: ServerFactory) -> None:
    emulator = SegmentEmulator(write_keys={WRITE_KEY})
    server = await aiohttp_server(emulator.app())
    s = sink(endpoint=str(server.make_url("")))
    items = fixture_items(s)  # the shared fixtures through rules/segment.yaml: all tracks
    assert len(items) == 14
    items.append(s.prepare(routed("identify", userId="user_123", traits={"p": 1}), "i", event()))
    group = routed("group", userId="user_123", groupId="account_456", traits={})
    items.append(s.prepare(group, "g", event()))
    (request,) = s.build(items)
    outcome = s.classify(request, await send(request))
    assert outcome == Delivered()
    assert emulator.dropped == []
    assert emulator.messages() == [json.loads(item.body) for item in items]
    assert {m["type"] for m in emulator.messages()} == {"track", "identify", "group"}
    # A replay (same idempotency keys) is answered 200 and not counted twice.
    (again,) = s.build(items)
    assert s.classify(again, await send(again)) == Delivered()
    assert len(emulator.ledger) == len(items)
    assert len(emulator.duplicates) == len(items)
    health = s.health_request()
    assert health is not None
    assert s.classify(health, await send(health)) == Delivered()


async def test_sink_full_batches_are_accepted_end_to_end(aiohttp_server: ServerFactory) -> None:
    emulator = SegmentEmulator()
    server = await aiohttp_server(emulator.app())
    s = sink(endpoint=str(server.make_url("")))
    template = _padded(LIMITS.max_event_bytes)  # the largest message the limits let through
    batcher: Batcher[Prepared] = Batcher(
        LIMITS.max_events, LIMITS.max_bytes, LIMITS.linger_s, LIMITS.per_item_overhead
    )
    closed: list[list[Prepared]] = []
    i = 0
    while not closed:
        message = body_of(template)
        message["messageId"] = f"{i:036d}"
        item = Prepared(json.dumps(message).encode())
        closed = batcher.add(item, len(item.body), None, 0.0)
        i += 1
    (request,) = s.build(closed[0])
    assert s.classify(request, await send(request)) == Delivered()
    assert len(emulator.ledger) == len(closed[0]) == 15


async def test_sink_outcomes_from_emulator_answers(aiohttp_server: ServerFactory) -> None:
    emulator = SegmentEmulator()
    server = await aiohttp_server(emulator.app())
    s = sink(endpoint=str(server.make_url("")))
    good = s.prepare(routed("track", event="E", userId="u"), KEY, event())
    big = s.prepare(
        routed("track", event="E", userId="u", properties={"p": "x" * 40_000}), "big", event()
    )
    # Were an oversized message sent anyway, Segment refuses the whole request: a reject.
    (request,) = s.build([good, big])
    outcome = s.classify(request, await send(request))
    assert isinstance(outcome, Reject)
    assert "message_too_large" in outcome.reason
    emulator.script = [Fault(429, retry_after="2"), Fault(500)]
    (request,) = s.build([good])
    assert s.classify(request, await send(request)) == Retry(
        'HTTP 429: {"code": "injected", "message": "injected fault 429"}', 2.0
    )
    assert isinstance(s.classify(request, await send(request)), Retry)
    assert s.classify(request, await send(request)) == Delivered()
    assert list(emulator.ledger) == [KEY]
    wrong = sink(endpoint=str(server.make_url("/nope")))
    (request,) = wrong.build([good])
    assert isinstance(wrong.classify(request, await send(request)), Pause)


def test_a_timestamp_out_of_range_is_refused_not_raised_past_the_consumer() -> None:
    # An OverflowError escaped prepare here and stopped the consumer on the event for good.
    with pytest.raises(ValueError, match=r"timestamp: .* out of the date-time range"):
        sink().prepare(routed("track", event="E", userId="u", timestamp=10**20), KEY, event())
