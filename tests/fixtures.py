"""Access to the shared sample Pendo payloads (../shared/fixtures/pendo)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PENDO_FIXTURES = Path(
    os.environ.get("PENDO_FIXTURES", ROOT.parent / "shared" / "fixtures" / "pendo")
).resolve()


def fixture_paths(shape: str) -> list[Path]:
    """Every sample payload of one ingest shape: webhook-dotted, webhook-url or track."""
    paths = sorted((PENDO_FIXTURES / shape).glob("*.json"))
    if not paths:
        raise FileNotFoundError(f"no Pendo fixtures under {PENDO_FIXTURES / shape}")
    return paths


def webhook_fixture_paths() -> list[Path]:
    return fixture_paths("webhook-dotted") + fixture_paths("webhook-url")
