"""The Amplitude sink: prepare/build/classify, golden requests, and the emulator it is tested on.

The emulator (tests/emulators/amplitude.py) follows shared/contracts/sinks.md §4; the official
SDK (amplitude-analytics) sending to it checks the emulator accepts real client traffic, and our
own built requests are sent to it over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

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
    Split,
    idempotency_key,
    sink_secrets,
)
from router.dlq import Redactor
from router.events import Event
from router.rules.engine import Routed
from router.sink_runner import secret_values
from sinks import amplitude
from sinks.amplitude import (
    BATCH_LIMITS,
    ENVELOPE_RESERVE,
    LIMITS,
    THROTTLE_PAUSE_S,
    AmplitudeSink,
    create,
)
from tests.emulators.amplitude import AmplitudeEmulator, Fault
from tests.golden import check_golden, fixture_events, golden_requests

API_KEY = "test-amplitude-api-key"
CONFIG = {"api_key": API_KEY}


def event(**overrides: Any) -> Event:
    fields: dict[str, Any] = {
        "id": "evt-1",
        "source": "track",
        "type": "track.event",
        "name": "Report Exported",
        "visitor_id": "user_123",
        "timestamp": 1_700_000_000_123,
        "received_at": 1_700_000_001_000,
    }
    fields.update(overrides)
    return Event(**fields)


def routed(**payload: Any) -> Routed:
    base: dict[str, Any] = {"event_type": "Report Exported", "user_id": "user_123"}
    base.update(payload)
    return Routed("track-events", "event", {k: v for k, v in base.items() if v is not None}, "h")


def prepared(sink: AmplitudeSink, n: int, **payload: Any) -> list[Prepared]:
    return [
        sink.prepare(routed(**payload), idempotency_key(f"evt-{i}", "amplitude", "r"), event())
        for i in range(n)
    ]


def body_of(request: HttpRequest) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(request.body)
    return decoded


def response(status: int, body: Any) -> HttpResponse:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return HttpResponse(status, {"content-type": "application/json"}, raw)


# ---- settings and create ------------------------------------------------------------------------


def test_defaults_v2_us_endpoint_and_limits() -> None:
    sink = create(CONFIG)
    assert sink.url == "https://api2.amplitude.com/2/httpapi"
    assert sink.limits is LIMITS
    assert not sink.dry_run
    assert LIMITS.max_events < 2000
    assert LIMITS.max_bytes + ENVELOPE_RESERVE < 1_000_000


def test_batch_api_and_eu_endpoint() -> None:
    sink = create({**CONFIG, "endpoint": "https://api.eu.amplitude.com/", "use_batch_api": True})
    assert sink.url == "https://api.eu.amplitude.com/batch"
    assert sink.limits is BATCH_LIMITS
    assert BATCH_LIMITS.max_events == 2000


def test_no_api_key_is_a_dry_run() -> None:
    sink = create({})
    assert sink.dry_run
    body = body_of(sink.build(prepared(sink, 1))[0])
    assert body["api_key"] == ""


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"api_key": API_KEY, "apikey": "x"}, "sinks.amplitude"),
        ({"api_key": API_KEY, "use_batch_api": "yes"}, "use_batch_api"),
        ({"api_key": ""}, "api_key: secret is empty"),
        ({"api_key": {"env": "AMPLITUDE_TEST_UNSET_VAR"}}, "AMPLITUDE_TEST_UNSET_VAR is unset"),
        ({"api_key": API_KEY, "min_id_length": 0}, "min_id_length"),
        ({"api_key": API_KEY, "endpoint": "api2.amplitude.com"}, "endpoint"),
    ],
)
def test_bad_settings_name_the_setting_never_the_key(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        create(config)
    assert API_KEY not in str(info.value)


def test_api_key_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMP_KEY_FOR_TEST", "key-from-env")
    sink = create({"api_key": {"env": "AMP_KEY_FOR_TEST"}})
    assert body_of(sink.build(prepared(sink, 1))[0])["api_key"] == "key-from-env"
    path = tmp_path / "key"
    path.write_text("key-from-file\n")
    sink = create({"api_key": {"file": str(path)}})
    assert body_of(sink.build(prepared(sink, 1))[0])["api_key"] == "key-from-file"


def test_the_key_is_in_no_repr() -> None:
    sink = create(CONFIG)
    assert API_KEY not in repr(sink)
    assert API_KEY not in repr(sink.settings)
    assert API_KEY not in repr(vars(sink))


def test_secrets_give_the_redactor_the_resolved_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMP_KEY_FOR_SECRETS_TEST", 'env-key-"quoted"')
    sink = create({"api_key": {"env": "AMP_KEY_FOR_SECRETS_TEST"}})
    assert sink_secrets(sink) == ['env-key-"quoted"', 'env-key-\\"quoted\\"']
    (request,) = sink.build(prepared(sink, 1))
    redact = Redactor(sink_secrets(sink))
    assert "env-key" not in redact(request.body.decode())
    assert sink_secrets(create({})) == []


def test_health_request_is_none() -> None:
    assert create(CONFIG).health_request() is None


# ---- prepare ------------------------------------------------------------------------------------


def test_prepare_sets_insert_id_and_time_in_ms() -> None:
    sink = create(CONFIG)
    key = idempotency_key("evt-1", "amplitude", "track-events")
    item = sink.prepare(routed(time=1_705_402_800_000), key, event())
    assert item.key is None
    assert json.loads(item.body) == {
        "event_type": "Report Exported",
        "user_id": "user_123",
        "time": 1_705_402_800_000,
        "insert_id": key,
    }
    assert API_KEY.encode() not in item.body


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, 1_700_000_000_123),  # no time in the output: the event's own time
        (1_705_402_800_000, 1_705_402_800_000),
        (1_705_402_800, 1_705_402_800_000),  # seconds
        (1_705_402_800.5, 1_705_402_800_500),
        ("2024-01-16T11:00:00Z", 1_705_402_800_000),
        (datetime(2024, 1, 16, 11, tzinfo=UTC), 1_705_402_800_000),
        (datetime(2024, 1, 16, 11, 0, 0, 999_999, tzinfo=UTC), 1_705_402_800_999),
        ("2024-01-16T12:00:00.123+01:00", 1_705_402_800_123),
    ],
)
def test_time_is_integer_milliseconds(value: Any, expected: int) -> None:
    item = create(CONFIG).prepare(routed(time=value), "k" * 36, event())
    assert json.loads(item.body)["time"] == expected


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"user_id": "null"}, "user_id: 'null' is an id Amplitude rejects"),
        ({"user_id": "Anonymous"}, "rejects"),
        ({"user_id": None, "device_id": "00000000-0000-0000-0000-000000000000"}, "rejects"),
        ({"user_id": None, "device_id": "0000000"}, "rejects"),
        ({"user_id": "u42"}, "shorter than the 5-character minimum"),
        ({"user_id": None}, "user_id or device_id: required"),
        ({"event_type": ""}, "event_type: required"),
        ({"time": True}, "time"),
        ({"time": -5}, "time"),
        ({"time": float("nan")}, "time"),
        ({"time": 10**30}, "time: .* out of the date-time range"),
        ({"time": "yesterday"}, "time: 'yesterday'"),
        ({"time": "1969-12-31T00:00:00Z"}, "before 1970"),
    ],
)
def test_prepare_refuses_what_amplitude_would_refuse(payload: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create(CONFIG).prepare(routed(**payload), "k" * 36, event())


def test_min_id_length_option() -> None:
    sink = create({**CONFIG, "min_id_length": 3})
    item = sink.prepare(routed(user_id="u42"), "k" * 36, event())
    assert json.loads(item.body)["user_id"] == "u42"
    assert body_of(sink.build([item])[0])["options"] == {"min_id_length": 3}
    with pytest.raises(ValueError, match="3-character"):
        sink.prepare(routed(user_id="ab"), "k" * 36, event())


# ---- build --------------------------------------------------------------------------------------


def test_build_one_post_with_key_events_and_options() -> None:
    sink = create(CONFIG)
    items = prepared(sink, 3)
    (request,) = sink.build(items)
    assert request.method == "POST"
    assert request.url == "https://api2.amplitude.com/2/httpapi"
    assert request.headers["Content-Type"] == "application/json"
    assert "Authorization" not in request.headers
    assert request.items == (0, 1, 2)
    body = body_of(request)
    assert list(body) == ["api_key", "events", "options"]
    assert body["api_key"] == API_KEY
    assert body["options"] == {"min_id_length": 5}
    assert [e["insert_id"] for e in body["events"]] == [
        json.loads(i.body)["insert_id"] for i in items
    ]


def test_a_full_batch_stays_within_the_request_limit() -> None:
    sink = create({**CONFIG, "api_key": "k" * 200})
    big = "x" * 900
    one = sink.prepare(routed(event_properties={"p": big}), "k" * 36, event())
    count = min(LIMITS.max_events, LIMITS.max_bytes // (len(one.body) + LIMITS.per_item_overhead))
    (request,) = sink.build([one] * count)
    assert len(request.body) < 1_000_000


# ---- classify (hand-written bodies in the contract's shapes) -----------------------------------


def classify(body: Any, status: int, n: int = 4, sink: AmplitudeSink | None = None) -> Outcome:
    sink = sink or create(CONFIG)
    items = prepared(sink, n)
    users = [f"user_{i:03d}" for i in range(n)]
    events = [dict(json.loads(i.body), user_id=u) for i, u in zip(items, users, strict=True)]
    items = [Prepared(json.dumps(e).encode()) for e in events]
    (request,) = sink.build(items)
    return sink.classify(request, response(status, body))


def test_200_is_delivered() -> None:
    body = {"code": 200, "events_ingested": 4, "payload_size_bytes": 50, "server_upload_time": 1}
    assert classify(body, 200) == Delivered()


def test_400_missing_field_at_request_level_rejects_all() -> None:
    body = {
        "code": 400,
        "error": "Request missing required field",
        "missing_field": "api_key",
        "events_with_missing_fields": {"event_type": [3]},
    }
    outcome = classify(body, 400)
    assert isinstance(outcome, Reject)
    assert "api_key" in outcome.reason


def test_400_invalid_and_missing_fields_reject_those_and_retry_the_others_at_once() -> None:
    body = {
        "code": 400,
        "error": "Invalid field values on some events",
        "events_with_invalid_fields": {"time": [1], "user_id": [3]},
        "events_with_missing_fields": {"event_type": [3]},
    }
    outcome = classify(body, 400)
    assert isinstance(outcome, Partial)
    assert set(outcome.rejected) == {1, 3}
    assert "invalid field time" in outcome.rejected[1]
    assert "invalid field user_id" in outcome.rejected[3]
    assert "missing field event_type" in outcome.rejected[3]
    assert outcome.retry == (0, 2)
    assert outcome.after_s == 0


def test_400_invalid_id_lengths_as_the_sdk_reads_them() -> None:
    body = {
        "code": 400,
        "error": "Invalid id length",
        "events_with_invalid_id_lengths": {"device_id": [0]},
    }
    outcome = classify(body, 400, n=2)
    assert isinstance(outcome, Partial)
    assert set(outcome.rejected) == {0}
    assert outcome.retry == (1,)


def test_400_silenced_devices() -> None:
    body = {
        "code": 400,
        "error": "Events silenced for device_id",
        "eps_threshold": 100,
        "exceeded_daily_quota_devices": {},
        "silenced_devices": ["dev-1"],
        "silenced_events": [5, 6],
        "throttled_devices": {"dev-2": 120},
        "throttled_events": [3, 4],
    }
    outcome = classify(body, 400, n=8)
    assert isinstance(outcome, Partial)
    assert set(outcome.rejected) == {5, 6}
    assert "device silenced" in outcome.rejected[5]
    assert outcome.retry == (0, 1, 2, 3, 4, 7)
    # Throttled events among the re-sent: wait the throttle pause rather than re-trigger it.
    assert outcome.after_s == THROTTLE_PAUSE_S


def test_400_naming_no_event_rejects_the_request() -> None:
    outcome = classify({"code": 400, "error": "Invalid JSON request body"}, 400)
    assert isinstance(outcome, Reject)
    assert isinstance(classify(b"<html>bad request</html>", 400), Reject)


def test_400_indexes_out_of_range_are_ignored() -> None:
    body = {"code": 400, "error": "x", "events_with_invalid_fields": {"time": [0, 99, -1]}}
    outcome = classify(body, 400, n=2)
    assert isinstance(outcome, Partial)
    assert set(outcome.rejected) == {0}
    assert outcome.retry == (1,)


def test_invalid_api_key_pauses_and_the_reason_never_shows_the_key() -> None:
    outcome = classify({"code": 400, "error": f"Invalid API key: {API_KEY}"}, 400)
    assert isinstance(outcome, Pause)
    assert API_KEY not in outcome.reason
    assert "***" in outcome.reason


@pytest.mark.parametrize("status", [401, 403])
def test_401_403_pause(status: int) -> None:
    assert isinstance(classify({"code": status, "error": "Forbidden"}, status), Pause)


def test_413_splits() -> None:
    assert isinstance(classify({"code": 413, "error": "Payload too large"}, 413), Split)


def test_429_throttled_events_retried_after_30_s_others_with_them() -> None:
    body = {
        "code": 429,
        "error": "Too many requests for some devices and users",
        "eps_threshold": 30,
        "throttled_devices": {},
        "throttled_users": {"user_001": 31},
        "throttled_events": [1],
    }
    outcome = classify(body, 429)
    assert isinstance(outcome, Partial)
    assert outcome.rejected == {}
    assert outcome.retry == (0, 1, 2, 3)  # nothing of a 429 request was ingested
    assert outcome.after_s == THROTTLE_PAUSE_S


def test_429_daily_quota_events_are_held_never_rejected() -> None:
    body = {
        "code": 429,
        "error": "Too many requests for some devices and users",
        "eps_threshold": 1000,
        "throttled_devices": {},
        "throttled_users": {},
        "throttled_events": [2],
        "exceeded_daily_quota_users": {"user_002": 500_001},
        "exceeded_daily_quota_devices": {},
    }
    sink = create({**CONFIG, "quota_hold_s": 7200})
    # Mixed with other events: the over-quota one is held, the others go again at once.
    outcome = classify(body, 429, sink=sink)
    assert isinstance(outcome, Partial)
    assert outcome.rejected == {}
    assert (outcome.hold, outcome.hold_s) == ((2,), 7200)
    assert outcome.retry == (0, 1, 3)
    assert outcome.after_s == 0.0
    # Alone: held (never rejected), nothing else to re-send.
    alone = {**body, "throttled_events": [0], "exceeded_daily_quota_users": {"user_000": 1}}
    outcome = classify(alone, 429, n=1, sink=sink)
    assert isinstance(outcome, Partial)
    assert outcome.rejected == {}
    assert (outcome.hold, outcome.retry, outcome.hold_s) == ((0,), (), 7200)
    (request,) = sink.build(prepared(sink, 4))
    throttled, held = amplitude.throttle_groups(
        request, {**body, "exceeded_daily_quota_users": {"user_123": 1}}
    )
    assert (throttled, held) == ((2,), (2,))


def test_429_naming_no_event_retries_the_request_after_the_pause() -> None:
    outcome = classify({"code": 429, "error": "Too many requests"}, 429)
    assert outcome == Retry(
        'HTTP 429: {"code": 429, "error": "Too many requests"}', THROTTLE_PAUSE_S
    )


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
def test_timeouts_and_5xx_retry(status: int) -> None:
    assert isinstance(classify({"code": status, "error": "x"}, status), Retry)


def test_other_4xx_reject() -> None:
    assert isinstance(classify({"code": 409, "error": "Conflict"}, 409), Reject)


@pytest.mark.parametrize(
    ("status", "body"),
    [(400, {"code": 400, "error": "Invalid request path"}), (404, b"not found"), (301, b"")],
)
def test_a_wrong_endpoint_pauses_instead_of_dead_lettering(status: int, body: Any) -> None:
    outcome = classify(body, status)
    assert isinstance(outcome, Pause)
    assert "sinks.amplitude.endpoint" in outcome.reason


# ---- golden requests ----------------------------------------------------------------------------


def test_golden_requests() -> None:
    sink = create(CONFIG)
    actual = golden_requests(sink, CONFIG)
    # tests/golden.py masks secrets in the URL and headers only (so far); Amplitude's key is in
    # the body: mask it here too (a no-op once golden.py does it).
    redact = Redactor(secret_values(CONFIG))
    for requests in actual.values():
        for request in requests:
            request["body"] = json.loads(redact(json.dumps(request["body"])))
    for requests in actual.values():
        for request in requests:
            assert request["body"]["api_key"] == "***"
            assert API_KEY not in json.dumps(request)
    assert any(actual.values())
    check_golden("amplitude", actual)


def test_redactor_from_the_config_masks_the_body_key() -> None:
    sink = create(CONFIG)
    (request,) = sink.build(prepared(sink, 1))
    redact = Redactor(secret_values(CONFIG))
    assert API_KEY not in redact(request.body.decode())


# ---- the emulator -------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def emulator(clock: Clock) -> AmplitudeEmulator:
    return AmplitudeEmulator(api_keys={API_KEY}, clock=clock)


@pytest.fixture
async def server(emulator: AmplitudeEmulator) -> AsyncIterator[TestServer]:
    test_server = TestServer(emulator.app())
    await test_server.start_server()
    yield test_server
    await test_server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def sink_for(server: TestServer, **config: Any) -> AmplitudeSink:
    return create({**CONFIG, "endpoint": str(server.make_url("")), **config})


async def send(http: aiohttp.ClientSession, request: HttpRequest) -> HttpResponse:
    async with http.request(
        request.method, request.url, headers=dict(request.headers), data=request.body
    ) as answer:
        return HttpResponse(
            answer.status, {k.lower(): v for k, v in answer.headers.items()}, await answer.read()
        )


async def post(
    http: aiohttp.ClientSession, server: TestServer, path: str, body: Any
) -> tuple[int, dict[str, Any]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(server.make_url(path), data=raw) as answer:
        return answer.status, await answer.json()


def ev(i: int = 0, **fields: Any) -> dict[str, Any]:
    return {
        "event_type": "Report Exported",
        "user_id": f"user_{i:04d}",
        "time": 1_700_000_000_000 + i,
        "insert_id": f"ins-{i}",
        **fields,
    }


async def test_our_requests_are_accepted_over_http(
    server: TestServer, http: aiohttp.ClientSession, emulator: AmplitudeEmulator
) -> None:
    """Every golden fixture's outputs, built by the sink, are accepted by the emulator."""
    from router.rules.loader import load_rules
    from tests.golden import ROOT

    sink = sink_for(server)
    ruleset = load_rules(ROOT / "rules" / "amplitude.yaml").ruleset
    assert ruleset is not None
    keys = []
    items = []
    for events in fixture_events().values():
        for fixture_event in events:
            for output in ruleset.evaluate(fixture_event):
                assert isinstance(output, Routed)
                key = idempotency_key(fixture_event.id, "amplitude", output.rule_id)
                keys.append(key)
                items.append(sink.prepare(output, key, fixture_event))
    assert items
    for request in sink.build(items):
        answer = await send(http, request)
        assert answer.status == 200, answer.body
        assert sink.classify(request, answer) == Delivered()
    assert emulator.inserted_ids() == keys
    # A replay is answered 200 and deduplicated on insert_id.
    for request in sink.build(items):
        assert sink.classify(request, await send(http, request)) == Delivered()
    assert len(emulator.ledger) == len(keys)
    assert emulator.duplicates == len(keys)


