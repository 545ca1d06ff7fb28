"""Kafka goes away under a running ingest: 503 (never a 2xx, never a hang), then 2xx again.

Runs its own broker on a second port (``$KAFKA_OUTAGE_PORT``, default 19392) so that stopping and
killing it does not disturb the other tests' broker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.bus import KafkaBus, PublishError
from router.events import Record, decode_event
from router.ingest import create_app
from tests.integration.conftest import (
    Broker,
    free_port,
    make_settings,
    read_topic,
    serve_process,
    unique_topic,
    wait_ready,
)

pytestmark = pytest.mark.kafka

ClientFactory = Callable[..., Any]
TRACK_HEADERS = {"Content-Type": "application/json", "x-pendo-integration-key": "it-key"}


def track_body(seq: int) -> bytes:
    return json.dumps(
        {
            "type": "track",
            "event": "outage_probe",
            "visitorId": f"v{seq % 5}",
            "timestamp": 1_700_000_000_000 + seq,
            "context": {},
            "properties": {"seq": seq},
        }
    ).encode()


async def test_stop_and_kill_give_503_then_recover(
    outage_broker: Broker, aiohttp_client: ClientFactory
) -> None:
    topic = unique_topic()
    settings = make_settings(outage_broker, topic, ROUTER_KAFKA__PRODUCE_TIMEOUT_MS="2000")
    client = await aiohttp_client(create_app(settings))
    acknowledged: set[str] = set()
    seq = 0

    async def post() -> Any:
        nonlocal seq
        seq += 1
        started = time.monotonic()
        response = await asyncio.wait_for(
            client.post("/data/track", data=track_body(seq), headers=TRACK_HEADERS), 30
        )
        elapsed = time.monotonic() - started
        if response.status == 200:
            acknowledged.update((await response.json())["ids"])
        return response, elapsed

    response, _ = await post()
    assert response.status == 200

    for how in ("stop", "kill"):
        await asyncio.to_thread(outage_broker.ctl, how)
        # Down: every answer is a 503 with Retry-After, within the produce timeout (+ slack).
        for _ in range(3):
            response, elapsed = await post()
            assert response.status == 503, await response.text()
            assert response.headers["Retry-After"] == "5"
            assert (await response.json())["error"] == "kafka_unavailable"
            assert elapsed < 10
        ready = await client.get("/readyz")
        assert ready.status == 503

        await asyncio.to_thread(outage_broker.ctl, "start")
        # Up again: the same producer recovers (aio-libs/aiokafka#517, #1101) without a restart.
        deadline = time.monotonic() + 90
        while True:
            response, _ = await post()
            if response.status == 200:
                break
            assert response.status == 503
            assert time.monotonic() < deadline, "the ingest did not recover after Kafka restarted"
            await asyncio.sleep(1)
        assert (await client.get("/readyz")).status == 200

    # Everything answered 2xx is on the topic (503'd events may be there too: same-id duplicates
    # of a send that landed after its wait timed out, which consumers tolerate).
    records = await read_topic(outage_broker.bootstrap, topic, expected=len(acknowledged))
    on_topic = {decode_event(r.value).id for r in records}
    assert acknowledged <= on_topic


async def test_sigterm_finishes_the_request_waiting_on_kafka(
    outage_broker: Broker, tmp_path: Path
) -> None:
    """SIGTERM while a request waits for Kafka: that request still gets its answer, then exit 0."""
    topic = unique_topic()
    port = free_port()
    config = tmp_path / "router.yaml"
    config.write_text(
        f"kafka:\n  bootstrap_servers: '{outage_broker.bootstrap}'\n  topic: {topic}\n"
        f"  produce_timeout_ms: 20000\n"
        f"ingest:\n  port: {port}\n  integration_keys: [it-key]\n  shutdown_timeout_s: 30\n"
    )
    url = f"http://127.0.0.1:{port}"
    with serve_process(config, tmp_path / "serve.log") as process:
        await wait_ready(url, process)
        broker_pid = outage_broker.pid()
        async with aiohttp.ClientSession() as session:
            os.kill(broker_pid, signal.SIGSTOP)  # Kafka freezes: the request below must wait
            try:
                pending = asyncio.ensure_future(
                    session.post(url + "/data/track", data=track_body(1), headers=TRACK_HEADERS)
                )
                await asyncio.sleep(1.0)
                assert not pending.done()
                process.send_signal(signal.SIGTERM)
                await asyncio.sleep(1.0)
                assert process.poll() is None, "exited with a request still in flight"
            finally:
                os.kill(broker_pid, signal.SIGCONT)
            response = await asyncio.wait_for(pending, 30)
            assert response.status == 200, await response.text()
            (event_id,) = (await response.json())["ids"]
        assert await asyncio.to_thread(process.wait, 30) == 0
    records = await read_topic(outage_broker.bootstrap, topic, expected=1)
    assert [decode_event(r.value).id for r in records] == [event_id]


async def test_bus_recovers_after_a_restart_under_concurrent_load(outage_broker: Broker) -> None:
    """After a restart under load the ingest publishes again, without a process restart.

    aiokafka 0.14 fails a batch that waited past ``request_timeout_ms`` for a leader after it took
    a sequence number; the partition's sequence is then ahead of the broker's and every later
    publish fails with OutOfOrderSequenceNumber, for good. KafkaBus replaces the producer.
    """
    topic = unique_topic()
    settings = make_settings(outage_broker, topic, ROUTER_KAFKA__PRODUCE_TIMEOUT_MS="2000")
    bus = KafkaBus(settings.kafka)
    await bus.start()
    outcomes: dict[str, Counter[str]] = {"before": Counter(), "after": Counter()}
    phase = "before"
    stop = asyncio.Event()
    sent = 0

    async def publisher(worker: int) -> None:
        nonlocal sent
        while not stop.is_set():
            sent += 1
            records = [
                Record(f"{worker}-{sent}-{i}", f"v{(sent + i) % 50}".encode(), b'{"x":1}', [])
                for i in range(1 + sent % 6)
            ]
            try:
                await bus.publish(records)
                outcomes[phase]["ok"] += 1
            except PublishError:
                outcomes[phase]["failed"] += 1
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.02)

    tasks = [asyncio.create_task(publisher(k)) for k in range(20)]
    try:
        await asyncio.sleep(3)
        await asyncio.to_thread(outage_broker.ctl, "stop")
        phase = "down"
        outcomes["down"] = Counter()
        await asyncio.sleep(2)
        await asyncio.to_thread(outage_broker.ctl, "start")
        await asyncio.sleep(10)  # reconnects, metadata, the producer's replacement
        phase = "after"
        await asyncio.sleep(5)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await bus.stop(2)
    assert outcomes["before"]["ok"] > 0
    # From 10 s after the restart on, publishes succeed again (without the replacement: none).
    assert outcomes["after"]["ok"] > 0, outcomes
    assert outcomes["after"]["failed"] == 0, outcomes
