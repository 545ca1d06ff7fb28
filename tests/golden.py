"""Golden HTTP requests: every shared Pendo fixture through a sink's default rules and build().

For one sink, each fixture payload is decoded as the ingest would (fixed receive time), evaluated
against ``rules/<sink>.yaml``, prepared with its idempotency key and built into requests, one
request per output. The result (method, URL, headers and body, secrets masked) is compared with
``tests/golden/<sink>/<fixture>.json``, a reviewed file in the repo. Regenerate after an intended
change with ``ROUTER_UPDATE_GOLDEN=1 pytest tests/unit/test_sink_<sink>.py`` and review the diff.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from router.delivery.sink import HttpRequest, Sink, idempotency_key, sink_secrets
from router.dlq import Redactor
from router.events import Event, decode_track, decode_webhook
from router.rules.engine import Routed
from router.rules.loader import load_rules
from router.rules.testing import TEST_RECEIVED_AT
from router.sink_runner import secret_values
from tests.fixtures import PENDO_FIXTURES

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
_pretty = msgspec.json.Encoder(order="sorted")


def fixture_events() -> dict[str, list[Event]]:
    """Every shared fixture (all three shapes) as canonical events, keyed 'shape/file'."""
    out: dict[str, list[Event]] = {}
    for path in sorted(PENDO_FIXTURES.glob("*/*.json")):
        body = path.read_bytes()
        name = f"{path.parent.name}/{path.stem}"
        if path.parent.name == "track":
            out[name] = decode_track(body, TEST_RECEIVED_AT, 500)
        else:
            out[name] = [decode_webhook(body, TEST_RECEIVED_AT)]
    return out


def request_dict(request: HttpRequest, redact: Redactor) -> dict[str, Any]:
    body: Any
    text = redact(request.body.decode("utf-8", "replace"))  # Amplitude's key is in the body
    try:
        body = msgspec.json.decode(text)
    except msgspec.DecodeError:
        body = text
    return {
        "method": request.method,
        "url": redact(request.url),
        "headers": {k: redact(v) for k, v in sorted(request.headers.items())},
        "body": body,
    }


def golden_requests(sink: Sink, config: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Map each fixture name to the requests its outputs become (one output per request)."""
    loaded = load_rules(ROOT / "rules" / f"{sink.name}.yaml")
    assert loaded.ruleset is not None, loaded.problems
    redact = Redactor([*secret_values(config), *sink_secrets(sink)])
    result: dict[str, list[dict[str, Any]]] = {}
    for name, events in fixture_events().items():
        requests: list[dict[str, Any]] = []
        for event in events:
            for output in loaded.ruleset.evaluate(event):
                assert isinstance(output, Routed), f"{name}: {output}"
                key = idempotency_key(event.id, sink.name, output.rule_id)
                prepared = sink.prepare(output, key, event)
                for request in sink.build([prepared]):
                    requests.append({"rule": output.rule_id, **request_dict(request, redact)})
        result[name] = requests
    return result


def check_golden(sink_name: str, actual: Mapping[str, list[dict[str, Any]]]) -> None:
    """Compare with tests/golden/<sink>/; ROUTER_UPDATE_GOLDEN=1 rewrites the files instead."""
    directory = GOLDEN / sink_name
    update = os.environ.get("ROUTER_UPDATE_GOLDEN") == "1"
    for name, requests in actual.items():
        path = directory / f"{name.replace('/', '__')}.json"
        text = msgspec.json.format(_pretty.encode(requests), indent=2).decode() + "\n"
        if update:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            continue
        assert path.exists(), f"no golden file {path}; run with ROUTER_UPDATE_GOLDEN=1 and review"
        assert path.read_text() == text, f"{path} differs from what {sink_name} builds now"
