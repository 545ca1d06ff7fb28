"""Segment sink: rule outputs as Segment track / identify / group calls, sent to ``/v1/batch``.

Every message is built by segment-analytics-python's own ``Client(send=False)``: its ``track``,
``identify`` and ``group`` return ``(True, message)`` without queueing or sending anything, so
the normalisation (``context.library``, ISO timestamps with milliseconds, ids as strings, ``null``
for an absent ``anonymousId``) is exactly what Segment's library produces. The sink sets
``messageId`` to the idempotency key (Segment deduplicates on it, so a retry or replay is not
counted twice) and ``timestamp`` to the event time (the rule's ``timestamp`` when it maps one).

Each message is serialised as the library serialises it (``json.dumps``), so the library's 32 KB
check and the delivery layer's ``max_event_bytes`` measure the same bytes: a larger message is
dead-lettered as ``too_large`` by the delivery layer, never sent. A batch is one
``POST {endpoint}/v1/batch`` with body ``{"batch": [...]}`` and ``Authorization: Basic
base64(write_key + ":")``; the write key is never put in the body.

Settings (``sinks.segment``): ``endpoint`` (default ``https://api.segment.io``; EU workspaces
``https://events.eu1.segmentapis.com``, since EU events sent to the US host are silently lost)
and ``write_key`` (a string, ``{env: NAME}`` or ``{file: PATH}``). Without a write key the sink
is a dry run: requests are logged, not sent.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Final

import msgspec

from router.delivery.sink import (
    HttpRequest,
    HttpResponse,
    Outcome,
    Prepared,
    SinkLimits,
    classify_by_status,
    endpoint_url,
    optional_secret,
    sink_settings,
)
from router.events import EPOCH, Event, rule_datetime
from router.rules.engine import Routed
from router.rules.outputs import FieldSpec, OutputKind, SinkOutputs, nonempty
from router.settings import Secret

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

US_ENDPOINT: Final = "https://api.segment.io"
EU_ENDPOINT: Final = "https://events.eu1.segmentapis.com"
BATCH_PATH: Final = "/v1/batch"

# The request body is _HEAD + items joined by b"," + _TAIL.
_HEAD: Final = b'{"batch":['
_TAIL: Final = b"]}"
#: Bytes a request body adds beyond its items and their separators (the Batcher counts one
#: separator per item, i.e. one more than the body has).
ENVELOPE_BYTES: Final = len(_HEAD) + len(_TAIL) - 1

#: Segment's request-body limit, in bytes. The docs say "500 KB"; the strictest reading is kept.
MAX_BATCH_BYTES: Final = 500_000
#: One message's limit: the library's ``MAX_MSG_SIZE = 32 << 10``, measured on ``json.dumps``.
MAX_MESSAGE_BYTES: Final = 32 * 1024

LIMITS = SinkLimits(
    # ref: https://segment.com/docs/connections/sources/catalog/libraries/server/http-api/
    # ("There is a maximum of 2500 events per batch"; more are rejected behind a 200)
    max_events=2500,
    # ref: https://segment.com/docs/connections/sources/catalog/libraries/server/http-api/
    # ("500 KB per batch request", else 400); minus our {"batch":[...]} envelope
    max_bytes=MAX_BATCH_BYTES - ENVELOPE_BYTES,
    # ref: https://segment.com/docs/connections/sources/catalog/libraries/server/http-api/
    # ("32 KB per event in a batch"; https://github.com/segmentio/analytics-python consumer.py
    # MAX_MSG_SIZE = 32 << 10): larger messages are dead-lettered as too_large
    max_event_bytes=MAX_MESSAGE_BYTES,
    # ref: https://segment.com/docs/connections/sources/catalog/libraries/server/http-api/
    # ("do not exceed 1,000 requests per second" per workspace; this is per sink process)
    rate_per_s=1000.0,
    # ref: https://github.com/segmentio/analytics-python (client.py: timeout=15 per request)
    timeout_s=15.0,
)


class SegmentSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``sinks.segment``: where to send, and the source's write key (absent = dry run)."""

    endpoint: str = US_ENDPOINT
    # A string, {env: NAME} or {file: PATH}; converted with router.settings.secret_from.
    write_key: str | dict[str, str] | None = None


def _normalise_endpoint(endpoint: str) -> str:
    return endpoint_url(
        endpoint, "sinks.segment.endpoint", BATCH_PATH, f"US: {US_ENDPOINT}, EU: {EU_ENDPOINT}"
    )


def _object(payload: dict[str, Any], field: str) -> dict[str, Any]:
    """A copy of an optional object field of the payload; ValueError if it is not an object."""
    value = payload.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{field}: expected an object, got {type(value).__name__}")
    return dict(value)


def _event_time(value: Any, event: Event) -> datetime:
    """The message time: the rule's ``timestamp`` if it maps one, else the event time."""
    if value is None:
        return EPOCH + timedelta(milliseconds=event.timestamp)
    return rule_datetime(value, "timestamp")


