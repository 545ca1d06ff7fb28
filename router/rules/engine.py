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

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

import msgspec
from msgspec import UNSET

from router.events import (
    EPOCH,
    EVENT_TYPES,
    MS_THRESHOLD,
    SOURCE_TRACK,
    SOURCE_WEBHOOK,
    UNKNOWN_TYPE,
    Event,
)
from router.rules.model import Condition, Directive, Rule, RuleFile
from router.rules.outputs import FieldSpec, OutputKind, SinkOutputs, compile_checks, type_problem


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()

#: Top-level fields of the canonical event that a path may start with.
EVENT_FIELDS: Final = frozenset(Event.__struct_fields__)

#: Top-level fields that hold a string, an integer or null, never a map or a list.
SCALAR_FIELDS: Final = EVENT_FIELDS - {"properties", "context", "raw"}

Getter = Callable[[Event], Any]
Predicate = Callable[[Event], bool]


class Routed(msgspec.Struct, frozen=True, gc=False):
    """One output of one rule for one event."""

    rule_id: str
    kind: str
    payload: dict[str, Any]
    ruleset: str


class Failed(msgspec.Struct, frozen=True, gc=False):
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
    #: The event ``type`` / ``name`` values the rule can match (None: any), and what is left of
    #: ``matches`` to test once the type and name are known to fit (None: nothing).
    types: frozenset[str] | None = None
    names: frozenset[str] | None = None
    rest: Predicate | None = None

    def admits(self, type_: str, name: str) -> bool:
        return (self.types is None or type_ in self.types) and (
            self.names is None or name in self.names
        )


#: How many (type, name) pairs a RuleSet remembers the candidate rules of; past it, they are
#: worked out per event (still correct, slower).
_MAX_PLANS: Final = 4096


class RuleSet:
    """One sink's compiled rules; immutable, so a reload swaps it whole.

    Most rules start with a test on the event's ``type`` or ``name``. The rules that can match a
    (type, name) pair are worked out the first time the pair is seen and remembered, so an event
    meets only those rules, and only the part of their condition that the pair does not settle.
    """

    def __init__(
        self, sink: str, mode: str, rules: Sequence[CompiledRule], content_hash: str
    ) -> None:
        self.sink = sink
        self.mode = mode
        self.rules = tuple(rules)
        self.hash = content_hash
        self._first_match = mode == "first_match"
        self._plans: dict[tuple[str, str], tuple[CompiledRule, ...]] = {}

    def _candidates(self, event: Event) -> tuple[CompiledRule, ...]:
        key = (event.type, event.name)
        try:
            plan = self._plans.get(key)
        except TypeError:  # an unhashable type or name (no decoder builds one): test every rule
            return tuple(_unguarded(rule) for rule in self.rules)
        if plan is None:
            plan = tuple(rule for rule in self.rules if rule.admits(*key))
            if len(self._plans) < _MAX_PLANS:
                self._plans[key] = plan
        return plan

    def evaluate(self, event: Event) -> list[Routed | Failed]:
        """Every output the rules produce for this event; [] means it is filtered out."""
        out: list[Routed | Failed] = []
        for rule in self._candidates(event):
            if rule.rest is not None and not rule.rest(event):
                continue
            try:
                out.append(Routed(rule.id, rule.kind, rule.render(event), self.hash))
            except _Fail as fail:
                out.append(Failed(rule.id, fail.field, fail.reason, self.hash))
            if self._first_match:
                break
        return out


def _unguarded(rule: CompiledRule) -> CompiledRule:
    return CompiledRule(rule.id, rule.kind, rule.matches, rule.render, rest=rule.matches)


