"""``router dlq list|show|replay`` on the real broker.

Dead letters come from a real sink consumer run against the scripted fake destination (poison
ids, a broken rule, an unencodable payload, a garbage record), or are written directly when a test
needs control over ``dead_at``. A replay must reach only the sink it names, through its retry
topic, with the idempotency keys of the first attempt.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from router import dlq
from router.cli import build_parser
from router.delivery.sink import idempotency_key
from router.dlq_tools import (
    Interruption,
    Selection,
    list_letters,
    parse_since,
    replay_letters,
    run,
)
from router.events import Event, now_ms, to_record
from router.settings import Settings
from tests.fakes.destination import Destination
from tests.integration.conftest import ROOT, Broker, make_settings, unique_topic
from tests.integration.dlq_helpers import (
    create_topic,
    end_offsets,
    group_done_with,
    read_to_end,
    write_letters,
)
from tests.integration.test_sink_consumer import (
    TOKEN,
    committed_everything,
    dead_letters,
    publish,
    rig_settings,
    start_consumer,
    track_event,
    wait_until,
    wait_until_async,
    write_rules,
)

pytestmark = pytest.mark.kafka


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    return write_rules(tmp_path / "rules")


@pytest.fixture
async def destinations() -> AsyncIterator[tuple[Destination, Destination, str, str]]:
    """Two fake destinations on their own servers: one for ``fake``, one for ``fake2``."""
    first, other = Destination(), Destination()
    servers = [TestServer(d.app(), host="127.0.0.1") for d in (first, other)]
    for server in servers:
        await server.start_server()
    try:
        urls = [str(s.make_url("/collect")) for s in servers]
        yield first, other, urls[0], urls[1]
    finally:
        for server in servers:
            await server.close()


async def _cli(settings: Settings, *argv: str) -> tuple[int, str, str]:
    """`router dlq ARGV` in-process (argument parsing included): (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    args = build_parser().parse_args(["dlq", *argv, "--timeout", "10"])
    status = await run(args, settings, out, err)
    return status, out.getvalue(), err.getvalue()


async def test_lists_real_dead_letters_with_their_reasons_and_filters(
    broker: Broker, destinations: tuple[Destination, Destination, str, str], rules_dir: Path
) -> None:
    destination, _, url, _ = destinations
    topic = unique_topic()
    settings = rig_settings(broker, topic, rules_dir, url)
    tracks = [track_event(i) for i in range(30)]
    destination.poison = {tracks[3].id, tracks[17].id}
    broken = [track_event(100 + i, name="broken") for i in range(2)]
    unencodable = [track_event(200, name="unencodable")]
    await publish(settings, tracks + broken + unencodable, garbage=[b"not json"])
    running = await start_consumer(settings)
    try:
        await wait_until_async(lambda: committed_everything(settings, "fake"), 30)
    finally:
        await running.close()
    letters = await dead_letters(settings, "fake", expected=6)
    assert len(letters) == 6

    # Everything: one line per letter, then the count by reason.
    out, err = io.StringIO(), io.StringIO()
    counts = await list_letters(settings, "fake", Selection(), out=out, err=err, timeout_s=10)
    assert counts == {
        "rejected_by_api": 2,
        "mapping_error": 2,
        "invalid_payload": 1,
        "invalid_event": 1,
    }
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["DLQ", "DEAD", "AT", "REASON", "RULE", "EVENT", "STATUS", "DETAIL"]
    assert len(lines) == 1 + 6 + 1
    assert lines[-1] == (
        f"6 dead letter(s) (of 6 in {settings.consumer.dlq_topic_for('fake')}): "
        "invalid_event 1, mapping_error 2, invalid_payload 1, rejected_by_api 2"
    )
    poison_line = next(line for line in lines if tracks[3].id in line)
    fields = poison_line.split()
    assert fields[2:6] == ["rejected_by_api", "tracks", tracks[3].id, "200"]
    assert fields[1].endswith("Z")
    assert fields[1][:2] == "20"
    assert poison_line.endswith(f"event {tracks[3].id} is poison")
    mapping_line = next(line for line in lines if broken[0].id in line)
    assert "mapping_error" in mapping_line
    assert "broken" in mapping_line
    assert "required value missing" in mapping_line
    garbage_line = next(line for line in lines if "invalid_event" in line)
    assert "not a canonical event" in garbage_line
    assert TOKEN not in out.getvalue()

    # --reason (comma-separated and repeated), as JSON lines; the count goes to stderr.
    status, stdout, stderr = await _cli(
        settings,
        "list",
        "--sink",
        "fake",
        "--reason",
        "rejected_by_api,invalid_payload",
        "--reason",
        "too_large",
        "--json",
    )
    assert status == 0
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert {(r["reason"], r["event_id"]) for r in rows} == {
        ("rejected_by_api", tracks[3].id),
        ("rejected_by_api", tracks[17].id),
        ("invalid_payload", unencodable[0].id),
    }
    assert all(r["sink"] == "fake" and "dlq_offset" in r for r in rows)
    assert stderr.startswith("3 dead letter(s) (of 6 in ")

    # --rule and --event-id.
    status, stdout, _ = await _cli(settings, "list", "--sink", "fake", "--rule", "broken", "--json")
    assert {json.loads(line)["event_id"] for line in stdout.splitlines()} == {e.id for e in broken}
    status, stdout, _ = await _cli(
        settings, "list", "--sink", "fake", "--event-id", tracks[17].id, "--json"
    )
    (row,) = [json.loads(line) for line in stdout.splitlines()]
    assert row["idempotency_key"] == idempotency_key(tracks[17].id, "fake", "tracks")

    # show: the whole record, pretty, selected by its place on the topic.
    place = f"{row['dlq_partition']}:{row['dlq_offset']}"
    status, stdout, _ = await _cli(settings, "show", "--sink", "fake", "--offset", place)
    assert status == 0
    shown = json.loads(stdout)
    assert shown == row
    assert shown["event"]["id"] == tracks[17].id
    assert stdout.startswith("{\n  ")
    status, stdout, stderr = await _cli(
        settings, "show", "--sink", "fake", "--event-id", "no-such-event"
    )
    assert (status, stdout, stderr) == (1, "", "router dlq: no dead letter matches\n")


async def test_replay_reaches_only_that_sink_with_the_same_idempotency_keys(
    broker: Broker, destinations: tuple[Destination, Destination, str, str], rules_dir: Path
) -> None:
    first, other, url, other_url = destinations
    topic = unique_topic()
    settings = rig_settings(broker, topic, rules_dir, url, ROUTER_SINKS__FAKE2__URL=other_url)
    events = [track_event(i) for i in range(30)]
    poisoned = {events[3].id, events[17].id}
    first.poison = set(poisoned)
    everything = {e.id for e in events}
    await publish(settings, events)
    fake = await start_consumer(settings, "fake")
    fake2 = await start_consumer(settings, "fake2")
    try:
        await wait_until(lambda: other.delivered_event_ids() == everything, 30, "fake2")
        await wait_until_async(lambda: committed_everything(settings, "fake"), 30)
        await wait_until_async(lambda: committed_everything(settings, "fake2"), 30)
        # Committed means the dead letters are on their topic: they are all there.
        dlq_records = await read_to_end(settings, settings.consumer.dlq_topic_for("fake"))
        letters = [dlq.decode(r.value) for r in dlq_records]
        assert {x.event_id for x in letters} == poisoned
        assert first.delivered_event_ids() == everything - poisoned
        assert len(other.ledger) == len(events)
        event_topic_before = await end_offsets(settings, topic)

        first.poison.clear()  # the destination is fixed
        out, err = io.StringIO(), io.StringIO()
        result = await replay_letters(
            settings,
            "fake",
            Selection(reasons=frozenset({dlq.REJECTED_BY_API})),
            out=out,
            err=err,
            progress=True,
            timeout_s=10,
        )
        target = settings.consumer.retry_topic_for("fake")
        assert (result.replayed, result.skipped, result.failed) == (2, 0, 0)
        assert result.summary() == f"replayed 2 event(s) to {target}; skipped 0"
        assert "\r" in err.getvalue()
        assert "2/2 100%" in err.getvalue()

        await wait_until(lambda: first.delivered_event_ids() == everything, 30, "the replay")
        await wait_until_async(
            lambda: group_done_with(settings, settings.consumer.group_for("fake"), target), 30
        )
        await asyncio.sleep(0.5)  # a grace period for any stray delivery to show
    finally:
        await fake.close()
        await fake2.close()

    # The replayed outputs carry the keys of the first attempt (those in the dead letters).
    replayed = {(key, event_id) for key, event_id, _, _ in first.ledger if event_id in poisoned}
    assert replayed == {(x.idempotency_key, x.event_id) for x in letters}
    assert replayed == {(idempotency_key(e, "fake", "tracks"), e) for e in poisoned}
    # Only the dead-lettered events were sent again, once each.
    assert len(first.ledger) == len(events)
    # fake2 saw nothing of the replay: not on the event topic, not on its own retry topic.
    assert len(other.ledger) == len(events)
    assert await end_offsets(settings, topic) == event_topic_before
    assert (
        sum((await end_offsets(settings, settings.consumer.retry_topic_for("fake2"))).values()) == 0
    )
    # The replayed records: the original value, keyed as on the event topic, with the headers.
    places = {dlq.decode(r.value).event_id: f"{r.partition}:{r.offset}" for r in dlq_records}
    records = await read_to_end(settings, target)
    assert len(records) == 2
    by_event = {dict(r.headers)["event_id"].decode(): r for r in records}
    assert set(by_event) == poisoned
    originals = {e.id: e for e in events}
    for event_id, record in by_event.items():
        assert record.value == to_record(originals[event_id]).value
        assert record.key == originals[event_id].partition_key()
        assert dict(record.headers)["replay_of"] == places[event_id].encode()
    # Delivered this time: no new dead letters.
    assert len(await read_to_end(settings, settings.consumer.dlq_topic_for("fake"))) == 2


def _synthetic_settings(broker: Broker) -> Settings:
    topic = unique_topic()
    return make_settings(
        broker,
        topic,
        ROUTER_CONSUMER__DLQ_TOPIC=f"{topic}.dlq.{{sink}}",
        ROUTER_CONSUMER__RETRY_TOPIC=f"{topic}.retry.{{sink}}",
    )


A, B, C = track_event(1), track_event(2), track_event(3)


def _letter(
    event: Event | None, rule: str | None, reason: str, minutes_ago: int, status: int | None = None
) -> dlq.DeadLetter:
    value = to_record(event).value if event is not None else b"not json"
    return dlq.DeadLetter(
        sink="fake",
        reason=reason,
        detail=f"{reason}: detail",
        event_id=event.id if event is not None else None,
        rule_id=rule,
        idempotency_key=idempotency_key(event.id, "fake", rule) if event and rule else None,
        status=status,
        dead_at=now_ms() - minutes_ago * 60_000,
        topic="events",
        partition=0,
        offset=minutes_ago,
        **dlq.event_fields(value),
    )


def _synthetic_letters() -> list[dlq.DeadLetter]:
    """Offsets 0..4 of a one-partition DLQ, dead 3 h, 30 min, 10 min, 5 min and 1 min ago."""
    return [
        _letter(A, "tracks", dlq.REJECTED_BY_API, 180, status=400),
        _letter(B, "broken", dlq.MAPPING_ERROR, 30),
        _letter(B, "tracks", dlq.RETRIES_EXHAUSTED, 10, status=503),  # same event as 0:1
        _letter(None, None, dlq.INVALID_EVENT, 5),
        _letter(C, "tracks", dlq.TOO_LARGE, 1),
    ]


async def test_dry_run_prints_what_would_be_sent_and_sends_nothing(broker: Broker) -> None:
    settings = _synthetic_settings(broker)
    await write_letters(settings, settings.consumer.dlq_topic_for("fake"), _synthetic_letters())
    target = settings.consumer.retry_topic_for("fake")

    status, stdout, stderr = await _cli(settings, "replay", "--sink", "fake", "--dry-run")
    assert status == 0
    assert stdout.splitlines() == [
        f"would send event {A.id} (rule tracks, rejected_by_api, dlq 0:0) to {target}",
        f"would send event {B.id} (rule broken, mapping_error, dlq 0:1) to {target}",
        f"would send event {C.id} (rule tracks, too_large, dlq 0:4) to {target}",
        f"dry run: would replay 3 event(s) to {target}; skipped 2",
    ]
    assert stderr.splitlines() == [
        f"skipped dlq 0:2: event {B.id} is already replayed from dlq 0:1 (all rules run again)",
        "skipped dlq 0:3: invalid_event: not a canonical event, it would only die again "
        "(--include-invalid)",
    ]
    assert await end_offsets(settings, target) == {}  # a dry run does not even create the topic

    # The retry topic as the sink's consumer creates it; --include-invalid, with the bar.
    await create_topic(settings, target, partitions=3)
    status, stdout, stderr = await _cli(
        settings, "replay", "--sink", "fake", "--dry-run", "--include-invalid", "--progress"
    )
    assert status == 0
    assert f"would send event - (rule -, invalid_event, dlq 0:3) to {target}" in stdout
    assert stdout.splitlines()[-1] == f"dry run: would replay 4 event(s) to {target}; skipped 1"
    assert "5/5 100%" in stderr
    assert sum((await end_offsets(settings, target)).values()) == 0


async def test_since_and_reason_select_what_is_listed_and_replayed(broker: Broker) -> None:
    settings = _synthetic_settings(broker)
    await write_letters(settings, settings.consumer.dlq_topic_for("fake"), _synthetic_letters())
    target = settings.consumer.retry_topic_for("fake")

    async def offsets(*argv: str) -> list[int]:
        status, stdout, _ = await _cli(settings, "list", "--sink", "fake", "--json", *argv)
        assert status == 0
        return [json.loads(line)["dlq_offset"] for line in stdout.splitlines()]

    assert await offsets() == [0, 1, 2, 3, 4]
    assert await offsets("--since", "1h") == [1, 2, 3, 4]
    assert await offsets("--since", "15m") == [2, 3, 4]
    assert await offsets("--since", "2m") == [4]
    assert await offsets("--since", "1d") == [0, 1, 2, 3, 4]
    twenty_ago = datetime.now(UTC) - timedelta(minutes=20)
    assert await offsets("--since", twenty_ago.isoformat()) == [2, 3, 4]
    assert await offsets("--since", twenty_ago.strftime("%Y-%m-%dT%H:%M:%SZ")) == [2, 3, 4]
    local = twenty_ago.astimezone(timezone(timedelta(hours=2)))
    assert await offsets("--since", local.isoformat()) == [2, 3, 4]
    assert await offsets("--reason", "rejected_by_api") == [0]
    assert await offsets("--reason", "retries_exhausted,invalid_event") == [2, 3]
    assert await offsets("--reason", "mapping_error", "--reason", "too_large") == [1, 4]
    assert await offsets("--since", "1h", "--reason", "rejected_by_api,too_large") == [4]
    assert parse_since("1h30m", now=10_000_000) == 10_000_000 - 5_400_000

    # A replay takes the same selection; it creates the retry topic if the sink never did.
    status, stdout, stderr = await _cli(
        settings,
        "replay",
        "--sink",
        "fake",
        "--since",
        "1h",
        "--reason",
        "retries_exhausted,invalid_event,too_large",
        "--include-invalid",
    )
    assert status == 0, stderr
    assert stdout == f"replayed 3 event(s) to {target}; skipped 0\n"
    assert stderr == ""
    records = await read_to_end(settings, target)
    sent = {dict(r.headers)["replay_of"].decode(): r for r in records}
    assert set(sent) == {"0:2", "0:3", "0:4"}
    assert sent["0:2"].value == to_record(B).value
    assert sent["0:2"].key == B.partition_key()
    assert dict(sent["0:2"].headers)["event_id"] == B.id.encode()
    assert sent["0:3"].value == b"not json"
    assert "event_id" not in dict(sent["0:3"].headers)
    assert sent["0:4"].value == to_record(C).value


async def test_the_router_command_line(broker: Broker) -> None:
    settings = _synthetic_settings(broker)
    await write_letters(settings, settings.consumer.dlq_topic_for("fake"), _synthetic_letters())
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")},
        "ROUTER_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
        "ROUTER_KAFKA__TOPIC": settings.kafka.topic,
        "ROUTER_CONSUMER__DLQ_TOPIC": settings.consumer.dlq_topic,
        "ROUTER_CONSUMER__RETRY_TOPIC": settings.consumer.retry_topic,
    }

    async def router(*argv: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "router.cli",
            *argv,
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), 30)
        finally:
            if process.returncode is None:
                process.kill()
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    status, out, err = await router("dlq", "list", "--sink", "fake", "--since", "1h")
    assert status == 0, err
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[1:-1]] == ["0:1", "0:2", "0:3", "0:4"]
    assert lines[-1].endswith("invalid_event 1, mapping_error 1, too_large 1, retries_exhausted 1")
    status, out, err = await router("dlq", "list", "--sink", "nosuch")
    assert status == 1
    assert out == ""
    assert "does not exist" in err
    status, out, err = await router("dlq", "list", "--sink", "fake", "--reason", "nope")
    assert status == 2
    assert "unknown reason 'nope'" in err


class _CtrlCAfter(Interruption):
    """Ctrl-C pressed after ``n`` letters were looked at (the flag the SIGINT handler sets)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self._left = n

    @property  # type: ignore[override]
    def requested(self) -> bool:
        self._left -= 1
        return self._left < 0

    @requested.setter
    def requested(self, value: bool) -> None:
        pass


async def test_ctrl_c_stops_a_replay_after_the_send_in_progress_and_says_so(
    broker: Broker,
) -> None:
    settings = _synthetic_settings(broker)
    await write_letters(settings, settings.consumer.dlq_topic_for("fake"), _synthetic_letters())
    target = settings.consumer.retry_topic_for("fake")
    out, err = io.StringIO(), io.StringIO()
    result = await replay_letters(
        settings, "fake", Selection(), out=out, err=err, interruption=_CtrlCAfter(2)
    )
    assert result.interrupted
    assert result.replayed == 2  # A and B, acknowledged before it stopped; C was not sent
    assert sum((await end_offsets(settings, target)).values()) == 2
    assert "interrupted (Ctrl-C): run it again to go on" in result.summary()
