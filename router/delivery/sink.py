"""What a sink is to the delivery layer: declared limits, and three pure functions.

- ``prepare(output, key, event)``: one rule output -> the bytes the sink sends for it;
- ``build(items)``: a batch of prepared items -> HTTP requests, each naming the items it carries;
- ``classify(request, response)``: the response -> an :data:`Outcome`.

A sink does no I/O and keeps no state about deliveries: batching, rate limits, retries, pausing,
dead letters and offset commits are the delivery layer's. Copy sinks/README.md's example sink.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import msgspec

from router.delivery.retry import Verdict, parse_retry_after, verdict_for_status
from router.events import Event
from router.rules.engine import Routed
from router.settings import Secret, secret_from

_S = TypeVar("_S")


@dataclass(frozen=True)
class SinkLimits:
    max_events: int  # events per request
    max_bytes: int  # request body bytes
    max_event_bytes: int  # one event's bytes; larger events are dead-lettered as too_large
    linger_s: float = 1.0  # longest wait for a batch to fill
    rate_per_s: float | None = None  # requests per second, sink-wide
    burst: float | None = None
    per_key_rate_per_s: float | None = None  # requests per second per key (Slack: channel)
    per_key_burst: float | None = None
    timeout_s: float = 30.0  # one HTTP request, connect to last byte
    concurrency: int = 4  # requests in flight at once
    per_item_overhead: int = 1  # bytes each item adds to a body beyond its own (separators)


class Tuning(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``sinks.<name>.delivery``: the operator's batching and request settings for one sink.

    Like Vector's ``batch`` and ``request`` options. Each may only tighten what the API allows:
    more events or bytes per request than the sink declares are refused, as is a rate above a
    documented one; concurrency, linger and timeout are the operator's to choose.
    """

    max_events: int | None = None
    max_bytes: int | None = None
    linger_s: float | None = None
    concurrency: int | None = None
    rate_per_s: float | None = None
    timeout_s: float | None = None


def tuned_limits(limits: SinkLimits, config: Any, where: str) -> SinkLimits:
    """``limits`` with the operator's ``delivery`` settings applied; ValueError names the field."""
    if config is None:
        return limits
    try:
        tuning = msgspec.convert(config, Tuning)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{where}: {exc}") from None
    changes: dict[str, Any] = {}

    def bounded(name: str, value: float | None, low: float, high: float | None, why: str) -> None:
        if value is None:
            return
        # Written so that NaN (YAML .nan) fails too, and infinity: "value < low" lets NaN pass.
        if not (low <= value <= (high if high is not None else math.inf) and math.isfinite(value)):
            limit = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
            raise ValueError(f"{where}.{name}: {value:g} must be {limit}{why}")
        changes[name] = value

    bounded("max_events", tuning.max_events, 1, limits.max_events, " (the API's limit)")
    bounded("max_bytes", tuning.max_bytes, 1, limits.max_bytes, " (the API's limit)")
    bounded("linger_s", tuning.linger_s, 0, None, "")
    bounded("concurrency", tuning.concurrency, 1, 256, "")
    bounded("rate_per_s", tuning.rate_per_s, 0.001, limits.rate_per_s, " (the API's limit)")
    bounded("timeout_s", tuning.timeout_s, 0.1, None, "")
    if "max_bytes" in changes and changes["max_bytes"] < limits.max_event_bytes:
        changes["max_event_bytes"] = changes["max_bytes"]
    return replace(limits, **changes)


@dataclass(frozen=True, slots=True)
class Prepared:
    body: bytes
    key: str | None = None  # group and rate-limit key; None = one group


@dataclass(frozen=True)
class HttpRequest:
    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes
    items: tuple[int, ...]  # indexes into the batch given to build()


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]  # lower-cased names
    body: bytes


@dataclass(frozen=True)
class Delivered:
    pass


@dataclass(frozen=True)
class Retry:
    reason: str
    after_s: float | None = None


@dataclass(frozen=True)
class Reject:
    reason: str


@dataclass(frozen=True)
class Pause:
    """The destination refuses the sink's configuration (credentials, channel).

    No event is at fault, so nothing is dropped or dead-lettered; the sink probes until it works.
    """

    reason: str


@dataclass(frozen=True)
class Split:
    """The request was too large for the destination: send its items in halves."""

    reason: str


@dataclass(frozen=True)
class Partial:
    """Some items of the request failed; the others count as delivered.

    ``rejected`` (item index in the request -> reason) are dead-lettered; ``retry`` are sent
    again after ``after_s``.
    """

    rejected: Mapping[int, str] = field(default_factory=dict)
    retry: tuple[int, ...] = ()
    after_s: float | None = None
    reason: str = ""
    #: Items the destination takes only once a quota window has passed (Amplitude's daily
    #: quota): re-sent as their own batch after ``hold_s``, never dead-lettered for waiting
    #: (neither the retry time limit nor the Retry-After cap applies), never delaying ``retry``.
    hold: tuple[int, ...] = ()
    hold_s: float | None = None


