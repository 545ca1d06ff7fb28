"""`router rules check|test|schema`: located problems, diffs, summary lines and exit codes."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from router.rules.commands import run_check, run_tests, schema

ROOT = Path(__file__).resolve().parents[2]

GOOD = """\
sink: slack
rules:
  - id: detractors
    when: {path: properties.score, lte: 6}
    map:
      text: {template: "Detractor {visitor_id}: {properties.comment}"}
      channel: {const: "#product-insights"}
tests:
  - name: a detractor is announced
    event: {type: nps.response, visitor_id: v1, properties: {score: 2, comment: slow}}
    expect:
      detractors: {text: "Detractor v1: slow", channel: "#product-insights"}
  - name: promoters are not
    event: {type: nps.response, visitor_id: v1, properties: {score: 9}}
    expect: {}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / "rules" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def check(*paths: Path) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = run_check([str(p) for p in paths], "rules", out)
    return code, out.getvalue().splitlines()


def rule_tests(*paths: Path) -> tuple[int, str]:
    out = io.StringIO()
    code = run_tests([str(p) for p in paths], "rules", out)
    return code, out.getvalue()


def test_valid_file_checks_ok(tmp_path: Path) -> None:
    path = write(tmp_path, "slack.yaml", GOOD)
    code, lines = check(path)
    assert code == 0
    assert len(lines) == 1
    assert lines[0].startswith(f"ok {path}: 1 rule, 2 tests, ruleset ")


