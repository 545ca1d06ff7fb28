"""Loading rule files: YAML to Structs to a compiled RuleSet, with every problem located.

Every problem is reported as ``rules/ga4.yaml:14: $.rules[2].map.name: <reason>``: the file, the
line (from PyYAML's node marks) and the JSON path of the offending value. msgspec reports values
inside a mapping as ``[...]``; the loader re-validates each entry to name the key that is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import yaml

import sinks
from router import yamlfile
from router.errors import validation_error_parts
from router.rules.engine import Problem, RuleSet, compile_file
from router.rules.model import Directive, Rule, RuleFile, RuleTest, TestFile

_TOKEN = re.compile(r"\.([^.\[\]]+)|\[(\d+)\]")


@dataclass(frozen=True)
class FileProblem:
    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.path}: {self.message}"


@dataclass
class LoadedRules:
    """One sink's rule file and its test files, compiled; usable when ``problems`` is empty."""

    sink: str
    path: Path
    ruleset: RuleSet | None
    rule_file: RuleFile | None
    tests: list[tuple[Path, RuleTest, str]] = field(default_factory=list)
    problems: list[FileProblem] = field(default_factory=list)
    sources: list[Path] = field(default_factory=list)


def _tokens(path: str) -> list[str | int]:
    return [int(index) if index else key for key, index in _TOKEN.findall(path.removeprefix("$"))]


def line_of(root: yaml.Node | None, path: str) -> int | None:
    """The 1-based line of the deepest node on ``path`` (a key's line for mapping entries)."""
    if root is None:
        return None
    node: yaml.Node = root
    line = node.start_mark.line + 1
    for token in _tokens(path):
        if isinstance(node, yaml.MappingNode) and isinstance(token, str):
            for key_node, value_node in node.value:
                if key_node.value == token:
                    line = key_node.start_mark.line + 1
                    node = value_node
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(token, int):
            if token >= len(node.value):
                return line
            node = node.value[token]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _walk(data: Any, path: str) -> Any:
    for token in _tokens(path):
        if isinstance(data, dict) and isinstance(token, str):
            data = data.get(token)
        elif isinstance(data, list) and isinstance(token, int) and token < len(data):
            data = data[token]
        else:
            return None
    return data


def _locate(data: Any, exc: msgspec.ValidationError, prefix: str = "$") -> tuple[str, str]:
    """Message and exact path of a validation error, naming the map key msgspec leaves as [...]."""
    message, path = validation_error_parts(exc, prefix)
    while "[...]" in path:
        prefix = path.split("[...]", 1)[0]
        container = _walk(data, prefix)
        if not isinstance(container, dict):
            break
        for key, value in container.items():
            # Most maps in a rule file hold directives (map, fields). Others (expect_errors,
            # case) do not: a key is named only when its value fails the same way, otherwise
            # the path keeps [...] rather than blame the wrong key.
            try:
                msgspec.convert(value, Directive)
            except msgspec.ValidationError as inner:
                inner_message, inner_path = validation_error_parts(inner)
                if inner_message == message:
                    path = f"{prefix}.{key}{inner_path[1:]}"
                    break
        else:
            break
    return message, path


def _schema_problems(data: Any, exc: msgspec.ValidationError) -> list[tuple[str, str]]:
    """Every rule and test that does not fit the schema, not only the first one msgspec hit."""
    found: list[tuple[str, str]] = []
    if isinstance(data, dict):
        for key, item_type in (("rules", Rule), ("tests", RuleTest)):
            items = data.get(key)
            if not isinstance(items, list):
                continue
            for index, item in enumerate(items):
                try:
                    msgspec.convert(item, item_type)
                except msgspec.ValidationError as inner:
                    found.append(_locate(data, inner, f"$.{key}[{index}]"))
        if found:
            shell = {**data, "rules": [], "tests": []}
            try:
                msgspec.convert(shell, RuleFile)
            except msgspec.ValidationError as inner:
                found.insert(0, _locate(shell, inner))
            return found
    return [_locate(data, exc)]


# What the usual YAML slips look like once decoded, and what to write instead.
_HINTS: tuple[tuple[str, str, str], ...] = (
    (".in", "got str", "write a list: [a, b]"),
    (".not_in", "got str", "write a list: [a, b]"),
    (".keep", "got str", "write a list: [a, b]"),
    (".drop", "got str", "write a list: [a, b]"),
    (".when", "got array", "several conditions go under all: (every one) or any: (one of them)"),
    (".template", "got object", 'quote the template: "{...}" unquoted is a YAML mapping'),
    (".pendo", "got str", "paste the payload itself (JSON is YAML); a file name is not read"),
    (".event", "got str", "write the event as a mapping: {type: ..., visitor_id: ...}"),
    ("", "(a key)", 'quote the key ("7", "yes"): unquoted, YAML reads a number or a boolean'),
)


