"""Compiling a rule file into plain Python callables, and evaluating events against it.

Each file compiles once: every condition becomes a predicate and every directive a function of the
event, with paths split, regexes compiled, templates parsed and transforms resolved up front. No
YAML is interpreted per event and nothing is ``eval``'d.

A rule that fails on one event (a required value missing, a value that does not convert, an
output its destination would refuse) yields a :class:`Failed` carrying the rule id, the output
field and the reason; the other rules still run. The sink consumer dead-letters failures as
``mapping_error``.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

import msgspec
from msgspec import UNSET

from router.events import Event
from router.rules.model import Condition, Directive, Rule, RuleFile
from router.rules.outputs import FieldSpec, OutputKind, SinkOutputs, type_problem, validate_output


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()

#: Top-level fields of the canonical event that a path may start with.
EVENT_FIELDS: Final = frozenset(
    {
        "id",
        "source",
        "type",
        "name",
        "visitor_id",
        "account_id",
        "properties",
        "context",
        "timestamp",
        "received_at",
        "raw",
    }
)

Getter = Callable[[Event], Any]
Predicate = Callable[[Event], bool]


@dataclass(frozen=True, slots=True)
class Routed:
    """One output of one rule for one event."""

    rule_id: str
    kind: str
    payload: dict[str, Any]
    ruleset: str


@dataclass(frozen=True, slots=True)
class Failed:
    """A rule matched but could not produce a valid output for this event."""

    rule_id: str
    field: str
    reason: str
    ruleset: str


@dataclass(frozen=True, slots=True)
class Problem:
    """A check-time problem: a JSON path into the rule file and what is wrong there."""

    path: str
    message: str


class _Fail(Exception):
    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CompiledRule:
    id: str
    kind: str
    matches: Predicate
    render: Callable[[Event], dict[str, Any]]


class RuleSet:
    """One sink's compiled rules; immutable, so a reload swaps it whole."""

    def __init__(
        self, sink: str, mode: str, rules: Sequence[CompiledRule], content_hash: str
    ) -> None:
        self.sink = sink
        self.mode = mode
        self.rules = tuple(rules)
        self.hash = content_hash
        self._first_match = mode == "first_match"

    def evaluate(self, event: Event) -> list[Routed | Failed]:
        """Every output the rules produce for this event; [] means it is filtered out."""
        out: list[Routed | Failed] = []
        for rule in self.rules:
            if not rule.matches(event):
                continue
            try:
                out.append(Routed(rule.id, rule.kind, rule.render(event), self.hash))
            except _Fail as fail:
                out.append(Failed(rule.id, fail.field, fail.reason, self.hash))
            if self._first_match:
                break
        return out


