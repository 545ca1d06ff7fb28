"""`router serve` as a real process: starts, accepts, and exits 0 on SIGTERM having flushed."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from router.events import decode_event
from router.signature import sign
from tests.fixtures import PENDO_FIXTURES
from tests.integration.conftest import (
    Broker,
    free_port,
    read_topic,
    serve_process,
    unique_topic,
    wait_ready,
)

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]


async def test_serve_accepts_then_stops_cleanly_on_sigterm(broker: Broker, tmp_path: Path) -> None:
    topic = unique_topic()
    port = free_port()
    config = tmp_path / "router.yaml"
    config.write_text(
        f"kafka:\n  bootstrap_servers: '{broker.bootstrap}'\n  topic: {topic}\n  partitions: 2\n"
        f"ingest:\n  port: {port}\n  webhook_secrets: [{{env: HOOK_SECRET}}]\n"
    )
    with serve_process(config, tmp_path / "serve.log", HOOK_SECRET="proc-secret") as process:
        url = f"http://127.0.0.1:{port}"
        await wait_ready(url, process)
        body = (PENDO_FIXTURES / "webhook-url" / "npsSubmitted.json").read_bytes()
        headers = {
            "Content-Type": "application/json",
            "X-Pendo-Signature": sign(b"proc-secret", body),
        }
        async with (
            aiohttp.ClientSession() as session,
            session.post(url + "/webhooks/pendo", data=body, headers=headers) as response,
        ):
            assert response.status == 200
            (event_id,) = (await response.json())["ids"]
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
    output = (tmp_path / "serve.log").read_text()
    assert "stopped" in output
    assert "proc-secret" not in output  # secrets never logged
    records = await read_topic(broker.bootstrap, topic, expected=1)
    assert [decode_event(r.value).id for r in records] == [event_id]


async def test_serve_exits_1_with_a_clear_message_when_kafka_is_absent(tmp_path: Path) -> None:
    config = tmp_path / "router.yaml"
    config.write_text(
        f"kafka:\n  bootstrap_servers: '127.0.0.1:{free_port()}'\n  startup_timeout_s: 3\n"
        f"ingest:\n  port: {free_port()}\n"
    )
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "router.cli", "--config", str(config), "serve"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot start" in result.stderr
    assert "not usable" in result.stderr


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "router.yaml"
    config.write_text("ingest:\n  port: lots\n")
    result = subprocess.run(
        [sys.executable, "-m", "router.cli", "--config", str(config), "serve"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "ingest.port" in result.stderr


async def test_sigterm_during_start_up_stops_promptly(tmp_path: Path) -> None:
    """While Kafka is unreachable the ingest keeps trying for startup_timeout_s; SIGTERM wins."""
    config = tmp_path / "router.yaml"
    config.write_text(
        f"kafka:\n  bootstrap_servers: '127.0.0.1:{free_port()}'\n  startup_timeout_s: 120\n"
        f"ingest:\n  port: {free_port()}\n"
    )
    with serve_process(config, tmp_path / "serve.log") as process:
        await asyncio.sleep(2)
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 15) == 0
    assert "stopped during start-up" in (tmp_path / "serve.log").read_text()


async def test_events_tail_prints_exactly_count_compact_lines(
    broker: Broker, tmp_path: Path
) -> None:
    """`events tail -n N` stops at N across partitions; a closed pipe ends it quietly with 0.

    300 events (~120 KB of output) outgrow the pipe's buffer, so `head` closing it is felt.
    """
    from router.bus import KafkaBus
    from router.events import decode_track, to_record
    from tests.integration.conftest import make_settings

    topic = unique_topic()
    settings = make_settings(broker, topic)
    bus = KafkaBus(settings.kafka)
    await bus.start()
    try:
        body = b"[" + b",".join(
            b'{"type":"track","event":"E%d","visitorId":"v%d","accountId":"a",'
            b'"properties":{"n": %d},"context":{},"timestamp":1700000000000}' % (i, i, i)
            for i in range(300)
        ) + b"]"  # fmt: skip
        events = decode_track(body, received_at=1, max_events=300)
        await bus.publish([to_record(e) for e in events])
    finally:
        await bus.stop()
    config = tmp_path / "router.yaml"
    config.write_text(f"kafka:\n  bootstrap_servers: '{broker.bootstrap}'\n  topic: {topic}\n")
    argv = [sys.executable, "-m", "router.cli", "--config", str(config), "events", "tail"]
    for count in (1, 5):
        done = await asyncio.to_thread(
            subprocess.run,
            [*argv, "--from-beginning", "-n", str(count)],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert len(lines) == count  # the events span three partitions
        assert all(", " not in line and '": ' not in line for line in lines)  # compact
        assert {decode_event(line.encode()).name for line in lines} <= {f"E{i}" for i in range(300)}

    def read_a_byte_then_close() -> tuple[int, str]:
        with subprocess.Popen(
            [*argv, "--from-beginning", "-n", "300"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        ) as process:  # fmt: skip
            assert process.stdout is not None
            assert process.stderr is not None
            process.stdout.read(1)
            process.stdout.close()  # as `| head -c 1` does
            errors = process.stderr.read().decode()
            return process.wait(timeout=60), errors

    code, errors = await asyncio.to_thread(read_a_byte_then_close)
    assert code == 0, errors
    assert "cannot read from Kafka" not in errors
    assert "BrokenPipe" not in errors
