"""Slack sink: what its rules may produce (output kinds, fields, value checks).

The transport (build, classify, limits) arrives with the sink issue; this is the part the rules
engine needs to check rule files and rendered outputs.
"""

from __future__ import annotations

from typing import Any

from router.rules.outputs import FieldSpec, OutputKind, SinkOutputs, all_of, max_len, nonempty

# ref: https://api.slack.com/methods/chat.postMessage


def _slack_blocks(value: Any) -> str | None:
    if isinstance(value, list):
        if len(value) > 50:
            return f"{len(value)} blocks; Slack allows 50 per message"
        for index, block in enumerate(value):
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                return f"block {index} must be an object with a type"
    return None


OUTPUTS = SinkOutputs(
    "slack",
    {
        "message": OutputKind(
            "message",
            {
                "text": FieldSpec("string", all_of(nonempty, max_len(40_000))),
                "blocks": FieldSpec("list", _slack_blocks),
                "channel": FieldSpec("string", nonempty),
                "username": FieldSpec("string"),
                "icon_emoji": FieldSpec("string"),
                "icon_url": FieldSpec("string"),
                "thread_ts": FieldSpec("string"),
                "mrkdwn": FieldSpec("boolean"),
                "unfurl_links": FieldSpec("boolean"),
                "unfurl_media": FieldSpec("boolean"),
            },
            (("text", "blocks"),),
        )
    },
)
