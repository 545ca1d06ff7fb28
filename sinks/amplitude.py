"""Amplitude sink: rule outputs -> Amplitude HTTP V2 API (or the Batch Event Upload API).

What rules may produce is ``OUTPUTS`` (checked by the rules engine). The transport:

- ``prepare``: the rendered event as Amplitude JSON, ``insert_id`` = the idempotency key (so a
  retry or replay is deduplicated by Amplitude, per device, for 7 days) and ``time`` in integer
  milliseconds (the canonical event's time when the rule sets none). An event whose ids Amplitude
  would refuse (placeholders like ``"null"``, shorter than ``min_id_length``) is refused here
  (ValueError: dead-lettered as ``invalid_payload`` with the reason) instead of failing a batch.
- ``build``: one ``POST {endpoint}/2/httpapi`` (or ``{endpoint}/batch``) per batch with
  ``{"api_key", "events", "options"}``; the key is in the body, Amplitude reads no auth header.
- ``classify``: Amplitude's answers, as its official Python SDK reads them: 200 delivered; 400
  with ``missing_field`` rejects the request; 400 naming events (``events_with_invalid_fields``,
  ``events_with_missing_fields``, ``events_with_invalid_id_lengths``, ``silenced_events``)
  dead-letters those with the reason and re-sends the others at once; 413 splits; 429 re-sends
  throttled events after 30 s and holds back events whose user/device exhausted its daily quota
  for ``quota_hold_s`` (never rejected); 400 "Invalid API key" / 401 / 403, and a wrong endpoint
  (400 "Invalid request path", 3xx, 404) pause the sink; 5xx and 408 retry.

Events over their daily quota are returned as ``Partial.hold``: the delivery layer re-sends them
as their own batch after ``quota_hold_s`` with no attempt limit, so they wait out the rolling
window without holding the other events back and are never dead-lettered for waiting. They stay
in the consumer's memory meanwhile (and keep their partition's commit position behind them).

Settings (``sinks.amplitude``): ``endpoint`` (US ``https://api2.amplitude.com`` or EU
``https://api.eu.amplitude.com``), ``api_key`` (a string, ``{env: NAME}`` or ``{file: PATH}``;
absent = dry run: requests are logged, not sent), ``use_batch_api``, ``min_id_length``,
``quota_hold_s``.

Secrets: the api_key travels in the request body. The delivery layer never logs or dead-letters
request bodies except in dry-run mode, where this sink has no key; dead letters keep the rendered
payload (no key). Amplitude echoes a wrong key in its answer (``"Invalid API key: <key>"``), so
reasons built here are scrubbed of the key, and ``secrets()`` gives the delivery layer's redactor
the resolved key (also when configured as ``{env: NAME}`` or ``{file: PATH}``) for the response
excerpts it keeps in dead letters and logs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

from router.delivery.sink import (
    Delivered,
    HttpRequest,
    HttpResponse,
    Outcome,
    Partial,
    Pause,
    Prepared,
    Reject,
    Retry,
    SinkLimits,
    Split,
    classify_by_status,
    excerpt,
    json_answer,
    optional_secret,
    sink_settings,
)
from router.events import Event, rule_time_ms
from router.rules.engine import Routed
from router.rules.outputs import FieldSpec, OutputKind, SinkOutputs, all_of, max_len, nonempty
from router.settings import Secret

# ref: https://amplitude.com/docs/apis/analytics/http-v2

_AMPLITUDE_INVALID_IDS = frozenset(
    {
        "anonymous",
        "nil",
        "none",
        "null",
        "n/a",
        "na",
        "undefined",
        "unknown",
        "",
        "00000000-0000-0000-0000-000000000000",
        "{}",
        "lmy47d",
        "0",
        "-1",
    }
)
_AMPLITUDE_RESERVED_EVENTS = frozenset(
    {
        "[Amplitude] Start Session",
        "[Amplitude] End Session",
        "[Amplitude] Revenue",
        "[Amplitude] Revenue (Verified)",
        "[Amplitude] Revenue (Unverified)",
        "[Amplitude] Merged User",
    }
)


def _amplitude_id(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    if value.strip().lower() in _AMPLITUDE_INVALID_IDS:
        return f"{value!r} is an id Amplitude rejects"
    if len(value) < 5:
        return f"{value!r} is shorter than Amplitude's 5-character minimum"
    return max_len(1024)(value)


def _amplitude_event_type(value: Any) -> str | None:
    if value in _AMPLITUDE_RESERVED_EVENTS:
        return f"{value!r} is reserved by Amplitude"
    return all_of(nonempty, max_len(1024))(value)


OUTPUTS = SinkOutputs(
    "amplitude",
    {
        "event": OutputKind(
            "event",
            {
                "event_type": FieldSpec("string", _amplitude_event_type),
                "user_id": FieldSpec("string", _amplitude_id),
                "device_id": FieldSpec("string", _amplitude_id),
                "time": FieldSpec("time"),
                "event_properties": FieldSpec("object"),
                "user_properties": FieldSpec("object"),
                "groups": FieldSpec("object"),
                "group_properties": FieldSpec("object"),
                "session_id": FieldSpec("integer"),
                "app_version": FieldSpec("string", max_len(1024)),
                "platform": FieldSpec("string", max_len(1024)),
                "os_name": FieldSpec("string", max_len(1024)),
                "language": FieldSpec("string", max_len(1024)),
                "country": FieldSpec("string", max_len(1024)),
                "ip": FieldSpec("string", max_len(1024)),
            },
            (("event_type",), ("user_id", "device_id")),
        )
    },
)

# ---- transport ----------------------------------------------------------------------------------

US_ENDPOINT = "https://api2.amplitude.com"
EU_ENDPOINT = "https://api.eu.amplitude.com"
V2_PATH = "/2/httpapi"
BATCH_PATH = "/batch"

# Room left in a request for what wraps the events: {"api_key":...,"events":[...],"options":{...}}.
# The batcher counts only the events (and a separator each); the key and options fit in this.
ENVELOPE_RESERVE = 4096

# ref: https://amplitude.com/docs/apis/analytics/http-v2 ("less than 2000 events per request";
# the issue says at most 2,000: the stricter reading is used)
V2_MAX_EVENTS = 1999
# ref: https://amplitude.com/docs/apis/analytics/http-v2 (request "less than 1 MB"; read as
# 1,000,000 bytes, the stricter unit)
V2_MAX_BYTES = 1_000_000 - 1
# ref: https://amplitude.com/docs/apis/analytics/batch-event-upload (2,000 events per batch)
BATCH_MAX_EVENTS = 2000
# ref: https://amplitude.com/docs/apis/analytics/batch-event-upload (20 MB per request)
BATCH_MAX_BYTES = 20_000_000
# ref: https://amplitude.com/docs/apis/analytics/http-v2 (Starter plan: at most 100 batches/s;
# shared by every consumer process, so each stays well below)
RATE_PER_S = 20.0
# ref: https://amplitude.com/docs/apis/analytics/http-v2 (a throttled user/device is paused 30 s;
# the official SDK re-sends throttled events after 30,000 ms)
THROTTLE_PAUSE_S = 30.0
# How long events of a user/device over its daily quota (Batch API: 500,000 events per rolling
# 24 h) are held before the next try. The window is rolling, so capacity comes back as the
# user's oldest events of the last 24 h age out, not only 24 h later: probing hourly delivers
# them soon after, for at most 24 extra requests a day. Never rejected.
# ref: https://amplitude.com/docs/apis/analytics/batch-event-upload
DEFAULT_QUOTA_HOLD_S = 3600.0

#: HTTP V2 limits (the default API).
LIMITS = SinkLimits(
    max_events=V2_MAX_EVENTS,
    max_bytes=V2_MAX_BYTES - ENVELOPE_RESERVE,
    max_event_bytes=V2_MAX_BYTES - ENVELOPE_RESERVE,
    linger_s=1.0,
    rate_per_s=RATE_PER_S,
    burst=RATE_PER_S,
    timeout_s=30.0,
    concurrency=4,
)
#: Batch Event Upload API limits (``use_batch_api: true``).
BATCH_LIMITS = SinkLimits(
    max_events=BATCH_MAX_EVENTS,
    max_bytes=BATCH_MAX_BYTES - ENVELOPE_RESERVE,
    max_event_bytes=V2_MAX_BYTES - ENVELOPE_RESERVE,
    linger_s=1.0,
    rate_per_s=RATE_PER_S,
    burst=RATE_PER_S,
    timeout_s=60.0,
    concurrency=4,
)


class AmplitudeSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``sinks.amplitude`` in the router config."""

    endpoint: str = US_ENDPOINT
    api_key: Any = None  # a string, {env: NAME} or {file: PATH}; None = dry run
    use_batch_api: bool = False
    min_id_length: int = 5
    quota_hold_s: float = DEFAULT_QUOTA_HOLD_S


