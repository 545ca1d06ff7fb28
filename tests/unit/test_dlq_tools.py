"""The dead-letter tool's parts that need no broker: arguments, filters, lines, plans, the bar."""

from __future__ import annotations

import io
from collections import Counter

import msgspec
import pytest

from router import dlq
from router.cli import build_parser
from router.dlq_tools import (
    LIST_HEADER,
    Entry,
    ProgressBar,
    Selection,
    _plan,
    iso_ms,
    list_line,
    parse_position,
    parse_reasons,
    parse_since,
    record,
    selection_from,
    summary,
)
from router.events import Event, to_record

NOW = 1_750_000_000_000  # 2025-06-15T15:06:40Z


def event(i: int, visitor: str | None = "v1") -> Event:
    return msgspec.convert(
        {
            "id": f"evt-{i}",
            "source": "track",
            "type": "track.event",
            "name": "x",
            "visitor_id": visitor,
            "account_id": "acct",
            "timestamp": 1,
            "received_at": 1,
        },
        Event,
    )


def letter(
    reason: str = dlq.REJECTED_BY_API,
    ev: Event | None = None,
    value: bytes | None = None,
    rule: str | None = "tracks",
    dead_at: int = NOW,
) -> dlq.DeadLetter:
    raw = value if value is not None else to_record(ev or event(1)).value
    return dlq.DeadLetter(
        sink="fake",
        reason=reason,
        detail="event evt-1 is poison",
        event_id=(ev or event(1)).id if value is None else None,
        rule_id=rule,
        status=200,
        dead_at=dead_at,
        topic="router.events",
        partition=2,
        offset=7,
        **dlq.event_fields(raw),
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", NOW - 30 * 60_000),
        ("2h", NOW - 2 * 3_600_000),
        ("7d", NOW - 7 * 86_400_000),
        ("1w", NOW - 7 * 86_400_000),
        ("1h30m", NOW - 90 * 60_000),
        ("45s", NOW - 45_000),
        ("2025-06-15", 1_749_945_600_000),
        ("2025-06-15T15:06:40Z", NOW),
        ("2025-06-15T15:06:40", NOW),  # no offset: UTC
        ("2025-06-15T17:06:40+02:00", NOW),
        ("2025-06-15T15:06:40.5Z", NOW + 500),
    ],
)
def test_since_takes_durations_and_iso_date_times(text: str, expected: int) -> None:
    assert parse_since(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "2h ago", "-2h", "2x", "2025-13-01"])
def test_since_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="neither an ISO 8601 date-time nor a duration"):
        parse_since(text, now=NOW)


def test_reasons_are_checked_and_may_be_comma_separated() -> None:
    assert parse_reasons(["too_large, mapping_error", "too_large"]) == {
        "too_large",
        "mapping_error",
    }
    with pytest.raises(ValueError, match="unknown reason 'timeout'; one of invalid_event"):
        parse_reasons(["too_large,timeout"])


def test_positions() -> None:
    assert parse_position("12") == (None, 12)
    assert parse_position("3:12") == (3, 12)
    with pytest.raises(ValueError, match="partition:offset"):
        parse_position("a:b")


def test_the_command_line_builds_the_selection() -> None:
    args = build_parser().parse_args(
        [
            "dlq",
            "show",
            "--sink",
            "segment",
            "--reason",
            "too_large,invalid_event",
            "--reason",
            "mapping_error",
            "--rule",
            "r1",
            "--event-id",
            "e1",
            "--offset",
            "1:5",
            "--since",
            "2025-06-15T15:06:40Z",
        ]
    )
    assert args.sink == "segment"
    assert selection_from(args) == Selection(
        reasons=frozenset({"too_large", "invalid_event", "mapping_error"}),
        since_ms=NOW,
        rule_id="r1",
        event_id="e1",
        position=(1, 5),
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["dlq", "list"])  # --sink is required
    with pytest.raises(SystemExit):
        build_parser().parse_args(["dlq", "list", "--sink", "x", "--reason", "nope"])


