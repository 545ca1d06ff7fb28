"""What a sink's rules may produce: output kinds, their fields, and the checks on values.

Each sink module (sinks/<name>.py) declares its ``OUTPUTS``; the rules engine finds them through
the sink registry. Used twice: at check time, so a rule that can never produce a valid output
fails ``router rules check`` (a constant GA4 event name with a space, a Slack rule with neither
text nor blocks); and on every rendered output, so an event whose values break the
destination's rules becomes a mapping error (dead-lettered with the reason) instead of being sent
to be dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

#: A check on one value: None when fine, else the reason.
ValueCheck = Callable[[Any], str | None]


@dataclass(frozen=True)
class FieldSpec:
    type: str  # string, object, list, time, integer, boolean, any
    check: ValueCheck | None = None
    # For object fields whose keys the destination constrains (GA4 param names).
    key_check: ValueCheck | None = None


@dataclass(frozen=True)
class OutputKind:
    name: str
    fields: Mapping[str, FieldSpec]
    # Each group: at least one of these fields must be produced.
    required: tuple[tuple[str, ...], ...]
    # Whole-output checks beyond single fields (counts, sizes).
    whole: Callable[[Mapping[str, Any]], list[str]] | None = None


@dataclass(frozen=True)
class SinkOutputs:
    sink: str
    kinds: Mapping[str, OutputKind]
    deny: frozenset[str] = field(default_factory=frozenset)

    @property
    def default_kind(self) -> str:
        return next(iter(self.kinds))


_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "object": (dict,),
    "list": (list,),
    "time": (datetime, int, float, str),
    "integer": (int,),
    "boolean": (bool,),
}


def type_problem(spec: FieldSpec, value: Any) -> str | None:
    expected = _TYPES.get(spec.type)
    if expected is None:
        return None
    if isinstance(value, bool) and bool not in expected:
        return f"expected {spec.type}, got boolean"
    if not isinstance(value, expected):
        return f"expected {spec.type}, got {type(value).__name__}"
    if spec.type == "time" and isinstance(value, str):
        try:
            msgspec.convert(value, datetime)
        except msgspec.ValidationError:
            return f"{value!r} is not an ISO 8601 date-time"
    return None


def field_problem(spec: FieldSpec, value: Any, type_known_ok: bool = False) -> str | None:
    """Why ``value`` is not valid for a field of ``spec`` (None when it is)."""
    problem = None if type_known_ok else type_problem(spec, value)
    if problem is None and spec.check is not None:
        problem = spec.check(value)
    if problem is None and spec.key_check is not None and isinstance(value, dict):
        for key in value:
            key_problem = spec.key_check(key)
            if key_problem:
                return f"key {key!r}: {key_problem}"
    return problem


# Exact types that pass type_problem with no more work (a str "time" still needs parsing).
_PASSES: dict[str, frozenset[type]] = {
    "string": frozenset({str}),
    "object": frozenset({dict}),
    "list": frozenset({list}),
    "time": frozenset({datetime, int, float}),
    "integer": frozenset({int}),
    "boolean": frozenset({bool}),
}


def compile_checks(
    kind: OutputKind,
    order: Sequence[str],
    known_valid: Collection[str] = (),
    known_present: Collection[str] = (),
) -> Callable[[Mapping[str, Any]], str | None]:
    """The first way an output breaks its destination's rules ('field: reason'), or None.

    The rules compiler passes what it proved before any event: fields all of whose values are
    valid (``known_valid``) and fields that are always there (``known_present``); those are not
    checked again. Same problems, same messages, same order; it stops at the first.
    """
    present = set(known_present)
    groups = [(g, f"{' or '.join(g)}: required") for g in kind.required if not present & set(g)]
    fields = [
        (name, spec, spec.type in _TYPES, _PASSES.get(spec.type, frozenset()))
        for name in order
        if name not in known_valid and (spec := kind.fields.get(name)) is not None
    ]
    whole = kind.whole

    def first_problem(output: Mapping[str, Any]) -> str | None:
        for group, message in groups:
            for name in group:
                if output.get(name) not in (None, ""):
                    break
            else:
                return message
        for name, spec, typed, passes in fields:
            value = output.get(name)
            if value is None:
                continue
            problem = field_problem(spec, value, type_known_ok=not typed or type(value) in passes)
            if problem:
                return f"{name}: {problem}"
        if whole is not None:
            found = whole(output)
            if found:
                return found[0]
        return None

    return first_problem


def nonempty(value: Any) -> str | None:
    return "must not be empty" if value == "" else None


def max_len(limit: int) -> ValueCheck:
    def check(value: Any) -> str | None:
        if isinstance(value, str) and len(value) > limit:
            return f"longer than {limit} characters ({len(value)})"
        return None

    return check


def all_of(*checks: ValueCheck) -> ValueCheck:
    def check(value: Any) -> str | None:
        for one in checks:
            problem = one(value)
            if problem:
                return problem
        return None

    return check
