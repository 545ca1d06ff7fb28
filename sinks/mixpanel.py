"""Mixpanel sink: what its rules may produce (output kinds, fields, value checks).

The transport (build, classify, limits) arrives with the sink issue; this is the part the rules
engine needs to check rule files and rendered outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from router.rules.outputs import FieldSpec, OutputKind, SinkOutputs, nonempty

# ref: https://developer.mixpanel.com/reference/import-events

_MIXPANEL_BLACKLIST = frozenset(
    {
        "00000000-0000-0000-0000-000000000000",
        "anon",
        "anonymous",
        "nil",
        "none",
        "null",
        "n/a",
        "na",
        "undefined",
        "unknown",
        "<nil>",
        "0",
        "-1",
        "true",
        "false",
        "[]",
        "{}",
    }
)


def _mixpanel_id(value: Any) -> str | None:
    if isinstance(value, str) and value.strip().lower() in _MIXPANEL_BLACKLIST:
        return f"{value!r} is a value Mixpanel rejects as an id"
    return None


def _mixpanel_properties(output: Mapping[str, Any]) -> list[str]:
    properties = output.get("properties")
    if isinstance(properties, dict) and len(properties) >= 255:
        return [f"properties: {len(properties)} properties; Mixpanel allows fewer than 255"]
    return []


OUTPUTS = SinkOutputs(
    "mixpanel",
    {
        "event": OutputKind(
            "event",
            {
                "event": FieldSpec("string", nonempty),
                "distinct_id": FieldSpec("string", _mixpanel_id),
                "time": FieldSpec("time"),
                "properties": FieldSpec("object"),
            },
            (("event",), ("distinct_id",)),
            _mixpanel_properties,
        )
    },
)
