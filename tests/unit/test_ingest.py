"""The ingest HTTP service on the in-memory bus: auth, error paths, 2xx only after publish."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from router.bus import MemoryBus, PublishError, RecordTooLarge
from router.events import decode_event
from router.ingest import create_app, openapi_document
from router.settings import Settings, load_settings
from router.signature import sign
from tests.fixtures import PENDO_FIXTURES, fixture_paths, webhook_fixture_paths

SECRET = b"test-secret"
OLD_SECRET = b"old-secret"
KEY = "test-integration-key"

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


def settings(**ingest: str) -> Settings:
    env = {
        "ROUTER_INGEST__WEBHOOK_SECRETS": f"{SECRET.decode()},{OLD_SECRET.decode()}",
        "ROUTER_INGEST__INTEGRATION_KEYS": KEY,
        "ROUTER_INGEST__MAX_BATCH_EVENTS": "5",
        "ROUTER_INGEST__MAX_BODY_BYTES": "4096",
    }
    env.update({f"ROUTER_INGEST__{k.upper()}": v for k, v in ingest.items()})
    return load_settings(None, env)


@pytest.fixture
def bus() -> MemoryBus:
    return MemoryBus()


@pytest.fixture
async def client(aiohttp_client: ClientFactory, bus: MemoryBus) -> TestClient[Any, Any]:
    return await aiohttp_client(create_app(settings(), bus))


def signed(body: bytes, secret: bytes = SECRET) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-Pendo-Signature": sign(secret, body)}


def track_headers() -> dict[str, str]:
    return {"Content-Type": "application/json", "x-pendo-integration-key": KEY}


GUIDE_VIEWED = (PENDO_FIXTURES / "webhook-dotted" / "guide.viewed.json").read_bytes()
TRACK_BATCH = (PENDO_FIXTURES / "track" / "batch.json").read_bytes()


async def error_of(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body: dict[str, Any] = await response.json()
    assert body["error"] == code
    assert body["message"]
    return body


# ---- webhooks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", webhook_fixture_paths(), ids=lambda p: f"{p.parent.name}/{p.name}")
async def test_every_webhook_fixture_is_accepted(
    client: TestClient[Any, Any], bus: MemoryBus, path: Any
) -> None:
    body = path.read_bytes()
    response = await client.post("/webhooks/pendo", data=body, headers=signed(body))
    assert response.status == 200, await response.text()
    result = await response.json()
    assert result["accepted"] == 1
    record = bus.records[-1]
    event = decode_event(record.value)
    assert result["ids"] == [event.id] == [record.id]
    assert dict(record.headers)["event_id"] == event.id.encode()
    assert dict(record.headers)["source"] == b"webhook"
    assert record.key == (event.visitor_id or event.account_id or event.id).encode()
    assert bytes(event.raw) == body.strip()


async def test_second_secret_accepted_for_rotation(client: TestClient[Any, Any]) -> None:
    response = await client.post(
        "/webhooks/pendo", data=GUIDE_VIEWED, headers=signed(GUIDE_VIEWED, OLD_SECRET)
    )
    assert response.status == 200


async def test_resending_the_same_body_gives_the_same_id(client: TestClient[Any, Any]) -> None:
    first = await client.post("/webhooks/pendo", data=GUIDE_VIEWED, headers=signed(GUIDE_VIEWED))
    second = await client.post("/webhooks/pendo", data=GUIDE_VIEWED, headers=signed(GUIDE_VIEWED))
    assert (await first.json())["ids"] == (await second.json())["ids"]


@pytest.mark.parametrize(
    ("headers", "body", "reason"),
    [
        ({"Content-Type": "application/json"}, GUIDE_VIEWED, "Missing"),
        (
            {"Content-Type": "application/json", "X-Pendo-Signature": "sha256=zz"},
            GUIDE_VIEWED,
            "Malformed",
        ),
        (
            {"Content-Type": "application/json", "X-Pendo-Signature": "md5=abc"},
            GUIDE_VIEWED,
            "Malformed",
        ),
        (signed(GUIDE_VIEWED, b"wrong-secret"), GUIDE_VIEWED, "does not match"),
        (signed(GUIDE_VIEWED), GUIDE_VIEWED.replace(b"ABC123", b"ABC124"), "does not match"),
        (
            signed(GUIDE_VIEWED),
            json.dumps(json.loads(GUIDE_VIEWED), separators=(",", ":")).encode(),
            "does not match",
        ),
        (signed(b""), GUIDE_VIEWED, "does not match"),
    ],
    ids=[
        "missing",
        "malformed-hex",
        "wrong-algo",
        "wrong-secret",
        "tampered",
        "reserialised",
        "empty-sig",
    ],
)
async def test_bad_signatures_get_401_and_publish_nothing(
    client: TestClient[Any, Any], bus: MemoryBus, headers: dict[str, str], body: bytes, reason: str
) -> None:
    response = await client.post("/webhooks/pendo", data=body, headers=headers)
    payload = await error_of(response, 401, "unauthorized")
    assert reason in payload["message"]
    assert bus.records == []


async def test_bad_signature_is_refused_before_the_body_is_parsed(
    client: TestClient[Any, Any],
) -> None:
    # Not JSON at all: a parse-first server would answer 400; we answer 401.
    response = await client.post(
        "/webhooks/pendo", data=b"{not json", headers=signed(b"other body")
    )
    await error_of(response, 401, "unauthorized")


async def test_signed_empty_body_is_a_json_error(client: TestClient[Any, Any]) -> None:
    response = await client.post("/webhooks/pendo", data=b"", headers=signed(b""))
    await error_of(response, 400, "malformed_json")


async def test_unsigned_refused_by_default_and_accepted_when_allowed(
    aiohttp_client: ClientFactory, bus: MemoryBus
) -> None:
    open_client = await aiohttp_client(create_app(settings(allow_unsigned="true"), bus))
    headers = {"Content-Type": "application/json"}
    response = await open_client.post("/webhooks/pendo", data=GUIDE_VIEWED, headers=headers)
    assert response.status == 200
    # allow_unsigned does not excuse a wrong signature.
    response = await open_client.post(
        "/webhooks/pendo", data=GUIDE_VIEWED, headers=signed(GUIDE_VIEWED, b"nope")
    )
    await error_of(response, 401, "unauthorized")


async def test_no_secrets_configured_refuses_every_signed_webhook(
    aiohttp_client: ClientFactory, bus: MemoryBus
) -> None:
    app = create_app(load_settings(None, {}), bus)
    c = await aiohttp_client(app)
    response = await c.post("/webhooks/pendo", data=GUIDE_VIEWED, headers=signed(GUIDE_VIEWED))
    await error_of(response, 401, "unauthorized")


@pytest.mark.parametrize(
    ("body", "status", "code", "path"),
    [
        (b"{", 400, "malformed_json", "$"),
        (b"[1, 2]", 422, "invalid_event", "$"),
        (
            b'{"event_type":"guide.viewed","timestamp":"2024-01-15T14:30:00Z","data":{"visitor_id":1}}',
            422,
            "invalid_event",
            "$.data.visitor_id",
        ),
        (
            b'{"event":"guideDisplayed","timestamp":1,"surprise":true}',
            422,
            "invalid_event",
            "$.surprise",
        ),
    ],
)
async def test_webhook_payload_errors(
    client: TestClient[Any, Any], bus: MemoryBus, body: bytes, status: int, code: str, path: str
) -> None:
    response = await client.post("/webhooks/pendo", data=body, headers=signed(body))
    payload = await error_of(response, status, code)
    assert payload["path"] == path
    assert bus.records == []


async def test_wrong_content_type_is_415(client: TestClient[Any, Any]) -> None:
    headers = {**signed(GUIDE_VIEWED), "Content-Type": "text/plain"}
    response = await client.post("/webhooks/pendo", data=GUIDE_VIEWED, headers=headers)
    await error_of(response, 415, "unsupported_media_type")
    headers = {**track_headers(), "Content-Type": "application/x-www-form-urlencoded"}
    response = await client.post("/data/track", data=TRACK_BATCH, headers=headers)
    await error_of(response, 415, "unsupported_media_type")


async def test_body_over_the_limit_is_413(client: TestClient[Any, Any]) -> None:
    big = b'{"event":"guideDisplayed","timestamp":1,"properties":{"x":"' + b"a" * 5000 + b'"}}'
    response = await client.post("/webhooks/pendo", data=big, headers=signed(big))
    await error_of(response, 413, "body_too_large")


async def test_gzip_is_accepted_and_signed_over_the_decompressed_bytes(
    client: TestClient[Any, Any], bus: MemoryBus
) -> None:
    headers = {**signed(GUIDE_VIEWED), "Content-Encoding": "gzip"}
    response = await client.post(
        "/webhooks/pendo", data=gzip.compress(GUIDE_VIEWED), headers=headers
    )
    assert response.status == 200, await response.text()
    assert len(bus.records) == 1


async def test_gzip_limit_applies_to_the_decompressed_size(client: TestClient[Any, Any]) -> None:
    # 1 MiB of spaces compresses to about 1 KiB: under the limit on the wire, far over it inflated.
    bomb_body = b'{"event":"guideDisplayed","timestamp":1' + b" " * (1 << 20) + b"}"
    compressed = gzip.compress(bomb_body)
    assert len(compressed) < 4096
    headers = {**signed(bomb_body), "Content-Encoding": "gzip"}
    response = await client.post("/webhooks/pendo", data=compressed, headers=headers)
    await error_of(response, 413, "body_too_large")


async def test_corrupt_gzip_is_a_client_error(client: TestClient[Any, Any]) -> None:
    headers = {**signed(GUIDE_VIEWED), "Content-Encoding": "gzip"}
    response = await client.post("/webhooks/pendo", data=b"\x1f\x8bnot gzip", headers=headers)
    await error_of(response, 400, "unreadable_body")


# ---- track API -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", fixture_paths("track"), ids=lambda p: p.name)
async def test_track_fixtures_are_accepted(
    client: TestClient[Any, Any], bus: MemoryBus, path: Any
) -> None:
    body = path.read_bytes()
    response = await client.post("/data/track", data=body, headers=track_headers())
    assert response.status == 200, await response.text()
    result = await response.json()
    expected = json.loads(body)
    count = len(expected) if isinstance(expected, list) else 1
    assert result["accepted"] == count
    events = [decode_event(record.value) for record in bus.records]
    assert [e.id for e in events] == result["ids"]
    assert all(e.source == "track" for e in events)


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"Content-Type": "application/json"}, "Missing"),
        ({"Content-Type": "application/json", "x-pendo-integration-key": "nope"}, "Unknown"),
        ({"Content-Type": "application/json", "x-pendo-integration-key": ""}, "Unknown"),
    ],
)
async def test_track_without_a_valid_key_is_401(
    client: TestClient[Any, Any], bus: MemoryBus, headers: dict[str, str], reason: str
) -> None:
    response = await client.post("/data/track", data=TRACK_BATCH, headers=headers)
    payload = await error_of(response, 401, "unauthorized")
    assert reason in payload["message"]
    assert bus.records == []


@pytest.mark.parametrize(
    ("payload", "status", "code", "path"),
    [
        ([], 422, "empty_batch", "$"),
        (
            [{"type": "track", "event": "e", "visitorId": "v", "timestamp": 1, "context": {}}] * 6,
            413,
            "too_many_events",
            "$",
        ),
        (
            [
                {"type": "track", "event": "e", "visitorId": "v", "timestamp": 1, "context": {}},
                {"type": "track", "event": "e", "timestamp": 1, "context": {}},
            ],
            422,
            "invalid_event",
            "$[1].visitorId",
        ),
    ],
)
async def test_track_batch_errors_refuse_the_whole_request(
    client: TestClient[Any, Any],
    bus: MemoryBus,
    payload: object,
    status: int,
    code: str,
    path: str,
) -> None:
    response = await client.post(
        "/data/track", data=json.dumps(payload).encode(), headers=track_headers()
    )
    body = await error_of(response, status, code)
    assert body["path"] == path
    assert bus.records == []


async def test_track_malformed_json(client: TestClient[Any, Any]) -> None:
    response = await client.post("/data/track", data=b"[{", headers=track_headers())
    await error_of(response, 400, "malformed_json")


# ---- Kafka acknowledgement -------------------------------------------------------------------


async def test_kafka_failure_is_503_with_retry_after_and_never_2xx(
    client: TestClient[Any, Any], bus: MemoryBus
) -> None:
    bus.fail = PublishError("kafka did not acknowledge")
    response = await client.post("/webhooks/pendo", data=GUIDE_VIEWED, headers=signed(GUIDE_VIEWED))
    await error_of(response, 503, "kafka_unavailable")
    assert response.headers["Retry-After"] == "5"
    response = await client.post("/data/track", data=TRACK_BATCH, headers=track_headers())
    await error_of(response, 503, "kafka_unavailable")


async def test_kafka_stall_is_503_not_a_hang(client: TestClient[Any, Any], bus: MemoryBus) -> None:
    bus.stall = asyncio.Event()
    bus.timeout = 0.2
    response = await asyncio.wait_for(
        client.post("/webhooks/pendo", data=GUIDE_VIEWED, headers=signed(GUIDE_VIEWED)), 5
    )
    await error_of(response, 503, "kafka_unavailable")


async def test_event_too_large_for_the_topic_is_413(
    client: TestClient[Any, Any], bus: MemoryBus
) -> None:
    bus.fail = RecordTooLarge("event x is 5000000 bytes; limit 4194304")
    response = await client.post("/webhooks/pendo", data=GUIDE_VIEWED, headers=signed(GUIDE_VIEWED))
    await error_of(response, 413, "event_too_large")


async def test_saturation_is_503(aiohttp_client: ClientFactory, bus: MemoryBus) -> None:
    c = await aiohttp_client(create_app(settings(max_inflight_requests="1"), bus))
    bus.stall = asyncio.Event()
    bus.timeout = 5
    first = asyncio.ensure_future(
        c.post("/webhooks/pendo", data=GUIDE_VIEWED, headers=signed(GUIDE_VIEWED))
    )
    await asyncio.sleep(0.1)
    second = await c.post("/webhooks/pendo", data=GUIDE_VIEWED, headers=signed(GUIDE_VIEWED))
    await error_of(second, 503, "overloaded")
    bus.stall.set()
    assert (await first).status == 200


# ---- operational endpoints -----------------------------------------------------------------


async def test_health_ready_and_metrics(client: TestClient[Any, Any], bus: MemoryBus) -> None:
    assert (await client.get("/healthz")).status == 200
    assert (await (await client.get("/readyz")).json()) == {"status": "ready"}
    await client.post("/webhooks/pendo", data=GUIDE_VIEWED, headers=signed(GUIDE_VIEWED))
    await client.post(
        "/webhooks/pendo", data=GUIDE_VIEWED, headers={"Content-Type": "application/json"}
    )
    await client.post("/data/track", data=TRACK_BATCH, headers=track_headers())
    text = await (await client.get("/metrics")).text()
    assert 'router_ingest_requests_total{route="/webhooks/pendo",status="200"} 1.0' in text
    assert 'router_ingest_requests_total{route="/webhooks/pendo",status="401"} 1.0' in text
    assert 'router_ingest_events_accepted_total{source="track"} 2.0' in text
    assert 'router_ingest_events_accepted_total{source="webhook"} 1.0' in text
    assert (
        'router_ingest_rejected_total{reason="signature_missing",route="/webhooks/pendo"} 1.0'
        in text
    )
    assert "router_ingest_produce_seconds_bucket" in text
    bus.fail = PublishError("down")
    response = await client.get("/readyz")
    assert response.status == 503
    assert (await response.json())["status"] == "unavailable"


async def test_unknown_routes_and_methods_get_json_errors(client: TestClient[Any, Any]) -> None:
    await error_of(await client.get("/nope"), 404, "not_found")
    response = await client.get("/webhooks/pendo")
    await error_of(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


async def test_openapi_is_served_and_names_every_route(client: TestClient[Any, Any]) -> None:
    response = await client.get("/openapi.yaml")
    assert response.status == 200
    assert await response.read() == openapi_document()
    document = yaml.safe_load(openapi_document())
    app_routes = {
        (r.method.lower(), r.resource.canonical)
        for r in client.app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    documented = {(m, p) for p, ops in document["paths"].items() for m in ops}
    assert documented == app_routes


def test_openapi_error_codes_cover_what_the_service_emits() -> None:
    described = yaml.safe_load(openapi_document())["components"]["schemas"]["Error"]["properties"][
        "error"
    ]["description"]
    for code in (
        "malformed_json",
        "unreadable_body",
        "invalid_event",
        "empty_batch",
        "too_many_events",
        "unauthorized",
        "unsupported_media_type",
        "body_too_large",
        "event_too_large",
        "kafka_unavailable",
        "overloaded",
    ):
        assert code in described


async def test_nothing_a_client_sends_gives_a_500(client: TestClient[Any, Any]) -> None:
    bodies = [b"", b"null", b"0", b'"s"', b"[[]]", b"{" * 5000, b"\xff\xfe", b'{"event": null}']
    for body in bodies:
        for path, headers in (("/webhooks/pendo", signed(body)), ("/data/track", track_headers())):
            response = await client.post(path, data=body, headers=headers)
            assert 400 <= response.status < 500, (path, body[:20], response.status)


def test_app_factory_uses_app_keys() -> None:
    app = create_app(settings(), MemoryBus())
    assert isinstance(app, web.Application)
    assert msgspec.json.decode(msgspec.json.encode({"ok": True})) == {"ok": True}


# ---- bytes and numbers the decoders cannot read back (found by fuzzing; each was a 500 or a 200) --

_TRACK_ONE = (
    b'{"type":"track","event":"e","visitorId":"v","timestamp":1,"context":%s,"properties":%s}'
)


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("webhook", b'{"event":"guideSeen","timestamp":1,"uniqueId":"\xff"}'),
        (
            "webhook",
            b'{"event_type":"guide.viewed","timestamp":"2024-01-01T00:00:00Z","data":{"x":"\xff"}}',
        ),
        ("track", _TRACK_ONE % (b"{}", b'{"name":"caf\xe9"}')),  # Latin-1, inside a map kept raw
        ("track", b"[" + _TRACK_ONE % (b'{"x":"\xff"}', b"{}") + b"]"),
    ],
)
async def test_bytes_that_are_not_utf8_are_malformed_json(
    client: TestClient[Any, Any], bus: MemoryBus, route: str, body: bytes
) -> None:
    if route == "webhook":
        response = await client.post("/webhooks/pendo", data=body, headers=signed(body))
    else:
        response = await client.post("/data/track", data=body, headers=track_headers())
    error = await error_of(response, 400, "malformed_json")
    assert "UTF-8" in error["message"]
    assert bus.records == []


@pytest.mark.parametrize(
    ("properties", "path"),
    [
        (b'{"n":' + b"1" * 4301 + b"}", "$.properties"),  # an int msgspec will not hold
        (b'{"x":1e400}', "$.properties"),  # a float past 1.8e308
        (b'{"x":[1E+309]}', "$.properties"),
        (b'{"x":' + b"9" * 320 + b".5}", "$.properties"),
    ],
)
async def test_numbers_no_consumer_could_read_are_refused(
    aiohttp_client: ClientFactory, bus: MemoryBus, properties: bytes, path: str
) -> None:
    client = await aiohttp_client(create_app(settings(max_body_bytes="65536"), bus))
    body = b"[" + _TRACK_ONE % (b"{}", properties) + b"]"
    response = await client.post("/data/track", data=body, headers=track_headers())
    error = await error_of(response, 422, "invalid_event")
    assert error["path"].startswith("$[0].properties") or error["path"].startswith(path)
    assert bus.records == []


async def test_numbers_that_only_look_big_are_accepted(
    client: TestClient[Any, Any], bus: MemoryBus
) -> None:
    # "file123" and 1e30 pass the cheap pre-check's over-approximation, then the full decode.
    body = _TRACK_ONE % (b'{"f":"file123"}', b'{"big":1e30,"n":' + b"7" * 300 + b"}")
    response = await client.post("/data/track", data=body, headers=track_headers())
    assert response.status == 200, await response.text()
    (record,) = bus.records
    assert decode_event(record.value).properties["big"] == 1e30


@pytest.mark.parametrize("route", ["webhook", "track"])
async def test_json_nested_too_deeply_is_refused_not_a_500(
    client: TestClient[Any, Any], bus: MemoryBus, route: str
) -> None:
    deep = b"[" * 2000 + b"]" * 2000
    if route == "webhook":
        body = b'{"event":"guideSeen","timestamp":1,"properties":{"a":' + deep + b"}}"
        response = await client.post("/webhooks/pendo", data=body, headers=signed(body))
    else:
        body = b"[" + _TRACK_ONE % (b"{}", b'{"a":' + deep + b"}") + b"]"
        response = await client.post("/data/track", data=body, headers=track_headers())
    error = await error_of(response, 422, "invalid_event")
    assert "nested too deeply" in error["message"]
    assert bus.records == []


_URL_TRACK = (
    b'{"event":"trackEventReceived","timestamp":1,"properties":{"name":"x","eventProperties":%s}}'
)
_DOTTED_TRACK = b'{"event_type":"track.event","timestamp":"2024-01-01T00:00:00Z","data":{"event":"n","properties":%s}}'


@pytest.mark.parametrize("value", [b"[]", b"0", b"false", b'""'])
@pytest.mark.parametrize(
    ("shape", "path"),
    [(_URL_TRACK, "$.properties.eventProperties"), (_DOTTED_TRACK, "$.data.properties")],
)
async def test_event_properties_that_are_not_objects_are_refused_even_when_falsy(
    client: TestClient[Any, Any], bus: MemoryBus, value: bytes, shape: bytes, path: str
) -> None:
    body = shape % value
    response = await client.post("/webhooks/pendo", data=body, headers=signed(body))
    error = await error_of(response, 422, "invalid_event")
    assert error["path"] == path
    assert bus.records == []


async def test_an_integration_key_that_is_not_utf8_is_unauthorized(
    client: TestClient[Any, Any],
) -> None:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"POST /data/track HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"x-pendo-integration-key: \xff\xfe\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert b'"error":"unauthorized"' in answer


# ---- what a Kafka client can throw besides KafkaError (found by review) ------------------------


class _Producer:
    """Stands in for aiokafka's producer: send() raises what it is given."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.refreshed = 0

        class _Client:
            async def force_metadata_update(inner: Any) -> bool:
                self.refreshed += 1
                return True

        self.client = _Client()

    async def send(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1}


