"""``router rules check|test|schema``: what an analyst runs before shipping a rule change."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import msgspec

import sinks
from router.rules import testing
from router.rules.engine import TRANSFORM_NAMES
from router.rules.loader import LoadedRules, load_rules, rule_paths, stray_files
from router.rules.model import RuleFile, TestFile


def _targets(paths: Sequence[str], default_dir: str, err: TextIO) -> tuple[list[Path], bool] | None:
    """The rule files to work on, and whether a stray file (reported to ``err``) was found."""
    targets = [Path(p) for p in paths] if paths else [Path(default_dir)]
    missing = [t for t in targets if not t.exists()]
    if missing:
        for target in missing:
            err.write(f"{target}: no such file or directory\n")
        return None
    strays = stray_files(targets)
    for problem in strays:
        err.write(f"{problem}\n")
    found = rule_paths(targets)
    if not found:
        if not strays:
            err.write(f"no rule files (*.yaml) in {', '.join(map(str, targets))}\n")
        return None
    return found, bool(strays)


def run_check(paths: Sequence[str], default_dir: str, out: TextIO = sys.stdout) -> int:
    """Exit 0 when every file is valid; otherwise one line per problem and exit 1."""
    targets = _targets(paths, default_dir, out)
    if targets is None:
        return 1
    files, failed = targets
    for path in files:
        loaded = load_rules(path)
        if loaded.problems:
            failed = True
            for problem in loaded.problems:
                out.write(f"{problem}\n")
        else:
            out.write(_ok_line(loaded))
    return 1 if failed else 0


def _ok_line(loaded: LoadedRules) -> str:
    assert loaded.ruleset is not None
    rules, tests = len(loaded.ruleset.rules), len(loaded.tests)
    return (
        f"ok {loaded.path}: {rules} rule{'s' if rules != 1 else ''}, "
        f"{tests} test{'s' if tests != 1 else ''}, ruleset {loaded.ruleset.hash}\n"
    )


def run_tests(paths: Sequence[str], default_dir: str, out: TextIO = sys.stdout) -> int:
    """Run every rule test; a diff per mismatch, a summary line, exit 1 on any failure."""
    targets = _targets(paths, default_dir, out)
    if targets is None:
        return 1
    files, strays = targets
    passed, failed = 0, int(strays)
    for path in files:
        loaded = load_rules(path)
        if loaded.ruleset is None:
            failed += 1
            out.write(f"FAIL {path}: the rules do not pass check:\n")
            for problem in loaded.problems:
                out.write(f"  {problem}\n")
            continue
        if not loaded.tests:
            failed += 1
            out.write(f"FAIL {path}: no tests (add tests: to the file or rules/tests/)\n")
            continue
        for result in testing.run_tests(loaded.ruleset, loaded.tests):
            if result.passed:
                passed += 1
                continue
            failed += 1
            out.write(f"FAIL {result.file} {result.where} {result.name!r}\n")
            for detail in result.details:
                out.write(f"  {detail}\n")
    out.write(f"rule tests: {passed} passed, {failed} failed\n")
    return 1 if failed or not passed else 0


def schema() -> bytes:
    """JSON Schema of rule and test files, for editors (checked in: docs/rules.schema.json)."""
    (rule_file, test_file), components = msgspec.json.schema_components(
        [RuleFile, TestFile], ref_template="#/$defs/{name}"
    )
    # The model takes any text for these (check names the valid ones); editors can do better
    # with the closed sets: the transforms, and the built-in sinks' output kinds.
    components["Directive"]["properties"]["transform"]["items"] = {
        "anyOf": [
            {"enum": [name for name in TRANSFORM_NAMES if name != "truncate"]},
            {
                "type": "object",
                "properties": {"truncate": {"type": "integer", "minimum": 1}},
                "required": ["truncate"],
                "additionalProperties": False,
            },
        ]
    }
    kinds = sorted({kind for outputs in sinks.OUTPUTS.values() for kind in outputs.kinds})
    components["Rule"]["properties"]["output"]["anyOf"] = [{"enum": kinds}, {"type": "null"}]
    document = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "pendo-event-router rule file",
        "description": "rules/<sink>.yaml (or rules/tests/<sink>*.yaml for extra tests)",
        "anyOf": [rule_file, test_file],
        "$defs": components,
    }
    return msgspec.json.format(msgspec.json.encode(document), indent=2) + b"\n"