async def test_batch_api_requests_are_accepted(
    server: TestServer, http: aiohttp.ClientSession, emulator: AmplitudeEmulator
) -> None:
    sink = sink_for(server, use_batch_api=True)
    (request,) = sink.build(prepared(sink, 3))
    assert request.url.endswith("/batch")
    assert sink.classify(request, await send(http, request)) == Delivered()
    assert [e.api for e in emulator.ledger] == ["batch"] * 3


async def test_emulator_request_level_errors(
    server: TestServer, http: aiohttp.ClientSession
) -> None:
    path = "/2/httpapi"
    assert await post(http, server, "/nowhere", {}) == (
        400,
        {"code": 400, "error": "Invalid request path"},
    )
    assert await post(http, server, path, b"") == (
        400,
        {"code": 400, "error": "Missing request body"},
    )
    assert await post(http, server, path, b"{not json") == (
        400,
        {"code": 400, "error": "Invalid JSON request body"},
    )
    assert await post(http, server, path, {"events": [ev()]}) == (
        400,
        {"code": 400, "error": "Request missing required field", "missing_field": "api_key"},
    )
    assert await post(http, server, path, {"api_key": API_KEY}) == (
        400,
        {"code": 400, "error": "Request missing required field", "missing_field": "events"},
    )
    assert (await post(http, server, path, {"api_key": API_KEY, "events": []}))[0] == 400
    status, body = await post(http, server, path, {"api_key": "wrong-key", "events": [ev()]})
    assert status == 400
    assert body["error"].startswith("Invalid API key:")


