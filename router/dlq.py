"""Dead letters: what could not be delivered, why, and everything needed to send it again.

One topic per sink (``router.dlq.<sink>``). A record keeps the original event (as it was on the
event topic), the rendered payload, the reason class, the HTTP status and an excerpt of the
response, the attempt count and times, and the rule-set hash. Secrets never reach it: payloads
are rendered before credentials are added, and reasons and excerpts pass through a Redactor.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final
from urllib.parse import quote

import msgspec

#: Reason classes.
INVALID_EVENT: Final = "invalid_event"  # the Kafka record is not a canonical event
MAPPING_ERROR: Final = "mapping_error"  # a rule could not render this event
INVALID_PAYLOAD: Final = "invalid_payload"  # the sink cannot encode the rendered output
TOO_LARGE: Final = "too_large"  # larger than any request the destination accepts
REJECTED_BY_API: Final = "rejected_by_api"  # the destination refused it (4xx, per-event errors)
RETRIES_EXHAUSTED: Final = "retries_exhausted"  # still failing after the retry window
REASONS: Final = (
    INVALID_EVENT,
    MAPPING_ERROR,
    INVALID_PAYLOAD,
    TOO_LARGE,
    REJECTED_BY_API,
    RETRIES_EXHAUSTED,
)


class DeadLetter(msgspec.Struct, kw_only=True, omit_defaults=True):
    sink: str
    reason: str
    detail: str
    event_id: str | None = None
    rule_id: str | None = None
    idempotency_key: str | None = None
    # The event as it was on the topic (JSON; null when the bytes were not JSON, then base64 of
    # them in event_b64). msgspec cannot put Raw in a union, hence null rather than absent.
    event: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))
    event_b64: str | None = None
    payload: Any = None
    status: int | None = None
    response: str | None = None
    attempts: int = 0
    first_attempt_at: int | None = None  # ms since the epoch
    last_attempt_at: int | None = None
    dead_at: int = 0
    ruleset: str | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(DeadLetter)
_json_check = msgspec.json.Decoder()


def event_fields(value: bytes | None) -> dict[str, Any]:
    """The ``event``/``event_b64`` fields for a record value, JSON or not."""
    value = value or b""
    try:
        _json_check.decode(value)
    except (msgspec.DecodeError, RecursionError):  # deep nesting is not a DecodeError
        return {"event_b64": base64.b64encode(value).decode()}
    return {"event": msgspec.Raw(value)}


def encode(letter: DeadLetter) -> bytes:
    return _encoder.encode(letter)


def decode(data: bytes) -> DeadLetter:
    return _decoder.decode(data)


def original_value(letter: DeadLetter) -> bytes | None:
    if bytes(letter.event) != b"null":
        return bytes(letter.event)
    if letter.event_b64 is not None:
        return base64.b64decode(letter.event_b64)
    return None


#: Words in a setting's name that mark its value as a credential (for secret_values).
SECRET_WORDS: Final = ("key", "secret", "token", "password", "webhook", "auth")
#: A secret's start this long or longer, cut off by an excerpt ("…"), is masked too.
_MIN_PREFIX: Final = 4
_CUT: Final = "…"


def secret_values(config: Mapping[str, Any]) -> list[str]:
    """Values of a sink's settings that look like credentials, for redaction."""
    found: list[str] = []
    for name, value in config.items():
        if isinstance(value, Mapping):
            found.extend(secret_values(value))
        elif isinstance(value, str) and any(w in name.lower() for w in SECRET_WORDS):
            found.append(value)
    return found


class Redactor:
    r"""Replaces every known secret in text with ***, in the forms an answer may echo it in.

    As given, URL-quoted, JSON-escaped (ASCII-only or not, ``/`` as ``\/``, escaped twice), in
    any letter case; and a secret's first characters where an excerpt cut the text off ("…"),
    since excerpts are cut before they are redacted.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: set[str] = set()
        for secret in {s for s in secrets if s}:
            forms |= {secret, quote(secret, safe="")}
            for ascii_only in (True, False):
                escaped = json.dumps(secret, ensure_ascii=ascii_only)[1:-1]
                twice = json.dumps(escaped, ensure_ascii=ascii_only)[1:-1]
                forms |= {escaped, escaped.replace("/", "\\/"), twice}
        # Longest first, so a secret containing another is replaced whole.
        ordered = sorted(forms, key=len, reverse=True)
        self._pattern = (
            re.compile("|".join(map(re.escape, ordered)), re.IGNORECASE) if ordered else None
        )
        self._starts = [form.lower() for form in ordered if len(form) > _MIN_PREFIX]

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        text = self._pattern.sub("***", text)
        return self._cut_starts(text) if _CUT in text else text

    def _cut_starts(self, text: str) -> str:
        at = text.find(_CUT)
        while at != -1:
            before = text[:at].lower()
            for form in self._starts:
                longest = min(len(form) - 1, at)
                for k in range(longest, _MIN_PREFIX - 1, -1):
                    if before.endswith(form[:k]):
                        text = text[: at - k] + "***" + text[at:]
                        at = at - k + 3
                        break
                else:
                    continue
                break
            at = text.find(_CUT, at + 1)
        return text
