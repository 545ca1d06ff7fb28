"""Decoding of every Pendo fixture into the canonical event, ids, and schema errors with paths."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from router import events
from router.events import (
    Event,
    PayloadError,
    datetime_ms,
    decode_event,
    decode_track,
    decode_webhook,
    encode_event,
    to_record,
    track_records,
)
from tests.fixtures import PENDO_FIXTURES, fixture_paths, webhook_fixture_paths


def ms(*args: int) -> int:
    """Milliseconds since the epoch for a UTC date-time given as datetime's arguments."""
    return datetime_ms(datetime(*args, tzinfo=UTC))  # type: ignore[arg-type,misc]


NOW = ms(2026, 11, 28, 12, 0)


def same_event(a: Event, b: Event) -> bool:
    """Field-wise equality; msgspec.Raw compares by identity, so raw is compared as bytes."""
    return encode_event(a) == encode_event(b) and bytes(a.raw) == bytes(b.raw)


def load(shape: str, name: str) -> bytes:
    return (PENDO_FIXTURES / shape / name).read_bytes()


def test_dotted_guide_viewed() -> None:
    event = decode_webhook(load("webhook-dotted", "guide.viewed.json"), NOW)
    assert event.source == "webhook"
    assert event.type == "guide.viewed"
    assert event.name == "guide.viewed"
    assert event.visitor_id == "user_123"
    assert event.account_id == "account_456"
    assert event.properties == {"guide_id": "ABC123", "guide_name": "Feature Announcement"}
    assert event.context == {"browser": "Chrome", "platform": "web"}
    assert event.timestamp == ms(2024, 1, 15, 14, 30)
    assert event.received_at == NOW
    assert len(event.id) == 40


@pytest.mark.parametrize(
    ("name", "type_", "properties"),
    [
        (
            "guide.advanced.json",
            "guide.advanced",
            {
                "guide_id": "ABC123",
                "guide_name": "Onboarding Checklist",
                "step_id": "step_2",
                "step_index": 1,
            },
        ),
        (
            "guide.dismissed.json",
            "guide.dismissed",
            {"guide_id": "ABC123", "guide_name": "Onboarding Checklist", "step_id": "step_2"},
        ),
        (
            "guide.completed.json",
            "guide.completed",
            {"guide_id": "ABC123", "guide_name": "Onboarding Checklist"},
        ),
        (
            "poll.response.json",
            "poll.response",
            {
                "guide_id": "POLL77",
                "poll_id": "p-991",
                "question": "How useful is advanced reporting?",
                "response": "Very useful",
            },
        ),
        (
            "nps.response.json",
            "nps.response",
            {
                "guide_id": "NPS2024Q1",
                "poll_id": "nps-1",
                "score": 3,
                "comment": "Exports keep timing out",
            },
        ),
    ],
)
def test_dotted_shapes(name: str, type_: str, properties: dict[str, object]) -> None:
    event = decode_webhook(load("webhook-dotted", name), NOW)
    assert event.type == type_
    assert event.properties == properties


def test_dotted_track_event_takes_its_name_and_properties() -> None:
    event = decode_webhook(load("webhook-dotted", "track.event.json"), NOW)
    assert event.type == "track.event"
    assert event.name == "custom_feature_used"
    assert event.properties == {"feature_name": "advanced_reporting", "usage_count": 5}
    assert event.context == {}
    assert event.timestamp == ms(2024, 1, 16, 11, 0)


def test_url_guide_displayed_is_normalised_like_the_dotted_shape() -> None:
    event = decode_webhook(load("webhook-url", "guideDisplayed.json"), NOW)
    assert event.id == "0c9f3b0c2a5d4d0f8e3f6a8c1b2d3e4f5a6b7c8d"  # Pendo's uniqueId
    assert event.type == "guide.viewed"
    assert event.name == "guideDisplayed"
    assert event.properties == {
        "guide_id": "ABC123",
        "guide_name": "Onboarding Checklist",
        "step_id": "step_1",
        "step_index": 0,
        "language": "en-US",
    }
    assert event.context["app"] == {"id": -323232, "name": "test_application", "platform": "web"}
    assert event.context["user_agent"] == "Mozilla/5.0 (X11; Linux x86_64)"
    # URL-webhook timestamps are seconds.
    assert event.timestamp == ms(2024, 1, 15, 14, 30)


def test_url_nps_and_poll() -> None:
    nps = decode_webhook(load("webhook-url", "npsSubmitted.json"), NOW)
    assert nps.type == "nps.response"
    assert nps.properties["score"] == 3
    assert nps.properties["comment"] == "Exports keep timing out"
    assert nps.visitor_id == "user_555"
    poll = decode_webhook(load("webhook-url", "pollSubmitted.json"), NOW)
    assert poll.type == "poll.response"
    assert poll.properties["response"] == "Very useful"
    assert poll.properties["poll_id"] == "p-991"