async def test_emulator_size_limits(server: TestServer, http: aiohttp.ClientSession) -> None:
    too_many = [ev(i) for i in range(2000)]
    assert (await post(http, server, "/2/httpapi", {"api_key": API_KEY, "events": too_many}))[
        0
    ] == 413
    assert (
        await post(http, server, "/2/httpapi", {"api_key": API_KEY, "events": too_many[:1999]})
    )[0] == 200
    many = [ev(i, user_id=f"u{i:06d}") for i in range(2000)]
    assert (await post(http, server, "/batch", {"api_key": API_KEY, "events": many}))[0] == 200
    extra = [*many, ev(9999)]
    assert await post(http, server, "/batch", {"api_key": API_KEY, "events": extra}) == (
        413,
        {"code": 413, "error": "Payload too large"},
    )
    big = {"api_key": API_KEY, "events": [ev(1, event_properties={"p": "x" * 1_000_000})]}
    assert (await post(http, server, "/2/httpapi", big))[0] == 413
    assert (await post(http, server, "/batch", big))[0] == 200


async def test_emulator_per_event_checks(server: TestServer, http: aiohttp.ClientSession) -> None:
    events = [
        ev(0),
        ev(1, time="2024-01-01T00:00:00Z"),
        ev(2, user_id="null"),
        ev(3, event_type=None),
        ev(4, user_id="abc"),  # too short: removed, and no id is left
        ev(5, user_id="abc", device_id="device-5"),  # too short but a device id remains
        ev(6, time=1.5),
        ev(7, event_type="[Amplitude] Revenue"),
    ]
    status, body = await post(http, server, "/2/httpapi", {"api_key": API_KEY, "events": events})
    assert status == 400
    assert body == {
        "code": 400,
        "error": "Invalid field values on some events",
        "events_with_invalid_fields": {"time": [1, 6], "user_id": [2], "event_type": [7]},
        "events_with_missing_fields": {"event_type": [3], "user_id": [4]},
    }
    # min_id_length lowers the minimum.
    ok = {"api_key": API_KEY, "events": [ev(4, user_id="abc")], "options": {"min_id_length": 3}}
    assert (await post(http, server, "/2/httpapi", ok))[0] == 200


