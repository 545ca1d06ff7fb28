"""Amplitude sink: what its rules may produce (output kinds, fields, value checks).

The transport (build, classify, limits) arrives with the sink issue; this is the part the rules
engine needs to check rule files and rendered outputs.
"""

from __future__ import annotations

from typing import Any

from router.rules.outputs import FieldSpec, OutputKind, SinkOutputs, all_of, max_len, nonempty

# ref: https://amplitude.com/docs/apis/analytics/http-v2

_AMPLITUDE_INVALID_IDS = frozenset(
    {
        "anonymous",
        "nil",
        "none",
        "null",
        "n/a",
        "na",
        "undefined",
        "unknown",
        "",
        "00000000-0000-0000-0000-000000000000",
        "{}",
        "lmy47d",
        "0",
        "-1",
    }
)
_AMPLITUDE_RESERVED_EVENTS = frozenset(
    {
        "[Amplitude] Start Session",
        "[Amplitude] End Session",
        "[Amplitude] Revenue",
        "[Amplitude] Revenue (Verified)",
        "[Amplitude] Revenue (Unverified)",
        "[Amplitude] Merged User",
    }
)


def _amplitude_id(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    if value.strip().lower() in _AMPLITUDE_INVALID_IDS:
        return f"{value!r} is an id Amplitude rejects"
    if len(value) < 5:
        return f"{value!r} is shorter than Amplitude's 5-character minimum"
    return max_len(1024)(value)


def _amplitude_event_type(value: Any) -> str | None:
    if value in _AMPLITUDE_RESERVED_EVENTS:
        return f"{value!r} is reserved by Amplitude"
    return all_of(nonempty, max_len(1024))(value)


OUTPUTS = SinkOutputs(
    "amplitude",
    {
        "event": OutputKind(
            "event",
            {
                "event_type": FieldSpec("string", _amplitude_event_type),
                "user_id": FieldSpec("string", _amplitude_id),
                "device_id": FieldSpec("string", _amplitude_id),
                "time": FieldSpec("time"),
                "event_properties": FieldSpec("object"),
                "user_properties": FieldSpec("object"),
                "groups": FieldSpec("object"),
                "group_properties": FieldSpec("object"),
                "session_id": FieldSpec("integer"),
                "app_version": FieldSpec("string", max_len(1024)),
                "platform": FieldSpec("string", max_len(1024)),
                "os_name": FieldSpec("string", max_len(1024)),
                "language": FieldSpec("string", max_len(1024)),
                "country": FieldSpec("string", max_len(1024)),
                "ip": FieldSpec("string", max_len(1024)),
            },
            (("event_type",), ("user_id", "device_id")),
        )
    },
)
