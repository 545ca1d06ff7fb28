"""The Redactor: a secret never survives in the forms an API may echo it in (found by fuzzing)."""

from __future__ import annotations

import json

import pytest

import sinks
from router.delivery.sink import HttpResponse, excerpt, sink_secrets
from router.dlq import Redactor, secret_values

KEY = "3f9a7c1e5b2d4f6a8c0e1b3d5f7a9c2e"


@pytest.mark.parametrize(
    ("secret", "echoed"),
    [
        (KEY, f"Invalid API key: {KEY}"),
        (KEY, f"BEARER {KEY.upper()}"),  # another letter case
        ("Wrong-Key-é", json.dumps({"error": "Invalid API key: Wrong-Key-é"})),  # \\u00e9
        ("abc/def-123", r'{"error": "Invalid API key: abc\/def-123"}'),  # an escaped slash
        ('q"u\\ote-123', json.dumps(json.dumps({"key": 'q"u\\ote-123'}))),  # escaped twice
        ("a/b c+d", "https://x.example/?api_secret=a%2fb%20c%2bd"),  # lowercase %-escapes
    ],
)
def test_escaped_and_recased_forms_are_masked(secret: str, echoed: str) -> None:
    masked = Redactor([secret])(echoed)
    assert "***" in masked
    low = masked.lower()
    for form in (secret, json.dumps(secret)[1:-1], secret.replace("/", "\\/")):
        assert form.lower() not in low


@pytest.mark.parametrize("cut", [22, 30, 40])
def test_a_secret_cut_by_an_excerpt_leaves_none_of_it(cut: int) -> None:
    body = f"Invalid API key: {KEY}".encode()
    text = excerpt(body, cut)
    masked = Redactor([KEY])(f"HTTP 400: {text} (check sinks.amplitude.endpoint)")
    assert KEY[:4] not in masked
    assert "***…" in masked


def test_text_without_secrets_is_unchanged() -> None:
    text = "HTTP 500: upstream … timed out; retry"
    assert Redactor([KEY, "hooks.slack.com/services/T0/B0/X"])(text) == text
    assert Redactor([])(text) == text


def test_an_amplitude_answer_echoing_a_non_ascii_key_is_masked_in_the_consumers_reason() -> None:
    key = "Wrong-Key-7Hq2Zx-é"
    sink = sinks.create("amplitude", {"api_key": key})
    redact = Redactor([*secret_values({"api_key": key}), *sink_secrets(sink)])
    (request,) = sink.build([sink.prepare(*_output())])
    answer = json.dumps({"code": 400, "error": f"Invalid API key: {key}"}).encode()  # ASCII-escaped
    outcome = sink.classify(request, HttpResponse(400, {}, answer))
    assert "7Hq2Zx" not in redact(outcome.reason)  # type: ignore[attr-defined]


def _output() -> tuple[object, str, object]:
    from router.events import Event, now_ms
    from router.rules.engine import Routed

    event = Event(
        id="e",
        source="track",
        type="track.event",
        name="n",
        timestamp=now_ms(),
        received_at=now_ms(),
    )
    return Routed("r", "event", {"event_type": "E", "user_id": "user-1"}, "h"), "k" * 36, event