async def test_emulator_400_is_classified_to_the_right_indexes(
    server: TestServer, http: aiohttp.ClientSession, emulator: AmplitudeEmulator
) -> None:
    sink = sink_for(server)
    good = prepared(sink, 3)
    bad = Prepared(json.dumps(ev(9, time="yesterday")).encode())
    items = [good[0], bad, good[1], good[2]]
    (request,) = sink.build(items)
    outcome = sink.classify(request, await send(http, request))
    assert isinstance(outcome, Partial)
    assert set(outcome.rejected) == {1}
    assert "time" in outcome.rejected[1]
    assert outcome.retry == (0, 2, 3)
    assert outcome.after_s == 0
    assert emulator.ledger == []  # a 400 ingests nothing
    (again,) = sink.build([items[i] for i in outcome.retry])
    assert sink.classify(again, await send(http, again)) == Delivered()
    assert len(emulator.ledger) == 3


async def test_emulator_silenced_devices(
    server: TestServer, http: aiohttp.ClientSession, emulator: AmplitudeEmulator
) -> None:
    emulator.silenced = {"device-silenced"}
    sink = sink_for(server)
    items = [
        *prepared(sink, 1),
        *prepared(sink, 1, user_id=None, device_id="device-silenced"),
        *prepared(sink, 1, user_id="other-user"),
    ]
    (request,) = sink.build(items)
    answer = await send(http, request)
    assert answer.status == 400
    assert json.loads(answer.body)["silenced_events"] == [1]
    outcome = sink.classify(request, answer)
    assert isinstance(outcome, Partial)
    assert set(outcome.rejected) == {1}
    assert outcome.retry == (0, 2)


