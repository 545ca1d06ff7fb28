"""The GA4 sink (sinks/ga4.py) and its emulator (tests/emulators/ga4.py).

- prepare: the one-event request, and every documented GA4 rule validated locally (each broken
  rule named in the ValueError), the 72-hour window on an injected clock;
- build: grouping by request-level fields (client, user, user properties, time), 25 events and
  130 kB per request; URL with the api_secret, which secrets() lists raw and URL-quoted;
- classify: 2xx delivered, the debug endpoint's validationMessages, the shared table;
- golden requests for every shared Pendo fixture (tests/golden/ga4/);
- the emulator's answers and validation codes (sinks.md §3);
- conformance: every request the sink sends is valid for the emulator's debug endpoint, and the
  outputs the sink refuses are exactly those the emulator would drop;
- end to end over HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from router.delivery.batching import Batcher
from router.delivery.sink import (
    Delivered,
    HttpRequest,
    HttpResponse,
    Partial,
    Pause,
    Prepared,
    Reject,
    Retry,
    Split,
    idempotency_key,
)
from router.dlq import Redactor
from router.events import Event
from router.rules.engine import Routed
from router.rules.loader import load_rules
from router.settings import Secret
from sinks import ga4
from sinks.ga4 import LIMITS, MAX_BODY_BYTES, Ga4Settings, Ga4Sink, create
from tests.emulators.ga4 import Fault, Ga4Emulator
from tests.golden import ROOT, check_golden, fixture_events, golden_requests

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]
ServerFactory = Callable[..., Awaitable[TestServer]]

API_SECRET = "fake/api+secret"  # fake; has characters that URL-quoting changes
QUOTED_SECRET = "fake%2Fapi%2Bsecret"
MEASUREMENT_ID = "G-TEST123"
CONFIG = {"measurement_id": MEASUREMENT_ID, "api_secret": API_SECRET}
EVENT_MS = 1705329000000  # 2024-01-15T14:30:00Z
NOW = EVENT_MS / 1000 + 3600  # the injected wall clock: one hour after the event
CLIENT = "80fba0ae1c48e3978e43e4efc365e14e12ea0c830ba8ba5b9a2dafc7e3f2ab8b"
KEY = idempotency_key("evt-1", "ga4", "rule-1")
URL = f"https://www.google-analytics.com/mp/collect?measurement_id={MEASUREMENT_ID}&api_secret={QUOTED_SECRET}"


def event(**overrides: Any) -> Event:
    fields: dict[str, Any] = {
        "id": "evt-1",
        "source": "webhook",
        "type": "track.event",
        "name": "custom_feature_used",
        "visitor_id": "user_123",
        "timestamp": EVENT_MS,
        "received_at": EVENT_MS + 1500,
    }
    return Event(**{**fields, **overrides})


def routed(**payload: Any) -> Routed:
    return Routed(rule_id="rule-1", kind="event", payload=payload, ruleset="test")


def output(**overrides: Any) -> Routed:
    payload: dict[str, Any] = {"name": "report_exported", "client_id": CLIENT}
    payload.update(overrides)
    return routed(**{k: v for k, v in payload.items() if v is not None})


def sink(clock: float = NOW, **config: Any) -> Ga4Sink:
    return create({**CONFIG, **config}, clock=lambda: clock)


def body_of(data: Prepared | HttpRequest) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(data.body)
    return decoded


def response(status: int, body: bytes = b"", **headers: str) -> HttpResponse:
    return HttpResponse(status, {k.replace("_", "-"): v for k, v in headers.items()}, body)


# ---- prepare ------------------------------------------------------------------------------


def test_prepare_is_a_one_event_request_keyed_by_client_id() -> None:
    out = output(
        user_id="account-user-9",
        params={"format": "pdf", "pages": 3, "ratio": 0.5, "first": True},
        user_properties={"plan": "pro", "seats": 12},
    )
    prepared = sink().prepare(out, KEY, event())
    assert prepared.key == CLIENT  # batches never mix clients
    assert body_of(prepared) == {
        "client_id": CLIENT,
        "user_id": "account-user-9",
        "timestamp_micros": EVENT_MS * 1000,
        "user_properties": {"plan": {"value": "pro"}, "seats": {"value": 12}},
        "events": [
            {
                "name": "report_exported",
                "params": {"format": "pdf", "pages": 3, "ratio": 0.5, "first": True},
            }
        ],
    }
    assert list(body_of(prepared)) == [
        "client_id",
        "user_id",
        "timestamp_micros",
        "user_properties",
        "events",
    ]
    assert b" " not in prepared.body  # compact JSON: what the 130 kB limit measures
    assert KEY.encode() not in prepared.body  # GA4 has no event id to put it in


def test_optional_fields_are_left_out() -> None:
    prepared = sink().prepare(output(), KEY, event())
    assert body_of(prepared) == {
        "client_id": CLIENT,
        "timestamp_micros": EVENT_MS * 1000,
        "events": [{"name": "report_exported"}],
    }
    empty = sink().prepare(output(user_properties={}), KEY, event())
    assert "user_properties" not in body_of(empty)


def test_non_ascii_is_sent_as_utf8_and_counted_in_characters() -> None:
    value = "é" * 100  # 100 characters, 200 bytes: within the 100-character limit
    prepared = sink().prepare(output(params={"label": value}), KEY, event())
    assert value.encode() in prepared.body
    assert body_of(prepared)["events"][0]["params"]["label"] == value


def test_app_stream_sends_app_instance_id_and_firebase_app_id() -> None:
    s = create(
        {"firebase_app_id": "1:123:android:abc", "api_secret": API_SECRET}, clock=lambda: NOW
    )
    prepared = s.prepare(output(), KEY, event())
    assert prepared.key == CLIENT
    assert body_of(prepared)["app_instance_id"] == CLIENT
    assert "client_id" not in body_of(prepared)
    (request,) = s.build([prepared])
    assert request.url == (
        "https://www.google-analytics.com/mp/collect?firebase_app_id=1%3A123%3Aandroid%3Aabc"
        f"&api_secret={QUOTED_SECRET}"
    )


@pytest.mark.parametrize(
    ("timestamp", "micros"),
    [
        (None, EVENT_MS * 1000),  # the event time
        ("2024-01-15T15:00:00Z", 1705330800000000),  # what the rule maps
        ("2024-01-15T16:00:00.123+01:00", 1705330800123000),
        ("2024-01-15T15:00:00", 1705330800000000),  # naive = UTC
        (1705330800, 1705330800000000),  # seconds
        (1705330800250, 1705330800250000),  # milliseconds
        (datetime(2024, 1, 15, 15, 0, tzinfo=UTC), 1705330800000000),
    ],
)
def test_timestamp_micros(timestamp: Any, micros: int) -> None:
    prepared = sink().prepare(output(timestamp=timestamp), KEY, event())
    assert body_of(prepared)["timestamp_micros"] == micros


def test_backdating_window_uses_the_injected_clock() -> None:
    hour_ms = 3_600_000
    # Exactly 72 hours old is accepted, a millisecond more is not.
    at_limit = sink(clock=(EVENT_MS + 72 * hour_ms) / 1000)
    assert body_of(at_limit.prepare(output(), KEY, event()))["timestamp_micros"] == EVENT_MS * 1000
    over = sink(clock=(EVENT_MS + 72 * hour_ms + 1) / 1000)
    with pytest.raises(ValueError, match="backdated up to 72 hours"):
        over.prepare(output(), KEY, event())
    # The rule's timestamp is what is checked, not the event's.
    with pytest.raises(ValueError, match=r"^timestamp: 96\.0 hours old"):
        sink().prepare(output(timestamp=EVENT_MS - 95 * hour_ms), KEY, event())
    # A smaller window leaves room for retries.
    strict = sink(clock=(EVENT_MS + 2 * hour_ms) / 1000, max_backdate_hours=1.5)
    with pytest.raises(ValueError, match=r"up to 1\.5 hours"):
        strict.prepare(output(), KEY, event())
    # The wall clock is read on every prepare (the default clock is time.time).
    assert create(CONFIG)._clock is not None


INVALID: list[tuple[dict[str, Any], str]] = [
    # client id
    ({"client_id": None}, r"^client_id: required"),
    ({"client_id": ""}, r"^client_id: required"),
    ({"client_id": "c\ud800"}, r"^client_id: is not valid UTF-8"),
    # user id
    ({"user_id": 42}, r"^user_id: must be a string"),
    ({"user_id": "u\udc00"}, r"^user_id: is not valid UTF-8"),
    # event name: charset, first character, length, reserved names and prefixes
    ({"name": None}, r"^name: event name must be a string"),
    ({"name": ""}, r"^name: event name must not be empty"),
    ({"name": "report exported"}, r"^name: .*only letters, digits and _, starting with a letter"),
    ({"name": "report-exported"}, r"only letters, digits and _"),
    ({"name": "1st_report"}, r"starting with a letter"),
    ({"name": "_private"}, r"starting with a letter"),
    ({"name": "rapport_exporté"}, r"only letters, digits and _"),
    ({"name": "report\n"}, r"only letters, digits and _"),
    ({"name": "e" * 41}, r"^name: event name 'e{41}' is longer than 40 characters"),
    ({"name": "session_start"}, r"^name: event name 'session_start' is reserved"),
    ({"name": "Screen_View"}, r"is reserved by Google Analytics"),
    ({"name": "firebase_thing"}, r"^name: .*reserved prefix"),
    ({"name": "ga_thing"}, r"reserved prefix"),
    ({"name": "Google_thing"}, r"reserved prefix"),
    # params: count, names, values
    ({"params": ["a"]}, r"^params: expected an object"),
    ({"params": {f"p{i}": i for i in range(26)}}, r"^params: 26 parameters; GA4 allows 25"),
    ({"params": {"bad-name": 1}}, r"^params.bad-name: parameter name .*only letters"),
    ({"params": {"p" * 41: 1}}, r"is longer than 40 characters"),
    ({"params": {"ga_source": 1}}, r"^params.ga_source: .*reserved prefix"),
    ({"params": {"label": "x" * 101}}, r"^params.label: value longer than 100 characters"),
    ({"params": {"label": {"a": 1}}}, r"^params.label: GA4 values are strings or numbers"),
    ({"params": {"tags": ["a"]}}, r"^params.tags: GA4 values are strings or numbers"),
    ({"params": {"label": None}}, r"^params.label: null"),
    ({"params": {"score": float("nan")}}, r"^params.score: nan is not a JSON number"),
    ({"params": {"score": float("inf")}}, r"is not a JSON number"),
    ({"params": {"label": "x\ud800"}}, r"^params.label: is not valid UTF-8"),
    # items: a list of objects; item parameters like params; at most 10 custom ones
    ({"params": {"items": {"item_id": "a"}}}, r"^params.items: items must be a list"),
    ({"params": {"items": ["a"]}}, r"^params.items: items\[0\] must be an object"),
    (
        {"params": {"items": [{"item_id": "a", **{f"c{i}": i for i in range(11)}}]}},
        r"^params.items: items\[0\]: 11 custom item parameters; GA4 allows 10",
    ),
    ({"params": {"items": [{"item id": "a"}]}}, r"items\[0\].item id: item parameter name"),
    ({"params": {"items": [{"item_name": "n" * 101}]}}, r"items\[0\].item_name: value longer"),
    ({"params": {"items": [{"item_id": ["a"]}]}}, r"items\[0\].item_id: GA4 values are"),
    # user properties: count, names (24), reserved names and prefixes, values (36)
    ({"user_properties": ["plan"]}, r"^user_properties: expected an object"),
    (
        {"user_properties": {f"u{i}": i for i in range(26)}},
        r"^user_properties: 26 user properties; GA4 allows 25",
    ),
    ({"user_properties": {"u" * 25: 1}}, r"user property name 'u{25}' is longer than 24"),
    ({"user_properties": {"user_id": "x"}}, r"^user_properties.user_id: .*is reserved"),
    ({"user_properties": {"first_open_time": 1}}, r"is reserved"),
    ({"user_properties": {"google_plan": "x"}}, r"reserved prefix"),
    ({"user_properties": {"plan tier": "x"}}, r"only letters, digits and _"),
    ({"user_properties": {"plan": "p" * 37}}, r"^user_properties.plan: value longer than 36"),
    ({"user_properties": {"plan": {"value": "pro"}}}, r"^user_properties.plan: GA4 values are"),
    # time
    ({"timestamp": "soon"}, r"^timestamp: 'soon' is not an ISO 8601 date-time"),
    ({"timestamp": True}, r"^timestamp: expected a date-time"),
]


@pytest.mark.parametrize(("fields", "rule"), INVALID)
def test_every_documented_rule_is_validated_and_named(fields: dict[str, Any], rule: str) -> None:
    out = routed(**{"name": "report_exported", "client_id": CLIENT, **fields})
    with pytest.raises(ValueError, match=rule):
        sink().prepare(out, KEY, event())


def test_values_at_the_limits_are_accepted() -> None:
    out = output(
        name="e" * 40,
        params={
            **{f"p{i:02d}_" + "x" * 36: "v" * 100 for i in range(24)},
            "items": [{"item_id": "i" * 100, **{f"c{i}": i for i in range(10)}}],
        },
        user_properties={f"u{i:02d}" + "y" * 21: "w" * 36 for i in range(25)},
    )
    payload = out.payload
    assert len(payload["params"]) == 25
    assert all(len(name) == 40 for name in payload["params"] if name != "items")
    assert all(len(name) == 24 for name in payload["user_properties"])
    body = body_of(sink().prepare(out, KEY, event()))
    assert body["events"][0]["params"] == payload["params"]
    assert len(body["user_properties"]) == 25


def test_other_output_kinds_are_refused() -> None:
    other = Routed(rule_id="r", kind="page", payload={"name": "x"}, ruleset="t")
    with pytest.raises(ValueError, match="ga4 has no output kind 'page'"):
        sink().prepare(other, KEY, event())


def test_the_rule_output_is_not_modified() -> None:
    properties = {"plan": "pro"}
    out = output(user_properties=properties, params={"a": 1})
    sink().prepare(out, KEY, event())
    assert properties == {"plan": "pro"}  # the DLQ keeps the output as the rule made it


# ---- build --------------------------------------------------------------------------------


def prepared(i: int = 0, **overrides: Any) -> Prepared:
    return sink().prepare(output(name=f"event_{i}", **overrides), f"key-{i}", event())


def test_build_merges_one_clients_events_at_one_time() -> None:
    s = sink()
    items = [prepared(i, params={"i": i}) for i in range(3)]
    (request,) = s.build(items)
    assert request.method == "POST"
    assert request.url == URL
    assert request.headers == {
        "Content-Type": "application/json",
        "User-Agent": "pendo-event-router",
    }
    assert request.items == (0, 1, 2)
    assert body_of(request) == {
        "client_id": CLIENT,
        "timestamp_micros": EVENT_MS * 1000,
        "events": [{"name": f"event_{i}", "params": {"i": i}} for i in range(3)],
    }
    assert request.body == ga4.encode(body_of(request))  # the same compact encoding


def test_build_splits_on_request_level_fields_in_batch_order() -> None:
    s = sink()
    items = [
        prepared(0),
        prepared(1, timestamp=EVENT_MS + 1),  # another time: timestamp_micros is request-level
        prepared(2),
        prepared(3, user_id="u-1"),
        prepared(4, user_properties={"plan": "pro"}),
        prepared(5, user_id="u-1"),
        prepared(6, timestamp=EVENT_MS + 1),
    ]
    requests = s.build(items)
    assert [r.items for r in requests] == [(0, 2), (1, 6), (3, 5), (4,)]
    for request in requests:
        body = body_of(request)
        assert len(body["events"]) == len(request.items)
        for position, index in enumerate(request.items):
            single = body_of(items[index])
            assert body["events"][position] == single["events"][0]
            assert {k: v for k, v in body.items() if k != "events"} == {
                k: v for k, v in single.items() if k != "events"
            }
    assert body_of(requests[1])["timestamp_micros"] == (EVENT_MS + 1) * 1000


def test_build_keeps_clients_apart_even_in_one_batch() -> None:
    other = prepared(1, client_id="other-client")
    assert other.key == "other-client"
    requests = sink().build([prepared(0), other, prepared(2)])
    assert [r.items for r in requests] == [(0, 2), (1,)]
    assert body_of(requests[1])["client_id"] == "other-client"


def test_build_sends_at_most_25_events_per_request() -> None:
    requests = sink().build([prepared(i) for i in range(60)])
    assert [len(r.items) for r in requests] == [25, 25, 10]
    assert [i for r in requests for i in r.items] == list(range(60))
    assert all(len(body_of(r)["events"]) == len(r.items) for r in requests)


def _big(i: int, size: int) -> Prepared:
    """An event whose one-event request is ``size`` bytes (padded with items)."""
    base = prepared(i, params={"items": []})
    pad = size - len(base.body)
    items: list[dict[str, str]] = []
    while pad > 0:
        # {"item_id":"..."} is 14 bytes plus its value; one comma between items.
        value = min(100, pad - 14 - (1 if items else 0))
        items.append({"item_id": "x" * value})
        pad -= 14 + value + (1 if len(items) > 1 else 0)
    result = prepared(i, params={"items": items})
    assert len(result.body) == size, (len(result.body), size)
    return result


def test_build_keeps_every_body_under_130kb() -> None:
    items = [_big(i, 30_000) for i in range(10)]
    requests = sink().build(items)
    assert [len(r.items) for r in requests] == [4, 4, 2]
    assert all(len(r.body) < MAX_BODY_BYTES for r in requests)
    assert all(json.loads(r.body) for r in requests)


def test_batches_the_limits_close_fit_one_request_each() -> None:
    """The delivery layer's Batcher, with LIMITS and the key, closes batches build sends whole."""
    assert (LIMITS.max_events, LIMITS.max_bytes, LIMITS.max_event_bytes) == (25, 130_000, 129_999)
    s = sink()
    for size in (1_000, 5_203, 30_000, 64_999, 129_998):
        batcher: Batcher[Prepared] = Batcher(
            LIMITS.max_events, LIMITS.max_bytes, LIMITS.linger_s, LIMITS.per_item_overhead
        )
        closed: list[list[Prepared]] = []
        i = 0
        while not closed:
            item = _big(i, size) if size > 1_000 else prepared(i)
            closed = batcher.add(item, len(item.body), item.key, 0.0)
            i += 1
        (request,) = s.build(closed[0])
        assert len(request.body) < MAX_BODY_BYTES
        assert len(request.items) == len(closed[0])
    # The largest one-event request the delivery layer lets through is still under 130 kB.
    assert batcher.fits_alone(LIMITS.max_event_bytes)
    assert not batcher.fits_alone(MAX_BODY_BYTES)