def _kafka_bus(error: BaseException) -> tuple[Any, _Producer]:
    from router.bus import KafkaBus

    kafka_bus = KafkaBus(settings().kafka)
    producer = _Producer(error)
    kafka_bus._producer = producer
    kafka_bus._partitions = [0, 1, 2, 3, 4, 5]  # before the topic was re-created with 2
    return kafka_bus, producer


async def test_an_unexpected_client_error_is_a_publish_error_and_the_partitions_are_reread() -> (
    None
):
    from router.events import decode_webhook, to_record

    kafka_bus, producer = _kafka_bus(AssertionError("Unrecognized partition"))
    record = to_record(decode_webhook(GUIDE_VIEWED, 1))
    with pytest.raises(PublishError, match="Unrecognized partition"):
        await kafka_bus.publish([record])
    await asyncio.sleep(0.05)  # the background refresh
    assert producer.refreshed == 1
    assert kafka_bus._partitions == [0, 1]


async def test_a_size_kafka_refuses_is_413_not_503_forever() -> None:
    from aiokafka.errors import MessageSizeTooLargeError

    from router.events import decode_webhook, to_record

    kafka_bus, _ = _kafka_bus(MessageSizeTooLargeError())
    with pytest.raises(RecordTooLarge, match=r"max\.message\.bytes"):
        await kafka_bus.publish([to_record(decode_webhook(GUIDE_VIEWED, 1))])


