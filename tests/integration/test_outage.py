"""Kafka goes away under a running ingest: 503 (never a 2xx, never a hang), then 2xx again.

Runs its own broker on a second port (``$KAFKA_OUTAGE_PORT``, default 19392) so that stopping and
killing it does not disturb the other tests' broker.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from router.events import decode_event
from router.ingest import create_app
from tests.integration.conftest import Broker, make_settings, read_topic, unique_topic

pytestmark = pytest.mark.kafka

ClientFactory = Callable[..., Any]
TRACK_HEADERS = {"Content-Type": "application/json", "x-pendo-integration-key": "it-key"}


@pytest.fixture(scope="module")
def outage_broker() -> Iterator[Broker]:
    broker = Broker(int(os.environ.get("KAFKA_OUTAGE_PORT", "19392")))
    broker.ctl("start")
    try:
        yield broker
    finally:
        broker.ctl("stop", check=False)


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