class SegmentSink:
    """The Segment transport: see the module docstring."""

    name = "segment"

    def __init__(self, settings: SegmentSettings, write_key: Secret | None) -> None:
        self.endpoint = _normalise_endpoint(settings.endpoint)
        self.url = self.endpoint + BATCH_PATH
        self.limits = LIMITS
        self.dry_run = write_key is None
        self._write_key = write_key
        # Imported here, not at module level: every router process imports this module for
        # OUTPUTS (the rules need it), and the library brings requests and cryptography along.
        from segment.analytics import Client  # type: ignore[import-untyped]
        from segment.analytics.request import DatetimeSerializer  # type: ignore[import-untyped]
        from segment.analytics.utils import clean  # type: ignore[import-untyped]
        from segment.analytics.version import VERSION  # type: ignore[import-untyped]

        # The library never sees the write key: with send=False it is not used, and this way it
        # cannot reach the library's logs. Its consumer threads are created but never started.
        self._client: Any = Client("", send=False)
        self._clean: Callable[[Any], Any] = clean
        self._json_encoder: type[json.JSONEncoder] = DatetimeSerializer
        self._headers: dict[str, str] = {
            "Content-Type": "application/json",
            "User-Agent": f"pendo-event-router analytics-python/{VERSION}",
        }
        self._secrets: list[str] = []
        if write_key is not None:
            token = base64.b64encode(f"{write_key.reveal()}:".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"
            self._secrets = [write_key.reveal(), token]

    def secrets(self) -> list[str]:
        """Every form the credentials take on the wire, for redaction (key, Basic token)."""
        return list(self._secrets)

    def __repr__(self) -> str:
        return f"SegmentSink(endpoint={self.endpoint!r}, dry_run={self.dry_run})"

    # ---- prepare -------------------------------------------------------------------------

    def message(self, output: Routed, idempotency_key: str, event: Event) -> dict[str, Any]:
        """The Segment message for one rule output, as the library builds it."""
        payload = output.payload
        common: dict[str, Any] = {
            "user_id": payload.get("userId"),
            "anonymous_id": payload.get("anonymousId"),
            # Copies: the library writes context.library into the dict it is given.
            "context": _object(payload, "context"),
            "integrations": _object(payload, "integrations"),
            "timestamp": _event_time(payload.get("timestamp"), event),
            "message_id": idempotency_key,
        }
        if output.kind == "track":
            big_field, call = "properties", self._client.track
            args = {"event": payload.get("event"), "properties": payload.get("properties")}
        elif output.kind == "identify":
            big_field, call = "traits", self._client.identify
            args = {"traits": payload.get("traits")}
        elif output.kind == "group":
            big_field, call = "traits", self._client.group
            args = {"group_id": payload.get("groupId"), "traits": payload.get("traits")}
        else:
            raise ValueError(f"segment has no output kind {output.kind!r}")
        try:
            try:
                _, message = call(**common, **args)
            except RecursionError:
                # The library's clean() recurses; RecursionError is a RuntimeError too, so it
                # must not reach the "over 32 KB" branch below.
                raise ValueError(f"{big_field} nested too deeply to encode") from None
            except RuntimeError:
                # Over the library's 32 KB: build it without the free-form object, put that back
                # as the library would have (clean()), and let the delivery layer dead-letter it
                # as too_large with its real size.
                big = args[big_field] or {}
                try:
                    _, message = call(**common, **{**args, big_field: {}})
                except RuntimeError:
                    raise ValueError(
                        f"the message is over Segment's 32 KB even without its {big_field}"
                    ) from None
                message[big_field] = self._clean(big)
        except AssertionError as exc:  # the library's argument checks
            raise ValueError(f"segment-analytics-python refuses the call: {exc}") from None
        result: dict[str, Any] = message
        return result

    def prepare(self, output: Routed, idempotency_key: str, event: Event) -> Prepared:
        message = self.message(output, idempotency_key, event)
        try:
            # allow_nan=False: NaN/Infinity are not JSON, and Segment refuses a whole request
            # (400) for one message it cannot parse; here only this output is dead-lettered.
            body = json.dumps(message, cls=self._json_encoder, allow_nan=False)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"not encodable as JSON: {exc}") from None
        return Prepared(body.encode())

    # ---- build ---------------------------------------------------------------------------

    def build(self, items: Sequence[Prepared]) -> list[HttpRequest]:
        body = _HEAD + b",".join(item.body for item in items) + _TAIL
        return [HttpRequest("POST", self.url, dict(self._headers), body, tuple(range(len(items))))]

    def health_request(self) -> HttpRequest | None:
        """An empty batch: checks DNS, TLS and that the endpoint speaks the Tracking API.

        It sends no event, so it costs nothing. Segment does not check write keys synchronously
        (a bad key still gets 200), so this cannot prove the key; a dry run has nothing to probe.
        """
        if self.dry_run:
            return None
        return HttpRequest("POST", self.url, dict(self._headers), _HEAD + _TAIL, ())

    # ---- classify ------------------------------------------------------------------------

    def classify(self, request: HttpRequest, response: HttpResponse) -> Outcome:
        """The shared table, with Segment's answers read more finely.

        - 2xx: delivered. Segment answers 200 even for messages it then drops (no user id,
          >2,500 per batch); the limits and the rules keep us from sending those.
        - 400 (a message over 32 KB, a body over 500 KB, invalid JSON): Segment does not say
          which message, so the whole request is rejected (dead-lettered with the answer).
        - 3xx and 404: the endpoint is wrong (a redirector, a path in the host setting): no
          event is at fault, so the sink pauses instead of dead-lettering everything.
        - 401/403 pause, 408/429/5xx retry (honouring Retry-After), 413 splits: shared table.
        """
        return classify_by_status(
            response, endpoint_hint=f"check sinks.segment.endpoint: {self.endpoint}"
        )


def create(config: Mapping[str, Any]) -> SegmentSink:
    """The sink from its settings (``sinks.segment``); ValueError names what is wrong."""
    settings = sink_settings(config, SegmentSettings, "segment")
    return SegmentSink(settings, optional_secret(settings.write_key, "sinks.segment.write_key"))