# ---- settings, secrets, dry run -----------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("https://region1.google-analytics.com", "https://region1.google-analytics.com/mp/collect"),
        (
            "https://region1.google-analytics.com/",
            "https://region1.google-analytics.com/mp/collect",
        ),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/mp/collect"),
    ],
)
def test_endpoint(endpoint: str, url: str) -> None:
    s = sink(endpoint=endpoint)
    assert s.build([prepared()])[0].url.startswith(url + "?measurement_id=G-TEST123&api_secret=")
    health = s.health_request()
    assert health is not None
    assert health.url.startswith(url.replace("/mp/collect", "/debug/mp/collect?"))


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"endpoint": "region1.google-analytics.com"}, "not an http"),
        ({"endpoint": "https://www.google-analytics.com/mp/collect"}, "host only"),
        ({"endpoint": "https://www.google-analytics.com?x=1"}, "query"),
        ({"firebase_app_id": "1:2:android:3"}, "not both"),
        ({"measurement_id": None}, "measurement_id or firebase_app_id is required"),
        ({"measurement_id": ""}, "measurement_id: must not be empty"),
        ({"max_backdate_hours": 73}, "max_backdate_hours"),
        ({"max_backdate_hours": 0}, "max_backdate_hours"),
        ({"api_secret": ""}, "api_secret: secret is empty"),
        ({"apisecret": "x"}, "unknown field"),
    ],
)
def test_bad_settings_are_value_errors(config: dict[str, Any], problem: str) -> None:
    merged = {k: v for k, v in {**CONFIG, **config}.items() if v is not None}
    with pytest.raises(ValueError, match=problem):
        create(merged)


