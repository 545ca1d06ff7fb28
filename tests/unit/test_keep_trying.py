"""keep_trying: how serve and sink wait for Kafka at start, and what they close on the way."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import KafkaConnectionError

from router import bus
from router.bus import PublishError, keep_trying
from router.settings import KafkaSettings


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    async def sleep(_: float) -> None:
        return None

    monkeypatch.setattr(bus.asyncio, "sleep", sleep)


async def test_retries_until_an_attempt_succeeds_and_undoes_each_failure() -> None:
    calls: list[str] = []

    async def attempt() -> None:
        calls.append("attempt")
        if calls.count("attempt") < 3:
            raise KafkaConnectionError("no broker")

    async def undo() -> None:
        calls.append("undo")

    await keep_trying(KafkaSettings(startup_timeout_s=60), attempt, undo)
    assert calls == ["attempt", "undo", "attempt", "undo", "attempt"]


async def test_gives_up_after_the_startup_timeout_naming_the_servers() -> None:
    undone = 0

    async def attempt() -> None:
        raise OSError("connection refused")

    async def undo() -> None:
        nonlocal undone
        undone += 1

    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1", startup_timeout_s=0)
    with pytest.raises(PublishError, match=r"127\.0\.0\.1:1 not usable after 1 attempts"):
        await keep_trying(settings, attempt, undo)
    assert undone == 1


async def test_a_cancelled_attempt_is_undone_and_the_cancellation_kept() -> None:
    started = asyncio.Event()
    undone = asyncio.Event()

    async def attempt() -> None:
        started.set()
        await asyncio.Event().wait()  # a broker that never answers

    async def undo() -> None:
        undone.set()

    task = asyncio.create_task(keep_trying(KafkaSettings(), attempt, undo))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert undone.is_set()


async def test_other_errors_are_not_retried() -> None:
    async def attempt() -> None:
        raise ValueError("a bug, not an outage")

    async def undo() -> None:
        return None

    with pytest.raises(ValueError, match="a bug"):
        await keep_trying(KafkaSettings(), attempt, undo)
