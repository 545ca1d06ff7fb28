"""Local emulators of destination APIs, faithful to shared/contracts/sinks.md."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The Slack emulator's incoming-webhook path (the shape Slack gives webhook URLs).
SLACK_HOOK_PATH = "/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"


def sink_configs(urls: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``sinks.*`` settings for the five default emulators at ``urls`` (credentials they take)."""
    return {
        "segment": {"endpoint": urls["segment"], "write_key": "emulator-write-key"},
        "mixpanel": {
            "endpoint": urls["mixpanel"],
            "project_id": "123456",
            "service_account": {
                "username": "sa-user.123.mp-service-account",
                "secret": "sa-secret",
            },
        },
        "amplitude": {"endpoint": urls["amplitude"], "api_key": "test-amplitude-api-key"},
        "ga4": {
            "endpoint": urls["ga4"],
            "measurement_id": "G-EMULATOR1",
            "api_secret": "emulator-api-secret",
        },
        "slack": {"webhook_url": urls["slack"] + SLACK_HOOK_PATH},
    }


def cut_strings(value: Any, limit: int) -> Any:
    """``value`` with every string in it cut at ``limit`` characters (what an API keeps)."""
    if isinstance(value, str):
        return value[:limit]
    if isinstance(value, dict):
        return {key: cut_strings(item, limit) for key, item in value.items()}
    if isinstance(value, list):
        return [cut_strings(item, limit) for item in value]
    return value
