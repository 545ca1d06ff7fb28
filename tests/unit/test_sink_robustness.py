"""Every sink against odd values and odd answers: prepare refuses with ValueError, classify never raises.

The consumer dead-letters an output whose prepare raises ValueError; any other exception from
prepare, or any exception from classify, is a sink bug that once stopped the consumer. The
cases below are the ones a fuzzer found (each raised before its fix).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

import sinks
from router.delivery.retry import parse_retry_after
from router.delivery.sink import HttpRequest, HttpResponse, Outcome, Pause, json_answer
from router.events import Event, now_ms
from router.rules.engine import Routed

KEY = "00000000-0000-0000-0000-111111111111"
EVENT = Event(
    id="evt-1",
    source="track",
    type="track.event",
    name="Clicked",
    visitor_id="visitor-1",
    timestamp=now_ms(),  # GA4 refuses events backdated more than 72 hours
    received_at=now_ms(),
)
CONFIGS: dict[str, dict[str, Any]] = {
    "segment": {"write_key": "wk"},
    "mixpanel": {"project_token": "pt"},
    "ga4": {"measurement_id": "G-TEST1", "api_secret": "as"},
    "amplitude": {"api_key": "ak"},
    "slack": {"bot_token": "xoxb-1", "channel": "#product-insights"},
}
#: A valid payload per sink, and the field that carries its event time.
GOOD: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "segment": ("track", {"event": "E", "userId": "user-1", "properties": {}}, "timestamp"),
    "mixpanel": ("event", {"event": "E", "distinct_id": "user-1", "properties": {}}, "time"),
    "ga4": ("event", {"name": "e", "client_id": "c1", "params": {}}, "timestamp"),
    "amplitude": ("event", {"event_type": "E", "user_id": "user-1"}, "time"),
    "slack": ("message", {"text": "hello"}, None),
}


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


DEEP = _nested(900)  # the ingest accepts events nested about this deep


def sink(name: str) -> Any:
    return sinks.create(name, CONFIGS[name])


def prepare(name: str, **changes: Any) -> Any:
    kind, payload, _ = GOOD[name]
    return sink(name).prepare(Routed("rule-1", kind, {**payload, **changes}, "hash"), KEY, EVENT)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_good_payloads_are_good(name: str) -> None:
    assert prepare(name).body


@pytest.mark.parametrize("name", [n for n, (_, _, t) in sorted(GOOD.items()) if t])
@pytest.mark.parametrize("value", [-1e306, 1e306, 10**30, -(10**30)])
def test_a_time_out_of_range_is_a_value_error(name: str, value: Any) -> None:
    time_field = GOOD[name][2]
    assert time_field is not None
    with pytest.raises(ValueError, match=f"{time_field}: .* out of the date-time range"):
        prepare(name, **{time_field: value})


@pytest.mark.parametrize("name", ["segment", "mixpanel", "amplitude", "ga4"])
def test_properties_nested_deeply_are_sent_or_refused_with_a_value_error(name: str) -> None:
    field = {"ga4": "params", "amplitude": "event_properties"}.get(name, "properties")
    try:
        prepared = prepare(name, **{field: {"p": DEEP}})
    except ValueError:
        return
    assert name == "amplitude"  # no nesting limit in its contract; the others have one
    assert len(prepared.body) > 1800


@pytest.mark.parametrize("field", ["context", "integrations"])
@pytest.mark.parametrize("value", [True, [1, 2], "text", 3])
def test_segment_object_fields_that_are_not_objects(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"^{field}: expected an object"):
        prepare("segment", **{field: value})


ODD_BODIES = [
    b"",
    b"not json",
    b"\xff\xfe\x00garbage",
    b"[" * 1000 + b"]" * 1000,
    b'{"a":' * 1000 + b"1" + b"}" * 1000,
    b"[]",
    b"null",
    b'"text"',
    b'{"error": 1, "ok": "yes", "failed_records": 3, "validationMessages": {}}',
    b'{"throttled_events": [0], "exceeded_daily_quota_users": 1}',
    b'{"throttled_events": [0], "exceeded_daily_quota_devices": true}',
    json.dumps(
        {"validationMessages": [{"description": "Event at index: [" + "9" * 4301 + "]"}]}
    ).encode(),
]
ODD_HEADERS = [{}, {"retry-after": "²"}, {"retry-after": "①"}, {"retry-after": "nan"}]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_classify_never_raises(name: str) -> None:
    the_sink = sink(name)
    requests: list[HttpRequest] = the_sink.build([prepare(name)])
    health = the_sink.health_request()
    if health is not None:
        requests.append(health)  # GA4's debug endpoint answers are read differently
    outcomes: list[Outcome] = []
    for request in requests:
        for status in (200, 400, 404, 413, 429, 500, 503):
            for headers in ODD_HEADERS:
                for body in ODD_BODIES:
                    outcomes.append(the_sink.classify(request, HttpResponse(status, headers, body)))
    assert outcomes
    assert any(isinstance(o, Pause) for o in outcomes)  # at least the 404s


def test_retry_after_with_digits_float_refuses() -> None:
    assert parse_retry_after("²") is None
    assert parse_retry_after("٣") == 3.0  # a decimal digit float() reads
    assert parse_retry_after("30") == 30.0


def test_json_answer() -> None:
    assert json_answer(b'{"ok": true}') == {"ok": True}
    assert json_answer(b"[" * 1000 + b"]" * 1000) is None
    assert json_answer(b"\xff") is None
