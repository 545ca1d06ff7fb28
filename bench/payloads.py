"""Request bodies for the ingest benchmark, built once, deterministically, before any load.

- Webhooks: the shared fixtures (``webhook-dotted/*.json`` and ``webhook-url/*.json``), each copy
  with its own visitor, account, timestamp (and ``uniqueId`` for the URL shape), so every body,
  and so every event id, differs; each signed with ``router.signature.sign``.
- Track-API batches: JSON arrays shaped like ``track/batch.json``: a dozen event names with
  realistic, varied properties and context, about 1000 distinct visitor ids and 120 accounts.

Each request is returned as the complete HTTP/1.1 request (head and body), ready to be written to
a keep-alive connection as is.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from router.signature import sign

FIXTURES = Path("/work/shared/fixtures/pendo")
WEBHOOK_PATH = "/webhooks/pendo"
TRACK_PATH = "/data/track"
VISITORS = 1000
ACCOUNTS = 120
# 2024-03-01T00:00:00Z: event times move forward from here, a few seconds apart.
BASE_EPOCH_S = 1_709_251_200

_USER_AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/122.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_3) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.3 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:123.0) Gecko/20100101 Firefox/123.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_3 like Mac OS X) AppleWebKit/605.1.15",
]
_PAGES = [
    ("/dashboard", "Dashboard"),
    ("/reports", "Reports"),
    ("/reports/revenue", "Revenue report"),
    ("/settings/billing", "Billing"),
    ("/settings/team", "Team"),
    ("/projects", "Projects"),
    ("/projects/new", "New project"),
    ("/integrations", "Integrations"),
]
_FEATURES = ["advanced_reporting", "bulk_export", "sso", "audit_log", "custom_fields", "api_keys"]
_PLANS = ["free", "starter", "pro", "enterprise"]
_CURRENCIES = ["USD", "EUR", "GBP", "JPY"]


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def http_request(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "User-Agent: ingest-bench/1"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    head += ["Content-Type: application/json", f"Content-Length: {len(body)}", "", ""]
    return "\r\n".join(head).encode() + body


# ---- webhooks ----------------------------------------------------------------------------------


def _load_fixtures(kind: str) -> list[dict[str, Any]]:
    files = sorted((FIXTURES / kind).glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no fixtures in {FIXTURES / kind}")
    return [json.loads(path.read_text()) for path in files]


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def webhook_bodies(count: int, seed: int = 1) -> list[bytes]:
    """``count`` distinct webhook bodies, alternating over the dotted and URL fixtures."""
    rng = random.Random(seed)
    fixtures = [("dotted", f) for f in _load_fixtures("webhook-dotted")]
    fixtures += [("url", f) for f in _load_fixtures("webhook-url")]
    bodies: list[bytes] = []
    for i in range(count):
        shape, template = fixtures[i % len(fixtures)]
        hook = json.loads(json.dumps(template))  # deep copy
        visitor = f"visitor-{rng.randrange(VISITORS):04d}"
        account = f"account-{rng.randrange(ACCOUNTS):03d}"
        seconds = BASE_EPOCH_S + i * 3 + rng.randrange(3)
        if shape == "dotted":
            hook["timestamp"] = _iso(seconds)
            data = hook["data"]
            data["visitor_id"] = visitor
            data["account_id"] = account
            if "metadata" in data:
                data["metadata"]["browser"] = rng.choice(["Chrome", "Firefox", "Safari", "Edge"])
        else:
            hook["timestamp"] = seconds
            hook["visitorId"] = visitor
            hook["accountId"] = account
            hook["uniqueId"] = hashlib.sha256(f"bench-{seed}-{i}".encode()).hexdigest()[:40]
        bodies.append(_json(hook))
    return bodies


def webhook_requests(count: int, secret: bytes, seed: int = 1) -> list[bytes]:
    return [
        http_request(WEBHOOK_PATH, body, {"X-Pendo-Signature": sign(secret, body)})
        for body in webhook_bodies(count, seed)
    ]


# ---- Track API ---------------------------------------------------------------------------------


def _page(rng: random.Random) -> dict[str, Any]:
    path, title = rng.choice(_PAGES)
    return {"path": path, "title": title}


def _feature_used(rng: random.Random) -> dict[str, Any]:
    return {
        "feature_name": rng.choice(_FEATURES),
        "usage_type": rng.choice(["export", "view", "share", "schedule"]),
        "file_format": rng.choice(["pdf", "csv", "xlsx"]),
        "usage_count": rng.randrange(1, 50),
    }


def _purchase(rng: random.Random) -> dict[str, Any]:
    return {
        "amount": round(rng.uniform(5, 2000), 2),
        "currency": rng.choice(_CURRENCIES),
        "product_id": f"PROD-{rng.randrange(1, 400):03d}",
        "quantity": rng.randrange(1, 10),
        "coupon": rng.choice([None, "SPRING24", "PARTNER10"]),
    }


def _plan_change(rng: random.Random) -> dict[str, Any]:
    old, new = rng.sample(_PLANS, 2)
    return {
        "fromTier": old,
        "toTier": new,
        "seats": rng.randrange(1, 500),
        "annual": rng.random() < 0.5,
    }


def _search(rng: random.Random) -> dict[str, Any]:
    terms = ["invoice", "export csv", "sso setup", "api rate limit", "billing address", "roles"]
    return {
        "query": rng.choice(terms),
        "results": rng.randrange(0, 120),
        "page": rng.randrange(1, 5),
    }


def _report(rng: random.Random) -> dict[str, Any]:
    return {
        "report_id": f"rpt_{rng.randrange(10_000):05d}",
        "rows": rng.randrange(10, 100_000),
        "duration_ms": rng.randrange(40, 9000),
        "filters": rng.sample(["region", "plan", "owner", "stage", "created_at"], 2),
    }


def _invite(rng: random.Random) -> dict[str, Any]:
    return {"role": rng.choice(["admin", "member", "viewer"]), "invites": rng.randrange(1, 20)}


def _error(rng: random.Random) -> dict[str, Any]:
    return {
        "code": rng.choice(["E_TIMEOUT", "E_QUOTA", "E_VALIDATION"]),
        "component": rng.choice(["exporter", "importer", "scheduler"]),
        "retryable": rng.random() < 0.7,
    }


_TRACK_EVENTS: list[tuple[str, Callable[[random.Random], dict[str, Any]]]] = [
    ("custom_feature_used", _feature_used),
    ("purchase_completed", _purchase),
    ("plan_changed", _plan_change),
    ("search_performed", _search),
    ("report_generated", _report),
    ("teammate_invited", _invite),
    ("error_shown", _error),
    ("page_bookmarked", _page),
    ("file_exported", _feature_used),
    ("checkout_started", _purchase),
    ("filter_applied", _report),
    ("help_searched", _search),
]


def track_event(rng: random.Random, index: int) -> dict[str, Any]:
    name, properties = _TRACK_EVENTS[rng.randrange(len(_TRACK_EVENTS))]
    path, title = rng.choice(_PAGES)
    visitor = rng.randrange(VISITORS)
    return {
        "type": "track",
        "event": name,
        "visitorId": f"visitor-{visitor:04d}",
        "accountId": f"account-{visitor % ACCOUNTS:03d}",
        "properties": properties(rng),
        "context": {
            "ip": f"203.0.{rng.randrange(256)}.{rng.randrange(1, 255)}",
            "userAgent": rng.choice(_USER_AGENTS),
            "url": f"https://app.example.com{path}",
            "title": title,
        },
        "timestamp": (BASE_EPOCH_S * 1000) + index * 250 + rng.randrange(250),
    }


def track_requests(count: int, batch: int, key: str, seed: int = 2) -> list[bytes]:
    """``count`` Track-API requests of ``batch`` events each; every event differs."""
    rng = random.Random(seed * 1_000_003 + batch)
    requests: list[bytes] = []
    index = 0
    for _ in range(count):
        events = []
        for _ in range(batch):
            events.append(track_event(rng, index))
            index += 1
        requests.append(http_request(TRACK_PATH, _json(events), {"x-pendo-integration-key": key}))
    return requests