_encoder = msgspec.json.Encoder()


def _time_ms(value: Any, default: int) -> int:
    """Amplitude's ``time``: integer milliseconds since the epoch (any other form is a 400)."""
    if value is None:
        return default
    ms = rule_time_ms(value, "time")  # refuses times past the year 9999 too
    if ms < 0:
        raise ValueError(f"time: {value!r} is before 1970")
    return ms


def _is_zero_id(value: str) -> bool:
    return bool(value) and set(value) <= {"0", "-"}


class AmplitudeSink:
    name = "amplitude"

    def __init__(self, settings: AmplitudeSettings, api_key: Secret | None) -> None:
        if settings.min_id_length < 1:
            raise ValueError("sinks.amplitude.min_id_length: must be at least 1")
        if not 0 < settings.quota_hold_s < math.inf:  # NaN fails this too
            raise ValueError("sinks.amplitude.quota_hold_s: must be a positive number of seconds")
        endpoint = settings.endpoint.rstrip("/")
        if not endpoint.startswith(("https://", "http://")):
            raise ValueError("sinks.amplitude.endpoint: expected an http(s) URL")
        # Kept without the raw key: a Struct's repr shows every field.
        self.settings = msgspec.structs.replace(settings, api_key=None)
        self._api_key = api_key
        self.dry_run = api_key is None
        self.url = endpoint + (BATCH_PATH if settings.use_batch_api else V2_PATH)
        self.limits = BATCH_LIMITS if settings.use_batch_api else LIMITS
        self.quota_hold_s = settings.quota_hold_s

    def __repr__(self) -> str:
        return f"AmplitudeSink(url={self.url!r}, dry_run={self.dry_run})"

    def secrets(self) -> list[str]:
        """The key as it travels (JSON string in the body, same text), for redaction."""
        if self._api_key is None:
            return []
        key = self._api_key.reveal()
        on_wire = _encoder.encode(key).decode()[1:-1]  # JSON-escaped, if it needs escaping
        return sorted({key, on_wire})

    # ---- prepare ------------------------------------------------------------------------------

    def _check_id(self, field: str, value: Any) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError(f"{field}: expected a string, got {type(value).__name__}")
        if value.strip().lower() in _AMPLITUDE_INVALID_IDS or (
            field == "device_id" and _is_zero_id(value)
        ):
            raise ValueError(f"{field}: {value!r} is an id Amplitude rejects")
        if len(value) < self.settings.min_id_length:
            raise ValueError(
                f"{field}: {value!r} is shorter than the {self.settings.min_id_length}-character"
                " minimum (options.min_id_length)"
            )
        return value

    def prepare(self, output: Routed, idempotency_key: str, event: Event) -> Prepared:
        payload = dict(output.payload)
        event_type = payload.get("event_type")
        if not isinstance(event_type, str) or not event_type:
            raise ValueError("event_type: required")
        user_id = self._check_id("user_id", payload.get("user_id"))
        device_id = self._check_id("device_id", payload.get("device_id"))
        if user_id is None and device_id is None:
            raise ValueError("user_id or device_id: required")
        payload["time"] = _time_ms(payload.get("time"), event.timestamp)
        payload["insert_id"] = idempotency_key
        return Prepared(_encoder.encode(payload))

    # ---- build --------------------------------------------------------------------------------

    def build(self, items: Sequence[Prepared]) -> list[HttpRequest]:
        key = "" if self._api_key is None else self._api_key.reveal()
        options = _encoder.encode({"min_id_length": self.settings.min_id_length})
        body = b"".join(
            (
                b'{"api_key":',
                _encoder.encode(key),
                b',"events":[',
                b",".join(item.body for item in items),
                b'],"options":',
                options,
                b"}",
            )
        )
        headers = {"Content-Type": "application/json", "Accept": "*/*"}
        return [HttpRequest("POST", self.url, headers, body, tuple(range(len(items))))]

    # ---- classify -----------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        if self._api_key is not None:
            secret = self._api_key.reveal()
            if secret:
                text = text.replace(secret, "***")
        return text

    def _detail(self, response: HttpResponse) -> str:
        return self._scrub(f"HTTP {response.status}: {excerpt(response.body, 300)}")

    def classify(self, request: HttpRequest, response: HttpResponse) -> Outcome:
        status = response.status
        if 200 <= status < 300:
            return Delivered()
        answer = _json_object(response.body)
        error = str(answer.get("error", ""))
        if status == 413:
            return Split(self._detail(response))
        if status in (401, 403) or (status == 400 and error.startswith("Invalid API key")):
            return Pause(self._detail(response))
        hint = f"check sinks.amplitude.endpoint: {self.url}"
        if error == "Invalid request path":
            # A wrong endpoint setting: no event is at fault, so nothing is dead-lettered.
            return Pause(f"{self._detail(response)} ({hint})")
        count = len(request.items)
        if status == 400:
            return self._classify_400(answer, count, response)
        if status == 429:
            return self._classify_429(request, answer, count, response)
        outcome = classify_by_status(response, endpoint_hint=hint)  # 3xx, 404: as above
        if isinstance(outcome, Retry):
            return Retry(self._scrub(outcome.reason), outcome.after_s)
        if isinstance(outcome, Reject):
            return Reject(self._scrub(outcome.reason))
        if isinstance(outcome, Pause):
            return Pause(self._scrub(outcome.reason))
        return outcome

    def _classify_400(
        self, answer: Mapping[str, Any], count: int, response: HttpResponse
    ) -> Outcome:
        error = self._scrub(str(answer.get("error", "")))
        if answer.get("missing_field"):
            return Reject(f"{error or 'Request missing required field'}: {answer['missing_field']}")
        reasons: dict[int, list[str]] = {}
        for key, what in (
            ("events_with_invalid_fields", "invalid field"),
            ("events_with_missing_fields", "missing field"),
            ("events_with_invalid_id_lengths", "invalid id length"),
        ):
            for field, indexes in _field_indexes(answer.get(key)):
                for index in indexes:
                    reasons.setdefault(index, []).append(f"{what} {field}")
        for index in _indexes(answer.get("silenced_events")):
            reasons.setdefault(index, []).append("device silenced")
        rejected = {
            i: f"HTTP 400 {error}: {', '.join(why)}" for i, why in reasons.items() if 0 <= i < count
        }
        if not rejected:
            # A 400 that names no event: nothing the API will take from this request.
            return Reject(self._detail(response))
        retry = tuple(i for i in range(count) if i not in rejected)
        throttled = set(_indexes(answer.get("throttled_events")))
        after = THROTTLE_PAUSE_S if throttled & set(retry) else 0.0
        return Partial(rejected=rejected, retry=retry, after_s=after, reason=f"HTTP 400 {error}")

    def _classify_429(
        self, request: HttpRequest, answer: Mapping[str, Any], count: int, response: HttpResponse
    ) -> Outcome:
        throttled, held = throttle_groups(request, answer)
        if not throttled:
            # No event named: the whole request was throttled.
            return Retry(self._detail(response), THROTTLE_PAUSE_S)
        if held:
            # Nothing of a 429 request was ingested. Events over their daily quota are held
            # until the window can have passed (never dead-lettered for waiting); the others go
            # again at once, or after the throttle pause if they were throttled too.
            others = tuple(i for i in range(count) if i not in held)
            after = THROTTLE_PAUSE_S if set(throttled) & set(others) else 0.0
            return Partial(
                retry=others,
                after_s=after,
                hold=tuple(sorted(held)),
                hold_s=self.quota_hold_s,
                reason=f"HTTP 429: {len(held)} of {count} event(s) over their daily quota",
            )
        # Every event is re-sent (non-throttled ones too, as the SDK does) after the pause.
        return Partial(
            retry=tuple(range(count)), after_s=THROTTLE_PAUSE_S, reason="HTTP 429 throttled"
        )

    def health_request(self) -> HttpRequest | None:
        """None: Amplitude has no documented endpoint that checks a key without ingesting.

        The answer to a request without events is undocumented, and a test event would show up
        in the project's data. A wrong key surfaces on the first real request (400 "Invalid API
        key" -> Pause, probed by the delivery layer).
        """
        return None