Outcome = Delivered | Retry | Reject | Pause | Split | Partial


class Sink(Protocol):
    """The interface every sink implements.

    A sink may also set ``dry_run = True`` (no credentials configured): the delivery layer then
    logs each request, secrets masked, and counts it as delivered without sending it. And it may
    offer ``secrets() -> list[str]``: every form its credentials take on the wire (a Basic
    token, a key resolved from a file), so that logs and dead letters never show them.
    And ``health_request() -> HttpRequest | None``: a request that proves the endpoint (and, where
    the API allows, the credentials) without sending data, run once at start-up.
    """

    name: str
    limits: SinkLimits

    def prepare(self, output: Routed, idempotency_key: str, event: Event) -> Prepared: ...

    def build(self, items: Sequence[Prepared]) -> list[HttpRequest]: ...

    def classify(self, request: HttpRequest, response: HttpResponse) -> Outcome: ...


def idempotency_key(event_id: str, sink: str, rule_id: str) -> str:
    """The same for every retry and replay of one event's output: a UUID-formatted hash.

    36 characters of [0-9a-f-]: a valid Segment messageId, Mixpanel $insert_id and Amplitude
    insert_id.
    """
    h = hashlib.sha256(f"{event_id}\0{sink}\0{rule_id}".encode()).hexdigest()
    # str(uuid.UUID(bytes=digest[:16])), without the UUID object: on the consumer's hot path.
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def excerpt(body: bytes, limit: int = 512) -> str:
    text = body[:limit].decode("utf-8", "replace")
    return text + ("…" if len(body) > limit else "")


_answer_decoder = msgspec.json.Decoder()


def json_answer(body: bytes) -> Any:
    """A response body as JSON, or None when it is not JSON a classify can read.

    Bodies come from the network: anything at all, including JSON nested deeper than the
    decoder's recursion allows (RecursionError, which is not a DecodeError).
    """
    try:
        return _answer_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None


def classify_by_status(response: HttpResponse, endpoint_hint: str | None = None) -> Outcome:
    """The shared retry table, for sinks whose API says nothing finer.

    With ``endpoint_hint`` (say "check sinks.segment.endpoint: URL"), a redirect or a 404 means
    a wrong endpoint setting, not a bad event: the sink pauses, naming what to check, instead
    of dead-lettering every event it sends.
    """
    status = response.status
    verdict = verdict_for_status(status)
    detail = f"HTTP {status}: {excerpt(response.body, 200)}"
    if verdict is Verdict.DELIVERED:
        return Delivered()
    if endpoint_hint is not None and (300 <= status < 400 or status == 404):
        return Pause(f"{detail} ({endpoint_hint})")
    if verdict is Verdict.RETRY:
        return Retry(detail, parse_retry_after(response.headers.get("retry-after")))
    if verdict is Verdict.PAUSE:
        return Pause(detail)
    if response.status == 413:
        return Split(detail)
    return Reject(detail)


def json_items(items: Sequence[Prepared]) -> bytes:
    """A JSON array of the prepared items (each already JSON)."""
    return b"[" + b",".join(item.body for item in items) + b"]"


def sink_secrets(sink: Sink) -> list[str]:
    """The sink's own list of secret strings, if it offers one."""
    secrets = getattr(sink, "secrets", None)
    return list(secrets()) if callable(secrets) else []


# ---- for sinks' create(): settings, credentials, endpoints -----------------------------------


def sink_settings(config: Mapping[str, Any], settings_type: type[_S], sink: str) -> _S:
    """A sink's settings (``sinks.<sink>``) as its Struct; ValueError naming the bad key."""
    try:
        return msgspec.convert(dict(config), settings_type)
    except msgspec.ValidationError as exc:
        raise ValueError(f"sinks.{sink}: {exc}") from None


def optional_secret(value: Any, key: str) -> Secret | None:
    """A credential from a string, {env: NAME} or {file: PATH}; None when not configured."""
    if value is None:
        return None
    try:
        return secret_from(value)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None


def endpoint_url(endpoint: str, key: str, appended_path: str, examples: str) -> str:
    """An http(s) base URL without query, fragment or the path the sink appends itself."""
    parts = urlsplit(endpoint)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # "host:abc", a port out of range
        port_ok = False
    if parts.scheme not in ("https", "http") or not parts.hostname or not port_ok:
        raise ValueError(f"{key}: {endpoint!r} is not an http(s) URL ({examples})")
    if "?" in endpoint or "#" in endpoint:  # also a bare "?" or "#": the path would follow it
        raise ValueError(f"{key}: must not have a query or fragment")
    if parts.path.rstrip("/").endswith(appended_path):
        raise ValueError(f"{key}: give the host only; the sink appends {appended_path}")
    return endpoint.rstrip("/")