def test_selection() -> None:
    entry = Entry(0, 4, letter(dead_at=NOW))
    assert Selection().matches(entry)
    assert Selection(reasons=frozenset({dlq.REJECTED_BY_API})).matches(entry)
    assert not Selection(reasons=frozenset({dlq.TOO_LARGE})).matches(entry)
    assert Selection(since_ms=NOW).matches(entry)
    assert not Selection(since_ms=NOW + 1).matches(entry)
    assert Selection(rule_id="tracks", event_id="evt-1").matches(entry)
    assert not Selection(rule_id="other").matches(entry)
    assert not Selection(event_id="evt-2").matches(entry)
    assert Selection(position=(None, 4)).matches(entry)
    assert Selection(position=(0, 4)).matches(entry)
    assert not Selection(position=(1, 4)).matches(entry)
    assert not Selection(position=(0, 5)).matches(entry)
    garbage = Entry(1, 0, None, "not a dead letter")
    assert Selection().matches(garbage)
    assert Selection(position=(1, 0)).matches(garbage)
    assert not Selection(reasons=frozenset({dlq.INVALID_EVENT})).matches(garbage)


def test_lines_and_records() -> None:
    entry = Entry(2, 9, letter())
    line = list_line(entry)
    assert line.split()[:6] == [
        "2:9",
        "2025-06-15T15:06:40.000Z",
        "rejected_by_api",
        "tracks",
        "evt-1",
        "200",
    ]
    assert line.endswith("event evt-1 is poison")
    # Real event ids are 40 characters: the columns stay under their headings.
    real = letter()
    real.event_id = "4d83a7e40912e5f1f3f30b8368def9a393961db2"
    real.rule_id = "guide-lifecycle-events"
    aligned = list_line(Entry(2, 9, real))
    cut = letter()
    cut.event_id = real.event_id
    cut.rule_id = "a-rule-id-longer-than-its-column-allows"
    for line in (aligned, list_line(Entry(2, 9, cut))):
        for heading in ("EVENT", "STATUS", "DETAIL"):
            start = LIST_HEADER.index(heading)
            assert line[start - 1] == " "
            assert line[start] != " "
    long = Entry(0, 0, letter()).letter
    assert long is not None
    long.detail = "x\n" * 100
    assert list_line(Entry(0, 0, long)).endswith("…")
    assert iso_ms(0) == "-"
    as_json = record(entry)
    assert as_json["dlq_partition"] == 2
    assert as_json["dlq_offset"] == 9
    assert as_json["event"]["id"] == "evt-1"
    assert record(Entry(0, 1, None, "empty record")) == {
        "dlq_partition": 0,
        "dlq_offset": 1,
        "error": "empty record",
    }
    counts = Counter({"too_large": 1, "invalid_event": 2, "undecodable": 1})
    assert summary(counts, 9, "router.dlq.x") == (
        "4 dead letter(s) (of 9 in router.dlq.x): invalid_event 2, too_large 1, undecodable 1"
    )
    assert summary(Counter(), 0, "router.dlq.x") == "0 dead letter(s) (of 0 in router.dlq.x)"


def test_plans_keep_the_event_key_and_send_each_event_once() -> None:
    seen: dict[str, str] = {}
    first = _plan(Entry(0, 3, letter(ev=event(1, visitor="v9"))), "fake", False, seen)
    assert not isinstance(first, str)
    assert first.value == to_record(event(1, visitor="v9")).value
    assert first.key == b"v9"
    assert first.headers == [("event_id", b"evt-1"), ("replay_of", b"0:3")]
    # The same event's dead letter for another rule: the first replay runs that rule too.
    again = _plan(Entry(1, 0, letter(ev=event(1), rule="other")), "fake", False, seen)
    assert again == "event evt-1 is already replayed from dlq 0:3 (all rules run again)"
    no_visitor = _plan(Entry(0, 4, letter(ev=event(2, visitor=None))), "fake", False, seen)
    assert not isinstance(no_visitor, str)
    assert no_visitor.key == b"acct"  # Event.partition_key: visitor, else account, else id