def test_api_secret_from_env_and_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("GA4_API_SECRET", "env-secret")
    from_env = create({"measurement_id": MEASUREMENT_ID, "api_secret": {"env": "GA4_API_SECRET"}})
    assert from_env.url.endswith("&api_secret=env-secret")
    path = tmp_path / "secret"
    path.write_text("file secret\n")
    from_file = create({"measurement_id": MEASUREMENT_ID, "api_secret": {"file": str(path)}})
    assert from_file.url.endswith("&api_secret=file%20secret")
    assert from_file.secrets() == ["file secret", "file%20secret", "file+secret"]


def test_secrets_are_every_wire_form_and_are_redacted() -> None:
    s = sink()
    assert s.secrets() == [API_SECRET, QUOTED_SECRET]
    (request,) = s.build([prepared()])
    assert QUOTED_SECRET in request.url
    redact = Redactor(s.secrets())
    assert redact(request.url).endswith("&api_secret=***")
    for text in (repr(s), str(s), request.body.decode()):
        assert API_SECRET not in text
        assert QUOTED_SECRET not in text
    assert repr(s) == (
        "Ga4Sink(endpoint='https://www.google-analytics.com', id_field='client_id', dry_run=False)"
    )


def test_no_api_secret_is_a_dry_run() -> None:
    s = create({"measurement_id": MEASUREMENT_ID}, clock=lambda: NOW)
    assert s.dry_run is True
    assert s.secrets() == []
    assert s.health_request() is None
    (request,) = s.build([s.prepare(output(), KEY, event())])
    assert (
        request.url
        == f"https://www.google-analytics.com/mp/collect?measurement_id={MEASUREMENT_ID}"
    )
    nothing = create({})
    assert (nothing.dry_run, nothing.url) == (True, "https://www.google-analytics.com/mp/collect")
    assert sink().dry_run is False


