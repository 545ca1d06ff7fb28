"""The consumer's bookkeeping without Kafka: each item settled exactly once, commits never early.

A SinkConsumer built with a stand-in sink; dead-letter writes and sends are replaced, so what is
tested is what the consumer does with outcomes. The cases came from property tests of the
delivery layer: each committed an offset early, settled an item twice, or stalled before its fix.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from router import dlq
from router.consumer import HEALTHY, PAUSED, Item, SinkConsumer, _Ticket
from router.delivery.offsets import PartitionOffsets
from router.delivery.sink import (
    Delivered,
    HttpRequest,
    Outcome,
    Partial,
    Pause,
    Retry,
    SinkLimits,
)
from router.settings import Settings
from router.sink_metrics import SinkMetrics

TP = TopicPartition("events", 0)


class _Sink:
    name = "fake"
    limits = SinkLimits(max_events=10, max_bytes=10_000, max_event_bytes=1_000)


def consumer() -> tuple[SinkConsumer, list[tuple[str | None, str]]]:
    metrics = SinkMetrics("fake", CollectorRegistry())
    made = SinkConsumer(Settings(), _Sink(), rules=None, metrics=metrics)  # type: ignore[arg-type]
    dead: list[tuple[str | None, str]] = []

    async def write_dead(letter: dlq.DeadLetter, key: bytes) -> None:  # Kafka acknowledged it
        dead.append((letter.rule_id, letter.reason))

    made._write_dead = write_dead  # type: ignore[method-assign]
    return made, dead


def take(
    made: SinkConsumer, offsets: PartitionOffsets, offset: int, rules: list[str]
) -> list[Item]:
    """What _take does for one record with one routed output per rule."""
    offsets.start(offset)
    ticket = _Ticket(offsets, offset, 1)
    items = []
    for rule in rules:
        ticket.remaining += 1
        key = f"key-{offset}-{rule}"
        items.append(Item(ticket, TP, f"evt-{offset}", rule, key, b"{}", None, {}, b"{}", "h"))
    made._finish_ticket(ticket)  # the guard released once every output is handed over
    return items


def scheduled(made: SinkConsumer) -> list[Item]:
    items = [item for entry in made._scheduled for item in entry.items]
    made._scheduled.clear()
    return items


@pytest.mark.parametrize(
    "partial",
    [
        Partial(rejected={0: "bad"}, retry=(0,)),
        Partial(retry=(0, 0)),
        Partial(retry=(0,), hold=(0,), hold_s=0.0),
        Partial(rejected={1: "bad"}),
        Partial(retry=(3,)),
        Partial(rejected={-1: "bad"}),
    ],
    ids=[
        "rejected+retry",
        "retry-twice",
        "retry+hold",
        "rejected-out-of-range",
        "retry-out-of-range",
        "negative",
    ],
)
async def test_a_partial_naming_items_oddly_settles_each_item_once(partial: Partial) -> None:
    made, dead = consumer()
    offsets = PartitionOffsets()
    first, second = take(made, offsets, 5, ["rule_a", "rule_b"])  # one record, two outputs
    await made._settle(partial, [first], 200, b"")
    again = scheduled(made)
    assert len(dead) + len(again) <= 1  # dead-lettered or re-sent, never both, never twice
    if again:
        await made._settle(Delivered(), again, 200, b"")
    # rule_b's output is still out: the record's offset must not be committable yet.
    assert offsets.committable() == 5
    assert first.ticket.remaining == 1
    await made._settle(Delivered(), [second], 200, b"")
    assert offsets.committable() == 6


async def test_a_preflight_asking_to_retry_some_items_sends_the_others_and_delivers_none() -> None:
    made, _ = consumer()
    offsets = PartitionOffsets()
    (first,) = take(made, offsets, 10, ["r"])
    (second,) = take(made, offsets, 11, ["r"])
    sent: list[str] = []

    async def send(request: HttpRequest, items: Any) -> tuple[Outcome, int | None, bytes]:
        sent.append(request.url)
        return Partial(retry=(0,), after_s=1.0, reason="throttled"), 200, b""

    async def no_wait(key: str | None) -> None:
        await asyncio.sleep(0)

    made._send = send  # type: ignore[method-assign]
    made._throttle = no_wait  # type: ignore[method-assign]
    check = HttpRequest("POST", "https://debug.example/validate", {}, b"[]", (0, 1))
    go = await made._preflight(check, [first, second])
    assert sent == ["https://debug.example/validate"]  # only the check was sent
    assert go == [second]  # goes out for real next
    assert scheduled(made) == [first]  # waits for its retry
    assert offsets.committable() == 10  # nothing counted as delivered


async def test_a_partition_revoked_while_its_commit_is_in_flight_is_skipped() -> None:
    made, _ = consumer()
    offsets = PartitionOffsets()
    take(made, offsets, 0, [])  # no outputs: finished at once
    made._offsets = {TP: offsets}

    class _Kafka:
        async def commit(self, positions: dict[TopicPartition, int]) -> None:
            made._offsets.pop(TP)  # on_revoked ran meanwhile

    made._consumer = _Kafka()  # type: ignore[assignment]
    await made._commit(made._offsets)  # raised KeyError, which ended the periodic commits
    assert made._offsets == {}


async def test_one_failure_between_successes_keeps_its_backoff_an_outage_does_not() -> None:
    made, _ = consumer()
    offsets = PartitionOffsets()
    (poison,) = take(made, offsets, 1, ["r"])
    await made._settle(Retry("HTTP 500"), [poison], 500, b"")
    assert len(made._scheduled) == 1
    (fine,) = take(made, offsets, 2, ["r"])
    await made._settle(Delivered(), [fine], 200, b"")
    # One failed request between successes: a poison request, not an outage. Released, it would
    # be re-sent after every success (1,000s of times) until its 4 hours ran out.
    assert len(made._scheduled) == 1
    assert not made._ready
    (other,) = take(made, offsets, 3, ["r"])
    (third,) = take(made, offsets, 4, ["r"])
    await made._settle(Retry("HTTP 503"), [other], 503, b"")
    await made._settle(Retry("HTTP 503"), [third], 503, b"")
    (back,) = take(made, offsets, 5, ["r"])
    await made._settle(Delivered(), [back], 200, b"")  # after two failures: a recovery
    assert made._scheduled == []
    assert sorted(item.ticket.offset for batch in made._ready for item in batch) == [1, 3, 4]


async def test_shutdown_survives_aiokafkas_own_cancellation_while_kafka_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # aiokafka's Fetcher.close re-raises its fetch task's CancelledError when Kafka is down:
    # SIGTERM then ended with a traceback and exit 1, the DLQ producer never stopped.
    made, _ = consumer()
    stopped: list[str] = []

    class _Kafka:
        def assignment(self) -> set[TopicPartition]:
            return set()

        def pause(self, *partitions: TopicPartition) -> None:
            pass

        async def stop(self) -> None:
            raise asyncio.CancelledError

    class _Producer:
        async def stop(self) -> None:
            stopped.append("producer")

    made._consumer = _Kafka()  # type: ignore[assignment]
    made._producer = _Producer()  # type: ignore[assignment]
    await made.shutdown()
    assert stopped == ["producer"]
    assert "aiokafka's fetcher was cancelled" in caplog.text


async def test_readyz_says_when_kafka_does_not_answer(aiohttp_client: Any) -> None:
    from aiokafka.errors import KafkaConnectionError

    from router.sink_runner import health_app

    made, _ = consumer()

    class _Client:
        answers = False

        async def fetch_all_metadata(self) -> None:
            if not self.answers:
                raise KafkaConnectionError("down")

    class _Kafka:
        _client = _Client()

    class _Rules:
        class current:
            hash = "0123456789abcdef"

    made._consumer = _Kafka()  # type: ignore[assignment]
    made.rules = _Rules()  # type: ignore[assignment]
    made.started = True
    client = await aiohttp_client(health_app(made, CollectorRegistry()))
    response = await client.get("/readyz")
    assert response.status == 503  # was 200 "ready" through a whole Kafka outage
    assert (await response.json())["kafka"] == "kafka unreachable: KafkaConnectionError"
    assert (await client.get("/healthz")).status == 200  # alive all the same
    _Kafka._client.answers = True
    made._kafka_checked = (0.0, "")  # past the one-second cache
    response = await client.get("/readyz")
    assert response.status == 200
    assert (await response.json())["kafka"] == "ok"


async def test_a_paused_sink_resumes_when_its_probe_comes_back_partly_accepted() -> None:
    # Mixpanel's 400 with failed_records imports the other rows: the credentials work again.
    # Counted as no success, the sink stayed paused for good (and a paused sink fetches nothing).
    made, dead = consumer()
    offsets = PartitionOffsets()
    probe = take(made, offsets, 1, ["a"]) + take(made, offsets, 2, ["a"])
    await made._settle(Pause("HTTP 401"), probe, 401, b"")
    assert made.state == PAUSED
    await made._settle(Partial(rejected={1: "time is in the future"}), scheduled(made), 400, b"")
    assert made.state == HEALTHY
    assert dead == [("a", dlq.REJECTED_BY_API)]
    assert offsets.committable() == 3


async def test_a_partial_without_an_answer_is_no_sign_of_recovery() -> None:
    # A preflight hold (no request sent, status None) says nothing about the destination.
    made, _ = consumer()
    offsets = PartitionOffsets()
    probe = take(made, offsets, 1, ["a"]) + take(made, offsets, 2, ["a"])
    await made._settle(Pause("HTTP 401"), probe, 401, b"")
    await made._settle(Partial(retry=(0, 1), reason="quota"), scheduled(made), None, b"")
    assert made.state != HEALTHY
    assert made._failed_since_success == 1  # not reset, as a real answer would


async def test_lag_of_paused_partitions_comes_from_the_broker() -> None:
    # Paused partitions fetch nothing, so their highwater mark stood still and the lag read 0
    # while events piled up behind a paused sink.
    made, _ = consumer()
    paused_tp, live_tp = TopicPartition("events", 0), TopicPartition("events", 1)
    made._offsets = {paused_tp: PartitionOffsets(), live_tp: PartitionOffsets()}

    class _Kafka:
        def paused(self) -> set[TopicPartition]:
            return {paused_tp}

        async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
            assert tps == [paused_tp]
            return {paused_tp: 368}

        def highwater(self, tp: TopicPartition) -> int | None:
            return {paused_tp: 356, live_tp: 40}[tp]

        async def position(self, tp: TopicPartition) -> int:
            return {paused_tp: 356, live_tp: 38}[tp]

    made._consumer = _Kafka()
    await made._update_lag()
    lag = made.metrics.lag
    assert lag.labels("0", "events")._value.get() == 12
    assert lag.labels("1", "events")._value.get() == 2
