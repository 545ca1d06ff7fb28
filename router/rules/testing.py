"""Running rule tests: an input event, the exact output expected from each rule.

A test passes when the set of rules that emitted equals the set expected, every output equals its
expectation exactly (after both go through JSON, so YAML dates and Python datetimes compare as the
sink would see them), and every expected mapping error occurred with the reason given.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import msgspec
import yaml

from router.events import Event, PayloadError, datetime_ms, decode_track, decode_webhook
from router.rules.engine import Failed, Routed, RuleSet
from router.rules.model import RuleTest

#: received_at of every test event, so outputs that use it are reproducible.
TEST_RECEIVED_AT: Final = datetime_ms(datetime(2026, 1, 1, tzinfo=UTC))

_json = msgspec.json.Encoder(order="sorted")


@dataclass
class TestResult:
    file: Path
    name: str
    where: str
    passed: bool
    details: list[str] = field(default_factory=list)


def _normal(value: Any) -> Any:
    """What a value looks like on the wire: a JSON round trip (dates become ISO strings)."""
    return msgspec.json.decode(_json.encode(value))


def _millis(value: Any) -> Any:
    """Let tests write times as YAML dates or ISO strings; the event model holds milliseconds."""
    if isinstance(value, datetime):
        return datetime_ms(value if value.tzinfo else value.replace(tzinfo=UTC))
    if isinstance(value, str):
        try:
            parsed = msgspec.convert(value, datetime)
        except msgspec.ValidationError:
            return value
        return datetime_ms(parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC))
    return value


def build_event(test: RuleTest) -> Event:
    """The test's input as a canonical event, through the ingest's own decoders for raw payloads."""
    if (test.pendo is None) == (test.event is None):
        raise ValueError("a test needs exactly one of pendo (a raw payload) or event")
    if test.pendo is not None:
        body = _json.encode(test.pendo)
        if test.pendo.get("type") == "track":
            (event,) = decode_track(body, TEST_RECEIVED_AT, 1)
            return event
        return decode_webhook(body, TEST_RECEIVED_AT)
    assert test.event is not None
    unknown = sorted(set(test.event) - set(Event.__struct_fields__))
    if unknown:
        raise ValueError(
            f"event has no field {', '.join(map(repr, unknown))}; its fields are: "
            + ", ".join(Event.__struct_fields__)
        )
    fields: dict[str, Any] = {
        "id": "test-event",
        "source": "track",
        "type": "track.event",
        "name": "test",
        "timestamp": TEST_RECEIVED_AT,
        "received_at": TEST_RECEIVED_AT,
        **test.event,
    }
    for key in ("timestamp", "received_at"):
        fields[key] = _millis(fields[key])
    if "raw" in fields:
        # The event model keeps the raw payload as JSON bytes.
        fields["raw"] = msgspec.Raw(_json.encode(fields["raw"]))
    return msgspec.convert(fields, Event, strict=False)


def _dump(value: Any) -> list[str]:
    return yaml.safe_dump(value, sort_keys=True, allow_unicode=True).splitlines()


def run_test(ruleset: RuleSet, file: Path, test: RuleTest, where: str) -> TestResult:
    result = TestResult(file=file, name=test.name, where=where, passed=True)
    try:
        event = build_event(test)
    except (ValueError, PayloadError, msgspec.ValidationError) as exc:
        result.passed = False
        result.details.append(f"the test input is not a valid event: {exc}")
        return result
    outputs = ruleset.evaluate(event)
    routed = {o.rule_id: o for o in outputs if isinstance(o, Routed)}
    failed = {o.rule_id: o for o in outputs if isinstance(o, Failed)}
    for rule_id in sorted(set(test.expect) - set(routed)):
        reason = (
            f": mapping error at {failed[rule_id].field}: {failed[rule_id].reason}"
            if (rule_id in failed)
            else " (the rule did not match)"
        )
        result.details.append(f"expected output from rule {rule_id!r}, got none{reason}")
    for rule_id in sorted(set(routed) - set(test.expect)):
        result.details.append(
            f"rule {rule_id!r} produced an output that the test does not expect:\n"
            + "\n".join("    " + line for line in _dump(_normal(routed[rule_id].payload)))
        )
    for rule_id in sorted(set(test.expect) & set(routed)):
        expected = _normal(test.expect[rule_id])
        actual = _normal(routed[rule_id].payload)
        if expected != actual:
            diff = difflib.unified_diff(
                _dump(expected), _dump(actual), "expected", "actual", lineterm=""
            )
            result.details.append(
                f"rule {rule_id!r} output differs:\n" + "\n".join("    " + d for d in diff)
            )
    for rule_id, reason in sorted(test.expect_errors.items()):
        got = failed.get(rule_id)
        if got is None:
            result.details.append(f"expected a mapping error from rule {rule_id!r}, got none")
        elif reason not in f"{got.field}: {got.reason}":
            result.details.append(
                f"rule {rule_id!r} failed with {got.field}: {got.reason!r}, "
                f"expected a reason containing {reason!r}"
            )
    for rule_id in sorted(set(failed) - set(test.expect_errors) - set(test.expect)):
        got = failed[rule_id]
        result.details.append(f"rule {rule_id!r} failed unexpectedly at {got.field}: {got.reason}")
    result.passed = not result.details
    return result


def run_tests(ruleset: RuleSet, tests: Sequence[tuple[Path, RuleTest, str]]) -> list[TestResult]:
    """Every test of a rule file (``LoadedRules.tests``: file, case, where) against ``ruleset``."""
    return [run_test(ruleset, path, case, where) for path, case, where in tests]