# ---- classify -----------------------------------------------------------------------------


def collect_request(items: tuple[int, ...] = (0,)) -> HttpRequest:
    return HttpRequest("POST", URL, {}, b"{}", items)


def debug_request(items: tuple[int, ...] = (0, 1, 2)) -> HttpRequest:
    return HttpRequest("POST", URL.replace("/mp/collect", "/debug/mp/collect"), {}, b"{}", items)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (204, Delivered),
        (200, Delivered),
        (202, Delivered),
        (400, Reject),
        (422, Reject),
        (401, Pause),
        (403, Pause),
        (404, Pause),
        (301, Pause),
        (413, Split),
        (408, Retry),
        (429, Retry),
        (500, Retry),
        (503, Retry),
    ],
)
def test_classify(status: int, expected: type) -> None:
    assert isinstance(sink().classify(collect_request(), response(status, b"x")), expected)


def test_classify_details() -> None:
    s = sink()
    assert s.classify(collect_request(), response(429, b"slow", retry_after="7")) == Retry(
        "HTTP 429: slow", 7.0
    )
    pause = s.classify(collect_request(), response(404, b"not found"))
    assert isinstance(pause, Pause)
    assert "sinks.ga4.endpoint" in pause.reason


def _messages(*messages: dict[str, str]) -> bytes:
    return json.dumps({"validationMessages": list(messages)}).encode()


