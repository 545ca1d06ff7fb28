"""The rules engine: conditions, directives, transforms, failures, modes and static checks."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
import pytest

import sinks
from router.events import Event, datetime_ms
from router.rules.engine import Failed, Problem, Routed, RuleSet, compile_file
from router.rules.model import RuleFile

T0 = 1_705_329_000_000  # 2024-01-15T14:30:00Z


def event(**fields: Any) -> Event:
    base: dict[str, Any] = {
        "id": "e1",
        "source": "webhook",
        "type": "nps.response",
        "name": "npsSubmitted",
        "visitor_id": "user_555",
        "account_id": "account_900",
        "properties": {"score": 3, "comment": "Exports keep timing out", "tags": ["a", "b"]},
        "context": {"platform": "web"},
        "timestamp": T0,
        "received_at": T0 + 5000,
    }
    base.update(fields)
    return msgspec.convert(base, Event)


def compile_yaml(text: str) -> tuple[RuleSet, list[Problem]]:
    rule_file = msgspec.yaml.decode(text, type=RuleFile)
    return compile_file(rule_file, sinks.OUTPUTS[rule_file.sink], [text.encode()])


def ruleset(text: str) -> RuleSet:
    compiled, problems = compile_yaml(text)
    assert problems == [], problems
    return compiled


def slack_rule(when: str = "", text: str = "{visitor_id}", extra: str = "") -> RuleSet:
    when_line = f"    when: {when}\n" if when else ""
    return ruleset(
        "sink: slack\nrules:\n  - id: r\n"
        + when_line
        + f"    map:\n      text: {{template: '{text}'}}\n"
        + extra
    )


def matches(when: str, ev: Event | None = None) -> bool:
    return bool(slack_rule(when).evaluate(ev or event()))


# ---- conditions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        ("{path: type, eq: nps.response}", True),
        ("{path: type, eq: guide.viewed}", False),
        ("{path: properties.score, eq: 3}", True),
        ("{path: properties.absent, eq: null}", False),
        ("{path: type, ne: guide.viewed}", True),
        ("{path: properties.absent, ne: x}", True),
        ("{path: type, in: [guide.viewed, nps.response]}", True),
        ("{path: properties.tags, in: [a]}", False),  # a list value is in no set of scalars
        ("{path: type, not_in: [guide.viewed]}", True),
        ("{path: properties.absent, not_in: [x]}", True),
        ("{path: properties.comment, exists: true}", True),
        ("{path: properties.absent, exists: true}", False),
        ("{path: properties.absent, exists: false}", True),
        ("{path: properties.score, lte: 6}", True),
        ("{path: properties.score, gte: 7}", False),
        ("{path: properties.score, gt: 2.5}", True),
        ("{path: properties.score, lt: 3}", False),
        ("{path: properties.comment, gt: 1}", False),  # not a number: no match, no error
        ("{path: timestamp, gte: '2024-01-15T14:30:00Z'}", True),
        ("{path: timestamp, gt: '2024-01-15T14:30:00Z'}", False),
        ("{path: timestamp, lt: '2024-01-16'}", True),
        ("{path: properties.comment, starts_with: Exports}", True),
        ("{path: properties.comment, contains: timing}", True),
        ("{path: properties.tags, contains: b}", True),
        ("{path: properties, contains: score}", True),
        ("{path: properties.comment, matches: '(?i)^exports.*out$'}", True),
        ("{path: properties.comment, matches: '^timing'}", False),
        ("{path: context.platform, eq: web}", True),
        ("{path: properties.tags.1, eq: b}", True),
        ("{all: [{path: type, eq: nps.response}, {path: properties.score, lte: 6}]}", True),
        ("{all: [{path: type, eq: nps.response}, {path: properties.score, gte: 7}]}", False),
        ("{any: [{path: type, eq: poll.response}, {path: properties.score, lte: 6}]}", True),
        ("{any: [{path: type, eq: poll.response}, {path: type, eq: guide.viewed}]}", False),
        ("{not: {path: type, eq: nps.response}}", False),
        ("{not: {any: [{path: type, eq: poll.response}]}}", True),
    ],
)
def test_conditions(when: str, expected: bool) -> None:
    assert matches(when) is expected


def test_raw_paths_read_the_original_payload() -> None:
    ev = event(raw=msgspec.Raw(b'{"uniqueId": "u1", "nested": {"k": 2}}'))
    assert matches("{path: raw.nested.k, eq: 2}", ev)
    assert not matches("{path: raw.absent, exists: true}", ev)


def test_no_when_matches_everything() -> None:
    assert slack_rule().evaluate(event(type="guide.viewed"))


# ---- directives ----------------------------------------------------------------------------


def render(map_yaml: str, ev: Event | None = None, sink: str = "slack") -> Routed | Failed:
    rules = ruleset(f"sink: {sink}\nrules:\n  - id: r\n    map:\n{map_yaml}")
    (out,) = rules.evaluate(ev or event())
    return out


def payload(map_yaml: str, ev: Event | None = None) -> dict[str, Any]:
    out = render(map_yaml, ev)
    assert isinstance(out, Routed), out
    return out.payload


def test_path_const_template() -> None:
    out = payload(
        "      text: {template: 'Score {properties.score} from {visitor_id} ({{raw}})'}\n"
        "      channel: {const: '#product-insights'}\n"
        "      username: {path: account_id}\n"
    )
    assert out == {
        "text": "Score 3 from user_555 ({raw})",
        "channel": "#product-insights",
        "username": "account_900",
    }


def test_missing_optional_fields_are_omitted_and_defaults_apply() -> None:
    out = payload(
        "      text: {const: hi}\n"
        "      username: {path: properties.absent}\n"
        "      icon_emoji: {path: properties.absent, default: ':wave:'}\n"
        "      thread_ts: {template: 'x {properties.absent}', default: none}\n"
    )
    assert out == {"text": "hi", "icon_emoji": ":wave:", "thread_ts": "none"}


def test_nested_fields_items_keep_drop_case() -> None:
    out = payload(
        "      text: {path: type, case: {nps.response: NPS, poll.response: Poll}}\n"
        "      blocks:\n"
        "        items:\n"
        "          - fields:\n"
        "              type: {const: section}\n"
        "              text:\n"
        "                fields:\n"
        "                  type: {const: mrkdwn}\n"
        "                  text: {template: '*{properties.score}* {properties.comment}'}\n"
        "          - fields:\n"
        "              type: {const: context}\n"
        "              elements: {path: properties, keep: [score, absent]}\n"
        "          - fields:\n"
        "              type: {const: context}\n"
        "              elements: {path: properties, drop: [tags, comment]}\n"
    )
    assert out == {
        "text": "NPS",
        "blocks": [
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": "*3* Exports keep timing out"},
            },
            {"type": "context", "elements": {"score": 3}},
            {"type": "context", "elements": {"score": 3}},
        ],
    }


def test_case_without_a_match_is_missing() -> None:
    out = render("      text: {path: type, case: {guide.viewed: G}, required: true}\n")
    assert isinstance(out, Failed)
    assert out.field == "text"
    assert "required value missing" in out.reason


@pytest.mark.parametrize(
    ("transform", "source", "expected"),
    [
        ("[lower]", "{const: MiXeD}", "mixed"),
        ("[upper]", "{const: MiXeD}", "MIXED"),
        ("[trim, lower]", "{const: '  Hi  '}", "hi"),
        ("[{truncate: 4}]", "{path: properties.comment}", "Expo"),
        ("[to_str]", "{path: properties.score}", "3"),
        ("[to_iso8601]", "{path: timestamp}", "2024-01-15T14:30:00Z"),
        ("[to_iso8601]", "{const: '2024-01-15T16:30:00+02:00'}", "2024-01-15T14:30:00Z"),
        ("[to_unix_s, to_str]", "{path: timestamp}", "1705329000"),
        ("[to_unix_ms, to_str]", "{path: timestamp}", str(T0)),
        ("[to_unix_ms, to_str]", "{const: '2024-01-15T14:30:00.250Z'}", str(T0 + 250)),
        ("[to_int, to_str]", "{const: '42'}", "42"),
        ("[to_float, to_str]", "{const: '2.5'}", "2.5"),
        ("[to_str]", "{path: properties.tags}", '["a","b"]'),
        ("[lower, sha256]", "{const: ' ME@X.COM'}", hashlib.sha256(b" me@x.com").hexdigest()),
    ],
)
def test_transforms(transform: str, source: str, expected: str) -> None:
    source_fields = source.strip("{}")
    out = payload(f"      text: {{{source_fields}, transform: {transform}}}\n")
    assert out["text"] == expected


@pytest.mark.parametrize(
    ("directive", "reason"),
    [
        ("{path: properties.score, transform: [lower]}", "lower needs a string, got int"),
        ("{path: properties.comment, transform: [to_int, to_str]}", "does not convert"),
        ("{path: properties.comment, transform: [to_iso8601]}", "not a date-time"),
        ("{path: visitor_id, keep: [a]}", "keep needs an object"),
        (
            "{path: properties.absent, required: true}",
            "required value missing (path properties.absent)",
        ),
    ],
)
def test_a_failing_value_is_a_mapping_error_with_the_field(directive: str, reason: str) -> None:
    out = render(f"      text: {directive}\n")
    assert isinstance(out, Failed)
    assert out.rule_id == "r"
    assert out.field == "text"
    assert reason in out.reason


def test_nested_failures_name_the_nested_field() -> None:
    out = render(
        "      text: {const: x}\n"
        "      blocks:\n"
        "        items:\n"
        "          - fields:\n"
        "              type: {const: section}\n"
        "              text: {path: properties.absent, required: true}\n"
    )
    assert isinstance(out, Failed)
    assert out.field == "blocks[0].text"


# ---- rule sets -----------------------------------------------------------------------------

TWO_RULES = """
sink: slack
{mode}
rules:
  - id: detractors
    when: {{path: properties.score, lte: 6}}
    map:
      text: {{template: 'Detractor {{visitor_id}}'}}
  - id: broken
    when: {{path: type, eq: nps.response}}
    map:
      text: {{path: properties.absent, required: true}}
  - id: everything
    map:
      text: {{template: '{{type}}'}}
