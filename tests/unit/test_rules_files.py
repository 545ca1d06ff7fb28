"""The shipped rule files: one per sink, each passes check and every one of its tests."""

from __future__ import annotations

from pathlib import Path

import pytest

import sinks
from router.rules.loader import load_rules
from router.rules.testing import run_test

RULES = Path(__file__).resolve().parents[2] / "rules"


def test_there_is_a_rule_file_for_every_sink() -> None:
    assert sorted(p.stem for p in RULES.glob("*.yaml")) == sorted(sinks.BUILT_IN)


@pytest.mark.parametrize("sink", sorted(sinks.BUILT_IN))
def test_rule_file_passes_check_and_its_tests(sink: str) -> None:
    loaded = load_rules(RULES / f"{sink}.yaml")
    assert loaded.problems == []
    assert loaded.ruleset is not None
    assert loaded.tests, f"rules/{sink}.yaml has no tests"
    tested_rules: set[str] = set()
    for path, case, where in loaded.tests:
        result = run_test(loaded.ruleset, path, case, where)
        assert result.passed, f"{path} {where} {case.name}: " + "\n".join(result.details)
        tested_rules.update(case.expect)
    # Every default rule has at least one test where it produces an output.
    assert {r.id for r in loaded.ruleset.rules} <= tested_rules