def throttle_groups(
    request: HttpRequest, answer: Mapping[str, Any]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """From a 429 body: (throttled event indexes, the subset over a daily quota).

    An event is over quota when its ``user_id`` is in ``exceeded_daily_quota_users`` or its
    ``device_id`` in ``exceeded_daily_quota_devices`` (as the official SDK decides).
    """
    count = len(request.items)
    throttled = tuple(sorted({i for i in _indexes(answer.get("throttled_events")) if i < count}))
    users = _id_set(answer.get("exceeded_daily_quota_users"))
    devices = _id_set(answer.get("exceeded_daily_quota_devices"))
    if not throttled or not (users or devices):
        return throttled, ()
    events = _json_object(request.body).get("events")
    if not isinstance(events, list):
        return throttled, ()
    held = []
    for index in throttled:
        event = events[index] if index < len(events) else None
        if not isinstance(event, dict):
            continue
        user, device = event.get("user_id"), event.get("device_id")
        if (isinstance(user, str) and user in users) or (
            isinstance(device, str) and device in devices
        ):
            held.append(index)
    return throttled, tuple(held)


def _json_object(body: bytes) -> dict[str, Any]:
    value = json_answer(body)
    return value if isinstance(value, dict) else {}


def _id_set(value: Any) -> frozenset[str]:
    """The ids of a 429's ``exceeded_daily_quota_*`` map (a list is read too; else none)."""
    if isinstance(value, dict | list):
        return frozenset(v for v in value if isinstance(v, str))
    return frozenset()


def _indexes(value: Any) -> Iterable[int]:
    if isinstance(value, list):
        for index in value:
            if isinstance(index, int) and not isinstance(index, bool) and index >= 0:
                yield index


def _field_indexes(value: Any) -> Iterable[tuple[str, list[int]]]:
    if isinstance(value, dict):
        for field, indexes in value.items():
            yield str(field), list(_indexes(indexes))


def create(config: Mapping[str, Any]) -> AmplitudeSink:
    """The sink from its settings (``sinks.amplitude``); ValueError names a bad setting."""
    settings = sink_settings(config, AmplitudeSettings, "amplitude")
    return AmplitudeSink(settings, optional_secret(settings.api_key, "sinks.amplitude.api_key"))