"""


def test_fan_out_every_matching_rule_emits_and_one_failure_does_not_stop_the_others() -> None:
    outputs = ruleset(TWO_RULES.format(mode="")).evaluate(event())
    assert [type(o).__name__ for o in outputs] == ["Routed", "Failed", "Routed"]
    assert [o.rule_id for o in outputs] == ["detractors", "broken", "everything"]
    assert outputs[0].payload == {"text": "Detractor user_555"}  # type: ignore[union-attr]


def test_first_match_stops_at_the_first_matching_rule() -> None:
    rules = ruleset(TWO_RULES.format(mode="mode: first_match"))
    (only,) = rules.evaluate(event())
    assert only.rule_id == "detractors"
    (second,) = rules.evaluate(event(properties={"score": 9}))
    assert isinstance(second, Failed)
    assert second.rule_id == "broken"


def test_outputs_carry_the_ruleset_hash_which_follows_the_content() -> None:
    text = TWO_RULES.format(mode="")
    a, b = ruleset(text), ruleset(text)
    c = ruleset(text.replace("Detractor", "Unhappy"))
    assert a.hash == b.hash != c.hash
    assert all(o.ruleset == a.hash for o in a.evaluate(event()))


def test_rendered_outputs_are_validated_against_the_sink() -> None:
    ga4 = ruleset(
        "sink: ga4\nrules:\n  - id: r\n    map:\n"
        "      name: {path: name}\n      client_id: {path: visitor_id}\n"
    )
    (bad,) = ga4.evaluate(event(name="Account Upgraded"))
    assert isinstance(bad, Failed)
    assert bad.field == "name"
    assert "only letters, digits and _" in bad.reason
    (good,) = ga4.evaluate(event(name="account_upgraded"))
    assert isinstance(good, Routed)


def test_denied_fields_are_stripped_from_passed_through_maps() -> None:
    ga4 = ruleset(
        "sink: ga4\nrules:\n  - id: r\n    map:\n"
        "      name: {const: nps}\n      client_id: {path: visitor_id}\n"
        "      params: {path: properties}\n"
    )
    ev = event(properties={"score": 3, "email": "a@b.c", "ip": "1.2.3.4"})
    (out,) = ga4.evaluate(ev)
    assert isinstance(out, Routed)
    assert out.payload["params"] == {"score": 3}


# ---- static checks -------------------------------------------------------------------------


def problems_of(text: str) -> list[tuple[str, str]]:
    return [(p.path, p.message) for p in compile_yaml(text)[1]]


@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    [
        (
            "sink: ga4\nrules:\n  - id: r\n    map:\n      name: {const: Guide Viewed}\n"
            "      client_id: {path: visitor_id}\n",
            "$.rules[0].map.name",
            "only letters, digits and _",
        ),
        (
            "sink: ga4\nrules:\n  - id: r\n    map:\n      name: {const: session_start}\n"
            "      client_id: {path: visitor_id}\n",
            "$.rules[0].map.name",
            "reserved",
        ),
        (
            "sink: ga4\nrules:\n  - id: r\n    map:\n      name: {path: type, case: {x: ok, y: 'not ok'}}\n"
            "      client_id: {path: visitor_id}\n",
            "$.rules[0].map.name",
            "can never be valid",
        ),
        (
            "sink: slack\nrules:\n  - id: r\n    map:\n      channel: {const: '#x'}\n",
            "$.rules[0].map",
            "needs text or blocks",
        ),
        (
            "sink: mixpanel\nrules:\n  - id: r\n    map:\n      event: {path: name}\n",
            "$.rules[0].map",
            "needs distinct_id",
        ),
        (
            "sink: mixpanel\nrules:\n  - id: r\n    map:\n      event: {path: name}\n"
            "      distinct_id: {const: anonymous}\n",
            "$.rules[0].map.distinct_id",
            "Mixpanel rejects",
        ),
        (
            "sink: segment\nrules:\n  - id: r\n    output: page\n    map:\n      event: {path: name}\n"
            "      userId: {path: visitor_id}\n",
            "$.rules[0].output",
            "has no output 'page'",
        ),
        (
            "sink: segment\nrules:\n  - id: r\n    map:\n      event: {path: name}\n"
            "      userid: {path: visitor_id}\n",
            "$.rules[0].map.userid",
            "has no field 'userid'",
        ),
        (
            "sink: ga4\nrules:\n  - id: r\n    map:\n      name: {const: x}\n"
            "      client_id: {path: visitor_id}\n"
            "      params: {fields: {'bad name': {const: 1}}}\n",
            "$.rules[0].map.params.fields.bad name",
            "parameter name",
        ),
        (
            "sink: ga4\nrules:\n  - id: r\n    map:\n      name: {const: x}\n"
            "      client_id: {path: visitor_id}\n"
            "      params: {path: properties, keep: [phone]}\n",
            "$.rules[0].map.params.keep",
            "must never reach ga4",
        ),
        (
            "sink: segment\npolicy: {deny: [comment]}\nrules:\n  - id: r\n    map:\n"
            "      event: {path: name}\n      userId: {path: visitor_id}\n"
            "      properties: {fields: {comment: {path: properties.comment}}}\n",
            "$.rules[0].map.properties.fields.comment",
            "must never reach segment",
        ),
        (
            "sink: slack\nrules:\n  - id: r\n    when: {path: type}\n    map:\n      text: {const: x}\n",
            "$.rules[0].when",
            "exactly one test",
        ),
        (
            "sink: slack\nrules:\n  - id: r\n    when: {path: type, eq: a, ne: b}\n"
            "    map:\n      text: {const: x}\n",
            "$.rules[0].when",
            "exactly one test",
        ),
        (
            "sink: slack\nrules:\n  - id: r\n    when: {all: [], path: type, eq: a}\n"
            "    map:\n      text: {const: x}\n",
            "$.rules[0].when",
            "exactly one of all, any, not or path",
        ),
        (
            "sink: slack\nrules:\n  - id: r\n    when: {path: timestamp, gt: yesterday}\n"
            "    map:\n      text: {const: x}\n",
            "$.rules[0].when.gt",
            "number or an ISO 8601",
        ),
        (
            "sink: slack\nrules:\n  - id: r\n    map:\n      text: {const: x, transform: [{truncate: 0}]}\n",
            "$.rules[0].map.text.transform[0]",
            "truncate takes a whole number",
        ),
        (
            "sink: slack\nrules:\n  - id: r\n    map:\n      text: {path: type, case: {a: b}, keep: [x]}\n",
            "$.rules[0].map.text",
            "case cannot be combined",
        ),
        (
            "sink: slack\nrules: []\n",
            "$.rules",
            "at least one rule",
        ),
    ],
)
def test_static_problems(text: str, path: str, fragment: str) -> None:
    found = problems_of(text)
    assert any(p == path and fragment in m for p, m in found), found


def test_event_time_is_milliseconds_everywhere() -> None:
    assert (
        datetime_ms(msgspec.convert("2024-01-15T14:30:00Z", __import__("datetime").datetime)) == T0
    )


# ---- regressions found while writing the default rule files ------------------------------------


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        ("{path: properties.flag, eq: 1}", False),
        ("{path: properties.flag, eq: true}", True),
        ("{path: properties.flag, in: [1, 2]}", False),
        ("{path: properties.flag, in: [true]}", True),
        ("{path: properties.one, in: [true]}", False),
        ("{path: properties.one, in: [1]}", True),
        ("{path: properties.flag, ne: 1}", True),
    ],
)
def test_booleans_never_equal_numbers(when: str, expected: bool) -> None:
    assert matches(when, event(properties={"flag": True, "one": 1})) is expected


def test_to_unix_ms_reads_small_integers_as_seconds() -> None:
    out = payload("      text: {const: 1705399200, transform: [to_unix_ms, to_str]}\n")
    assert out["text"] == "1705399200000"


def test_denied_fields_cannot_leave_through_templates_or_to_str() -> None:
    found = problems_of(
        "sink: ga4\nrules:\n  - id: r\n    map:\n      name: {const: x}\n"
        "      client_id: {path: visitor_id}\n"
        "      params: {fields: {where: {template: '{context.ip}'}}}\n"
    )
    assert (
        "$.rules[0].map.params.fields.where.template",
        "{context.ip} must never reach ga4 (policy)",
    ) in found
    ga4 = ruleset(
        "sink: ga4\nrules:\n  - id: r\n    map:\n      name: {const: x}\n"
        "      client_id: {path: visitor_id}\n"
        "      params: {fields: {ctx: {path: context, transform: [to_str]}}}\n"
    )
    (out,) = ga4.evaluate(event(context={"ip": "203.0.113.7", "platform": "web"}))
    assert isinstance(out, Routed)
    assert out.payload["params"] == {"ctx": '{"platform":"web"}'}


def test_a_brace_anywhere_in_a_template_is_reported() -> None:
    found = problems_of(
        "sink: slack\nrules:\n  - id: r\n    map:\n      text: {template: 'Score} {visitor_id}'}\n"
    )
    assert any("unbalanced brace" in m for _, m in found)


def test_a_path_step_of_non_ascii_digits_is_a_key_not_an_index() -> None:
    # "²".isdigit() is true and int("²") raises: evaluate raised on such a path.
    ev = event(properties={"items": [1, 2, 3], "score": 3})
    assert matches("{path: properties.items.², exists: true}", ev) is False
    assert matches("{path: properties.items.1, eq: 2}", ev) is True


@pytest.mark.parametrize(
    "raw", [b'{"context":{"x":"\xff"},"context":{}}', b'{"n":' + b"1" * 4301 + b"}", b"[" * 3000]
)
def test_a_raw_payload_that_cannot_be_read_back_is_missing_not_an_exception(raw: bytes) -> None:
    ev = event(raw=msgspec.Raw(raw))
    assert matches("{path: raw.context.x, exists: false}", ev) is True
    failed = slack_rule(text="{raw.context.x}", extra="").evaluate(ev)
    assert [type(o) for o in failed] == [Failed]


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        ("{path: properties.flags, contains: 1}", False),  # a boolean only equals a boolean
        ("{path: properties.flags, contains: true}", True),
        ("{path: properties.numbers, contains: 1}", True),
        ("{path: properties.numbers, contains: true}", False),
        ("{path: properties.flag, eq: 1}", False),
        ("{path: properties.flag, in: [1]}", False),
    ],
)
def test_booleans_and_numbers_never_equal_one_another(when: str, expected: bool) -> None:
    ev = event(properties={"flag": True, "flags": [True], "numbers": [1.0, 2]})
    assert matches(when, ev) is expected