def test_plans_skip_invalid_events_unless_asked() -> None:
    invalid = Entry(0, 0, letter(dlq.INVALID_EVENT, value=b"\xffnot json", rule=None))
    assert "invalid_event" in str(_plan(invalid, "fake", False, {}))
    plan = _plan(invalid, "fake", True, {})
    assert not isinstance(plan, str)
    assert plan.value == b"\xffnot json"
    assert plan.key is None
    assert plan.headers == [("replay_of", b"0:0")]
    assert (
        _plan(Entry(0, 1, None, "empty record"), "fake", True, {})
        == "not a dead letter (empty record)"
    )
    empty = dlq.DeadLetter(sink="fake", reason=dlq.MAPPING_ERROR, detail="d", event_id="e")
    assert _plan(Entry(0, 2, empty), "fake", True, {}) == "the dead letter holds no original event"


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_in_place_and_keeps_notes_readable() -> None:
    stream = Tty()
    bar = ProgressBar(stream, 4, enabled=stream.isatty(), label="read")
    bar.advance()
    bar.note("skipped dlq 0:1: reasons")
    for _ in range(3):
        bar.advance()
    bar.close()
    text = stream.getvalue()
    first = "read [#######.......................] 1/4  25%"
    # Drawn, cleared for the note, drawn again; the last state once more at the end.
    assert text.startswith(f"\r{first}\r{' ' * len(first)}\rskipped dlq 0:1: reasons\n\r{first}")
    assert text.endswith("\rread [##############################] 4/4 100%\n")
    assert text.count("4/4 100%") == 1
    quiet = io.StringIO()
    bar = ProgressBar(quiet, 4, enabled=quiet.isatty())
    bar.advance(4)
    bar.note("a note")
    bar.close()
    assert quiet.getvalue() == "a note\n"


def test_plans_skip_letters_of_other_sinks_bad_base64_and_undecodable_events() -> None:
    other = dlq.DeadLetter(sink="beta", reason=dlq.MAPPING_ERROR, detail="d", event_id="e2")
    assert _plan(Entry(0, 0, other), "fake", True, {}) == "a dead letter of sink 'beta', not 'fake'"
    bad_b64 = dlq.DeadLetter(
        sink="fake", reason=dlq.RETRIES_EXHAUSTED, detail="d", event_id="e8", event_b64="abc"
    )
    assert _plan(Entry(0, 1, bad_b64), "fake", False, {}) == "its event_b64 is not base64"
    garbage = letter(dlq.MAPPING_ERROR, value=b"garbage2", rule=None)
    assert "not a canonical event" in str(_plan(Entry(0, 2, garbage), "fake", False, {}))
    assert not isinstance(_plan(Entry(0, 2, garbage), "fake", True, {}), str)


def test_odd_letters_are_listed_not_raised() -> None:
    from router.dlq_tools import _to_entry, iso_ms, parse_reasons, parse_timeout

    assert iso_ms(10**16) == "10000000000000000 (not a time)"
    deep = b'{"sink":"fake","reason":"rejected_by_api","detail":"d","payload":' + b"[" * 1000
    deep += b"]" * 1000 + b"}"

    class Record:
        partition, offset, value = 0, 5, deep

    entry = _to_entry(Record())
    assert entry.letter is None
    assert entry.error == "not a dead letter: nested too deeply"
    with pytest.raises(ValueError, match="empty reason"):
        parse_reasons([""])
    for text in ("nan", "0", "-1", "inf", "soon"):
        with pytest.raises(ValueError, match="positive number of seconds"):
            parse_timeout(text)
    assert dlq.event_fields(b"[" * 1200 + b"]" * 1200).keys() == {"event_b64"}