async def test_an_unexpected_error_is_a_counted_json_500(
    client: TestClient[Any, Any], bus: MemoryBus
) -> None:
    bus.fail = RuntimeError("a bug")  # type: ignore[assignment]
    response = await client.post("/webhooks/pendo", data=GUIDE_VIEWED, headers=signed(GUIDE_VIEWED))
    await error_of(response, 500, "internal_error")
    text = await (await client.get("/metrics")).text()
    assert 'router_ingest_requests_total{route="/webhooks/pendo",status="500"} 1.0' in text


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, br"])
async def test_an_encoding_we_do_not_decode_is_a_json_415(
    client: TestClient[Any, Any], encoding: str
) -> None:
    # aiohttp's parser answered br and zstd with a plain-text 400 before the app ran.
    headers = {**signed(GUIDE_VIEWED), "Content-Encoding": encoding}
    response = await client.post("/webhooks/pendo", data=GUIDE_VIEWED, headers=headers)
    error = await error_of(response, 415, "unsupported_encoding")
    assert encoding in error["message"]


@pytest.mark.parametrize("wbits", [zlib.MAX_WBITS, -zlib.MAX_WBITS], ids=["zlib", "raw"])
async def test_deflate_is_accepted_in_both_forms(
    client: TestClient[Any, Any], bus: MemoryBus, wbits: int
) -> None:
    packer = zlib.compressobj(wbits=wbits)
    body = packer.compress(GUIDE_VIEWED) + packer.flush()
    headers = {**signed(GUIDE_VIEWED), "Content-Encoding": "deflate"}
    response = await client.post("/webhooks/pendo", data=body, headers=headers)
    assert response.status == 200, await response.text()
    assert len(bus.records) == 1


async def test_gzip_members_count_together_toward_the_limit(client: TestClient[Any, Any]) -> None:
    half = b" " * 3000  # two members of 3,000 bytes each, over the 4,096-byte test limit
    body = gzip.compress(b'{"event":"guideDisplayed","timestamp":1' + half) + gzip.compress(
        half + b"}"
    )
    headers = {**signed(gzip.decompress(body)), "Content-Encoding": "gzip"}
    response = await client.post("/webhooks/pendo", data=body, headers=headers)
    await error_of(response, 413, "body_too_large")