def test_classify_reads_the_debug_endpoints_validation_messages() -> None:
    s = sink()
    assert s.classify(debug_request(), response(200, _messages())) == Delivered()
    bad_name = {
        "fieldPath": "events",
        "description": "Event at index: [1] has invalid name [_bad]. Names must start with an "
        "alphabetic character.",
        "validationCode": "NAME_INVALID",
    }
    bad_param = {
        "fieldPath": "events.params",
        "description": "Event at index: [2] param [x] has a value longer than 100 characters.",
        "validationCode": "VALUE_OUT_OF_BOUNDS",
    }
    outcome = s.classify(debug_request(), response(200, _messages(bad_name, bad_param)))
    assert outcome == Partial(
        rejected={
            1: "GA4 validation: NAME_INVALID: " + bad_name["description"],
            2: "GA4 validation: VALUE_OUT_OF_BOUNDS: " + bad_param["description"],
        }
    )
    whole = {"fieldPath": "client_id", "description": "missing", "validationCode": "VALUE_REQUIRED"}
    rejected = s.classify(debug_request(), response(200, _messages(bad_name, whole)))
    assert rejected == Reject("GA4 validation: VALUE_REQUIRED: missing")
    # A 2xx that is not the debug endpoint's answer judged nothing: retried, not dead-lettered.
    assert isinstance(s.classify(debug_request(), response(200, b"<html>")), Retry)
    assert isinstance(s.classify(debug_request(), response(200, b"{}")), Retry)
    # An index beyond the request's items is not trusted to name an item.
    beyond = {**bad_name, "description": "Event at index: [7] has invalid name [_x]."}
    assert isinstance(s.classify(debug_request(), response(200, _messages(beyond))), Reject)


def test_preflight_is_the_debug_twin_of_a_request_when_enabled() -> None:
    assert sink().preflight(sink().build([prepared()])[0]) is None
    settings = Ga4Settings(
        measurement_id=MEASUREMENT_ID, api_secret=API_SECRET, validate_with_debug_endpoint=True
    )
    s = Ga4Sink(settings, Secret(API_SECRET), lambda: NOW)
    (request,) = s.build([prepared(0), prepared(1)])
    check = s.preflight(request)
    assert check is not None
    assert check.url == URL.replace("/mp/collect", "/debug/mp/collect")
    assert (check.body, check.items) == (request.body, request.items)
    assert s.preflight(check) is None  # never a preflight of a preflight


# ---- golden -------------------------------------------------------------------------------


