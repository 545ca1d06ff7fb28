"""Segment sink: what its rules may produce (output kinds, fields, value checks).

The transport (build, classify, limits) arrives with the sink issue; this is the part the rules
engine needs to check rule files and rendered outputs.
"""

from __future__ import annotations

from router.rules.outputs import FieldSpec, OutputKind, SinkOutputs, nonempty

# ref: https://segment.com/docs/connections/sources/catalog/libraries/server/http-api/

_SEGMENT_COMMON = {
    "userId": FieldSpec("string", nonempty),
    "anonymousId": FieldSpec("string", nonempty),
    "context": FieldSpec("object"),
    "integrations": FieldSpec("object"),
    "timestamp": FieldSpec("time"),
}
OUTPUTS = SinkOutputs(
    "segment",
    {
        "track": OutputKind(
            "track",
            {
                **_SEGMENT_COMMON,
                "event": FieldSpec("string", nonempty),
                "properties": FieldSpec("object"),
            },
            (("event",), ("userId", "anonymousId")),
        ),
        "identify": OutputKind(
            "identify",
            {**_SEGMENT_COMMON, "traits": FieldSpec("object")},
            (("userId", "anonymousId"),),
        ),
        "group": OutputKind(
            "group",
            {
                **_SEGMENT_COMMON,
                "groupId": FieldSpec("string", nonempty),
                "traits": FieldSpec("object"),
            },
            (("groupId",), ("userId", "anonymousId")),
        ),
    },
)