def _hint(message: str, where: str) -> str:
    for suffix, seen, hint in _HINTS:
        if seen in message and (where.endswith(suffix) if suffix else True):
            return f"{message}; {hint}"
    return message


class _Read(NamedTuple):
    """One YAML file read once: its bytes (for the rule set's hash), the data and the node tree."""

    raw: bytes
    data: Any
    root: yaml.Node | None


def _read_yaml(path: Path, label: str, problems: list[FileProblem]) -> _Read:
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(FileProblem(label, None, "$", f"cannot read: {exc}"))
        return _Read(b"", None, None)
    document = yamlfile.read(text)
    problems.extend(FileProblem(label, p.line, p.path, p.message) for p in document.problems)
    if document.root is None and document.problems:
        return _Read(raw, None, None)
    problems.extend(_yaml11_booleans(label, document.root))
    return _Read(raw, document.data, document.root)


_BOOL_TAG = "tag:yaml.org,2002:bool"


def _yaml11_booleans(label: str, root: yaml.Node | None) -> list[FileProblem]:
    """Unquoted yes / no / on / off: YAML 1.1 reads them as booleans, editors (YAML 1.2) as text.

    `eq: yes` would never match a property holding the text "yes"; true and false are fine.
    """
    found: list[FileProblem] = []
    stack: list[tuple[yaml.Node, str]] = [(root, "$")] if root is not None else []
    seen: set[int] = set()
    while stack:
        node, path = stack.pop()
        if id(node) in seen:  # aliases share nodes
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.append((value, f"{path}.{key.value}"))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))
        elif (
            isinstance(node, yaml.ScalarNode)
            and node.tag == _BOOL_TAG
            and node.style is None
            and node.value.lower() not in ("true", "false")
        ):
            found.append(
                FileProblem(
                    label,
                    node.start_mark.line + 1,
                    path,
                    f"{node.value} is read as the boolean "
                    f"{str(node.value.lower() in ('yes', 'on', 'y')).lower()}; write "
                    f"'{node.value}' (quoted) for the text, or true/false for a boolean",
                )
            )
    return sorted(found, key=lambda p: p.line or 0)