def test_url_track_event() -> None:
    event = decode_webhook(load("webhook-url", "trackEventReceived.json"), NOW)
    assert event.type == "track.event"
    assert event.name == "Account Upgraded"
    assert event.properties == {"fromTier": "basic", "toTier": "pro"}
    assert event.context["source"] == "web"
    assert event.timestamp == ms(2021, 7, 20, 18, 2, 24)


def test_track_single_and_batch() -> None:
    (single,) = decode_track(load("track", "single.json"), NOW, 500)
    assert single.source == "track"
    assert single.type == "track.event"
    assert single.name == "custom_feature_used"
    assert single.context["ip"] == "203.0.113.7"
    assert single.timestamp == ms(2022, 1, 1)  # milliseconds
    batch = decode_track(load("track", "batch.json"), NOW, 500)
    assert [e.name for e in batch] == ["custom_feature_used", "purchase_completed"]
    assert batch[1].properties["amount"] == 99.99
    assert batch[1].timestamp == ms(2022, 1, 1, 0, 1)


@pytest.mark.parametrize("path", webhook_fixture_paths(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_webhook_fixture_round_trips_through_kafka_encoding(path: object) -> None:
    body = path.read_bytes()  # type: ignore[attr-defined]
    event = decode_webhook(body, NOW)
    again = decode_event(encode_event(event))
    assert same_event(again, event)
    # The raw payload is kept byte for byte.
    assert bytes(again.raw) == body.strip()


@pytest.mark.parametrize("path", fixture_paths("track"), ids=lambda p: p.name)
def test_every_track_fixture_round_trips(path: object) -> None:
    body = path.read_bytes()  # type: ignore[attr-defined]
    events = decode_track(body, NOW, 500)
    for event in events:
        assert same_event(decode_event(encode_event(event)), event)
        assert json.loads(bytes(event.raw))["event"] == event.name


def _reserialised(body: bytes) -> bytes:
    """Return the same JSON content with other spacing and key order."""
    return json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize("name", ["guide.viewed.json", "nps.response.json", "track.event.json"])
def test_content_id_is_stable_across_resending_and_reserialising(name: str) -> None:
    body = load("webhook-dotted", name)
    first = decode_webhook(body, NOW)
    later = decode_webhook(body, ms(2030, 1, 1))
    reencoded = decode_webhook(_reserialised(body), NOW)
    assert first.id == later.id == reencoded.id


def test_content_id_changes_with_content() -> None:
    data = json.loads(load("webhook-dotted", "guide.viewed.json"))
    first = decode_webhook(json.dumps(data).encode(), NOW)
    data["data"]["guide_id"] = "OTHER"
    assert decode_webhook(json.dumps(data).encode(), NOW).id != first.id


def test_track_ids_stable_and_distinct_within_a_batch() -> None:
    body = load("track", "batch.json")
    a = [e.id for e in decode_track(body, NOW, 500)]
    b = [e.id for e in decode_track(body, NOW + 1000, 500)]
    assert a == b
    assert len(set(a)) == 2


def test_unknown_webhook_kinds_are_accepted_and_typed_unknown() -> None:
    url = decode_webhook(
        b'{"event":"orchestrateSomethingNew","timestamp":1705329000,"visitorId":"v1",'
        b'"properties":{"x":1}}',
        NOW,
    )
    assert (url.type, url.name, url.properties) == ("unknown", "orchestrateSomethingNew", {"x": 1})
    dotted = decode_webhook(
        b'{"event_type":"page.exploded","timestamp":"2024-01-15T14:30:00Z","data":{"a":1}}', NOW
    )
    assert (dotted.type, dotted.name, dotted.properties) == ("unknown", "page.exploded", {"a": 1})


def test_other_known_url_kinds() -> None:
    event = decode_webhook(
        b'{"event":"visitorCreated","timestamp":1705329000,"visitorId":"v1"}', NOW
    )
    assert event.type == "visitor.created"
    account = decode_webhook(
        b'{"event":"accountCreated","timestamp":1705329000,"accountId":"a1"}', NOW
    )
    assert account.type == "account.created"
    assert account.visitor_id is None
    assert account.partition_key() == b"a1"


def test_url_timestamp_in_milliseconds_is_recognised() -> None:
    event = decode_webhook(b'{"event":"guideDisplayed","timestamp":1705329000123}', NOW)
    assert event.timestamp == ms(2024, 1, 15, 14, 30, 0, 123000)


def test_naive_dotted_timestamp_is_utc_and_offsets_are_normalised() -> None:
    naive = decode_webhook(
        b'{"event_type":"guide.viewed","timestamp":"2024-01-15T14:30:00","data":{}}', NOW
    )
    offset = decode_webhook(
        b'{"event_type":"guide.viewed","timestamp":"2024-01-15T16:30:00+02:00","data":{}}', NOW
    )
    assert naive.timestamp == offset.timestamp == ms(2024, 1, 15, 14, 30)


def test_partition_key_prefers_visitor() -> None:
    event = decode_webhook(load("webhook-dotted", "guide.viewed.json"), NOW)
    assert event.partition_key() == b"user_123"
    no_ids = decode_webhook(b'{"event":"guideDisplayed","timestamp":1}', NOW)
    assert no_ids.partition_key() == no_ids.id.encode()


@pytest.mark.parametrize(
    ("body", "status", "code", "path"),
    [
        (b"{", 400, "malformed_json", "$"),
        (b"", 400, "malformed_json", "$"),
        (b"not json", 400, "malformed_json", "$"),
        (b"[]", 422, "invalid_event", "$"),
        (b"{}", 422, "invalid_event", "$"),
        (b'{"event_type":"guide.viewed","data":{}}', 422, "invalid_event", "$.timestamp"),
        (
            b'{"event_type":"guide.viewed","timestamp":"yesterday","data":{}}',
            422,
            "invalid_event",
            "$.timestamp",
        ),
        (
            b'{"event_type":"guide.viewed","timestamp":"2024-01-15T14:30:00Z","data":{"visitor_id":5}}',
            422,
            "invalid_event",
            "$.data.visitor_id",
        ),
        (
            b'{"event_type":"track.event","timestamp":"2024-01-15T14:30:00Z","data":{}}',
            422,
            "invalid_event",
            "$.data.event",
        ),
        (b'{"event":"guideDisplayed","timestamp":-5}', 422, "invalid_event", "$.timestamp"),
        (b'{"event":"guideDisplayed","timestamp":1,"bogus":1}', 422, "invalid_event", "$.bogus"),
        (
            b'{"event":"guideDisplayed","timestamp":1,"visitorId":7}',
            422,
            "invalid_event",
            "$.visitorId",
        ),
        (
            b'{"event":"trackEventReceived","timestamp":1,"properties":{}}',
            422,
            "invalid_event",
            "$.properties.name",
        ),
    ],
)
def test_webhook_errors_name_the_field(body: bytes, status: int, code: str, path: str) -> None:
    with pytest.raises(PayloadError) as info:
        decode_webhook(body, NOW)
    assert (info.value.status, info.value.code, info.value.path) == (status, code, path)
    assert info.value.message


TRACK_OK = {
    "type": "track",
    "event": "e",
    "visitorId": "v",
    "timestamp": 1,
    "context": {},
}


@pytest.mark.parametrize(
    ("payload", "status", "code", "path"),
    [
        ([], 422, "empty_batch", "$"),
        ([TRACK_OK, {**TRACK_OK, "visitorId": 5}], 422, "invalid_event", "$[1].visitorId"),
        ([TRACK_OK, {**TRACK_OK, "extra": 1}], 422, "invalid_event", "$[1].extra"),
        ({**TRACK_OK, "type": "identify"}, 422, "invalid_event", "$.type"),
        ({k: v for k, v in TRACK_OK.items() if k != "context"}, 422, "invalid_event", "$.context"),
        ({**TRACK_OK, "event": ""}, 422, "invalid_event", "$.event"),
        ({**TRACK_OK, "timestamp": "yesterday"}, 422, "invalid_event", "$.timestamp"),
        ([1], 422, "invalid_event", "$[0]"),
        ("a string", 422, "invalid_event", "$"),
        ([TRACK_OK] * 4, 413, "too_many_events", "$"),
    ],
)
def test_track_errors_name_the_field(payload: object, status: int, code: str, path: str) -> None:
    with pytest.raises(PayloadError) as info:
        decode_track(json.dumps(payload).encode(), NOW, 3)
    assert (info.value.status, info.value.code, info.value.path) == (status, code, path)


def test_event_envelope_is_tolerant_of_new_fields() -> None:
    event = decode_track(json.dumps(TRACK_OK).encode(), NOW, 1)[0]
    data = msgspec.json.decode(encode_event(event))
    data["added_by_a_newer_ingest"] = True
    again = decode_event(msgspec.json.encode(data))
    no_raw = msgspec.Raw(b"null")
    assert same_event(
        msgspec.structs.replace(again, raw=no_raw), msgspec.structs.replace(event, raw=no_raw)
    )
    assert json.loads(bytes(again.raw)) == json.loads(bytes(event.raw))


@pytest.mark.parametrize("path", fixture_paths("track"), ids=lambda p: p.name)
def test_fast_track_records_match_the_canonical_events(path: object) -> None:
    """The ingest's raw-passthrough path and the dict path agree on id, key, headers and value."""
    body = path.read_bytes()  # type: ignore[attr-defined]
    fast = track_records(body, NOW, 500)
    slow = [to_record(e) for e in decode_track(body, NOW, 500)]
    assert [r.id for r in fast] == [r.id for r in slow]
    assert [r.key for r in fast] == [r.key for r in slow]
    assert [r.headers for r in fast] == [r.headers for r in slow]
    for a, b in zip(fast, slow, strict=True):
        assert msgspec.json.decode(a.value) == msgspec.json.decode(b.value)
        assert same_event(decode_event(a.value), decode_event(b.value))


def test_fast_track_path_checks_the_maps_are_objects() -> None:
    for field in ("context", "properties"):
        bad = [TRACK_OK, {**TRACK_OK, field: [1]}]
        with pytest.raises(PayloadError) as info:
            track_records(json.dumps(bad).encode(), NOW, 5)
        assert (info.value.status, info.value.path) == (422, f"$[1].{field}")
        with pytest.raises(PayloadError) as info:
            decode_track(json.dumps(bad).encode(), NOW, 5)
        assert (info.value.status, info.value.path) == (422, f"$[1].{field}")
        with pytest.raises(PayloadError) as info:
            track_records(json.dumps({**TRACK_OK, field: None}).encode(), NOW, 5)
        assert info.value.path == f"$.{field}"


def test_track_id_is_the_hash_of_the_exact_bytes() -> None:
    compact = json.dumps(TRACK_OK, separators=(",", ":")).encode()
    spaced = json.dumps(TRACK_OK).encode()
    assert track_records(compact, NOW, 1)[0].id == track_records(compact, NOW + 5, 1)[0].id
    # Documented trade-off: a re-serialised Track event is a new event.
    assert track_records(compact, NOW, 1)[0].id != track_records(spaced, NOW, 1)[0].id


# ---- times a rule maps (shared by the sinks) -------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        (1_705_396_320, 1_705_396_320_000),  # seconds
        (1_705_396_320.25, 1_705_396_320_250),
        (1_705_396_320_250, 1_705_396_320_250),  # milliseconds from 1e11 on
        (99_999_999_999, 99_999_999_999_000),  # the last number read as seconds
        (100_000_000_000, 100_000_000_000),
        ("2024-01-16T09:12:00Z", 1_705_396_320_000),
        ("2024-01-16T10:12:00.250+01:00", 1_705_396_320_250),
        ("2024-01-16T09:12:00", 1_705_396_320_000),  # naive is UTC
        (datetime(2024, 1, 16, 9, 12, tzinfo=UTC), 1_705_396_320_000),
        (datetime(2024, 1, 16, 9, 12), 1_705_396_320_000),
    ],
)
def test_rule_time_ms(value: Any, ms: int) -> None:
    assert events.rule_time_ms(value, "time") == ms
    assert type(events.rule_time_ms(value, "time")) is int
    assert events.datetime_ms(events.rule_datetime(value, "time")) == ms


