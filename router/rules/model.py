"""The rule file format: msgspec Structs that refuse unknown fields.

A rule file (``rules/<sink>.yaml``) is data: structured conditions over the canonical event and
mapping directives for each output field. There is no expression language; a template may only
name paths. See docs/rules.md for the semantics and examples.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

RuleId = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")]
# A transform is a bare name (`lower`) or a one-key mapping with its argument (`{truncate: 40}`).
Transform = str | dict[str, Any]


class Condition(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One node of a ``when`` tree: exactly one of all / any / not, or a path with one test."""

    all: list[Condition] | None = None
    any: list[Condition] | None = None
    not_: Condition | None = msgspec.field(default=None, name="not")
    path: str | None = None
    eq: Any | UnsetType = UNSET
    ne: Any | UnsetType = UNSET
    in_: list[Any] | None = msgspec.field(default=None, name="in")
    not_in: list[Any] | None = None
    exists: bool | None = None
    gt: float | str | None = None
    gte: float | str | None = None
    lt: float | str | None = None
    lte: float | str | None = None
    starts_with: str | None = None
    contains: Any | UnsetType = UNSET
    matches: str | None = None


class Directive(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """How one output field gets its value.

    Exactly one source: ``path`` (dotted, into the canonical event), ``const``, ``template``
    (``"Pendo {type}"``, placeholders are paths), ``fields`` (a nested object) or ``items`` (a
    list). Then, in this order: ``keep``/``drop`` (for maps), ``case`` (lookup table),
    ``transform`` (list), and ``default`` when the value is missing; ``required`` turns a missing
    value into a mapping error instead of omitting the field.
    """

    path: str | None = None
    const: Any | UnsetType = UNSET
    template: str | None = None
    fields: dict[str, Directive] | None = None
    items: list[Directive] | None = None
    keep: list[str] | None = None
    drop: list[str] | None = None
    case: dict[str, Any] | None = None
    transform: list[Transform] = msgspec.field(default_factory=list)
    default: Any | UnsetType = UNSET
    required: bool = False


class Rule(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    id: RuleId
    map: dict[str, Directive]
    when: Condition | None = None
    # What the rule produces for its sink: segment track|identify|group, mixpanel event,
    # ga4 event, amplitude event, slack message. Defaults to the sink's first kind.
    output: str | None = None
    description: str | None = None


class Policy(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    # Field names that must never reach this sink, in addition to the sink's built-in list.
    deny: list[str] = msgspec.field(default_factory=list)


class RuleTest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One test case: an input and, per rule id, the exact output (or the mapping error)."""

    name: str
    # A raw Pendo payload in any of the three ingest shapes, or a canonical event (partial:
    # missing fields take test defaults).
    pendo: dict[str, Any] | None = None
    event: dict[str, Any] | None = None
    # rule id -> exact output; {} means nothing is routed.
    expect: dict[str, Any] = msgspec.field(default_factory=dict)
    # rule id -> a substring of the mapping error's reason.
    expect_errors: dict[str, str] = msgspec.field(default_factory=dict)


class RuleFile(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The whole of ``rules/<sink>.yaml``."""

    sink: str
    rules: list[Rule]
    # fan_out: every matching rule emits an output; first_match: only the first matching rule.
    mode: Literal["fan_out", "first_match"] = "fan_out"
    policy: Policy = msgspec.field(default_factory=Policy)
    tests: list[RuleTest] = msgspec.field(default_factory=list)
    description: str | None = None


class TestFile(msgspec.Struct, forbid_unknown_fields=True):
    """``rules/tests/<sink>*.yaml``: more test cases for one sink's rule file."""

    sink: str
    tests: list[RuleTest]