def content_hash(parts: Sequence[bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()[:16]


# ---- paths ---------------------------------------------------------------------------------

_raw_decoder = msgspec.json.Decoder()


def _walk(value: Any, keys: Sequence[str]) -> Any:
    for key in keys:
        if type(value) is dict:
            value = value.get(key, MISSING)
        elif type(value) is list and key.isdigit():
            index = int(key)
            value = value[index] if index < len(value) else MISSING
        else:
            return MISSING
        if value is MISSING:
            return MISSING
    return value


def compile_path(path: str, where: str, problems: list[Problem]) -> Getter:
    """A getter for a dotted path; MISSING when any step is absent (never raises)."""
    parts = path.split(".")
    head, rest = parts[0], parts[1:]
    if head not in EVENT_FIELDS or any(not p for p in parts):
        problems.append(
            Problem(
                where,
                f"path {path!r} must start with an event field "
                f"({', '.join(sorted(EVENT_FIELDS))}) and have no empty segments",
            )
        )
        return lambda event: MISSING
    if head == "raw":
        # The raw payload is kept as bytes; decode it only for rules that ask for it.
        return lambda event: _walk(_raw_decoder.decode(event.raw), rest)
    if not rest:
        return lambda event: getattr(event, head)
    if len(rest) == 1:
        key = rest[0]

        def get_one(event: Event) -> Any:
            value = getattr(event, head)
            return value.get(key, MISSING) if type(value) is dict else MISSING

        return get_one
    return lambda event: _walk(getattr(event, head), rest)


# ---- conditions ----------------------------------------------------------------------------

_OPS: Final = (
    "eq",
    "ne",
    "in_",
    "not_in",
    "exists",
    "gt",
    "gte",
    "lt",
    "lte",
    "starts_with",
    "contains",
    "matches",
)
_OP_NAMES: Final = {"in_": "in"}


def _is_set(value: Any) -> bool:
    return value is not UNSET and value is not None


def compile_condition(cond: Condition, where: str, problems: list[Problem]) -> Predicate:
    groups = [
        name
        for name, value in (("all", cond.all), ("any", cond.any), ("not", cond.not_))
        if value is not None
    ]
    ops = [op for op in _OPS if _is_set(getattr(cond, op))]
    if cond.eq is None:
        ops.append("eq")
    if cond.ne is None:
        ops.append("ne")
    if len(groups) + (cond.path is not None) != 1:
        problems.append(Problem(where, "a condition needs exactly one of all, any, not or path"))
        return lambda event: False
    if groups:
        if ops:
            problems.append(Problem(where, f"{groups[0]} cannot be combined with a test"))
        if cond.all is not None:
            preds = [
                compile_condition(c, f"{where}.all[{i}]", problems) for i, c in enumerate(cond.all)
            ]
            return lambda event: all(p(event) for p in preds)
        if cond.any is not None:
            preds = [
                compile_condition(c, f"{where}.any[{i}]", problems) for i, c in enumerate(cond.any)
            ]
            return lambda event: any(p(event) for p in preds)
        assert cond.not_ is not None
        inner = compile_condition(cond.not_, f"{where}.not", problems)
        return lambda event: not inner(event)
    assert cond.path is not None
    get = compile_path(cond.path, f"{where}.path", problems)
    if len(ops) != 1:
        names = ", ".join(_OP_NAMES.get(o, o) for o in _OPS)
        problems.append(
            Problem(where, f"a path condition needs exactly one test ({names}); got {len(ops)}")
        )
        return lambda event: False
    (op,) = ops
    operand = getattr(cond, op)
    return _compile_test(op, operand, get, f"{where}.{_OP_NAMES.get(op, op)}", problems)


def _hashable(values: list[Any]) -> frozenset[Any] | None:
    try:
        return frozenset(values)
    except TypeError:
        return None


def _compile_test(
    op: str, operand: Any, get: Getter, where: str, problems: list[Problem]
) -> Predicate:
    if op == "eq":
        return lambda event: _same(get(event), operand)
    if op == "ne":
        return lambda event: not _same(get(event), operand)
    if op in ("in_", "not_in"):
        members = _hashable([m for m in operand if not isinstance(m, bool)])
        flags = frozenset(m for m in operand if isinstance(m, bool))
        if members is not None:
            if op == "in_":
                return lambda event: _member(get(event), members, flags)
            return lambda event: not _member(get(event), members, flags)
        if op == "in_":
            return lambda event: any(_same(get(event), m) for m in operand)
        return lambda event: not any(_same(get(event), m) for m in operand)
    if op == "exists":
        if operand:
            return lambda event: get(event) not in (MISSING, None)
        return lambda event: get(event) in (MISSING, None)
    if op in ("gt", "gte", "lt", "lte"):
        return _compile_order(op, operand, get, where, problems)
    if op == "starts_with":
        return lambda event: isinstance(v := get(event), str) and v.startswith(operand)
    if op == "contains":
        return lambda event: _contains(get(event), operand)
    assert op == "matches"
    try:
        pattern = re.compile(operand)
    except re.error as exc:
        problems.append(Problem(where, f"invalid regular expression {operand!r}: {exc}"))
        return lambda event: False
    return lambda event: isinstance(v := get(event), str) and pattern.search(v) is not None


def _same(value: Any, operand: Any) -> bool:
    """Equality without Python's True == 1: a boolean only equals a boolean."""
    if value is MISSING:
        return False
    return bool(value == operand) and isinstance(value, bool) == isinstance(operand, bool)


def _member(value: Any, members: frozenset[Any], flags: frozenset[bool]) -> bool:
    if value is MISSING:
        return False
    if isinstance(value, bool):
        return value in flags
    try:
        return value in members
    except TypeError:  # an unhashable event value (a map or list) is in no set of scalars
        return False


def _contains(value: Any, operand: Any) -> bool:
    if isinstance(value, str):
        return isinstance(operand, str) and operand in value
    if isinstance(value, (list, dict)):
        try:
            return operand in value
        except TypeError:
            return False
    return False


_COMPARE: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
}


def _compile_order(
    op: str, operand: Any, get: Getter, where: str, problems: list[Problem]
) -> Predicate:
    compare = _COMPARE[op]
    if isinstance(operand, str):
        moment = _parse_datetime(operand)
        if moment is not None:
            # An ISO operand compares with datetimes (timestamp, received_at) and ISO strings.
            def on_time(event: Event) -> bool:
                value = _as_datetime(get(event))
                return value is not None and compare(value, moment)

            return on_time
        problems.append(
            Problem(where, f"{operand!r}: comparisons take a number or an ISO 8601 date-time")
        )
        return lambda event: False

    def on_number(event: Event) -> bool:
        value = get(event)
        return (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and compare(value, operand)
        )

    return on_number


def _parse_datetime(text: str) -> datetime | None:
    """An ISO 8601 date-time (no zone = UTC), or a bare date meaning its midnight UTC."""
    try:
        value = msgspec.convert(text, datetime)
    except msgspec.ValidationError:
        try:
            day = msgspec.convert(text, date)
        except msgspec.ValidationError:
            return None
        return datetime(day.year, day.month, day.day, tzinfo=UTC)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _as_datetime(value: Any) -> datetime | None:
    """Event times are integer milliseconds; ISO strings in properties compare too."""
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        return _parse_datetime(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return _to_datetime(value)
        except (ValueError, OverflowError):
            return None
    return None


# ---- transforms ----------------------------------------------------------------------------

Transform = Callable[[Any], Any]
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS_THRESHOLD: Final = 100_000_000_000


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return msgspec.json.encode(value).decode()
    return str(value)


def _iso(value: datetime) -> str:
    value = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    text = value.isoformat(timespec="milliseconds" if value.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def _need_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} needs a string, got {type(value).__name__}")
    return value


def _to_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value >= _MS_THRESHOLD:
            return _EPOCH + timedelta(milliseconds=value)
        return _EPOCH + timedelta(seconds=value)
    if isinstance(value, str):
        parsed = _parse_datetime(value)
        if parsed is not None:
            return parsed
    raise ValueError(f"{value!r} is not a date-time")


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("to_int does not convert booleans")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{value!r} is not a whole number")
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if number.is_integer():
            return int(number)
    raise ValueError(f"{value!r} does not convert to an integer")


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{value!r} does not convert to a number")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{value!r} does not convert to a number") from None


_SIMPLE_TRANSFORMS: Final[dict[str, Transform]] = {
    "lower": lambda v: _need_str("lower", v).lower(),
    "upper": lambda v: _need_str("upper", v).upper(),
    "trim": lambda v: _need_str("trim", v).strip(),
    "to_int": _to_int,
    "to_float": _to_float,
    "to_str": _text,
    "to_unix_ms": lambda v: (
        v
        if type(v) is int and v >= _MS_THRESHOLD
        else int((_to_datetime(v) - _EPOCH) // timedelta(milliseconds=1))
    ),
    "to_unix_s": lambda v: int((_to_datetime(v) - _EPOCH) // timedelta(seconds=1)),
    "to_iso8601": lambda v: _iso(_to_datetime(v)),
    "sha256": lambda v: hashlib.sha256(_text(v).encode()).hexdigest(),
}
TRANSFORM_NAMES: Final = (*sorted(_SIMPLE_TRANSFORMS), "truncate")


def compile_transform(spec: Any, where: str, problems: list[Problem]) -> Transform | None:
    if isinstance(spec, str) and spec in _SIMPLE_TRANSFORMS:
        return _SIMPLE_TRANSFORMS[spec]
    if isinstance(spec, dict) and len(spec) == 1 and "truncate" in spec:
        limit = spec["truncate"]
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            problems.append(Problem(where, "truncate takes a whole number >= 1"))
            return None
        return lambda v: _need_str("truncate", v)[:limit]
    problems.append(
        Problem(where, f"unknown transform {spec!r}; known: {', '.join(TRANSFORM_NAMES)}")
    )
    return None


# ---- directives ----------------------------------------------------------------------------

_TEMPLATE_PART = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


def compile_template(
    text: str, where: str, problems: list[Problem], deny: frozenset[str] = frozenset()
) -> Getter:
    """``"Pendo {type} {properties.guide_name}"``: literals and paths only; ``{{`` is a brace."""
    pieces: list[str | Getter] = []
    last = 0
    paths = 0
    for match in _TEMPLATE_PART.finditer(text):
        literal = text[last : match.start()]
        if "{" in literal or "}" in literal:
            problems.append(Problem(where, "unbalanced brace in template (write {{ or }})"))
        pieces.append(literal)
        token = match.group(0)
        if token in ("{{", "}}"):
            pieces.append(token[0])
        else:
            path = match.group(1).strip()
            pieces.append(_denied_stripped(compile_path(path, where, problems), deny))
            paths += 1
        last = match.end()
    tail = text[last:]
    if "{" in tail or "}" in tail:
        problems.append(Problem(where, "unbalanced brace in template (write {{ or }})"))
    pieces.append(tail)
    if paths == 0:
        problems.append(Problem(where, "template names no path; use const for fixed text"))
    literal_or_get = [p for p in pieces if p != ""]

    def render(event: Event) -> Any:
        out: list[str] = []
        for piece in literal_or_get:
            if isinstance(piece, str):
                out.append(piece)
                continue
            value = piece(event)
            if value is MISSING or value is None:
                return MISSING
            out.append(_text(value))
        return "".join(out)

    return render


def _case_key(value: Any) -> str:
    return _text(value)


def _denied_stripped(get: Getter, deny: frozenset[str]) -> Getter:
    """Strip denied keys from maps and lists read from the event, before anything renders them.

    A template or to_str would otherwise carry a denied value out as text.
    """
    if not deny:
        return get

    def stripped(event: Event) -> Any:
        value = get(event)
        return _strip_denied(value, deny) if isinstance(value, (dict, list)) else value

    return stripped


def compile_directive(
    directive: Directive,
    where: str,
    field: str,
    problems: list[Problem],
    deny: frozenset[str] = frozenset(),
) -> Getter:
    """A function of the event giving the field's value, MISSING, or raising _Fail."""
    sources = [
        name
        for name, present in (
            ("path", directive.path is not None),
            ("const", directive.const is not UNSET),
            ("template", directive.template is not None),
            ("fields", directive.fields is not None),
            ("items", directive.items is not None),
        )
        if present
    ]
    if len(sources) != 1:
        problems.append(
            Problem(
                where,
                "a directive needs exactly one source (path, const, template, fields or items); "
                f"got {', '.join(sources) if sources else 'none'}",
            )
        )
        return lambda event: MISSING
    source = sources[0]
    get: Getter
    if source == "path":
        assert directive.path is not None
        path_get = _denied_stripped(compile_path(directive.path, f"{where}.path", problems), deny)

        def get(event: Event) -> Any:
            value = path_get(event)
            return MISSING if value is None else value

    elif source == "const":
        constant = directive.const
        if isinstance(constant, (dict, list)):
            get = lambda event: copy.deepcopy(constant)  # noqa: E731  (outputs are mutable)
        else:
            get = lambda event: constant  # noqa: E731
    elif source == "template":
        assert directive.template is not None
        get = compile_template(directive.template, f"{where}.template", problems, deny)
    elif source == "fields":
        assert directive.fields is not None
        get = compile_object(directive.fields, f"{where}.fields", field, problems, deny)
    else:
        assert directive.items is not None
        item_getters = [
            compile_directive(item, f"{where}.items[{i}]", f"{field}[{i}]", problems, deny)
            for i, item in enumerate(directive.items)
        ]

        def get(event: Event) -> Any:
            values = (g(event) for g in item_getters)
            return [v for v in values if v is not MISSING]

    steps: list[tuple[str, Transform]] = []
    if directive.keep is not None:
        keep = tuple(directive.keep)
        steps.append(("keep", lambda v: {k: v[k] for k in keep if k in _need_map("keep", v)}))
    if directive.drop is not None:
        drop = frozenset(directive.drop)
        steps.append(
            ("drop", lambda v: {k: x for k, x in _need_map("drop", v).items() if k not in drop})
        )
    table = directive.case
    for i, spec in enumerate(directive.transform):
        transform = compile_transform(spec, f"{where}.transform[{i}]", problems)
        if transform is not None:
            steps.append((_transform_name(spec), transform))
    default = directive.default
    required = directive.required

    def value_of(event: Event) -> Any:
        value = get(event)
        if value is not MISSING:
            if table is not None:
                value = table.get(_case_key(value), MISSING)
            if value is not MISSING:
                for name, step in steps:
                    try:
                        value = step(value)
                    except (ValueError, TypeError, OverflowError) as exc:
                        raise _Fail(field, f"{name}: {exc}") from None
        if value is MISSING and default is not UNSET:
            value = copy.deepcopy(default) if isinstance(default, (dict, list)) else default
        if value is MISSING and required:
            raise _Fail(field, f"required value missing ({_describe_source(directive)})")
        return value

    # Keep/drop run before the case lookup, which maps whole values: order them explicitly.
    if table is not None and (directive.keep is not None or directive.drop is not None):
        problems.append(Problem(where, "case cannot be combined with keep or drop"))
    return value_of


def _transform_name(spec: Any) -> str:
    return spec if isinstance(spec, str) else next(iter(spec))


def _need_map(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{name} needs an object, got {type(value).__name__}")
    return value


def _describe_source(directive: Directive) -> str:
    if directive.path is not None:
        return f"path {directive.path}"
    if directive.template is not None:
        return f"template {directive.template!r}"
    return "no value"


def compile_object(
    fields: Mapping[str, Directive],
    where: str,
    field_prefix: str,
    problems: list[Problem],
    deny: frozenset[str] = frozenset(),
) -> Getter:
    getters = [
        (
            name,
            compile_directive(
                d,
                f"{where}.{name}",
                f"{field_prefix}.{name}" if field_prefix else name,
                problems,
                deny,
            ),
        )
        for name, d in fields.items()
    ]

    def render(event: Event) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, get in getters:
            value = get(event)
            if value is not MISSING:
                out[name] = value
        return out

    return render


# ---- rules and files -------------------------------------------------------------------------


def _strip_denied(value: Any, deny: frozenset[str]) -> Any:
    if isinstance(value, dict):
        return {k: _strip_denied(v, deny) for k, v in value.items() if k not in deny}
    if isinstance(value, list):
        return [_strip_denied(v, deny) for v in value]
    return value


def compile_rule(
    rule: Rule, where: str, outputs: SinkOutputs, deny: frozenset[str], problems: list[Problem]
) -> CompiledRule:
    kind_name = rule.output or outputs.default_kind
    kind = outputs.kinds.get(kind_name)
    if kind is None:
        problems.append(
            Problem(
                f"{where}.output",
                f"{outputs.sink} has no output {kind_name!r}; choose one of "
                f"{', '.join(outputs.kinds)}",
            )
        )
        kind = outputs.kinds[outputs.default_kind]
    matches: Predicate = (
        compile_condition(rule.when, f"{where}.when", problems)
        if rule.when is not None
        else (lambda event: True)
    )
    render_fields = compile_object(rule.map, f"{where}.map", "", problems, deny)
    check_static(rule, where, kind, outputs.sink, deny, problems)

    def render(event: Event) -> dict[str, Any]:
        output: dict[str, Any] = render_fields(event)
        if deny:
            output = _strip_denied(output, deny)
        found = validate_output(kind, output)
        if found:
            field, _, reason = found[0].partition(": ")
            raise _Fail(field, reason or found[0])
        return output

    return CompiledRule(rule.id, kind.name, matches, render)


def compile_file(
    rule_file: RuleFile, outputs: SinkOutputs, parts: Sequence[bytes]
) -> tuple[RuleSet, list[Problem]]:
    """Compile a decoded file; the RuleSet is usable only when no problem was found."""
    problems: list[Problem] = []
    deny = outputs.deny | frozenset(rule_file.policy.deny)
    compiled: list[CompiledRule] = []
    seen: dict[str, int] = {}
    for index, rule in enumerate(rule_file.rules):
        where = f"$.rules[{index}]"
        if rule.id in seen:
            problems.append(
                Problem(
                    f"{where}.id",
                    f"duplicate rule id {rule.id!r} (first at rules[{seen[rule.id]}])",
                )
            )
        seen.setdefault(rule.id, index)
        compiled.append(compile_rule(rule, where, outputs, deny, problems))
    if not rule_file.rules:
        problems.append(Problem("$.rules", "a rule file needs at least one rule"))
    return RuleSet(outputs.sink, rule_file.mode, compiled, content_hash(parts)), problems


# ---- static checks: what can be known before any event ---------------------------------------


def check_static(
    rule: Rule,
    where: str,
    kind: OutputKind,
    sink: str,
    deny: frozenset[str],
    problems: list[Problem],
) -> None:
    """Output-schema and field-policy checks on a rule's map."""
    produced = set(rule.map)
    for group in kind.required:
        if not produced.intersection(group):
            problems.append(
                Problem(
                    f"{where}.map",
                    f"a {sink} {kind.name} needs {' or '.join(group)}; this rule never sets it",
                )
            )
    for name, directive in rule.map.items():
        at = f"{where}.map.{name}"
        spec = kind.fields.get(name)
        if spec is None:
            problems.append(
                Problem(
                    at,
                    f"{sink} {kind.name} has no field {name!r}; fields: {', '.join(kind.fields)}",
                )
            )
            continue
        _check_constants(directive, at, spec, problems)
        if spec.key_check is not None and directive.fields is not None:
            for key in directive.fields:
                reason = spec.key_check(key)
                if reason:
                    problems.append(Problem(f"{at}.fields.{key}", reason))
    if deny:
        _check_policy(rule.map, f"{where}.map", sink, deny, problems)


def _constants(directive: Directive) -> list[Any]:
    """The values a directive can produce when they are known before any event."""
    if directive.transform:
        return []
    if directive.case is not None:
        values = list(directive.case.values())
        return values + ([directive.default] if directive.default is not UNSET else [])
    if directive.const is not UNSET:
        return [directive.const]
    return []


def _check_constants(
    directive: Directive, at: str, spec: FieldSpec, problems: list[Problem]
) -> None:
    for value in _constants(directive):
        reason = type_problem(spec, value) if value is not None else None
        if reason is None and spec.check is not None:
            reason = spec.check(value)
        if reason:
            problems.append(Problem(at, f"can never be valid: {reason}"))
            return


def _check_policy(
    fields: Mapping[str, Directive],
    where: str,
    sink: str,
    deny: frozenset[str],
    problems: list[Problem],
) -> None:
    for name, directive in fields.items():
        at = f"{where}.{name}"
        if name in deny:
            problems.append(Problem(at, f"field {name!r} must never reach {sink} (policy)"))
        if directive.path is not None and directive.path.rsplit(".", 1)[-1] in deny:
            problems.append(
                Problem(f"{at}.path", f"{directive.path!r} must never reach {sink} (policy)")
            )
        if directive.template is not None:
            for match in _TEMPLATE_PART.finditer(directive.template):
                placeholder = (match.group(1) or "").strip()
                if placeholder and placeholder.rsplit(".", 1)[-1] in deny:
                    problems.append(
                        Problem(
                            f"{at}.template",
                            f"{{{placeholder}}} must never reach {sink} (policy)",
                        )
                    )
        for key in directive.keep or ():
            if key in deny:
                problems.append(Problem(f"{at}.keep", f"{key!r} must never reach {sink} (policy)"))
        if directive.fields is not None:
            _check_policy(directive.fields, f"{at}.fields", sink, deny, problems)
        for i, item in enumerate(directive.items or ()):
            _check_policy({f"items[{i}]": item}, at, sink, deny, problems)