async def test_emulator_throttles_a_user_over_30_events_per_second(
    server: TestServer, http: aiohttp.ClientSession, emulator: AmplitudeEmulator, clock: Clock
) -> None:
    sink = sink_for(server)
    hot = [
        sink.prepare(routed(), idempotency_key(f"hot-{i}", "amplitude", "r"), event())
        for i in range(31)
    ]
    cold = sink.prepare(routed(user_id="cold-user"), "c" * 36, event())
    (request,) = sink.build([cold, *hot])
    answer = await send(http, request)
    assert answer.status == 429
    body = json.loads(answer.body)
    assert body["error"] == "Too many requests for some devices and users"
    assert body["eps_threshold"] == 30
    assert body["throttled_users"] == {"user_123": 31}
    assert body["throttled_events"] == list(range(1, 32))
    assert "exceeded_daily_quota_users" not in body  # V2 has no daily quota
    outcome = sink.classify(request, answer)
    assert outcome == Partial(retry=tuple(range(32)), after_s=30.0, reason="HTTP 429 throttled")
    assert emulator.ledger == []
    # The user stays throttled for 30 s, even at a low rate.
    clock.now += 10
    (one,) = sink.build(hot[:1])
    assert (await send(http, one)).status == 429
    clock.now += 31
    (retry,) = sink.build([cold, *hot[:30]])
    assert sink.classify(retry, await send(http, retry)) == Delivered()
    assert len(emulator.ledger) == 31


