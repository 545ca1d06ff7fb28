"""The CLI's log filter for aiokafka's self-retried errors: quiet on a healthy start, visible in an outage."""

from __future__ import annotations

import logging

from aiokafka.errors import GroupCoordinatorNotAvailableError, NotCoordinatorForGroupError

from router.cli import _KafkaClientNoise


def record(name: str, msg: str, args: tuple[object, ...], created: float) -> logging.LogRecord:
    made = logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)
    made.created = created
    return made


def test_coordinator_not_available_while_a_group_starts_is_dropped() -> None:
    noise = _KafkaClientNoise()
    name = "aiokafka.consumer.group_coordinator"
    template = "Group Coordinator Request failed: %s"
    assert not noise.filter(record(name, template, (GroupCoordinatorNotAvailableError(),), 0))
    # another coordinator error is not the start-up transient: kept
    assert noise.filter(record(name, template, (NotCoordinatorForGroupError(),), 0))


def test_reconnect_errors_show_once_per_address_per_interval() -> None:
    noise = _KafkaClientNoise(interval_s=30)
    template = 'Unable connect to "%s:%s": %s'
    refused = ConnectionRefusedError(111, "Connection refused")
    shown = [
        noise.filter(record("aiokafka", template, ("127.0.0.1", port, refused), at))
        for at, port in [(0, 9092), (2, 9092), (4, 9093), (29, 9092), (31, 9092)]
    ]
    assert shown == [True, False, True, False, True]


def test_other_records_pass() -> None:
    noise = _KafkaClientNoise()
    assert noise.filter(record("router.bus", "kafka not ready (attempt %d)", (1,), 0))
    assert noise.filter(record("aiokafka", "Heartbeat failed: %r", ("x",), 0))


def test_metadata_errors_with_a_list_of_nodes_never_raise_into_aiokafka() -> None:
    # aiokafka logs "Unable to update metadata from %s" with a list: a filter that hashed its
    # arguments raised TypeError inside aiokafka's metadata loop, which then never reconnected.
    noise = _KafkaClientNoise(interval_s=30)
    template = "Unable to update metadata from %s"
    assert noise.filter(record("aiokafka.client", template, ([1, 2],), 0))
    assert not noise.filter(record("aiokafka.client", template, ([1, 2],), 1))
    assert noise.filter(record("aiokafka.client", template, ([3],), 1))


def test_reconnects_to_one_node_are_throttled_whatever_the_error() -> None:
    noise = _KafkaClientNoise(interval_s=30)
    template = "Unable connect to node with id %s: %s"
    shown = [
        noise.filter(record("aiokafka", template, (1, ConnectionRefusedError(111, "refused")), at))
        for at in (0, 1, 2, 31)
    ]
    assert shown == [True, False, False, True]


def test_a_record_the_filter_cannot_read_passes() -> None:
    noise = _KafkaClientNoise()
    odd = record("aiokafka.client", 'Unable connect to "%s:%s": %s', ("h", 1, "e"), 0)
    odd.args = {"not": "a tuple"}  # type: ignore[assignment]
    assert noise.filter(odd)
    broken = record("aiokafka.consumer", "Group Coordinator Request failed: %s", (), 0)
    assert noise.filter(broken)  # getMessage() raises TypeError (too few args): still kept


def test_fetch_failures_during_an_outage_are_throttled() -> None:
    noise = _KafkaClientNoise(interval_s=30)
    template = "Failed fetch messages from %s: %s"
    shown = [
        noise.filter(record("aiokafka.consumer.fetcher", template, (1, "NodeNotReadyError"), at))
        for at in (0.0, 0.1, 0.2, 30.5)
    ]
    assert shown == [True, False, False, True]
