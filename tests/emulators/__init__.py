"""Local emulators of destination APIs, faithful to shared/contracts/sinks.md."""

from __future__ import annotations

from typing import Any


def cut_strings(value: Any, limit: int) -> Any:
    """``value`` with every string in it cut at ``limit`` characters (what an API keeps)."""
    if isinstance(value, str):
        return value[:limit]
    if isinstance(value, dict):
        return {key: cut_strings(item, limit) for key, item in value.items()}
    if isinstance(value, list):
        return [cut_strings(item, limit) for item in value]
    return value
