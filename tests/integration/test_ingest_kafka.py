"""The ingest on the real broker: what a 2xx acknowledged is on the topic, exactly."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner

from router.bus import KafkaBus
from router.events import decode_event, decode_track, decode_webhook, encode_event
from router.ingest import create_app
from router.signature import sign
from tests.fixtures import fixture_paths, webhook_fixture_paths
from tests.integration.conftest import Broker, make_settings, read_topic, unique_topic

pytestmark = pytest.mark.kafka

ClientFactory = Callable[..., Any]


def signed(body: bytes) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-Pendo-Signature": sign(b"it-secret", body)}


TRACK_HEADERS = {"Content-Type": "application/json", "x-pendo-integration-key": "it-key"}


async def test_every_fixture_lands_on_the_topic_exactly(
    broker: Broker, aiohttp_client: ClientFactory
) -> None:
    topic = unique_topic()
    client: TestClient[Any, Any] = await aiohttp_client(create_app(make_settings(broker, topic)))
    sent: dict[str, bytes] = {}  # event id -> the body it came from
    kinds: dict[str, str] = {}
    for path in webhook_fixture_paths():
        body = path.read_bytes()
        response = await client.post("/webhooks/pendo", data=body, headers=signed(body))
        assert response.status == 200, await response.text()
        (event_id,) = (await response.json())["ids"]
        sent[event_id], kinds[event_id] = body, "webhook"
    for path in fixture_paths("track"):
        body = path.read_bytes()
        response = await client.post("/data/track", data=body, headers=TRACK_HEADERS)
        assert response.status == 200, await response.text()
        for event_id in (await response.json())["ids"]:
            sent[event_id], kinds[event_id] = body, "track"

    records = await read_topic(broker.bootstrap, topic, expected=len(sent))
    assert len(records) == len(sent)
    partitioner = DefaultPartitioner()
    for record in records:
        event = decode_event(record.value)
        body = sent[event.id]
        if kinds[event.id] == "webhook":
            # Byte-exact: the record is what decoding the body at the recorded receive time gives.
            assert record.value == encode_event(decode_webhook(body, event.received_at))
        else:
            # The Track fast path passes properties and context through with the sender's
            # spacing: equal as JSON to the canonical event, field for field.
            (expected,) = [
                e for e in decode_track(body, event.received_at, 500) if e.id == event.id
            ]
            assert msgspec.json.decode(record.value) == msgspec.json.decode(encode_event(expected))
        assert record.key == (event.visitor_id or event.account_id or event.id).encode()
        assert dict(record.headers) == {
            "event_id": event.id.encode(),
            "source": event.source.encode(),
            "type": event.type.encode(),
        }
        # Where Kafka's default (murmur2) partitioner puts the key, as any other client would.
        assert record.partition == partitioner(record.key, [0, 1, 2], [0, 1, 2])


async def test_batch_keeps_per_visitor_order_and_spans_partitions(
    broker: Broker, aiohttp_client: ClientFactory
) -> None:
    topic = unique_topic()
    client = await aiohttp_client(create_app(make_settings(broker, topic)))
    events = [
        {
            "type": "track",
            "event": f"step_{i}",
            "visitorId": f"visitor_{i % 7}",
            "timestamp": 1_700_000_000_000 + i,
            "context": {},
            "properties": {"seq": i, "pad": "x" * 200},
        }
        for i in range(500)
    ]
    response = await client.post(
        "/data/track", data=json.dumps(events).encode(), headers=TRACK_HEADERS
    )
    assert response.status == 200, await response.text()
    ids = (await response.json())["ids"]
    assert len(set(ids)) == 500

    records = await read_topic(broker.bootstrap, topic, expected=500)
    assert sorted(decode_event(r.value).id for r in records) == sorted(ids)
    assert len({r.partition for r in records}) > 1
    by_visitor: dict[bytes, list[int]] = {}
    for record in records:  # sorted by (partition, offset)
        by_visitor.setdefault(record.key, []).append(decode_event(record.value).properties["seq"])
    for seqs in by_visitor.values():
        assert seqs == sorted(seqs)


async def test_concurrent_batches_are_all_accepted(
    broker: Broker, aiohttp_client: ClientFactory
) -> None:
    """Many 500-event requests at once: every one 200 (aiokafka's add_batch timed out early)."""
    topic = unique_topic()
    client = await aiohttp_client(create_app(make_settings(broker, topic)))

    def batch(n: int) -> bytes:
        return json.dumps(
            [
                {
                    "type": "track",
                    "event": "concurrent",
                    "visitorId": f"v{(n * 500 + i) % 997}",
                    "timestamp": 1_700_000_000_000 + n * 500 + i,
                    "context": {},
                    "properties": {"n": n, "i": i, "pad": "p" * 300},
                }
                for i in range(500)
            ]
        ).encode()

    bodies = [batch(n) for n in range(64)]
    responses = await asyncio.gather(
        *(client.post("/data/track", data=body, headers=TRACK_HEADERS) for body in bodies)
    )
    statuses = [r.status for r in responses]
    assert statuses == [200] * len(bodies), [await r.text() for r in responses if r.status != 200]
    records = await read_topic(broker.bootstrap, topic, expected=64 * 500, timeout_s=90)
    assert len({decode_event(r.value).id for r in records}) == 64 * 500


async def test_resending_is_safe_same_ids(broker: Broker, aiohttp_client: ClientFactory) -> None:
    topic = unique_topic()
    client = await aiohttp_client(create_app(make_settings(broker, topic)))
    body = fixture_paths("track")[0].read_bytes()
    first = await (await client.post("/data/track", data=body, headers=TRACK_HEADERS)).json()
    again = await (await client.post("/data/track", data=body, headers=TRACK_HEADERS)).json()
    assert first["ids"] == again["ids"]
    records = await read_topic(broker.bootstrap, topic, expected=2 * len(first["ids"]))
    assert sorted(decode_event(r.value).id for r in records) == sorted(first["ids"] * 2)


async def test_topic_is_created_with_configured_shape(
    broker: Broker, admin: AIOKafkaAdminClient
) -> None:
    topic = unique_topic()
    settings = make_settings(
        broker, topic, ROUTER_KAFKA__PARTITIONS="4", ROUTER_KAFKA__RETENTION_MS="3600000"
    )
    bus = KafkaBus(settings.kafka)
    await bus.start()
    try:
        assert await bus.ready() == (True, "ok")
        (description,) = await admin.describe_topics([topic])
        assert len(description["partitions"]) == 4
        configs = await admin.describe_configs([_topic_resource(topic)], include_synonyms=False)
        values = {entry[0]: entry[1] for entry in configs[0].resources[0][4]}
        assert values["retention.ms"] == "3600000"
        assert values["max.message.bytes"] == str(settings.kafka.max_message_bytes)
    finally:
        await bus.stop()
    # A second start finds the topic and leaves it alone.
    again = KafkaBus(settings.kafka)
    await again.start()
    await again.stop()


async def test_readyz_reports_kafka(broker: Broker, aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app(make_settings(broker, unique_topic())))
    response = await client.get("/readyz")
    assert response.status == 200
    assert await response.json() == {"status": "ready"}


async def test_auto_create_is_off_on_the_broker(broker: Broker, admin: AIOKafkaAdminClient) -> None:
    from aiokafka import AIOKafkaProducer

    topic = unique_topic("router.never-created")
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, request_timeout_ms=3000)
    await producer.start()
    try:
        with pytest.raises(Exception):  # noqa: B017, PT011  (aiokafka raises a timeout here)
            await producer.send_and_wait(topic, b"x")
    finally:
        await producer.stop()
    assert topic not in await admin.list_topics()


def _topic_resource(topic: str) -> Any:
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    return ConfigResource(ConfigResourceType.TOPIC, topic)