async def test_emulator_batch_daily_quota_is_held(
    server: TestServer, http: aiohttp.ClientSession, emulator: AmplitudeEmulator, clock: Clock
) -> None:
    emulator.daily_quota = 5
    sink = sink_for(server, use_batch_api=True)
    first = prepared(sink, 5)
    (request,) = sink.build(first)
    assert sink.classify(request, await send(http, request)) == Delivered()
    clock.now += 3600
    more = [
        *[
            sink.prepare(routed(), idempotency_key(f"more-{i}", "amplitude", "r"), event())
            for i in range(2)
        ],
        sink.prepare(routed(user_id="another-user"), "a" * 36, event()),
    ]
    (request,) = sink.build(more)
    answer = await send(http, request)
    assert answer.status == 429
    body = json.loads(answer.body)
    assert body["exceeded_daily_quota_users"] == {"user_123": 7}
    assert body["throttled_events"] == [0, 1]
    assert body["eps_threshold"] == 1000
    # The over-quota user's events are held; the other user's event goes again at once.
    outcome = sink.classify(request, answer)
    assert isinstance(outcome, Partial)
    assert (outcome.hold, outcome.hold_s) == ((0, 1), amplitude.DEFAULT_QUOTA_HOLD_S)
    assert (outcome.retry, outcome.after_s, outcome.rejected) == ((2,), 0.0, {})
    (others_request,) = sink.build(more[2:])
    assert sink.classify(others_request, await send(http, others_request)) == Delivered()
    (held_request,) = sink.build(more[:2])
    assert isinstance(sink.classify(held_request, await send(http, held_request)), Partial)
    # The rolling window passes: the held events go through.
    clock.now += 24 * 3600
    assert sink.classify(held_request, await send(http, held_request)) == Delivered()
    assert len(emulator.ledger) == 5 + 3