def test_rule_datetime_keeps_microseconds() -> None:
    when = events.rule_datetime(1_705_396_320.123456, "timestamp")
    assert when == datetime(2024, 1, 16, 9, 12, 0, 123456, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "^when: expected a date-time, got bool$"),
        (None, "^when: expected a date-time, got NoneType$"),
        ([1], "^when: expected a date-time, got list$"),
        ("soon", "^when: 'soon' is not an ISO 8601 date-time$"),
        (float("nan"), "^when: nan is not a time$"),
        (float("inf"), "^when: inf is not a time$"),
    ],
)
def test_rule_times_that_are_not_times(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        events.rule_time_ms(value, "when")
    with pytest.raises(ValueError, match=message):
        events.rule_datetime(value, "when")


def test_a_time_past_the_datetime_range_is_a_value_error() -> None:
    # Was an OverflowError in the Segment sink, which the consumer did not catch.
    for value in (10**20, 10**16 + 0.5, -1e306, 1e306):
        for convert in (events.rule_datetime, events.rule_time_ms):
            with pytest.raises(ValueError, match=r"^when: .* is out of the date-time range$"):
                convert(value, "when")
    assert events.rule_time_ms(253_402_300_799_999, "when") == 253_402_300_799_999
    assert events.rule_time_ms(-62_135_596_800, "when") == -62_135_596_800_000  # year 1