def _label(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def rule_test_files(path: Path) -> list[Path]:
    """The test files of rule file ``path``: ``tests/<sink>*.yaml`` beside it, in order."""
    return sorted((path.parent / "tests").glob(f"{path.stem}*.yaml"))


def load_rules(path: Path) -> LoadedRules:
    """Load, compile and check one rule file and the test files beside it (rules/tests/)."""
    label = _label(path)
    sink = path.stem
    loaded = LoadedRules(sink=sink, path=path, ruleset=None, rule_file=None, sources=[path])
    problems = loaded.problems
    raw, data, root = _read_yaml(path, label, problems)
    if data is None and root is None:
        if not problems:
            problems.append(FileProblem(label, None, "$", "the file is empty"))
        return loaded
    try:
        rule_file = msgspec.convert(data, RuleFile)
    except msgspec.ValidationError as exc:
        for message, where in _schema_problems(data, exc):
            problems.append(FileProblem(label, line_of(root, where), where, _hint(message, where)))
        return loaded
    loaded.rule_file = rule_file
    for index, rule in enumerate(data["rules"]):
        if isinstance(rule, dict) and "when" in rule and rule["when"] is None:
            # Conditions commented out leave `when:` empty, which would match every event.
            where = f"$.rules[{index}].when"
            problems.append(
                FileProblem(
                    label,
                    line_of(root, where),
                    where,
                    "empty: give a condition, or remove `when` to match every event",
                )
            )
    outputs = sinks.OUTPUTS.get(rule_file.sink)
    if outputs is None:
        problems.append(
            FileProblem(
                label,
                line_of(root, "$.sink"),
                "$.sink",
                f"unknown sink {rule_file.sink!r}; known: {', '.join(sinks.OUTPUTS)}",
            )
        )
        return loaded
    if rule_file.sink != sink:
        problems.append(
            FileProblem(
                label,
                line_of(root, "$.sink"),
                "$.sink",
                f"the file for sink {rule_file.sink!r} must be named {rule_file.sink}.yaml",
            )
        )
    # Each test file read once: the hash covers exactly the bytes that are checked and run.
    # (Their read problems are reported after the rule file's own, as before.)
    test_reads: list[tuple[Path, _Read, list[FileProblem]]] = []
    for test_path in rule_test_files(path):
        read_problems: list[FileProblem] = []
        read = _read_yaml(test_path, _label(test_path), read_problems)
        test_reads.append((test_path, read, read_problems))
    parts = [raw, *(read.raw for _, read, _ in test_reads)]
    ruleset, found = compile_file(rule_file, outputs, parts)
    problems.extend(_located(label, root, found))
    loaded.tests = [(path, test, f"$.tests[{i}]") for i, test in enumerate(rule_file.tests)]
    rule_ids = {rule.id for rule in rule_file.rules}
    problems.extend(_unknown_rules(label, root, rule_file.tests, rule_ids))
    for test_path, read, read_problems in test_reads:
        loaded.sources.append(test_path)
        problems.extend(read_problems)
        test_file = _load_test_file(test_path, read, sink, loaded)
        if test_file is not None:
            problems.extend(_unknown_rules(_label(test_path), read.root, test_file.tests, rule_ids))
    if not problems:
        loaded.ruleset = ruleset
    return loaded


def _located(label: str, root: yaml.Node | None, found: Sequence[Problem]) -> list[FileProblem]:
    return [FileProblem(label, line_of(root, p.path), p.path, p.message) for p in found]


def _unknown_rules(
    label: str, root: yaml.Node | None, tests: Sequence[RuleTest], rule_ids: set[str]
) -> list[FileProblem]:
    """Expectations naming a rule the file does not have (a typo, or a renamed rule)."""
    found: list[FileProblem] = []
    for index, test in enumerate(tests):
        for key, named in (("expect", test.expect), ("expect_errors", test.expect_errors)):
            for rule_id in named:
                if rule_id not in rule_ids:
                    where = f"$.tests[{index}].{key}.{rule_id}"
                    found.append(
                        FileProblem(
                            label,
                            line_of(root, where),
                            where,
                            f"no rule {rule_id!r} in this sink's rules; its rules are: "
                            + ", ".join(sorted(rule_ids)),
                        )
                    )
    return found


def _load_test_file(path: Path, read: _Read, sink: str, loaded: LoadedRules) -> TestFile | None:
    label = _label(path)
    data, root = read.data, read.root
    if data is None:
        if root is None and not any(p.file == label for p in loaded.problems):
            loaded.problems.append(FileProblem(label, None, "$", "the file is empty"))
        return None
    try:
        test_file = msgspec.convert(data, TestFile)
    except msgspec.ValidationError as exc:
        message, where = validation_error_parts(exc)
        loaded.problems.append(FileProblem(label, line_of(root, where), where, message))
        return None
    if test_file.sink != sink:
        loaded.problems.append(
            FileProblem(
                label,
                line_of(root, "$.sink"),
                "$.sink",
                f"tests for sink {test_file.sink!r} found beside the {sink} rules",
            )
        )
        return None
    loaded.tests.extend((path, test, f"$.tests[{i}]") for i, test in enumerate(test_file.tests))
    return test_file


def rule_paths(targets: Sequence[Path]) -> list[Path]:
    """Rule files named by the CLI: files as given, directories expanded to their *.yaml.

    A test file (``rules/tests/<sink>*.yaml``) stands for the rule file it tests, which runs it.
    """
    paths: list[Path] = []
    for target in targets:
        if target.is_dir():
            paths.extend(sorted(target.glob("*.yaml")))
        elif target.parent.name == "tests":
            owner = _tested_by(target)
            if owner is not None:  # else a stray: see stray_files
                paths.append(owner)
        else:
            paths.append(target)
    return list(dict.fromkeys(paths))


def _tested_by(path: Path) -> Path | None:
    """The rule file whose tests ``path`` holds, if it is a test file; None otherwise."""
    if path.parent.name != "tests":
        return None
    owners = [
        rule
        for rule in path.parent.parent.glob("*.yaml")
        if path.name.startswith(rule.stem) and path in rule_test_files(rule)
    ]
    # The longest name wins (segment-extra.yaml beside segment.yaml and segment-extra.yaml).
    return max(owners, key=lambda rule: len(rule.stem), default=None)


def stray_files(targets: Sequence[Path]) -> list[FileProblem]:
    """Files in a rules directory that nothing reads: a misnamed test file never runs."""
    found: list[FileProblem] = []
    for target in targets:
        if target.is_dir():
            directory = target
        elif target.parent.name == "tests" and _tested_by(target) is None:
            directory = target.parent.parent
        else:
            continue
        rules = sorted(directory.glob("*.yaml"))
        names = ", ".join(rule.name for rule in rules) or "none"
        for path in sorted(directory.glob("*.yml")):
            found.append(FileProblem(_label(path), None, "$", "rule files end in .yaml, not .yml"))
        tested = {test for rule in rules for test in rule_test_files(rule)}
        for path in sorted((directory / "tests").glob("*.y*ml")):
            if path not in tested:
                found.append(
                    FileProblem(
                        _label(path),
                        None,
                        "$",
                        "tests no rule file, so they never run: a test file is named after "
                        f"its rule file (<sink>.yaml or <sink>-*.yaml; rule files: {names})",
                    )
                )
    return list(dict.fromkeys(found))
