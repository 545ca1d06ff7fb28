"""The Mixpanel sink (sinks/mixpanel.py) and its emulator (tests/emulators/mixpanel.py).

Unit tests of prepare/build/classify, golden requests for every shared fixture, the emulator
against sinks.md section 2a, the official mixpanel library sending to the emulator (so the
emulator accepts what the real client sends), and our built requests over HTTP, including a
partial failure whose classification dead-letters exactly the records Mixpanel listed.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
from router.events import Event
from router.rules.engine import Routed
from sinks import mixpanel
from tests.emulators.mixpanel import BODIES, BODY_LIMIT, Fault, MixpanelEmulator
from tests.golden import check_golden, golden_requests

# Fixed fake credentials (the golden files are generated with these).
SA_CONFIG: dict[str, Any] = {
    "project_id": "123456",
    "service_account": {"username": "sa-user.123.mp-service-account", "secret": "sa-secret"},
}
TOKEN_CONFIG: dict[str, Any] = {"project_token": "project-token"}
T0 = 1_705_329_000_000  # 2024-01-15T14:30:00Z


def event(**kw: Any) -> Event:
    fields: dict[str, Any] = {
        "id": "evt-1",
        "source": "webhook",
        "type": "track.event",
        "name": "test",
        "visitor_id": "user_1",
        "timestamp": T0,
        "received_at": T0,
    }
    fields.update(kw)
    return Event(**fields)


def routed(payload: dict[str, Any], rule: str = "track-events") -> Routed:
    return Routed(rule, "event", payload, "hash")


def prepare(sink: mixpanel.MixpanelSink, payload: dict[str, Any], key: str = "") -> Prepared:
    ev = event()
    key = key or idempotency_key(ev.id, "mixpanel", "track-events")
    return sink.prepare(routed(payload), key, ev)


def decoded(prepared: Prepared) -> dict[str, Any]:
    result: dict[str, Any] = msgspec.json.decode(prepared.body)
    return result


def request_body(request: HttpRequest) -> list[dict[str, Any]]:
    body = request.body
    if request.headers.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    result: list[dict[str, Any]] = msgspec.json.decode(body)
    return result


def response(status: int, body: Any = b"", headers: dict[str, str] | None = None) -> HttpResponse:
    raw = body if isinstance(body, bytes) else msgspec.json.encode(body)
    return HttpResponse(status, headers or {}, raw)


@pytest.fixture
def sink() -> mixpanel.MixpanelSink:
    return mixpanel.create(SA_CONFIG)


# ---- settings -------------------------------------------------------------------------------


def test_service_account_settings() -> None:
    sink = mixpanel.create({**SA_CONFIG, "project_id": 123456, "endpoint": "EU"})
    assert sink.url == "https://api-eu.mixpanel.com/import?strict=1&project_id=123456"
    assert not sink.dry_run
    request = sink.build([Prepared(b"{}")])[0]
    expected = base64.b64encode(b"sa-user.123.mp-service-account:sa-secret").decode()
    assert request.headers["Authorization"] == f"Basic {expected}"


def test_project_token_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MP_TOKEN", "tok-from-env")
    sink = mixpanel.create({"project_token": {"env": "MP_TOKEN"}, "endpoint": "IN"})
    assert sink.url == "https://api-in.mixpanel.com/import?strict=1"
    request = sink.build([Prepared(b"{}")])[0]
    assert (
        request.headers["Authorization"] == "Basic " + base64.b64encode(b"tok-from-env:").decode()
    )


def test_no_credentials_is_a_dry_run() -> None:
    sink = mixpanel.create({})
    assert sink.dry_run
    assert sink.url == "https://api.mixpanel.com/import?strict=1"
    assert "Authorization" not in sink.build([Prepared(b"{}")])[0].headers
    # a dry run logs bodies: never gzipped
    assert "Content-Encoding" not in sink.build([Prepared(b'"' + b"x" * 5000 + b'"')])[0].headers


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"endpont": "US"}, "unknown field"),
        ({**SA_CONFIG, **TOKEN_CONFIG}, "not both"),
        ({"service_account": SA_CONFIG["service_account"]}, "needs project_id"),
        ({"endpoint": "moon"}, "not US, EU, IN"),
        ({"project_token": {"env": "MP_SURELY_UNSET_VAR"}}, "project_token: environment"),
        ({"project_token": ""}, "project_token: secret is empty"),
    ],
)
def test_bad_settings_are_refused(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mixpanel.create(config)


def test_secret_never_in_errors_or_repr() -> None:
    sink = mixpanel.create(SA_CONFIG)
    assert "sa-secret" not in repr(vars(sink))


def test_secrets_cover_the_wire_forms() -> None:
    basic = base64.b64encode(b"sa-user.123.mp-service-account:sa-secret").decode()
    assert mixpanel.create(SA_CONFIG).secrets() == ["sa-secret", basic]
    token_basic = base64.b64encode(b"project-token:").decode()
    assert mixpanel.create(TOKEN_CONFIG).secrets() == ["project-token", token_basic]
    assert mixpanel.create({}).secrets() == []


def test_health_request_is_none(sink: mixpanel.MixpanelSink) -> None:
    assert sink.health_request() is None


def test_limits_follow_the_contract() -> None:
    limits = mixpanel.LIMITS
    assert limits.max_events == 2000
    # A full batch, as the batcher counts it, plus the brackets fits 2 MB exactly.
    assert limits.max_bytes + 1 == 2_097_152
    assert limits.max_event_bytes < 1_000_000


# ---- prepare --------------------------------------------------------------------------------


def test_prepare_builds_the_import_event(sink: mixpanel.MixpanelSink) -> None:
    body = decoded(
        prepare(
            sink,
            {"event": "Clicked", "distinct_id": "u1", "time": T0, "properties": {"a": 1}},
            key="8a66058c-a56d-4ef6-8123-28b7c9f7e82f",
        )
    )
    assert body == {
        "event": "Clicked",
        "properties": {
            "distinct_id": "u1",
            "time": T0,
            "$insert_id": "8a66058c-a56d-4ef6-8123-28b7c9f7e82f",
            "mp_lib": "python",
            "$lib_version": "5.4.1",
            "a": 1,
        },
    }


def test_prepare_uses_the_library(sink: mixpanel.MixpanelSink, monkeypatch: Any) -> None:
    calls: list[tuple[Any, ...]] = []
    original = sink._mixpanel.import_data

    def spy(*args: Any) -> None:
        calls.append(args)
        original(*args)

    monkeypatch.setattr(sink._mixpanel, "import_data", spy)
    prepare(sink, {"event": "E", "distinct_id": "u1"})
    assert len(calls) == 1
    assert calls[0][1:4] == ("u1", "E", T0)


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        (T0, T0),
        (T0 // 1000, T0),  # seconds
        (1_705_329_000.5, T0 + 500),
        (float(T0) + 0.9, T0),
        ("2024-01-15T14:30:00Z", T0),
        ("2024-01-15T14:30:00.250+00:00", T0 + 250),
        ("2024-01-15T15:30:00+01:00", T0),
        ("2024-01-15T14:30:00", T0),  # no zone = UTC
        (datetime(2024, 1, 15, 14, 30, tzinfo=UTC), T0),
    ],
)
def test_time_becomes_integer_ms(sink: mixpanel.MixpanelSink, value: Any, ms: int) -> None:
    props = decoded(prepare(sink, {"event": "E", "distinct_id": "u", "time": value}))["properties"]
    assert props["time"] == ms
    assert type(props["time"]) is int


def test_time_defaults_to_the_event_time(sink: mixpanel.MixpanelSink) -> None:
    assert decoded(prepare(sink, {"event": "E", "distinct_id": "u"}))["properties"]["time"] == T0
    payload = {"event": "E", "distinct_id": "u", "time": None, "properties": None}
    assert decoded(prepare(sink, payload))["properties"]["time"] == T0


@pytest.mark.parametrize("value", [0, -5, 31_536_000, "yesterday", True, float("nan"), [1]])
def test_times_mixpanel_refuses_are_refused(sink: mixpanel.MixpanelSink, value: Any) -> None:
    with pytest.raises(ValueError, match="time"):
        prepare(sink, {"event": "E", "distinct_id": "u", "time": value})


def test_reserved_properties_cannot_override_dedup_fields(sink: mixpanel.MixpanelSink) -> None:
    key = "11111111-2222-3333-4444-555555555555"
    props = decoded(
        prepare(
            sink,
            {
                "event": "E",
                "distinct_id": "u1",
                "properties": {
                    "time": "not a time",
                    "distinct_id": "someone else",
                    "$insert_id": "other",
                    "token": "leak",
                    "kept": True,
                },
            },
            key=key,
        )
    )["properties"]
    assert props["time"] == T0
    assert props["distinct_id"] == "u1"
    assert props["$insert_id"] == key
    assert "token" not in props
    assert props["kept"] is True


@pytest.mark.parametrize(
    "distinct_id",
    ["anonymous", "NULL", " none ", "0", "-1", "{}", "00000000-0000-0000-0000-000000000000"],
)
def test_blacklisted_distinct_ids_are_refused(
    sink: mixpanel.MixpanelSink, distinct_id: str
) -> None:
    with pytest.raises(ValueError, match="distinct_id"):
        prepare(sink, {"event": "E", "distinct_id": distinct_id})


def test_empty_distinct_id_is_allowed(sink: mixpanel.MixpanelSink) -> None:
    assert (
        decoded(prepare(sink, {"event": "E", "distinct_id": ""}))["properties"]["distinct_id"] == ""
    )


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"distinct_id": "u"}, "event"),
        ({"event": "", "distinct_id": "u"}, "event"),
        ({"event": "E"}, "distinct_id"),
        ({"event": "E", "distinct_id": 7}, "distinct_id"),
        ({"event": "E", "distinct_id": "u", "properties": [1]}, "properties"),
        ({"event": "E", "distinct_id": "u", "properties": {"x": float("nan")}}, "JSON"),
        ({"event": "E", "distinct_id": "u", "properties": {"x": object()}}, "JSON"),
        ({"event": "E", "distinct_id": "u", "properties": {f"p{i}": i for i in range(250)}}, "255"),
        ({"event": "E", "distinct_id": "u", "properties": {"a": {"b": {"c": {"d": 1}}}}}, "deeper"),
        ({"event": "E", "distinct_id": "u", "properties": {"a": list(range(255))}}, "255"),
        (
            {
                "event": "E",
                "distinct_id": "u",
                "properties": {"a": {str(i): i for i in range(255)}},
            },
            "255",
        ),
    ],
)
def test_payloads_mixpanel_refuses_are_refused(
    sink: mixpanel.MixpanelSink, payload: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        prepare(sink, payload)


def test_depth_three_and_254_entries_pass(sink: mixpanel.MixpanelSink) -> None:
    props = {"a": {"b": {"c": 1}}, "l": list(range(254)), "m": [[1]]}
    assert decoded(prepare(sink, {"event": "E", "distinct_id": "u", "properties": props}))


@pytest.mark.parametrize("key", ["x" * 37, "has_underscore", "null"])
def test_invalid_keys_become_a_stable_uuid(sink: mixpanel.MixpanelSink, key: str) -> None:
    first = decoded(prepare(sink, {"event": "E", "distinct_id": "u"}, key=key))
    again = decoded(prepare(sink, {"event": "E", "distinct_id": "u"}, key=key))
    insert_id = first["properties"]["$insert_id"]
    assert insert_id == again["properties"]["$insert_id"]
    assert len(insert_id) == 36
    if key and key != "null" and len(key) > 36:
        assert insert_id != key


def test_router_keys_are_used_as_they_are(sink: mixpanel.MixpanelSink) -> None:
    key = idempotency_key("evt-1", "mixpanel", "track-events")
    assert (
        decoded(prepare(sink, {"event": "E", "distinct_id": "u"}, key=key))["properties"][
            "$insert_id"
        ]
        == key
    )


def test_non_ascii_is_sent_as_utf8(sink: mixpanel.MixpanelSink) -> None:
    body = prepare(sink, {"event": "Vu é", "distinct_id": "ü", "properties": {"t": "日本"}}).body
    assert "日本".encode() in body
    assert decoded(Prepared(body))["event"] == "Vu é"


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_ids = st.one_of(
    st.sampled_from(["anonymous", "NULL", "0", "-1", "[]", "", "user_1", " none", "n/a"]),
    st.text(max_size=12),
)
# Past times only: the "1 hour in the future" rule is Mixpanel's clock, which prepare (pure)
# leaves to Mixpanel (its 400 dead-letters the event).
_times = st.one_of(
    st.integers(0, T0 // 1000),  # seconds
    st.integers(10**11, T0),  # milliseconds
    st.floats(0, T0 / 1000, allow_nan=False),
    st.datetimes(min_value=datetime(1960, 1, 1), max_value=datetime(2025, 1, 1)),
)
_keys = st.one_of(st.uuids().map(str), st.text(max_size=40))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.one_of(st.text(max_size=10), st.just("")),
    distinct_id=_ids,
    when=_times,
    properties=st.dictionaries(st.text(max_size=10), _values, max_size=8),
    key=_keys,
)
def test_what_prepare_lets_through_the_emulator_accepts(
    name: str, distinct_id: str, when: Any, properties: dict[str, Any], key: str
) -> None:
    """Prepare either refuses (ValueError: dead-lettered) or builds an event Mixpanel accepts."""
    sink = mixpanel.create(SA_CONFIG)
    payload = {"event": name, "distinct_id": distinct_id, "time": when, "properties": properties}
    try:
        prepared = sink.prepare(routed(payload), key, event())
    except ValueError:
        return
    emulator = MixpanelEmulator()
    assert emulator.validate(0, msgspec.Raw(prepared.body)) is None


# ---- build ----------------------------------------------------------------------------------


def items(sink: mixpanel.MixpanelSink, n: int, pad: int = 0) -> list[Prepared]:
    return [
        prepare(
            sink,
            {"event": "E", "distinct_id": f"u{i}", "properties": {"pad": "x" * pad}},
            key=f"k-{i}",
        )
        for i in range(n)
    ]


def test_build_one_json_array_request(sink: mixpanel.MixpanelSink) -> None:
    batch = items(sink, 3)
    (request,) = sink.build(batch)
    assert request.method == "POST"
    assert request.url == "https://api.mixpanel.com/import?strict=1&project_id=123456"
    assert request.headers["Content-Type"] == "application/json"
    assert request.items == (0, 1, 2)
    assert request_body(request) == [decoded(p) for p in batch]


def test_build_gzips_large_bodies_only(sink: mixpanel.MixpanelSink) -> None:
    (small,) = sink.build(items(sink, 1))
    assert "Content-Encoding" not in small.headers
    batch = items(sink, 20, pad=100)
    (large,) = sink.build(batch)
    assert large.headers["Content-Encoding"] == "gzip"
    assert len(large.body) < len(b",".join(p.body for p in batch))
    assert request_body(large) == [decoded(p) for p in batch]
    assert sink.build(batch)[0].body == large.body  # deterministic


def test_build_splits_past_2000_events(sink: mixpanel.MixpanelSink) -> None:
    batch = [Prepared(b'{"e":1}')] * 4001
    requests = sink.build(batch)
    assert [len(r.items) for r in requests] == [2000, 2000, 1]
    assert [i for r in requests for i in r.items] == list(range(4001))


def test_build_keeps_each_body_within_2mb(sink: mixpanel.MixpanelSink) -> None:
    one = Prepared(b'"' + b"x" * 699_998 + b'"')  # 700,000 bytes
    requests = sink.build([one] * 7)
    assert [len(r.items) for r in requests] == [2, 2, 2, 1]
    for r in requests:
        assert len(gzip.decompress(r.body)) <= BODY_LIMIT
    exact = Prepared(b'"' + b"x" * (1_048_575 - 2) + b'"')  # two of them + "[,]" = 2,097,153
    assert [len(r.items) for r in sink.build([exact, exact])] == [1, 1]


def test_build_of_a_batcher_full_batch_is_one_request(sink: mixpanel.MixpanelSink) -> None:
    size = 2000
    count = (mixpanel.LIMITS.max_bytes) // (size + 1)
    batch = [Prepared(b'"' + b"y" * (size - 2) + b'"')] * count
    (request,) = sink.build(batch)
    assert len(gzip.decompress(request.body)) <= BODY_LIMIT


# ---- classify -------------------------------------------------------------------------------


def req(n: int) -> HttpRequest:
    return HttpRequest("POST", "u", {}, b"[]", tuple(range(10, 10 + n)))


def test_200_is_delivered(sink: mixpanel.MixpanelSink) -> None:
    body = {"code": 200, "num_records_imported": 3, "status": "OK"}
    assert sink.classify(req(3), response(200, body)) == Delivered()


def test_400_with_failed_records_is_partial(sink: mixpanel.MixpanelSink) -> None:
    body = {
        "code": 400,
        "error": "some data points in the request failed validation",
        "status": "Bad Request",
        "num_records_imported": 2,
        "failed_records": [
            {
                "index": 1,
                "insert_id": "abc",
                "field": "properties.time",
                "message": "'properties.time' is invalid: must be specified as seconds since epoch",
            },
            {"index": 3, "$insert_id": "def", "field": "properties.x", "message": "bad utf8"},
            {"index": 99, "field": "event", "message": "outside the request: ignored"},
        ],
    }
    outcome = sink.classify(req(4), response(400, body))
    assert isinstance(outcome, Partial)
    assert dict(outcome.rejected) == {
        1: "'properties.time' is invalid: must be specified as seconds since epoch",
        3: "properties.x: bad utf8",
    }
    assert outcome.retry == ()  # nothing accepted is sent again


def test_400_without_failed_records_is_rejected(sink: mixpanel.MixpanelSink) -> None:
    outcome = sink.classify(
        req(2), response(400, {"code": 400, "error": "x", "status": "Bad Request"})
    )
    assert isinstance(outcome, Reject)
    assert isinstance(sink.classify(req(2), response(400, b"<html>")), Reject)
    only_outside = {"failed_records": [{"index": 5, "message": "m"}]}
    assert isinstance(sink.classify(req(2), response(400, only_outside)), Reject)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (413, Split),
        (401, Pause),
        (403, Pause),
        (500, Retry),
        (504, Retry),
        (404, Pause),  # a wrong endpoint setting: no event is at fault
        (301, Pause),
        (501, Reject),
    ],
)
def test_statuses(sink: mixpanel.MixpanelSink, status: int, kind: type) -> None:
    outcome = sink.classify(req(1), response(status, BODIES.get(status, {})))
    assert isinstance(outcome, kind)
    if status in (301, 404):
        assert "check sinks.mixpanel.endpoint: https://api.mixpanel.com" in str(outcome)


def test_429_backs_off_at_least_2s(sink: mixpanel.MixpanelSink) -> None:
    outcome = sink.classify(req(1), response(429, BODIES[429]))
    assert isinstance(outcome, Retry)
    assert outcome.after_s == 2.0
    longer = sink.classify(req(1), response(429, BODIES[429], {"retry-after": "30"}))
    assert isinstance(longer, Retry)
    assert longer.after_s == 30.0
    assert isinstance(sink.classify(req(1), response(503, b"")), Retry)


# ---- golden ---------------------------------------------------------------------------------


def test_golden_requests() -> None:
    sink = mixpanel.create(SA_CONFIG)
    actual = golden_requests(sink, SA_CONFIG)
    assert sum(len(v) for v in actual.values()) >= 13
    check_golden("mixpanel", actual)


# ---- the emulator ---------------------------------------------------------------------------


@pytest.fixture
async def emulator() -> AsyncIterator[tuple[MixpanelEmulator, str]]:
    emu = MixpanelEmulator()
    server = TestServer(emu.app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield emu, f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


def sa_auth(emu: MixpanelEmulator) -> dict[str, str]:
    token = base64.b64encode(f"{emu.username}:{emu.secret}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def good(i: int = 0, **props: Any) -> dict[str, Any]:
    base = {"time": T0 + i, "distinct_id": f"u{i}", "$insert_id": f"id-{i}"}
    return {"event": "E", "properties": {**base, **props}}


async def post(
    url: str,
    body: Any,
    headers: dict[str, str],
    query: str = "strict=1&project_id=123456",
    content_type: str = "application/json",
    gzipped: bool = False,
) -> tuple[int, Any]:
    raw = body if isinstance(body, bytes) else msgspec.json.encode(body)
    headers = {"Content-Type": content_type, **headers}
    if gzipped:
        raw = gzip.compress(raw)
        headers["Content-Encoding"] = "gzip"
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/import?{query}", data=raw, headers=headers) as resp,
    ):
        text = await resp.read()
        try:
            return resp.status, msgspec.json.decode(text)
        except msgspec.DecodeError:
            return resp.status, text.decode()


async def test_emulator_accepts_valid_events(emulator: tuple[MixpanelEmulator, str]) -> None:
    emu, url = emulator
    status, body = await post(url, [good(0), good(1)], sa_auth(emu))
    assert (status, body) == (200, {"code": 200, "num_records_imported": 2, "status": "OK"})
    assert emu.insert_ids() == ["id-0", "id-1"]


async def test_emulator_auth_forms(emulator: tuple[MixpanelEmulator, str]) -> None:
    emu, url = emulator
    token = {"Authorization": "Basic " + base64.b64encode(b"project-token:").decode()}
    assert (await post(url, [good()], token, query="strict=1"))[0] == 200
    # the token with a project_id is not a service account
    assert (await post(url, [good()], token))[0] == 401
    wrong = {"Authorization": "Basic " + base64.b64encode(f"{emu.username}:nope".encode()).decode()}
    assert await post(url, [good()], wrong) == (401, BODIES[401])
    assert (await post(url, [good()], sa_auth(emu), query="strict=1&project_id=999"))[0] == 401
    assert (await post(url, [good()], {}))[0] == 401
    assert emu.received == [good()]


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"properties": good()["properties"]}, "event"),
        ({"event": "", "properties": good()["properties"]}, "event"),
        ({"event": "E"}, "properties"),
        (good(time=None), "properties.time"),
        (good(time=1_705_329_000.5), "properties.time"),
        (good(time="2024-01-15"), "properties.time"),
        (good(time=31_535_999), "properties.time"),  # 1970-12-31T23:59:59Z
        # Two days ahead, not just past the 1 h limit: computed at import, run minutes later.
        (good(time=int(time.time()) + 2 * 86400), "properties.time"),
        (good(time=int(time.time() * 1000) + 2 * 86_400_000), "properties.time"),
        (good(distinct_id=None), "properties.distinct_id"),
        (good(distinct_id=42), "properties.distinct_id"),
        (good(distinct_id="undefined"), "properties.distinct_id"),
        (good(distinct_id="Anonymous"), "properties.distinct_id"),
        (good(distinct_id="<nil>"), "properties.distinct_id"),
        ({"event": "E", "properties": {"time": T0, "distinct_id": "u"}}, "properties.$insert_id"),
        (good(**{"$insert_id": "x" * 37}), "properties.$insert_id"),
        (good(**{"$insert_id": "has_underscore"}), "properties.$insert_id"),
        (good(**{"$insert_id": "é"}), "properties.$insert_id"),
        (good(**{"$insert_id": ""}), "properties.$insert_id"),
        (good(**{"$insert_id": "false"}), "properties.$insert_id"),
        (good(**{f"p{i}": i for i in range(252)}), "properties"),
        (good(deep={"a": {"b": {"c": 1}}}), "properties.deep.a.b"),
        (good(arr=list(range(255))), "properties.arr"),
        (good(obj={str(i): i for i in range(255)}), "properties.obj"),
        (good(big="x" * 1_000_000), "event"),
    ],
)
async def test_emulator_strict_validation(
    emulator: tuple[MixpanelEmulator, str], record: dict[str, Any], field: str
) -> None:
    emu, url = emulator
    status, body = await post(url, [good(0), record, good(2)], sa_auth(emu))
    assert status == 400
    assert body["code"] == 400
    assert body["status"] == "Bad Request"
    assert body["error"] == "some data points in the request failed validation"
    assert body["num_records_imported"] == 2
    (failed,) = body["failed_records"]
    assert failed["index"] == 1
    assert failed["field"] == field
    assert failed["message"]
    # the valid records ARE ingested
    assert emu.insert_ids() == ["id-0", "id-2"]


async def test_emulator_accepts_edge_values(emulator: tuple[MixpanelEmulator, str]) -> None:
    emu, url = emulator
    records = [
        good(0, time=31_536_000),  # 1971-01-01 in seconds
        good(1, time=int(time.time()) + 3000),
        good(2, distinct_id=""),
        good(3, **{"$insert_id": "A" * 36}),
        good(4, **{f"p{i}": i for i in range(251)}),  # 254 properties
        good(5, nested={"a": {"b": 1}}, arr=list(range(254))),
    ]
    status, body = await post(url, records, sa_auth(emu))
    assert (status, body["num_records_imported"]) == (200, 6)


async def test_emulator_time_message_matches_the_docs(
    emulator: tuple[MixpanelEmulator, str],
) -> None:
    emu, url = emulator
    _, body = await post(url, [good(time="soon")], sa_auth(emu))
    assert body["failed_records"] == [
        {
            "index": 0,
            "insert_id": "id-0",
            "field": "properties.time",
            "message": "'properties.time' is invalid: must be specified as seconds since epoch",
        }
    ]


async def test_emulator_request_limits(emulator: tuple[MixpanelEmulator, str]) -> None:
    emu, url = emulator
    status, body = await post(url, [good(i) for i in range(2001)], sa_auth(emu))
    assert status == 400
    assert "2000" in body["error"]
    assert emu.received == []
    assert (await post(url, [good(i) for i in range(2000)], sa_auth(emu)))[0] == 200
    big = [good(i, pad="x" * 700_000) for i in range(3)]  # > 2 MB uncompressed
    assert await post(url, big, sa_auth(emu)) == (413, BODIES[413])
    # the limit is on the uncompressed size, also when gzipped (tiny compressed)
    assert await post(url, big, sa_auth(emu), gzipped=True) == (413, BODIES[413])
    assert BODIES[413]["error"] == "request exceeds max limit of 2097152 bytes"
    assert (await post(url, [], sa_auth(emu)))[0] == 400
    assert (await post(url, b"[{", sa_auth(emu)))[0] == 400
    assert (await post(url, [good()], sa_auth(emu), content_type="text/plain"))[0] == 400


async def test_emulator_gzip_and_ndjson(emulator: tuple[MixpanelEmulator, str]) -> None:
    emu, url = emulator
    assert (await post(url, [good(0)], sa_auth(emu), gzipped=True))[0] == 200
    ndjson = b"\n".join(msgspec.json.encode(good(i)) for i in (1, 2)) + b"\n"
    assert (await post(url, ndjson, sa_auth(emu), content_type="application/x-ndjson"))[0] == 200
    headers = {**sa_auth(emu), "Content-Encoding": "gzip"}
    assert (await post(url, b"not gzip", headers))[0] == 400
    assert emu.insert_ids() == ["id-0", "id-1", "id-2"]


async def test_emulator_dedup(emulator: tuple[MixpanelEmulator, str]) -> None:
    emu, url = emulator
    first = good(0, v=1)
    again = good(0, v=2)  # same (event, distinct_id, time, $insert_id)
    in_seconds = good(0, time=T0 // 1000)  # same time, in seconds: same key
    other_time = good(0, time=T0 + 1)
    for record in (first, again, in_seconds, other_time):
        status, body = await post(url, [record], sa_auth(emu))
        assert (status, body["num_records_imported"]) == (200, 1)  # duplicates still succeed
    assert len(emu.received) == 4
    assert len(emu.events) == 2
    assert list(emu.events.values())[-2]["properties"]["time"] == T0 // 1000  # the latest kept


async def test_emulator_faults(emulator: tuple[MixpanelEmulator, str]) -> None:
    emu, url = emulator
    emu.script = [Fault(429, retry_after="3"), Fault(503), Fault(401)]
    assert await post(url, [good()], sa_auth(emu)) == (429, BODIES[429])
    assert (await post(url, [good()], sa_auth(emu)))[0] == 503
    assert await post(url, [good()], sa_auth(emu)) == (401, BODIES[401])
    assert emu.received == []
    emu.poison = {"id-1": ("properties.x", "'properties.x' is invalid: poisoned")}
    status, body = await post(url, [good(0), good(1)], sa_auth(emu))
    assert status == 400
    assert body["failed_records"][0]["index"] == 1


# ---- the official library against the emulator (form-encoded legacy mode) ------------------


async def test_the_mixpanel_library_is_accepted(emulator: tuple[MixpanelEmulator, str]) -> None:
    from mixpanel import (  # type: ignore[import-untyped]
        BufferedConsumer,
        Consumer,
        Mixpanel,
        MixpanelException,
        ServiceAccountCredentials,
    )

    emu, url = emulator
    credentials = ServiceAccountCredentials(emu.username, emu.secret, emu.project_id)
    consumer = Consumer(import_url=f"{url}/import", credentials=credentials, retry_limit=0)
    mp = Mixpanel(emu.token, consumer=consumer)
    when = int(time.time()) - 86_400
    await asyncio.to_thread(mp.import_data, None, "user_1", "Signed Up", when, {"plan": "pro"})
    (event,) = emu.received
    assert event["event"] == "Signed Up"
    assert event["properties"]["time"] == when
    assert len(event["properties"]["$insert_id"]) == 32
    assert emu.requests[-1] == (200, 1, "form")

    buffered = BufferedConsumer(import_url=f"{url}/import", credentials=credentials, retry_limit=0)
    mp = Mixpanel(emu.token, consumer=buffered)
    for i in range(3):
        mp.import_data(None, f"user_{i}", "Batch", when + i, {"i": i})
    await asyncio.to_thread(buffered.flush)
    assert [e["event"] for e in emu.received] == ["Signed Up", "Batch", "Batch", "Batch"]

    # What the emulator refuses, the library reports as a failure.
    mp.import_data(None, "anonymous", "E", when)
    with pytest.raises(MixpanelException, match="distinct_id"):
        await asyncio.to_thread(buffered.flush)
    bad = Consumer(
        import_url=f"{url}/import",
        credentials=ServiceAccountCredentials(emu.username, "wrong", emu.project_id),
        retry_limit=0,
    )
    with pytest.raises(MixpanelException):
        await asyncio.to_thread(Mixpanel(emu.token, consumer=bad).import_data, None, "u", "E", when)
    assert len(emu.received) == 4


# ---- our requests over HTTP -----------------------------------------------------------------


async def send(request: HttpRequest, url: str) -> HttpResponse:
    target = request.url.replace("https://api.mixpanel.com", url)
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            request.method, target, headers=dict(request.headers), data=request.body
        ) as resp,
    ):
        body = await resp.read()
        return HttpResponse(resp.status, {k.lower(): v for k, v in resp.headers.items()}, body)


@pytest.mark.parametrize("config", [SA_CONFIG, TOKEN_CONFIG])
async def test_our_requests_are_accepted(
    emulator: tuple[MixpanelEmulator, str], config: dict[str, Any]
) -> None:
    emu, url = emulator
    sink = mixpanel.create(config)
    golden = golden_requests(sink, config)  # every fixture through the real rules
    assert golden
    batch = items(sink, 30, pad=200)  # large enough to be gzipped
    (request,) = sink.build(batch)
    assert request.headers["Content-Encoding"] == "gzip"
    result = await send(request, url)
    assert sink.classify(request, result) == Delivered()
    assert msgspec.json.decode(result.body) == {
        "code": 200,
        "num_records_imported": 30,
        "status": "OK",
    }
    assert emu.insert_ids() == [f"k-{i}" for i in range(30)]
    # A retry of the same batch (same idempotency keys) adds no event.
    assert sink.classify(request, await send(request, url)) == Delivered()
    assert len(emu.events) == 30
    assert len(emu.received) == 60


async def test_golden_fixture_requests_are_accepted(emulator: tuple[MixpanelEmulator, str]) -> None:
    from router.rules.loader import load_rules
    from tests.golden import ROOT, fixture_events

    emu, url = emulator
    sink = mixpanel.create(SA_CONFIG)
    ruleset = load_rules(ROOT / "rules" / "mixpanel.yaml").ruleset
    assert ruleset is not None
    prepared = [
        sink.prepare(output, idempotency_key(ev.id, "mixpanel", output.rule_id), ev)
        for events in fixture_events().values()
        for ev in events
        for output in ruleset.evaluate(ev)
        if isinstance(output, Routed)
    ]
    (request,) = sink.build(prepared)
    assert sink.classify(request, await send(request, url)) == Delivered()
    assert len(emu.events) == len(prepared)


async def test_partial_failure_dead_letters_exactly_the_listed(
    emulator: tuple[MixpanelEmulator, str],
) -> None:
    emu, url = emulator
    sink = mixpanel.create(SA_CONFIG)
    now_ms = int(time.time() * 1000)
    times = [now_ms - 60_000, now_ms + 2 * 3_600_000, now_ms, now_ms + 3 * 3_600_000, now_ms - 1]
    batch = [
        sink.prepare(routed({"event": "E", "distinct_id": f"u{i}", "time": t}), f"key-{i}", event())
        for i, t in enumerate(times)
    ]
    emu.poison = {
        "key-4": ("properties.x", "'properties.x' is invalid: string should be valid utf8")
    }
    (request,) = sink.build(batch)
    result = await send(request, url)
    assert result.status == 400
    answer = msgspec.json.decode(result.body)
    assert answer["num_records_imported"] == 2
    outcome = sink.classify(request, result)
    assert isinstance(outcome, Partial)
    assert set(outcome.rejected) == {1, 3, 4}
    assert "in the future" in outcome.rejected[1]
    assert outcome.rejected[4] == "'properties.x' is invalid: string should be valid utf8"
    assert outcome.retry == ()
    # exactly the others were ingested, and the delivery layer counts them delivered
    delivered = [i for i in range(len(batch)) if i not in outcome.rejected]
    assert emu.insert_ids() == [f"key-{i}" for i in delivered]


async def test_pause_and_split_over_http(emulator: tuple[MixpanelEmulator, str]) -> None:
    emu, url = emulator
    sink = mixpanel.create({**SA_CONFIG, "service_account": {"username": "x", "secret": "y"}})
    (request,) = sink.build(items(sink, 2))
    assert isinstance(sink.classify(request, await send(request, url)), Pause)
    emu.script = [Fault(413), Fault(429, retry_after="7")]
    good_sink = mixpanel.create(SA_CONFIG)
    (request,) = good_sink.build(items(good_sink, 2))
    assert isinstance(good_sink.classify(request, await send(request, url)), Split)
    outcome = good_sink.classify(request, await send(request, url))
    assert outcome == Retry(outcome.reason, 7.0) if isinstance(outcome, Retry) else False


async def test_emulator_counts_every_gzip_member_and_keeps_255_characters(
    emulator: tuple[MixpanelEmulator, str],
) -> None:
    emu, url = emulator
    one = msgspec.json.encode([good(0)])
    # Two members whose whole is over 2 MB uncompressed: only the first was measured before.
    two = gzip.compress(one) + gzip.compress(b" " * 2_100_000)
    headers = {**sa_auth(emu), "Content-Encoding": "gzip"}
    assert (await post(url, two, headers))[0] == 413
    both = gzip.compress(one[:-1] + b",") + gzip.compress(msgspec.json.encode(good(1))[:] + b"]")
    assert (await post(url, both, headers))[0] == 200
    assert emu.insert_ids() == ["id-0", "id-1"]
    # "strings are truncated to 255 chars": what is kept is cut there.
    await post(url, [good(2, guide_name="g" * 300)], sa_auth(emu))
    assert emu.received[-1]["properties"]["guide_name"] == "g" * 255
