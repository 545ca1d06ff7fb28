"""Fixtures for tests on the real Kafka broker (deploy/kafka/kafkactl).

The session starts the broker on ``$KAFKA_PORT`` (default 19092) unless one is already ready
there, and stops it at the end only if it started it. Each test gets its own topic, so tests never
see each other's events and can run against a developer's long-running broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient

from router.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
KAFKACTL = ROOT / "deploy" / "kafka" / "kafkactl"


class Broker:
    """One local broker managed through kafkactl, on its own port and state directory."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.bootstrap = f"127.0.0.1:{port}"

    def ctl(self, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KAFKA_PORT": str(self.port)}
        result = subprocess.run(
            [str(KAFKACTL), command], env=env, capture_output=True, text=True, timeout=300
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"kafkactl {command} (port {self.port}) failed with {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def is_ready(self) -> bool:
        return self.ctl("status", check=False).returncode == 0

    def pid(self) -> int:
        """The broker JVM's PID, for SIGSTOP/SIGCONT fault injection."""
        state = Path(os.environ.get("KAFKA_STATE_DIR", ROOT / ".local"))
        return int((state / f"kafka-{self.port}" / "kafka.pid").read_text().strip())


def _session_broker(port: int) -> Iterator[Broker]:
    broker = Broker(port)
    started = not broker.is_ready()
    if started:
        broker.ctl("start")
    try:
        yield broker
    finally:
        if started:
            broker.ctl("stop", check=False)


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    yield from _session_broker(int(os.environ.get("KAFKA_PORT", "19092")))


@pytest.fixture(scope="module")
def outage_broker() -> Iterator[Broker]:
    """A broker of its own, for tests that stop or kill it; started and stopped per module.

    On ``$KAFKA_OUTAGE_PORT`` (default 19392), so that the other tests' broker is never disturbed.
    """
    broker = Broker(int(os.environ.get("KAFKA_OUTAGE_PORT", "19392")))
    broker.ctl("start")
    try:
        yield broker
    finally:
        broker.ctl("stop", check=False)


def unique_topic(prefix: str = "router.test") -> str:
    return f"{prefix}.{uuid.uuid4().hex[:12]}"


def make_settings(broker: Broker, topic: str, **env: str) -> Settings:
    values = {
        "ROUTER_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
        "ROUTER_KAFKA__TOPIC": topic,
        "ROUTER_KAFKA__PARTITIONS": "3",
        "ROUTER_KAFKA__STARTUP_TIMEOUT_S": "30",
        "ROUTER_INGEST__WEBHOOK_SECRETS": "it-secret",
        "ROUTER_INGEST__INTEGRATION_KEYS": "it-key",
    }
    values.update(env)
    return load_settings(None, values)


async def read_topic(
    bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Read a topic from the beginning with a fresh, group-less consumer until `expected` records.

    Returns early (with what it has) after `timeout_s`; reads a little past `expected` so that
    unexpected extra records are seen too.
    """
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await asyncio.wait_for(consumer.start(), timeout=30)
    records: list[ConsumerRecord[bytes, bytes]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        quiet_after_expected = 0
        while loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for part in batch.values():
                records.extend(part)
            if len(records) >= expected:
                quiet_after_expected += 0 if batch else 1
                if quiet_after_expected >= 2:
                    break
    finally:
        await asyncio.wait_for(consumer.stop(), timeout=10)
    records.sort(key=lambda r: (r.partition, r.offset))
    return records


@pytest.fixture
async def admin(broker: Broker) -> AsyncIterator[AIOKafkaAdminClient]:
    client = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await asyncio.wait_for(client.start(), timeout=30)
    yield client
    await asyncio.wait_for(client.close(), timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_process(config: Path, log: Path, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """`router serve` as a child process; killed at the end if the test did not stop it."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "--config", str(config), "serve"],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


async def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with aiohttp.ClientSession() as session:
        while loop.time() < deadline:
            assert process.poll() is None, "router serve exited during start-up"
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url + "/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise AssertionError("router serve did not become ready")