async def test_emulator_dedup_is_per_device_for_7_days(
    server: TestServer, http: aiohttp.ClientSession, emulator: AmplitudeEmulator, clock: Clock
) -> None:
    payload = {"api_key": API_KEY, "events": [ev(1)]}
    assert (await post(http, server, "/2/httpapi", payload))[0] == 200
    assert (await post(http, server, "/2/httpapi", payload))[0] == 200
    assert len(emulator.ledger) == 1
    other_device = {"api_key": API_KEY, "events": [ev(1, device_id="device-other")]}
    assert (await post(http, server, "/2/httpapi", other_device))[0] == 200
    assert len(emulator.ledger) == 2
    clock.now += 7 * 24 * 3600 + 1
    assert (await post(http, server, "/2/httpapi", payload))[0] == 200
    assert len(emulator.ledger) == 3


async def test_emulator_200_body(server: TestServer, http: aiohttp.ClientSession) -> None:
    payload = json.dumps({"api_key": API_KEY, "events": [ev(1), ev(2)]}).encode()
    status, body = await post(http, server, "/2/httpapi", payload)
    assert status == 200
    assert body == {
        "code": 200,
        "events_ingested": 2,
        "payload_size_bytes": len(payload),
        "server_upload_time": 1_800_000_000_000,
    }


async def test_emulator_fault_injection(
    server: TestServer, http: aiohttp.ClientSession, emulator: AmplitudeEmulator
) -> None:
    sink = sink_for(server)
    (request,) = sink.build(prepared(sink, 1))
    emulator.script = [Fault(503), Fault(413), Fault(403), Fault(reset=True)]
    assert isinstance(sink.classify(request, await send(http, request)), Retry)
    assert isinstance(sink.classify(request, await send(http, request)), Split)
    assert isinstance(sink.classify(request, await send(http, request)), Pause)
    with pytest.raises(aiohttp.ClientError):
        await send(http, request)
    assert sink.classify(request, await send(http, request)) == Delivered()
    assert [status for _, status, _ in emulator.requests] == [503, 413, 403, 0, 200]