def content_hash(parts: Sequence[bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()[:16]


# ---- paths ---------------------------------------------------------------------------------

_raw_decoder = msgspec.json.Decoder()


def _raw_json(event: Event) -> Any:
    """The raw payload decoded; MISSING (nothing there) when it cannot be read back."""
    try:
        return _raw_decoder.decode(event.raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return MISSING


def _walk(value: Any, keys: Sequence[str]) -> Any:
    for key in keys:
        if type(value) is dict:
            value = value.get(key, MISSING)
        elif type(value) is list and key.isascii() and key.isdigit():  # "²".isdigit() too
            index = int(key)
            value = value[index] if index < len(value) else MISSING
        else:
            return MISSING
        if value is MISSING:
            return MISSING
    return value


def compile_path(
    path: str,
    where: str,
    problems: list[Problem],
    none_is_missing: bool = False,
    deny: frozenset[str] = frozenset(),
) -> Getter:
    """A getter for a dotted path; MISSING when any step is absent (never raises).

    ``none_is_missing``: a null reads as MISSING too (what an output field wants). ``deny``: a
    map or list read from properties, context or raw comes back without those keys.
    """
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
    if head in SCALAR_FIELDS:
        deny = frozenset()  # a string, a number or null: nothing to strip
    if len(rest) == 1 and head != "raw":
        # The common case, in one closure: properties.score, context.url.
        key = rest[0]
        if deny and none_is_missing:

            def get_one_stripped(event: Event) -> Any:
                value = getattr(event, head)
                if type(value) is not dict or (value := value.get(key)) is None:
                    return MISSING
                return _strip_denied(value, deny) if isinstance(value, _CONTAINERS) else value

            return get_one_stripped
        if none_is_missing:

            def get_one_value(event: Event) -> Any:
                value = getattr(event, head)
                if type(value) is not dict or (value := value.get(key)) is None:
                    return MISSING
                return value

            return get_one_value
        if not deny:

            def get_one(event: Event) -> Any:
                value = getattr(event, head)
                return value.get(key, MISSING) if type(value) is dict else MISSING

            return get_one
    if not rest and not deny:
        if none_is_missing:
            return lambda event: MISSING if (v := getattr(event, head)) is None else v
        return lambda event: getattr(event, head)
    get: Getter
    if head == "raw":
        # The raw payload is kept as bytes; decode it only for rules that ask for it.
        get = lambda event: _walk(_raw_json(event), rest)  # noqa: E731
    else:
        get = lambda event: _walk(getattr(event, head), rest)  # noqa: E731
    if deny:
        get = _denied_stripped(get, deny)
    if none_is_missing:
        return lambda event: MISSING if (v := get(event)) is None else v
    return get


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
            return _all_of(preds)
        if cond.any is not None:
            preds = [
                compile_condition(c, f"{where}.any[{i}]", problems) for i, c in enumerate(cond.any)
            ]
            return _any_of(preds)
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
    at = f"{where}.{_OP_NAMES.get(op, op)}"
    closed = _CLOSED_VALUES.get(cond.path)
    if closed is not None and op in ("eq", "ne", "in_", "not_in"):
        # A typo here (nps.respones) is a rule that silently never (or always) matches.
        for value in operand if isinstance(operand, list) else [operand]:
            if value not in closed:
                problems.append(
                    Problem(
                        at,
                        f"no event has {cond.path} {value!r}; the {cond.path}s are: "
                        + ", ".join(sorted(closed)),
                    )
                )
    return _compile_test(op, operand, get, at, problems)


# Fields whose values are a closed set: a condition naming another value is a typo.
_CLOSED_VALUES: Final[dict[str | None, frozenset[str]]] = {
    "type": EVENT_TYPES | {UNKNOWN_TYPE},
    "source": frozenset({SOURCE_WEBHOOK, SOURCE_TRACK}),
}


def _all_of(preds: list[Predicate]) -> Predicate:
    """``all(p(event) for p in preds)`` without a generator per call."""
    if len(preds) == 1:
        return preds[0]
    if len(preds) == 2:
        a, b = preds
        return lambda event: a(event) and b(event)
    if len(preds) == 3:
        a, b, c = preds
        return lambda event: a(event) and b(event) and c(event)

    def every(event: Event) -> bool:
        for pred in preds:  # noqa: SIM110  (all() would build a generator per call)
            if not pred(event):
                return False
        return True

    return every


def _any_of(preds: list[Predicate]) -> Predicate:
    """``any(p(event) for p in preds)`` without a generator per call."""
    if len(preds) == 1:
        return preds[0]
    if len(preds) == 2:
        a, b = preds
        return lambda event: a(event) or b(event)
    if len(preds) == 3:
        a, b, c = preds
        return lambda event: a(event) or b(event) or c(event)

    def some(event: Event) -> bool:
        for pred in preds:  # noqa: SIM110  (any() would build a generator per call)
            if pred(event):
                return True
        return False

    return some


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
    # OverflowError for "a{4294967296}", RecursionError for thousands of nested groups.
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        shown = operand if len(operand) <= 80 else operand[:80] + "..."
        problems.append(Problem(where, f"invalid regular expression {shown!r}: {exc}"))
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
    if isinstance(value, list):
        return any(_same(item, operand) for item in value)  # as eq: true is not 1
    if isinstance(value, dict):
        return isinstance(operand, str) and operand in value
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


_iso_encoder = msgspec.json.Encoder()


def _iso(value: datetime) -> str:
    """UTC, ``Z``, milliseconds only when there are any (msgspec's C encoder; it writes µs)."""
    value = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    text = _iso_encoder.encode(value)[1:-1].decode()
    return text[:23] + "Z" if value.microsecond else text


# Unix second -> "YYYY-MM-DDTHH:MM:SS": event times cluster, so most lookups hit.
_ISO_SECONDS: dict[int, str] = {}
_ISO_SECONDS_MAX: Final = 4096


def _iso_ms(value: int) -> str:
    """``_iso`` of an event time in milliseconds, without a datetime per call."""
    seconds, millis = divmod(value, 1000)
    head = _ISO_SECONDS.get(seconds)
    if head is None:
        head = _iso(EPOCH + timedelta(seconds=seconds))[:-1]
        if len(_ISO_SECONDS) >= _ISO_SECONDS_MAX:
            _ISO_SECONDS.clear()
        _ISO_SECONDS[seconds] = head
    return f"{head}.{millis:03d}Z" if millis else f"{head}Z"


def _need_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} needs a string, got {type(value).__name__}")
    return value


def _to_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value >= MS_THRESHOLD:
            return EPOCH + timedelta(milliseconds=value)
        return EPOCH + timedelta(seconds=value)
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
        if type(v) is int and v >= MS_THRESHOLD
        else int((_to_datetime(v) - EPOCH) // timedelta(milliseconds=1))
    ),
    "to_unix_s": lambda v: int((_to_datetime(v) - EPOCH) // timedelta(seconds=1)),
    "to_iso8601": lambda v: (
        _iso_ms(v) if type(v) is int and v >= MS_THRESHOLD else _iso(_to_datetime(v))
    ),
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
            pieces.append(compile_path(path, where, problems, deny=deny))
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


_CONTAINERS: Final = (dict, list)


def _copy_json(value: Any) -> Any:
    """A deep copy of a value from a rule file (maps, lists and immutable scalars only)."""
    if type(value) is dict:
        return {k: _copy_json(v) if type(v) in _CONTAINERS else v for k, v in value.items()}
    if type(value) is list:
        return [_copy_json(v) if type(v) in _CONTAINERS else v for v in value]
    return value


def _case_key(value: Any) -> str:
    return _text(value)


def _denied_stripped(get: Getter, deny: frozenset[str]) -> Getter:
    """Strip denied keys from maps and lists read from the event, before anything renders them.

    A template or to_str would otherwise carry a denied value out as text. Paths are the only
    place event values enter an output, so the rendered output is not stripped again.
    """
    if not deny:
        return get

    def stripped(event: Event) -> Any:
        value = get(event)
        return _strip_denied(value, deny) if isinstance(value, _CONTAINERS) else value

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
        get = compile_path(directive.path, f"{where}.path", problems, True, deny)

    elif source == "const":
        if directive.const is None:  # `const:` with nothing after it sends null
            problems.append(
                Problem(
                    f"{where}.const",
                    "empty (null): leave the field out instead, or quote the value; an unquoted "
                    "value starting with # is a YAML comment (write '#product-insights')",
                )
            )
        constant = _strip_denied(directive.const, deny) if deny else directive.const
        if isinstance(constant, (dict, list)):
            get = lambda event: _copy_json(constant)  # noqa: E731  (outputs are mutable)
        else:
            get = lambda event: constant  # noqa: E731
    elif source == "template":
        assert directive.template is not None
        get = compile_template(directive.template, f"{where}.template", problems, deny)
    elif source == "fields":
        assert directive.fields is not None
        # A built map is never missing ({} at worst), so these would be silently ignored.
        for name, unused in (
            ("default", directive.default is not UNSET),
            ("required", directive.required),
        ):
            if unused:
                problems.append(
                    Problem(
                        f"{where}.{name}",
                        f"{name} never applies to fields (a map built by fields is never "
                        "missing); put it on the entries inside fields",
                    )
                )
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
    if table is not None and deny:
        table = {key: _strip_denied(value, deny) for key, value in table.items()}
    for i, spec in enumerate(directive.transform):
        transform = compile_transform(spec, f"{where}.transform[{i}]", problems)
        if transform is not None:
            steps.append((_transform_name(spec), transform))
    default = _strip_denied(directive.default, deny) if deny else directive.default
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
            value = _copy_json(default)
        if value is MISSING and required:
            raise _Fail(field, f"required value missing ({_describe_source(directive)})")
        return value

    # Keep/drop run before the case lookup, which maps whole values: order them explicitly.
    if table is not None and (directive.keep is not None or directive.drop is not None):
        problems.append(Problem(where, "case cannot be combined with keep or drop"))
    if steps or table is not None or default is not UNSET or required:
        return value_of
    return get  # a bare path, const, template, fields or items: no wrapper per event


def _transform_name(spec: Any) -> str:
    return spec if isinstance(spec, str) else next(iter(spec), "")  # {} is reported elsewhere


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


# ---- the rule index: what a condition says about the event's type and name -------------------

_INDEXED: Final = ("type", "name")
Guard = dict[str, frozenset[str]]


def _pure_guard(cond: Condition) -> Guard | None:
    """The strings a lone ``{path: type|name, eq|in: ...}`` test admits; None for any other test.

    For a string, ``_same`` and ``_member`` are plain equality and set membership, which is what
    the index does with the event's type and name.
    """
    if cond.path not in _INDEXED or cond.eq is None or cond.ne is None:
        return None
    if cond.all is not None or cond.any is not None or cond.not_ is not None:
        return None  # not a valid test (reported by compile_condition)
    ops = [op for op in _OPS if _is_set(getattr(cond, op))]
    if ops == ["eq"] and isinstance(cond.eq, str):
        return {cond.path: frozenset((cond.eq,))}
    if ops == ["in_"] and cond.in_ is not None and all(isinstance(v, str) for v in cond.in_):
        return {cond.path: frozenset(cond.in_)}
    return None


def _only(cond: Condition, group: str) -> bool:
    """Whether ``cond`` is a bare ``all`` / ``any`` group (nothing else set on the node)."""
    groups = [cond.all, cond.any, cond.not_]
    return cond.path is None and groups.count(None) == 2 and getattr(cond, group) is not None


def _guard(cond: Condition) -> Guard:
    """The type / name values every event matching ``cond`` has ({}: no constraint found)."""
    pure = _pure_guard(cond)
    if pure is not None:
        return pure
    if _only(cond, "all"):
        assert cond.all is not None
        merged: Guard = {}
        for child in cond.all:
            for field, values in _guard(child).items():
                merged[field] = merged[field] & values if field in merged else values
        return merged
    if _only(cond, "any") and cond.any:
        guards = [_guard(child) for child in cond.any]
        fields = set(guards[0]).intersection(*guards[1:])
        return {f: frozenset().union(*(g[f] for g in guards)) for f in fields}
    return {}


def _rest(cond: Condition) -> Condition | None:
    """``cond`` without the tests the index has settled; None when nothing is left."""
    if _pure_guard(cond) is not None:
        return None
    if _only(cond, "all"):
        assert cond.all is not None
        left = [child for child in cond.all if _pure_guard(child) is None]
        if not left:
            return None
        return left[0] if len(left) == 1 else Condition(all=left)
    if _only(cond, "any") and cond.any:
        pures = [_pure_guard(child) for child in cond.any]
        if all(p is not None for p in pures) and len({f for p in pures if p for f in p}) == 1:
            return None  # the union of their values is exactly the guard
    return cond


# ---- rules and files -------------------------------------------------------------------------


def _strip_denied(value: Any, deny: frozenset[str]) -> Any:
    """A copy of a map or list without the denied keys, at any depth."""
    if isinstance(value, dict):
        return {
            k: _strip_denied(v, deny) if isinstance(v, _CONTAINERS) else v
            for k, v in value.items()
            if k not in deny
        }
    if isinstance(value, list):
        return [_strip_denied(v, deny) if isinstance(v, _CONTAINERS) else v for v in value]
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
    first_problem = compile_checks(
        kind,
        list(rule.map),
        [n for n, d in rule.map.items() if n in kind.fields and _known_valid(d, kind.fields[n])],
        [n for n, d in rule.map.items() if _always_present(d)],
    )

    def render(event: Event) -> dict[str, Any]:
        # No denied key can be left: the rule's own field names are checked statically,
        # constants were stripped when compiled, and event values as they are read.
        output: dict[str, Any] = render_fields(event)
        problem = first_problem(output)
        if problem:
            field, _, reason = problem.partition(": ")
            raise _Fail(field, reason or problem)
        return output

    if rule.when is None:
        return CompiledRule(rule.id, kind.name, matches, render)
    guard = _guard(rule.when)
    left = _rest(rule.when)
    # Compiled again from parts already compiled above: any problem has been reported.
    rest = None if left is None else compile_condition(left, f"{where}.when", [])
    return CompiledRule(
        rule.id, kind.name, matches, render, guard.get("type"), guard.get("name"), rest
    )


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
    if rule_file.mode == "first_match":
        for index, rule in enumerate(rule_file.rules[:-1]):
            if rule.when is None:
                # It matches every event, so under first_match no later rule ever runs.
                problems.append(
                    Problem(
                        f"$.rules[{index}]",
                        f"rule {rule.id!r} has no when, so under first_match the "
                        f"{len(rule_file.rules) - index - 1} rule(s) after it never run; "
                        "move it last (a catch-all) or give it a condition",
                    )
                )
                break
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


# What a directive's last transform returns, when it returns.
_RESULT_TYPES: Final[dict[str, type]] = {
    "lower": str,
    "upper": str,
    "trim": str,
    "truncate": str,
    "to_str": str,
    "sha256": str,
    "to_iso8601": str,
    "to_int": int,
    "to_unix_ms": int,
    "to_unix_s": int,
    "to_float": float,
}
_SPEC_TYPES: Final[dict[str, type]] = {"string": str, "object": dict, "list": list, "integer": int}


def _passes(spec: FieldSpec, value: Any) -> bool:
    if type_problem(spec, value) is not None or (spec.check is not None and spec.check(value)):
        return False
    return spec.key_check is None or not isinstance(value, dict)


def _known_valid(directive: Directive, spec: FieldSpec) -> bool:
    """Whether every value the directive can give passes ``spec``: then it is not re-checked."""
    default = directive.default
    if default is not UNSET and default is not None and not _passes(spec, default):
        return False
    if not directive.transform:
        if directive.case is not None:
            return all(v is None or _passes(spec, v) for v in directive.case.values())
        if directive.const is not UNSET:
            return directive.const is None or _passes(spec, directive.const)
        if directive.fields is not None:  # its keys were checked by check_static
            return spec.type in ("object", "any") and spec.check is None
        if directive.items is not None:
            return spec.type in ("list", "any") and spec.check is None
        if directive.keep is not None or directive.drop is not None:  # a map, or a _Fail
            return spec.type in ("object", "any") and spec.check is None and not spec.key_check
        return False
    last = _transform_name(directive.transform[-1])
    produced = _RESULT_TYPES.get(last)
    if spec.check is not None or produced is None:
        return False
    if spec.type == "time":  # our own ISO 8601 text, or epoch numbers
        return last == "to_iso8601" or produced is not str
    expected = _SPEC_TYPES.get(spec.type)
    return expected is produced or spec.type not in (*_SPEC_TYPES, "boolean")


def _always_present(directive: Directive) -> bool:
    """Whether the field is in every output, neither null nor "" (for required groups)."""
    if directive.transform or directive.case is not None:
        return False
    if directive.const is not UNSET:
        return directive.const is not None and directive.const != ""
    return directive.fields is not None or directive.items is not None


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
