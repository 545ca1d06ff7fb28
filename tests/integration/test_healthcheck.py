"""The start-up healthcheck: each sink's free probe request, run once, logged, never fatal.

On the real broker (a consumer only starts with Kafka) against the emulators: Slack's
``auth.test`` proves the token, Segment's empty batch proves the endpoint, Mixpanel has no free
probe, an unreachable endpoint is a network failure; the token never shows in the result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from tests.emulators import segment as segment_emulator
from tests.emulators import slack as slack_emulator
from tests.integration.conftest import Broker, free_port, make_settings, unique_topic
from tests.integration.test_e2e_sinks import start_sink

pytestmark = pytest.mark.kafka

REVOKED = "xoxb-1111-1111-revoked"


def slack_bot(token: str) -> Callable[[str], dict[str, Any]]:
    return lambda url: {"bot_token": token, "channel": "C0PRODUCT1", "endpoint": url + "/api"}


@pytest.mark.parametrize(
    ("sink", "emulator", "config", "expected"),
    [
        ("slack", slack_emulator.SlackEmulator, slack_bot(slack_emulator.BOT_TOKEN), "passed"),
        ("slack", slack_emulator.SlackEmulator, slack_bot(REVOKED), "failed: HTTP 200: "),
        (
            "segment",
            segment_emulator.SegmentEmulator,
            lambda url: {"endpoint": url, "write_key": "test-write-key"},
            "passed",
        ),
        (
            "mixpanel",
            None,
            lambda url: {"project_id": "1", "service_account": {"username": "u", "secret": "s"}},
            "skipped: ",
        ),
        (
            "segment",
            None,
            lambda url: {
                "endpoint": f"http://127.0.0.1:{free_port()}",
                "write_key": "wk-unreachable",
            },
            "failed: network: ",
        ),
    ],
    ids=["slack-token-ok", "slack-token-revoked", "segment", "mixpanel-no-probe", "unreachable"],
)
async def test_start_up_healthcheck(
    broker: Broker, sink: str, emulator: Any, config: Any, expected: str
) -> None:
    server = None
    url = "http://127.0.0.1:9"
    if emulator is not None:
        instance = emulator()
        if isinstance(instance, slack_emulator.SlackEmulator):
            instance.tokens.add(REVOKED)
            instance.revoked.add(REVOKED)
        server = TestServer(instance.app(), host="127.0.0.1")
        await server.start_server()
        url = str(server.make_url("")).rstrip("/")
    topic = unique_topic()
    settings = make_settings(broker, topic, ROUTER_CONSUMER__GROUP_PREFIX=f"{topic}-")
    running = await start_sink(settings, sink, config(url))
    try:
        result = await running.consumer.healthcheck()
    finally:
        await running.close()
        if server is not None:
            await server.close()
    assert result.startswith(expected), result
    assert running.consumer.health == result
    if result.startswith("failed: HTTP"):
        assert "token_revoked" in result  # Slack's error code, named
    assert REVOKED not in result