class AtEventTime:
    """The sink with its wall clock one minute after each event (the fixtures span years)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.inner = create(CONFIG, clock=lambda: self.now)
        self.name = self.inner.name
        self.limits = self.inner.limits

    def prepare(self, out: Routed, key: str, ev: Event) -> Prepared:
        self.now = ev.timestamp / 1000 + 60
        return self.inner.prepare(out, key, ev)

    def build(self, items: Sequence[Prepared]) -> list[HttpRequest]:
        return self.inner.build(items)

    def classify(self, request: HttpRequest, response: HttpResponse) -> Any:
        return self.inner.classify(request, response)

    def secrets(self) -> list[str]:
        return self.inner.secrets()


def test_golden_requests() -> None:
    requests = golden_requests(AtEventTime(), CONFIG)
    check_golden("ga4", requests)
    sent = [r for rs in requests.values() for r in rs]
    assert len(sent) == 10
    for request in sent:
        assert request["url"].endswith("&api_secret=***")  # the fake secret is masked
        assert API_SECRET not in json.dumps(request)


def test_module_exports_the_factory_and_outputs() -> None:
    assert ga4.OUTPUTS.sink == "ga4"
    assert set(ga4.OUTPUTS.kinds) == {"event"}
    assert isinstance(ga4.create(CONFIG), Ga4Sink)


# ---- the emulator -------------------------------------------------------------------------


@pytest.fixture
def emulator() -> Ga4Emulator:
    return Ga4Emulator(api_secrets={API_SECRET}, streams={MEASUREMENT_ID}, now=lambda: NOW)


@pytest.fixture
async def api(aiohttp_client: ClientFactory, emulator: Ga4Emulator) -> TestClient[Any, Any]:
    return await aiohttp_client(emulator.app())


QUERY = {"measurement_id": MEASUREMENT_ID, "api_secret": API_SECRET}


def ga_event(name: str = "report_exported", /, **params: Any) -> dict[str, Any]:
    return {"name": name, "params": params} if params else {"name": name}


def ga_body(*events: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "client_id": CLIENT,
        "timestamp_micros": EVENT_MS * 1000,
        **fields,
        "events": list(events),
    }


async def post(
    api: TestClient[Any, Any],
    body: Any,
    path: str = "/mp/collect",
    query: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with api.post(path, data=data, params=QUERY if query is None else query) as resp:
        return resp.status, await resp.read()


async def validate(api: TestClient[Any, Any], body: Any, **query: str) -> list[dict[str, str]]:
    status, answer = await post(api, body, "/debug/mp/collect", query)
    assert status == 200
    messages: list[dict[str, str]] = json.loads(answer)["validationMessages"]
    return messages


async def test_emulator_accepts_valid_events_with_204(
    api: TestClient[Any, Any], emulator: Ga4Emulator
) -> None:
    body = ga_body(
        ga_event("a", x=1), ga_event("b"), user_id="u-1", user_properties={"plan": {"value": "pro"}}
    )
    assert await post(api, body) == (204, b"")
    assert emulator.events() == [ga_event("a", x=1), ga_event("b")]
    entry = emulator.ledger[0]
    assert (entry.stream, entry.client_id, entry.user_id) == (MEASUREMENT_ID, CLIENT, "u-1")
    assert entry.timestamp_micros == EVENT_MS * 1000
    assert entry.user_properties == {"plan": {"value": "pro"}}
    assert emulator.dropped == []
    assert await validate(api, body) == []


async def test_emulator_debug_answers_the_documented_example(api: TestClient[Any, Any]) -> None:
    messages = await validate(api, ga_body(ga_event("_badEventName")))
    assert messages == [
        {
            "fieldPath": "events",
            "description": "Event at index: [0] has invalid name [_badEventName]. Names must "
            "start with an alphabetic character and contain only alphanumeric characters and "
            "underscores.",
            "validationCode": "NAME_INVALID",
        }
    ]


async def test_emulator_drops_invalid_events_silently_and_keeps_the_rest(
    api: TestClient[Any, Any], emulator: Ga4Emulator
) -> None:
    body = ga_body(ga_event("ok_1"), ga_event("session_start"), ga_event("ok_2", x="y" * 101))
    assert await post(api, body) == (204, b"")
    assert emulator.events() == [ga_event("ok_1")]
    assert [(d.code, d.event["name"]) for d in emulator.dropped] == [
        ("NAME_RESERVED", "session_start"),
        ("VALUE_OUT_OF_BOUNDS", "ok_2"),
    ]


async def test_emulator_request_level_problems_drop_every_event(
    api: TestClient[Any, Any], emulator: Ga4Emulator
) -> None:
    old = EVENT_MS * 1000 - 72 * 3600 * 1_000_000  # 73 hours before NOW
    for body in (
        ga_body(ga_event("a"), timestamp_micros=old),
        ga_body(ga_event("a"), user_properties={"user_id": {"value": "x"}}),
        ga_body(*[ga_event("a")] * 26),
        ga_body(ga_event("a"), client_id=""),
    ):
        assert (await post(api, body))[0] == 204
    assert emulator.ledger == []
    assert [d.code for d in emulator.dropped] == [
        "VALUE_OUT_OF_BOUNDS",
        "NAME_RESERVED",
        *["EXCEEDED_MAX_ENTITIES"] * 26,
        "VALUE_REQUIRED",
    ]


async def test_emulator_checks_the_query_only_on_collect(
    api: TestClient[Any, Any], emulator: Ga4Emulator
) -> None:
    body = ga_body(ga_event("a"))
    for query in (
        {"measurement_id": MEASUREMENT_ID},
        {"measurement_id": MEASUREMENT_ID, "api_secret": "other"},
        {"api_secret": API_SECRET},
        {"measurement_id": "G-OTHER", "api_secret": API_SECRET},
        {**QUERY, "firebase_app_id": "1:2:3"},
    ):
        assert await post(api, body, query=query) == (204, b"")
        if "firebase_app_id" not in query:  # (with it, the body id is app_instance_id)
            assert await validate(api, body, **query) == []  # the validator checks neither
    assert emulator.ledger == []
    assert {d.code for d in emulator.dropped} == {"AUTH"}
    assert len(emulator.dropped) == 5


async def test_emulator_app_streams_need_app_instance_id(aiohttp_client: ClientFactory) -> None:
    emulator = Ga4Emulator(now=lambda: NOW)
    api = await aiohttp_client(emulator.app())
    query = {"firebase_app_id": "1:2:android:3", "api_secret": "s"}
    body = {"app_instance_id": "a" * 32, "events": [ga_event("a")]}
    assert (await post(api, body, query=query))[0] == 204
    assert emulator.ledger[0].client_id == "a" * 32
    messages = await validate(api, ga_body(ga_event("a")), **query)
    assert [m["validationCode"] for m in messages] == ["VALUE_REQUIRED"]
    assert messages[0]["fieldPath"] == "app_instance_id"


LONG = "x" * 101
CODES: list[tuple[Any, list[str]]] = [
    (b"{not json", ["VALUE_INVALID"]),
    (b'{"client_id": "c", "events": [{"name": "a", "params": {"v": NaN}}]}', ["VALUE_INVALID"]),
    (b'{"client_id": "c", "client_id": "d", "events": [{"name": "a"}]}', ["NAME_DUPLICATED"]),
    (b"[]", ["VALUE_INVALID"]),
    ({"events": [ga_event()]}, ["VALUE_REQUIRED"]),
    ({"client_id": 5, "events": [ga_event()]}, ["VALUE_INVALID"]),
    ({"client_id": "c"}, ["VALUE_REQUIRED"]),
    ({"client_id": "c", "events": []}, ["VALUE_REQUIRED"]),
    ({"client_id": "c", "events": {}}, ["VALUE_INVALID"]),
    (ga_body(ga_event(), user_id=7), ["VALUE_INVALID"]),
    (b'{"client_id":"c","user_id":"\\ud800","events":[{"name":"a"}]}', ["VALUE_INVALID"]),
    (ga_body(ga_event(), timestamp_micros="1705329000000000"), ["VALUE_INVALID"]),
    (ga_body(ga_event(), timestamp_micros=1.5), ["VALUE_INVALID"]),
    (ga_body(ga_event(), validation_behavior="STRICT"), ["VALUE_INVALID"]),
    (ga_body(ga_event(), validation_behavior="ENFORCE_RECOMMENDATIONS"), []),
    (ga_body(*[ga_event()] * 26), ["EXCEEDED_MAX_ENTITIES"]),
    (ga_body("nope"), ["VALUE_INVALID"]),  # type: ignore[arg-type]
    (ga_body({"params": {}}), ["VALUE_REQUIRED"]),
    (ga_body(ga_event("e" * 41)), ["NAME_INVALID"]),
    (ga_body(ga_event("e" * 40)), []),
    (ga_body(ga_event("has space")), ["NAME_INVALID"]),
    (ga_body(ga_event("9lives")), ["NAME_INVALID"]),
    (ga_body(ga_event("name\n")), ["NAME_INVALID"]),
    (ga_body(ga_event("first_visit")), ["NAME_RESERVED"]),
    (ga_body(ga_event("Ad_Click")), ["NAME_RESERVED"]),
    (ga_body(ga_event("firebase_x")), ["NAME_RESERVED"]),
    (ga_body(ga_event("ga_x")), ["NAME_RESERVED"]),
    (ga_body(ga_event("google_x")), ["NAME_RESERVED"]),
    (ga_body({"name": "a", "params": []}), ["VALUE_INVALID"]),
    (ga_body(ga_event(**{f"p{i}": i for i in range(26)})), ["EXCEEDED_MAX_ENTITIES"]),
    (ga_body(ga_event(**{f"p{i}": i for i in range(25)})), []),
    (ga_body(ga_event(**{"p" * 41: 1})), ["NAME_INVALID"]),
    (ga_body(ga_event(**{"google_p": 1})), ["NAME_RESERVED"]),
    (ga_body(ga_event(**{"gtag.p": 1})), ["NAME_INVALID"]),
    (ga_body(ga_event(**{"_p": 1})), ["NAME_INVALID"]),
    (ga_body(ga_event(v=LONG)), ["VALUE_OUT_OF_BOUNDS"]),
    (ga_body(ga_event(v="x" * 100, n=1.5, b=True)), []),
    (ga_body(ga_event(v=None)), ["VALUE_INVALID"]),
    (ga_body(ga_event(v={"a": 1})), ["VALUE_INVALID"]),
    (ga_body(ga_event(v=[1])), ["VALUE_INVALID"]),
    (ga_body(ga_event(items={})), ["VALUE_INVALID"]),
    (ga_body(ga_event(items=[1])), ["VALUE_INVALID"]),
    (ga_body(ga_event(items=[{"item_id": LONG}])), ["VALUE_OUT_OF_BOUNDS"]),
    (ga_body(ga_event(items=[{"item id": "a"}])), ["NAME_INVALID"]),
    (
        ga_body(ga_event(items=[{"item_id": "a", **{f"c{i}": i for i in range(11)}}])),
        ["EXCEEDED_MAX_ENTITIES"],
    ),
    (
        ga_body(ga_event(items=[{"item_id": "a", "price": 1, **{f"c{i}": i for i in range(10)}}])),
        [],
    ),
    (ga_body(ga_event(), user_properties=[]), ["VALUE_INVALID"]),
    (
        ga_body(ga_event(), user_properties={f"u{i}": {"value": 1} for i in range(26)}),
        ["EXCEEDED_MAX_ENTITIES"],
    ),
    (ga_body(ga_event(), user_properties={f"u{i}": {"value": 1} for i in range(25)}), []),
    (ga_body(ga_event(), user_properties={"u" * 25: {"value": 1}}), ["NAME_INVALID"]),
    (ga_body(ga_event(), user_properties={"u" * 24: {"value": "v" * 36}}), []),
    (ga_body(ga_event(), user_properties={"plan": {"value": "v" * 37}}), ["VALUE_OUT_OF_BOUNDS"]),
    (ga_body(ga_event(), user_properties={"plan": "pro"}), ["VALUE_INVALID"]),
    (
        ga_body(ga_event(), user_properties={"first_open_after_install": {"value": 1}}),
        ["NAME_RESERVED"],
    ),
    (ga_body(ga_event(), user_properties={"ga_plan": {"value": 1}}), ["NAME_RESERVED"]),
]


@pytest.mark.parametrize(("body", "codes"), CODES)
async def test_emulator_validation_codes(
    api: TestClient[Any, Any], emulator: Ga4Emulator, body: Any, codes: list[str]
) -> None:
    messages = await validate(api, body)
    assert [m["validationCode"] for m in messages] == codes
    assert all(set(m) == {"fieldPath", "description", "validationCode"} for m in messages)
    # /mp/collect answers 204 either way and keeps exactly the valid events.
    assert await post(api, body) == (204, b"")
    assert bool(emulator.dropped) == bool(codes)
    if not codes:
        assert len(emulator.ledger) == len(body["events"])


async def test_emulator_body_size_limit(api: TestClient[Any, Any], emulator: Ga4Emulator) -> None:
    def padded(size: int) -> bytes:
        body = ga_body(*[ga_event(items=[])] * 1)
        base = len(json.dumps(body).encode())
        body["events"][0]["params"]["items"] = []
        raw = json.dumps(body).encode()
        # Pad with whitespace, which JSON allows: the body's bytes are what is limited.
        return raw[:-1] + b" " * (size - base) + raw[-1:]

    assert await validate(api, padded(129_999)) == []
    over = await validate(api, padded(130_000))
    assert [m["validationCode"] for m in over] == ["VALUE_OUT_OF_BOUNDS"]
    assert (await post(api, padded(130_000)))[0] == 204
    assert emulator.ledger == []
    assert emulator.dropped[0].code == "VALUE_OUT_OF_BOUNDS"


async def test_emulator_backdating_window_on_its_clock(api: TestClient[Any, Any]) -> None:
    limit = int(NOW * 1_000_000) - 72 * 3600 * 1_000_000
    assert await validate(api, ga_body(ga_event(), timestamp_micros=limit)) == []
    late = await validate(api, ga_body(ga_event(), timestamp_micros=limit - 1))
    assert [m["validationCode"] for m in late] == ["VALUE_OUT_OF_BOUNDS"]


async def test_emulator_scripted_faults(api: TestClient[Any, Any], emulator: Ga4Emulator) -> None:
    emulator.script = [Fault(429, retry_after="3"), Fault(503)]
    async with api.post("/mp/collect", json=ga_body(ga_event()), params=QUERY) as resp:
        assert (resp.status, resp.headers["Retry-After"]) == (429, "3")
    assert (await post(api, ga_body(ga_event())))[0] == 503
    assert emulator.ledger == []
    assert (await post(api, ga_body(ga_event())))[0] == 204
    assert [r.status for r in emulator.requests] == [429, 503, 204]
    async with api.get("/mp/collect", params=QUERY) as resp:
        assert resp.status == 405  # POST only


# ---- conformance: what the sink sends vs. what the emulator keeps ---------------------------


def naive_body(payload: dict[str, Any], ev: Event) -> bytes:
    """The GA4 request for an output, built with no checks at all (what a naive sink sends)."""
    body: dict[str, Any] = {"client_id": payload.get("client_id")}
    if "user_id" in payload:
        body["user_id"] = payload["user_id"]
    stamp = payload.get("timestamp", ev.timestamp)
    if isinstance(stamp, int) and not isinstance(stamp, bool):
        body["timestamp_micros"] = stamp * 1000
    elif stamp is not None:
        body["timestamp_micros"] = stamp
    if "user_properties" in payload:
        properties = payload["user_properties"]
        body["user_properties"] = (
            {k: {"value": v} for k, v in properties.items()}
            if isinstance(properties, dict)
            else properties
        )
    event_object: dict[str, Any] = {"name": payload.get("name")}
    if "params" in payload:
        event_object["params"] = payload["params"]
    body["events"] = [event_object]
    return json.dumps(body).encode()  # NaN as NaN, lone surrogates as \ud800 escapes


VALID: list[dict[str, Any]] = [
    {},
    {"user_id": "u-1", "params": {"a": "b", "n": 1, "f": 0.25, "t": False}},
    {"user_properties": {"plan": "pro", "seats": 3}},
    {"params": {"items": [{"item_id": "SKU_1", "price": 9.99, "quantity": 2, "color": "red"}]}},
    {"name": "E" * 40, "params": {"label": "é" * 100}},
    {"timestamp": EVENT_MS - 71 * 3_600_000},
]


@pytest.mark.parametrize(
    "fields",
    [f for f, _ in INVALID if "timestamp" not in f or isinstance(f["timestamp"], int)]
    + [*VALID, {"timestamp": EVENT_MS - 74 * 3_600_000}],
)
async def test_the_sink_refuses_exactly_what_the_emulator_drops(
    api: TestClient[Any, Any], emulator: Ga4Emulator, fields: dict[str, Any]
) -> None:
    """Refused by prepare <=> dropped by /mp/collect and flagged by /debug/mp/collect."""
    payload = {"name": "report_exported", "client_id": CLIENT, **fields}
    payload = {k: v for k, v in payload.items() if v is not None}
    emulator.now = lambda: EVENT_MS / 1000
    try:
        sink(clock=EVENT_MS / 1000).prepare(routed(**payload), KEY, event())
    except ValueError:
        refused = True
    else:
        refused = False
    raw = naive_body(payload, event())
    messages = await validate(api, raw)
    assert (await post(api, raw))[0] == 204
    assert bool(messages) == refused, messages
    assert bool(emulator.dropped) == refused
    assert len(emulator.ledger) == (0 if refused else 1)


async def test_every_request_the_sink_sends_is_valid_for_the_debug_endpoint(
    api: TestClient[Any, Any], emulator: Ga4Emulator
) -> None:
    s = sink()
    items = [
        s.prepare(output(**{"name": f"valid_{i}", **fields}), f"k{i}", event())
        for i, fields in enumerate(VALID)
    ]
    items += [_big(100 + i, 40_000) for i in range(4)]
    items += [prepared(200 + i) for i in range(30)]
    requests = s.build(items)
    assert len(requests) > 3
    for request in requests:
        assert await validate(api, request.body) == []
        assert await post(api, request.body) == (204, b"")
    assert emulator.dropped == []
    assert len(emulator.ledger) == len(items)


# ---- end to end over HTTP ------------------------------------------------------------------


async def send(request: HttpRequest) -> HttpResponse:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            request.method, request.url, headers=dict(request.headers), data=request.body
        ) as resp,
    ):
        headers = {k.lower(): v for k, v in resp.headers.items()}
        return HttpResponse(resp.status, headers, await resp.read())


async def test_fixtures_end_to_end(aiohttp_server: ServerFactory) -> None:
    """The shared fixtures through rules/ga4.yaml, each sent when it happened (plus a minute)."""
    emulator = Ga4Emulator(api_secrets={API_SECRET}, streams={MEASUREMENT_ID})
    server = await aiohttp_server(emulator.app())
    ruleset = load_rules(ROOT / "rules" / "ga4.yaml").ruleset
    assert ruleset is not None
    sent = 0
    for events in fixture_events().values():
        for ev in events:
            for out in ruleset.evaluate(ev):
                assert isinstance(out, Routed)
                now = ev.timestamp / 1000 + 60
                emulator.now = lambda now=now: now  # type: ignore[misc]
                s = sink(clock=now, endpoint=str(server.make_url("")))
                item = s.prepare(out, idempotency_key(ev.id, s.name, out.rule_id), ev)
                (request,) = s.build([item])
                assert s.classify(request, await send(request)) == Delivered()
                sent += 1
    assert sent == 10
    assert emulator.dropped == []
    assert len(emulator.ledger) == sent
    assert {e.client_id for e in emulator.ledger} == {CLIENT}


async def test_sink_outcomes_from_emulator_answers(aiohttp_server: ServerFactory) -> None:
    emulator = Ga4Emulator(api_secrets={API_SECRET}, now=lambda: NOW)
    server = await aiohttp_server(emulator.app())
    s = sink(endpoint=str(server.make_url("")))
    items = [prepared(0), prepared(1, timestamp=EVENT_MS + 5), prepared(2)]
    requests = s.build(items)
    for request in requests:
        assert s.classify(request, await send(request)) == Delivered()
    ledger = [(e.event["name"], e.timestamp_micros) for e in emulator.ledger]
    assert ledger == [
        ("event_0", EVENT_MS * 1000),
        ("event_2", EVENT_MS * 1000),
        ("event_1", (EVENT_MS + 5) * 1000),
    ]
    health = s.health_request()
    assert health is not None
    assert s.classify(health, await send(health)) == Delivered()
    assert len(emulator.ledger) == 3  # the debug endpoint records nothing
    emulator.script = [Fault(429, retry_after="2"), Fault(500)]
    (request,) = s.build([prepared(3)])
    assert s.classify(request, await send(request)) == Retry("HTTP 429: ", 2.0)
    assert isinstance(s.classify(request, await send(request)), Retry)
    assert s.classify(request, await send(request)) == Delivered()
    wrong = sink(endpoint=str(server.make_url("/nope")))
    (request,) = wrong.build([prepared(4)])
    assert isinstance(wrong.classify(request, await send(request)), Pause)


async def test_preflight_against_the_emulator(aiohttp_server: ServerFactory) -> None:
    emulator = Ga4Emulator(now=lambda: NOW)
    server = await aiohttp_server(emulator.app())
    settings = Ga4Settings(
        endpoint=str(server.make_url("")),
        measurement_id=MEASUREMENT_ID,
        validate_with_debug_endpoint=True,
    )
    s = Ga4Sink(settings, Secret(API_SECRET), lambda: NOW)
    good = [prepared(0), prepared(1)]
    (request,) = s.build(good)
    check = s.preflight(request)
    assert check is not None
    assert s.classify(check, await send(check)) == Delivered()
    assert emulator.ledger == []  # validation sends nothing to reports
    # An event that slipped past prepare (hand-made here) is named by the debug endpoint.
    smuggled = json.loads(good[1].body)
    smuggled["events"][0]["name"] = "session_start"
    (request,) = s.build([good[0], Prepared(json.dumps(smuggled).encode(), CLIENT)])
    check = s.preflight(request)
    assert check is not None
    outcome = s.classify(check, await send(check))
    assert isinstance(outcome, Partial)
    assert list(outcome.rejected) == [1]
    assert "NAME_RESERVED" in outcome.rejected[1]


def test_an_empty_user_id_is_no_user_id() -> None:
    assert "user_id" not in body_of(sink().prepare(output(user_id=""), KEY, event()))