async def test_wrong_key_pauses_without_leaking_it(
    server: TestServer, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    sink = sink_for(server, api_key="a-key-amplitude-does-not-know")
    (request,) = sink.build(prepared(sink, 1))
    answer = await send(http, request)
    assert b"a-key-amplitude-does-not-know" in answer.body  # the emulator echoes it
    outcome = sink.classify(request, answer)
    assert isinstance(outcome, Pause)
    assert "a-key-amplitude-does-not-know" not in outcome.reason


# ---- conformance: the official SDK against the emulator ----------------------------------------


def flush_until(client: Any, done: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Flush the SDK (its retries are queued again) until ``done()`` or the timeout."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "the SDK did not finish in time"
        for future in client.flush():
            if future is not None:
                future.result(timeout=timeout_s)
        time.sleep(0.05)


@pytest.mark.parametrize("use_batch", [False, True])
async def test_official_sdk_is_accepted_by_the_emulator(
    server: TestServer, emulator: AmplitudeEmulator, use_batch: bool
) -> None:
    from amplitude import Amplitude, BaseEvent, Config

    path = "/batch" if use_batch else "/2/httpapi"
    results: list[tuple[int, str]] = []

    def callback(event: Any, code: int, message: str | None = None) -> None:
        results.append((code, message or ""))

    config = Config(
        server_url=str(server.make_url(path)),
        use_batch=use_batch,
        flush_queue_size=10,
        callback=callback,
        logger=logging.getLogger("amplitude-test"),
    )

    def run_sdk() -> None:
        client = Amplitude(API_KEY, config)
        for i in range(3):
            client.track(
                BaseEvent(
                    event_type="Report Exported",
                    user_id=f"sdk-user-{i}",
                    device_id=f"sdk-device-{i}",
                    event_properties={"format": "csv", "rows": i},
                    insert_id=f"sdk-insert-{i}",
                )
            )
        flush_until(client, lambda: len(results) >= 3)
        client.shutdown()

    await asyncio.to_thread(run_sdk)
    assert results == [(200, "Event sent successfully.")] * 3
    assert sorted(e.insert_id or "" for e in emulator.ledger) == [
        "sdk-insert-0",
        "sdk-insert-1",
        "sdk-insert-2",
    ]
    sent = emulator.ledger[0].event
    assert isinstance(sent["time"], int)
    assert sent["library"].startswith("amplitude-python/")


async def test_official_sdk_reads_the_emulators_400_as_we_do(
    server: TestServer, emulator: AmplitudeEmulator
) -> None:
    """The SDK fails the events the emulator names and re-sends (then delivers) the others."""
    from amplitude import Amplitude, BaseEvent, Config

    results: list[tuple[str, int]] = []

    def callback(event: Any, code: int, message: str | None = None) -> None:
        results.append((event.user_id, code))

    config = Config(
        server_url=str(server.make_url("/2/httpapi")),
        flush_queue_size=10,
        flush_interval_millis=100,
        callback=callback,
        logger=logging.getLogger("amplitude-test"),
    )

    def run_sdk() -> None:
        client = Amplitude(API_KEY, config)
        client.track(BaseEvent(event_type="Ok", user_id="good-user-1"))
        client.track(BaseEvent(event_type="[Amplitude] Revenue", user_id="bad-user-1"))
        flush_until(client, lambda: len(results) >= 2)
        client.shutdown()

    await asyncio.to_thread(run_sdk)
    assert ("bad-user-1", 400) in results
    assert ("good-user-1", 200) in results
    assert [e.user_id for e in emulator.ledger] == ["good-user-1"]


def test_a_key_from_env_is_scrubbed_by_the_sink_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """router.sink_runner.secret_values knows only string config values, not {env: NAME}."""
    monkeypatch.setenv("AMP_KEY_FOR_SCRUB_TEST", "env-secret-key-123")
    config = {"api_key": {"env": "AMP_KEY_FOR_SCRUB_TEST"}}
    sink = create(config)
    (request,) = sink.build(prepared(sink, 1))
    echoed = {"code": 400, "error": "Invalid API key: env-secret-key-123"}
    outcome = sink.classify(request, response(400, echoed))
    assert isinstance(outcome, Pause)
    assert "env-secret-key-123" not in outcome.reason
    for status in (500, 409):
        other = sink.classify(request, response(status, {"error": "env-secret-key-123"}))
        assert isinstance(other, Retry | Reject)
        assert "env-secret-key-123" not in other.reason


async def test_emulator_dedup_is_per_app_and_limits_are_applied_to_what_is_kept(
    http: aiohttp.ClientSession, clock: Clock
) -> None:
    emulator = AmplitudeEmulator(api_keys={API_KEY, "another-app-key"}, clock=clock)
    server = TestServer(emulator.app(), host="127.0.0.1")
    await server.start_server()
    try:
        for key in (API_KEY, "another-app-key"):  # the same insert_id in two apps: both kept
            assert (await post(http, server, "/2/httpapi", {"api_key": key, "events": [ev(1)]}))[
                0
            ] == 200
        assert len(emulator.ledger) == 2
        groups = {f"type{i}": [f"v{j}" for j in range(12)] for i in range(7)}
        long = ev(2, event_properties={"long": "x" * 5000}, groups=groups)
        assert (await post(http, server, "/2/httpapi", {"api_key": API_KEY, "events": [long]}))[
            0
        ] == 200
        kept = emulator.ledger[-1].event
        assert len(kept["event_properties"]["long"]) == 1024
        assert len(kept["groups"]) == 5
        assert all(len(values) == 10 for values in kept["groups"].values())
        emulator.script = [Fault(429)]
        status, body = await post(
            http, server, "/2/httpapi", {"api_key": API_KEY, "events": [ev(3)]}
        )
        assert status == 429
        assert {"eps_threshold", "throttled_devices", "throttled_users", "throttled_events"} <= set(
            body
        )
    finally:
        await server.close()
