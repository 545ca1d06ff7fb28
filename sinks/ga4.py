"""GA4 Measurement Protocol sink: what its rules may produce (output kinds, fields, value checks).

The transport (build, classify, limits) arrives with the sink issue; this is the part the rules
engine needs to check rule files and rendered outputs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from router.rules.outputs import FieldSpec, OutputKind, SinkOutputs, ValueCheck, nonempty

# ref: https://developers.google.com/analytics/devguides/collection/protocol/ga4/sending-events#limitations

_GA4_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_GA4_RESERVED_EVENTS = frozenset(
    {
        "ad_activeview",
        "ad_click",
        "ad_exposure",
        "ad_impression",
        "ad_query",
        "ad_reward",
        "adunit_exposure",
        "app_background",
        "app_clear_data",
        "app_exception",
        "app_remove",
        "app_store_refund",
        "app_store_subscription_cancel",
        "app_store_subscription_convert",
        "app_store_subscription_renew",
        "app_update",
        "app_upgrade",
        "dynamic_link_app_open",
        "dynamic_link_app_update",
        "dynamic_link_first_open",
        "error",
        "firebase_campaign",
        "first_open",
        "first_visit",
        "in_app_purchase",
        "notification_dismiss",
        "notification_foreground",
        "notification_open",
        "notification_receive",
        "os_update",
        "screen_view",
        "session_start",
        "session_start_with_rollout",
        "user_engagement",
    }
)
_GA4_RESERVED_PREFIXES = ("_", "firebase_", "ga_", "google_")
_GA4_RESERVED_USER_PROPERTIES = frozenset(
    {
        "first_open_time",
        "first_visit_time",
        "last_deep_link_referrer",
        "user_id",
        "first_open_after_install",
    }
)


def _ga4_name(limit: int, what: str, reserved: frozenset[str] = frozenset()) -> ValueCheck:
    def check(value: Any) -> str | None:
        if not isinstance(value, str):
            return None
        if not value:
            return f"{what} must not be empty"
        if len(value) > limit:
            return f"{what} {value!r} is longer than {limit} characters"
        if not _GA4_NAME.match(value):
            return (
                f"{what} {value!r}: only letters, digits and _, starting with a letter "
                "(GA4 drops it otherwise)"
            )
        lowered = value.lower()
        if lowered.startswith(_GA4_RESERVED_PREFIXES[1:]):
            return f"{what} {value!r} uses a reserved prefix (firebase_, ga_, google_)"
        if lowered in reserved:
            return f"{what} {value!r} is reserved by Google Analytics"
        return None

    return check


def _ga4_params(output: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    params = output.get("params")
    if isinstance(params, dict):
        if len(params) > 25:
            problems.append(f"params: {len(params)} parameters; GA4 allows 25 per event")
        for key, value in params.items():
            if isinstance(value, str) and len(value) > 100:
                problems.append(f"params.{key}: value longer than 100 characters")
            elif isinstance(value, (dict, list)) and key != "items":
                problems.append(f"params.{key}: GA4 parameter values must be scalars")
    user_properties = output.get("user_properties")
    if isinstance(user_properties, dict):
        if len(user_properties) > 25:
            problems.append(f"user_properties: {len(user_properties)}; GA4 allows 25")
        for key, value in user_properties.items():
            if isinstance(value, str) and len(value) > 36:
                problems.append(f"user_properties.{key}: value longer than 36 characters")
    return problems


OUTPUTS = SinkOutputs(
    "ga4",
    {
        "event": OutputKind(
            "event",
            {
                "name": FieldSpec("string", _ga4_name(40, "event name", _GA4_RESERVED_EVENTS)),
                "client_id": FieldSpec("string", nonempty),
                "user_id": FieldSpec("string", nonempty),
                "params": FieldSpec("object", key_check=_ga4_name(40, "parameter name")),
                "user_properties": FieldSpec(
                    "object",
                    key_check=_ga4_name(24, "user property name", _GA4_RESERVED_USER_PROPERTIES),
                ),
                "timestamp": FieldSpec("time"),
            },
            (("name",), ("client_id",)),
            _ga4_params,
        )
    },
    # Google's terms forbid sending personally identifiable information to Analytics.
    deny=frozenset(
        {
            "email",
            "email_address",
            "phone",
            "phone_number",
            "ip",
            "ip_address",
            "first_name",
            "last_name",
            "full_name",
            "street_address",
        }
    ),
)