def test_the_check_output_in_docs_is_what_the_default_files_give(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/rules.md shows `router rules check` on the shipped files; its hashes must be theirs."""
    shown = [
        line
        for line in (ROOT / "docs/rules.md").read_text().splitlines()
        if line.startswith("ok rules/")
    ]
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    assert run_check([], "rules", out) == 0
    assert shown == out.getvalue().splitlines()


def test_one_test_is_not_plural(tmp_path: Path) -> None:
    one = GOOD[: GOOD.index("  - name: promoters are not")]
    code, lines = check(write(tmp_path, "slack.yaml", one))
    assert code == 0
    assert ": 1 rule, 1 test, ruleset " in lines[0]


def test_problems_are_one_line_each_with_file_line_and_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "ga4.yaml",
        """\
sink: ga4
rules:
  - id: guides
    when: {path: type, matches: "guide(("}
    map:
      name: {const: Guide Viewed}
      client_id: {path: visitor_id}
      params:
        fields:
          email: {path: properties.email}
          label: {template: "no placeholders"}
          x: {path: properties.x, transform: [lowercase]}
  - id: guides
    map:
      name: {const: guide_viewed}
      client_id: {path: visitor_id}
""",
    )
    code, lines = check(path)
    assert code == 1
    p = str(path)
    assert lines == [
        f"{p}:4: $.rules[0].when.matches: invalid regular expression 'guide((': "
        "missing ), unterminated subpattern at position 6",
        f"{p}:11: $.rules[0].map.params.fields.label.template: template names no path; "
        "use const for fixed text",
        f"{p}:12: $.rules[0].map.params.fields.x.transform[0]: unknown transform 'lowercase'; "
        "known: lower, sha256, to_float, to_int, to_iso8601, to_str, to_unix_ms, to_unix_s, "
        "trim, upper, truncate",
        f"{p}:6: $.rules[0].map.name: can never be valid: event name 'Guide Viewed': only "
        "letters, digits and _, starting with a letter (GA4 drops it otherwise)",
        f"{p}:10: $.rules[0].map.params.fields.email: field 'email' must never reach ga4 (policy)",
        f"{p}:10: $.rules[0].map.params.fields.email.path: 'properties.email' must never reach "
        "ga4 (policy)",
        f"{p}:13: $.rules[1].id: duplicate rule id 'guides' (first at rules[0])",
    ]


def test_schema_errors_name_the_map_key_and_every_broken_rule(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "segment.yaml",
        """\
sink: segment
rules:
  - id: one
    map:
      event: {pth: name}
  - id: Two Words
    map:
      event: {path: name}
  - id: three
    map:
      userId: {path: visitor_id, fields: {a: {cnst: 1}}}
""",
    )
    code, lines = check(path)
    assert code == 1
    p = str(path)
    assert lines == [
        f"{p}:5: $.rules[0].map.event.pth: Object contains unknown field pth",
        f"{p}:6: $.rules[1].id: Expected str matching regex '^[a-z0-9][a-z0-9_.-]{{0,62}}$'",
        f"{p}:11: $.rules[2].map.userId.fields.a.cnst: Object contains unknown field cnst",
    ]


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("slack.yaml", "sink: slack\nrules: [\n", ":3: $: not valid YAML"),
        # The key without its colon is on line 4; PyYAML stops on line 5.
        (
            "slack.yaml",
            "sink: slack\nrules:\n  - id: a\n    when\n      path: x\n",
            ":4: $: not valid YAML: a key without its ':'",
        ),
        (
            "slack.yaml",
            "sink: slack\nrules:\n  - id: &a a\n    map: &a {}\n",
            ":4: $: not valid YAML: second occurrence (found duplicate anchor 'a'; first "
            "occurrence on line 3)",
        ),
        ("slack.yaml", "", ": $: the file is empty"),
        ("slack.yaml", "sink: slack\nsink: slack\nrules: []\n", ":2: $.sink: duplicate key 'sink'"),
        ("slack.yaml", "sink: nope\nrules: []\n", ":1: $.sink: unknown sink 'nope'"),
        ("mixpanel.yaml", GOOD, ":1: $.sink: the file for sink 'slack' must be named slack.yaml"),
        (
            "slack.yaml",
            "sink: slack\nrules: []\nextra: 1\n",
            ":3: $.extra: Object contains unknown field extra",
        ),
    ],
)
def test_file_level_problems(tmp_path: Path, name: str, text: str, expected: str) -> None:
    path = write(tmp_path, name, text)
    code, lines = check(path)
    assert code == 1
    assert any(line.startswith(str(path)) and expected in line for line in lines), lines


def test_directory_is_expanded_and_missing_paths_are_errors(tmp_path: Path) -> None:
    write(tmp_path, "slack.yaml", GOOD)
    code, lines = check(tmp_path / "rules")
    assert code == 0
    assert len(lines) == 1
    code, lines = check(tmp_path / "absent")
    assert code == 1
    assert "no such file or directory" in lines[0]


def test_rule_tests_pass_with_a_summary_line(tmp_path: Path) -> None:
    path = write(tmp_path, "slack.yaml", GOOD)
    code, out = rule_tests(path)
    assert code == 0
    assert out.splitlines()[-1] == "rule tests: 2 passed, 0 failed"


def test_a_mismatch_prints_a_diff_and_fails(tmp_path: Path) -> None:
    path = write(
        tmp_path, "slack.yaml", GOOD.replace('"Detractor v1: slow"', '"Detractor v1: fast"')
    )
    code, out = rule_tests(path)
    assert code == 1
    assert f"FAIL {path} $.tests[0] 'a detractor is announced'" in out
    assert "-text: 'Detractor v1: fast'" in out
    assert "+text: 'Detractor v1: slow'" in out
    assert out.splitlines()[-1] == "rule tests: 1 passed, 1 failed"


def test_unexpected_outputs_and_errors_are_failures(tmp_path: Path) -> None:
    text = GOOD.replace("properties: {score: 9}", "properties: {score: 5, comment: meh}")
    path = write(tmp_path, "slack.yaml", text)
    code, out = rule_tests(path)
    assert code == 1
    assert "rule 'detractors' produced an output that the test does not expect" in out


def test_expected_mapping_errors(tmp_path: Path) -> None:
    text = GOOD + (
        "  - name: no comment is a mapping error\n"
        "    event: {type: nps.response, visitor_id: v1, properties: {score: 1}}\n"
        "    expect_errors: {detractors: text}\n"
    )
    text = text.replace(
        'text: {template: "Detractor {visitor_id}: {properties.comment}"}',
        'text: {template: "Detractor {visitor_id}: {properties.comment}", required: true}',
    )
    path = write(tmp_path, "slack.yaml", text)
    code, out = rule_tests(path)
    assert code == 0, out


def test_tests_in_rules_tests_dir_and_raw_pendo_inputs(tmp_path: Path) -> None:
    write(tmp_path, "slack.yaml", GOOD)
    write(
        tmp_path,
        "tests/slack-pendo.yaml",
        """\
sink: slack
tests:
  - name: a raw URL webhook NPS response
    pendo:
      event: npsSubmitted
      timestamp: 1705399200
      visitorId: user_555
      accountId: account_900
      properties: {guideId: NPS2024Q1, pollId: nps-1, score: 3, reason: Exports keep timing out}
    expect:
      detractors: {text: "Detractor user_555: Exports keep timing out", channel: "#product-insights"}
""",
    )
    code, out = rule_tests(tmp_path / "rules")
    assert code == 0, out
    assert out.splitlines()[-1] == "rule tests: 3 passed, 0 failed"


def test_rules_that_fail_check_fail_test_and_no_tests_is_a_failure(tmp_path: Path) -> None:
    path = write(tmp_path, "slack.yaml", GOOD.replace("lte: 6", "lte: six"))
    code, out = rule_tests(path)
    assert code == 1
    assert "the rules do not pass check" in out
    bare = write(tmp_path, "slack.yaml", GOOD.split("tests:")[0])
    code, out = rule_tests(bare)
    assert code == 1
    assert "no tests" in out


def test_checked_in_json_schema_is_current() -> None:
    checked_in = ROOT / "docs" / "rules.schema.json"
    assert checked_in.read_bytes() == schema(), "run: router rules schema > docs/rules.schema.json"


def test_cli_exit_codes(tmp_path: Path) -> None:
    good = write(tmp_path, "slack.yaml", GOOD)
    for command, path, expected in (
        ("check", good, 0),
        ("test", good, 0),
        ("check", tmp_path / "absent.yaml", 1),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "router.cli", "rules", command, str(path)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        )
        assert result.returncode == expected, result.stdout + result.stderr


def test_unquoted_dates_stay_text(tmp_path: Path) -> None:
    text = """\
sink: slack
rules:
  - id: recent
    when: {all: [{path: timestamp, gte: 2024-01-01T00:00:00Z}, {path: properties.day, eq: 2024-01-16}]}
    map:
      text: {template: "{properties.day}"}
tests:
  - name: dates compare as written
    event: {timestamp: 2024-02-01T00:00:00Z, properties: {day: 2024-01-16}}
    expect: {recent: {text: 2024-01-16}}
"""
    code, out = rule_tests(write(tmp_path, "slack.yaml", text))
    assert code == 0, out


def test_an_empty_test_file_is_reported(tmp_path: Path) -> None:
    write(tmp_path, "slack.yaml", GOOD)
    write(tmp_path, "tests/slack-empty.yaml", "")
    code, lines = check(tmp_path / "rules")
    assert code == 1
    assert any("slack-empty.yaml: $: the file is empty" in line for line in lines), lines


def test_a_bad_case_key_is_located(tmp_path: Path) -> None:
    text = GOOD.replace(
        'channel: {const: "#product-insights"}', "channel: {path: type, case: {1: x}}"
    )
    code, lines = check(write(tmp_path, "slack.yaml", text))
    assert code == 1
    assert any(
        ": $.rules[0].map.channel.case: Expected str, got int (a key)" in line for line in lines
    ), lines


def test_test_events_may_carry_a_raw_payload(tmp_path: Path) -> None:
    text = """\
sink: slack
rules:
  - id: raw
    map:
      text: {path: raw.uniqueId}
tests:
  - name: raw is readable
    event: {raw: {uniqueId: u-1}}
    expect: {raw: {text: u-1}}
"""
    code, out = rule_tests(write(tmp_path, "slack.yaml", text))
    assert code == 0, out


# ---- files that once crashed the check with a traceback (found by fuzzing) --------------------

_RULE = """\
sink: slack
rules:
  - id: r1
    when: {path: name, matches: %s}
    map:
      text: {path: visitor_id%s}
"""


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (_RULE % ('"a{4294967296}"', ""), "invalid regular expression 'a{4294967296}'"),
        (_RULE % ('"' + "(" * 2000 + ")" * 2000 + '"', ""), "invalid regular expression '(((("),
        (_RULE % ("x", ", transform: [{}]"), "unknown transform {}"),
        (
            "sink: slack\nrules: &r [{id: r1, map: {text: {const: x}}, description: *r}]\n",
            "refers to a value that contains it",
        ),
        ("sink: slack\nrules: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    ],
    ids=["regex-overflow", "regex-recursion", "empty-transform", "alias-cycle", "deep-yaml"],
)
def test_files_that_crashed_the_check_are_problems(tmp_path: Path, text: str, problem: str) -> None:
    code, lines = check(write(tmp_path, "slack.yaml", text))
    assert code == 1
    assert any(problem in line for line in lines), lines


def test_aliases_that_fan_out_are_refused_quickly(tmp_path: Path) -> None:
    # "Billion laughs": 9 ** 8 values from ~500 bytes; walking them hung the check.
    lines = ["sink: slack", "x0: &x0 [" + ", ".join("a" * 9) + "]"]
    lines += [f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, 9)]
    lines += ["rules: [{id: r1, map: {text: {const: x}}}]"]
    code, out = check(write(tmp_path, "slack.yaml", "\n".join(lines) + "\n"))
    assert code == 1
    assert any("aliases (*name) expand to more than 200,000 values" in line for line in out), out


def test_aliases_within_bounds_still_work() -> None:
    shipped = ROOT / "rules" / "slack.yaml"
    assert shipped.read_text().count("*who") == 2  # its rules share blocks through aliases
    assert check(shipped)[0] == 0


def test_a_bad_value_in_a_map_of_text_does_not_blame_another_key(tmp_path: Path) -> None:
    text = GOOD + "  - name: errors\n    event: {type: nps.response}\n"
    text += "    expect_errors: {detractors: required value missing, other: 5}\n"
    code, lines = check(write(tmp_path, "slack.yaml", text))
    assert code == 1
    assert any("expect_errors[...]: Expected str, got int" in line for line in lines), lines
    assert not any("expect_errors.detractors" in line for line in lines), lines


# ---- mistakes an analyst makes that used to pass check (found by review) ------------------


def test_an_empty_when_is_refused_rather_than_matching_everything(tmp_path: Path) -> None:
    text = GOOD.replace(
        "    when: {path: properties.score, lte: 6}\n",
        "    when:\n      # - {path: properties.score, lte: 6}\n",
    )
    code, lines = check(write(tmp_path, "slack.yaml", text))
    assert code == 1
    assert lines == [
        f"{tmp_path / 'rules/slack.yaml'}:4: $.rules[0].when: empty: give a condition, or "
        "remove `when` to match every event"
    ]


@pytest.mark.parametrize(
    ("when", "bad"),
    [
        ("{path: type, eq: nps.respones}", "'nps.respones'"),
        ("{path: type, in: [guide.viewed, guide.advnced]}", "'guide.advnced'"),
        ("{not: {path: source, eq: webhooks}}", "'webhooks'"),
    ],
)
def test_a_type_or_source_no_event_has_is_refused(tmp_path: Path, when: str, bad: str) -> None:
    text = GOOD.replace("{path: properties.score, lte: 6}", when)
    code, lines = check(write(tmp_path, "slack.yaml", text))
    assert code == 1
    assert len(lines) == 1
    assert f"no event has {'source' if 'source' in when else 'type'} {bad}" in lines[0]
    assert "nps.response" in lines[0] or "webhook" in lines[0]  # the valid values are listed


def test_an_empty_const_is_refused_with_the_comment_hint(tmp_path: Path) -> None:
    text = GOOD.replace('channel: {const: "#product-insights"}', "channel:\n        const: #x")
    code, lines = check(write(tmp_path, "slack.yaml", text))
    assert code == 1
    assert len(lines) == 1
    assert ":8: $.rules[0].map.channel.const: empty (null)" in lines[0]
    assert "'#product-insights'" in lines[0]


def test_a_test_expecting_a_rule_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    text = GOOD.replace("      detractors: {text:", "      detractor: {text:")
    code, lines = check(write(tmp_path, "slack.yaml", text))
    assert code == 1
    assert lines == [
        f"{tmp_path / 'rules/slack.yaml'}:12: $.tests[0].expect.detractor: no rule 'detractor' "
        "in this sink's rules; its rules are: detractors"
    ]


def test_an_unknown_field_in_a_test_event_fails_the_test(tmp_path: Path) -> None:
    text = GOOD.replace("event: {type: nps.response, visitor_id: v1, properties: {score: 2,",
                        "event: {type: nps.response, visitorId: v1, properties: {score: 2,")  # fmt: skip
    code, output = rule_tests(write(tmp_path, "slack.yaml", text))
    assert code == 1
    assert "the test input is not a valid event: event has no field 'visitorId'" in output


def test_misnamed_test_files_are_reported_not_skipped(tmp_path: Path) -> None:
    write(tmp_path, "slack.yaml", GOOD)
    tests = "sink: slack\ntests:\n  - name: t\n    event: {type: guide.viewed}\n    expect: {}\n"
    write(tmp_path, "tests/slack-more.yaml", tests)  # runs with slack.yaml
    write(tmp_path, "tests/slak.yaml", tests)  # a typo: never ran before
    write(tmp_path, "extra.yml", "sink: slack\n")
    code, lines = check(tmp_path / "rules")
    assert code == 1
    assert f"{tmp_path / 'rules/extra.yml'}: $: rule files end in .yaml, not .yml" in lines
    (stray,) = [line for line in lines if "slak.yaml" in line]
    assert "tests no rule file, so they never run" in stray
    assert "rule files: slack.yaml" in stray
    assert lines[-1].startswith(f"ok {tmp_path / 'rules/slack.yaml'}: 1 rule, 3 tests")
    code, output = rule_tests(tmp_path / "rules")
    assert code == 1
    assert "rule tests: 3 passed, 1 failed" in output


def test_a_test_file_given_alone_runs_with_its_rule_file(tmp_path: Path) -> None:
    write(tmp_path, "slack.yaml", GOOD)
    tests = "sink: slack\ntests:\n  - name: t\n    event: {type: guide.viewed}\n    expect: {}\n"
    more = write(tmp_path, "tests/slack-more.yaml", tests)
    code, output = rule_tests(more)
    assert code == 0, output
    assert "rule tests: 3 passed, 0 failed" in output
    code, lines = check(more)
    assert code == 0
    assert lines[0].startswith(f"ok {tmp_path / 'rules/slack.yaml'}")


@pytest.mark.parametrize(
    ("before", "after", "hint"),
    [
        ("{path: properties.score, lte: 6}", "{path: type, in: nps.response}", "write a list"),
        (
            "    when: {path: properties.score, lte: 6}\n",
            "    when:\n      - {path: properties.score, lte: 6}\n",
            "several conditions go under all:",
        ),
        (
            '{template: "Detractor {visitor_id}: {properties.comment}"}',
            "{template: {visitor_id}}",
            "quote the template",
        ),
        (
            'channel: {const: "#product-insights"}',
            "channel: {path: name, case: {7: x}}",
            "quote the key",
        ),
        (
            "    event: {type: nps.response, visitor_id: v1, properties: {score: 2, comment: slow}}",
            "    pendo: fixtures/pendo/track/single.json",
            "a file name is not read",
        ),
    ],
)
def test_usual_yaml_slips_get_a_hint(tmp_path: Path, before: str, after: str, hint: str) -> None:
    assert before in GOOD
    code, lines = check(write(tmp_path, "slack.yaml", GOOD.replace(before, after)))
    assert code == 1
    assert any(hint in line for line in lines), lines


@pytest.mark.parametrize("extra", ["required: true", "default: {}"])
def test_default_or_required_on_a_fields_map_is_refused(tmp_path: Path, extra: str) -> None:
    text = GOOD.replace(
        'channel: {const: "#product-insights"}',
        f"metadata: {{fields: {{a: {{path: name}}}}, {extra}}}",
    )
    code, lines = check(write(tmp_path, "slack.yaml", text))
    assert code == 1
    name = extra.split(":")[0]
    assert any(f"map.metadata.{name}: {name} never applies to fields" in line for line in lines), (
        lines
    )


def test_a_catch_all_before_other_rules_under_first_match_is_refused(tmp_path: Path) -> None:
    text = """\
sink: slack
mode: first_match
rules:
  - id: everything
    map: {text: {const: any event}}
  - id: detractors
    when: {path: properties.score, lte: 6}
    map: {text: {const: detractor}}
"""
    code, lines = check(write(tmp_path, "slack.yaml", text))
    assert code == 1
    assert lines == [
        f"{tmp_path / 'rules/slack.yaml'}:4: $.rules[0]: rule 'everything' has no when, so under "
        "first_match the 1 rule(s) after it never run; move it last (a catch-all) or give it a "
        "condition"
    ]
    last = text.replace("  - id: everything\n    map: {text: {const: any event}}\n", "")
    last += "  - id: everything\n    map: {text: {const: any event}}\n"
    assert check(write(tmp_path, "slack.yaml", last + "tests: []\n"))[0] == 0


def test_schema_gives_editors_the_transforms_and_output_kinds() -> None:
    import json

    import sinks
    from router.rules.engine import TRANSFORM_NAMES

    defs = json.loads(schema())["$defs"]
    simple, with_argument = defs["Directive"]["properties"]["transform"]["items"]["anyOf"]
    assert {*simple["enum"], *with_argument["properties"]} == set(TRANSFORM_NAMES)
    output = defs["Rule"]["properties"]["output"]["anyOf"][0]["enum"]
    assert set(output) == {kind for o in sinks.OUTPUTS.values() for kind in o.kinds}


def test_yaml_1_1_booleans_are_refused_with_the_quoting_hint(tmp_path: Path) -> None:
    text = GOOD.replace(
        "{path: properties.score, lte: 6}", "{path: properties.answer, in: [yes, 'no', true]}"
    )
    code, lines = check(write(tmp_path, "slack.yaml", text))
    assert code == 1
    assert lines == [
        f"{tmp_path / 'rules/slack.yaml'}:4: $.rules[0].when.in[0]: yes is read as the boolean "
        "true; write 'yes' (quoted) for the text, or true/false for a boolean"
    ]


def test_an_empty_const_nested_in_fields_is_refused_too(tmp_path: Path) -> None:
    text = GOOD.replace(
        'channel: {const: "#product-insights"}', "metadata: {fields: {a: {const: null}}}"
    )
    code, lines = check(write(tmp_path, "slack.yaml", text))
    assert code == 1
    assert any("$.rules[0].map.metadata.fields.a.const: empty (null)" in line for line in lines)
