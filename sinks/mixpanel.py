"""Mixpanel sink: rule outputs -> ``POST {endpoint}/import?strict=1`` batches.

What the rules may produce (``OUTPUTS``) is checked by the rules engine; the transport follows
shared/contracts/sinks.md section 2a (the /import API) and 7b (the mixpanel library):

- **prepare** builds each event with the official ``mixpanel`` library (``import_data`` through a
  capturing consumer, nothing sent), then pins the four fields Mixpanel deduplicates on: ``event``,
  ``properties.distinct_id`` (from the rules), ``properties.time`` (integer milliseconds) and
  ``properties.$insert_id`` (the router's idempotency key, so a retry or replay is a duplicate
  Mixpanel drops). A rule's own properties named ``time``, ``distinct_id`` or ``$insert_id``
  cannot override those; ``token`` is not sent (authentication is in the header). An event
  Mixpanel's strict validation would refuse (a blacklisted id, a time before 1971, too many or too
  deeply nested properties, a value that is not JSON) raises ValueError: it is dead-lettered
  before it is sent.
- **build** posts JSON arrays of at most 2,000 events and 2 MB (uncompressed), gzip-compressed
  when the body is large enough for that to pay, with HTTP Basic auth: a service account
  (``username:secret``, plus ``project_id`` in the query) or the project token (``token:``).
- **classify**: 200 delivered; 400 with ``failed_records`` is a partial success (the listed
  records are dead-lettered with Mixpanel's message, the rest were ingested and count as
  delivered, nothing is sent again); any other 400 rejects the request; 413 splits it; 401/403
  pause the sink, and so do 3xx and 404 (a wrong endpoint setting); 429, 502 and 503 back off
  (at least 2 s, Mixpanel's advice) and other 5xx retry.

Settings (``sinks.mixpanel``)::

    endpoint: https://api.mixpanel.com   # or US / EU / IN, or https://api-eu.mixpanel.com ...
    project_id: "123456"                 # with service_account
    service_account: {username: ..., secret: {env: MIXPANEL_SECRET}}
    # or instead of both: project_token: {env: MIXPANEL_TOKEN}

Credentials take a string, ``{env: NAME}`` or ``{file: PATH}``. With none configured the sink is a
dry run: the delivery layer logs what it would send and sends nothing.
"""

from __future__ import annotations

import base64
import gzip
import importlib
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import quote

import msgspec

from router.delivery.retry import parse_retry_after
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
    json_items,
    sink_settings,
)
from router.events import Event, rule_time_ms
from router.rules.engine import Routed
from router.rules.outputs import FieldSpec, OutputKind, SinkOutputs, nonempty
from router.settings import Secret, secret_from

# ---- what Mixpanel accepts ------------------------------------------------------------------

# ref: https://developer.mixpanel.com/reference/import-events (disallowed distinct_id and
# $insert_id values)
_MIXPANEL_BLACKLIST = frozenset(
    {
        "00000000-0000-0000-0000-000000000000",
        "anon",
        "anonymous",
        "nil",
        "none",
        "null",
        "n/a",
        "na",
        "undefined",
        "unknown",
        "<nil>",
        "0",
        "-1",
        "true",
        "false",
        "[]",
        "{}",
    }
)


def _mixpanel_id(value: Any) -> str | None:
    if isinstance(value, str) and value.strip().lower() in _MIXPANEL_BLACKLIST:
        return f"{value!r} is a value Mixpanel rejects as an id"
    return None


def _mixpanel_properties(output: Mapping[str, Any]) -> list[str]:
    properties = output.get("properties")
    # Mixpanel allows fewer than 255 properties, and the sink adds 5 of its own (distinct_id,
    # time, $insert_id, mp_lib, $lib_version).
    if isinstance(properties, dict) and len(properties) >= 250:
        return [
            f"properties: {len(properties)} properties; Mixpanel allows fewer than 255, "
            "of which the sink uses 5"
        ]
    return []


OUTPUTS = SinkOutputs(
    "mixpanel",
    {
        "event": OutputKind(
            "event",
            {
                "event": FieldSpec("string", nonempty),
                "distinct_id": FieldSpec("string", _mixpanel_id),
                "time": FieldSpec("time"),
                "properties": FieldSpec("object"),
            },
            (("event",), ("distinct_id",)),
            _mixpanel_properties,
        )
    },
)

# ---- limits -----------------------------------------------------------------------------------

#: Request body limit (uncompressed, also when gzipped). The sources disagree: 10 MB in the
#: current docs, 2 MB (2097152 bytes, in the 413 example) in the OpenAPI; the smaller one holds.
# ref: https://developer.mixpanel.com/reference/import-events
# ref: https://docs.mixpanel.com/troubleshooting/errors/413-payload-too-large
BODY_LIMIT: Final = 2_097_152
#: Events per request.
# ref: https://developer.mixpanel.com/reference/import-events
MAX_EVENTS: Final = 2000
#: One event must be "smaller than 1MB of uncompressed JSON" (read as 10^6 bytes, the smaller).
# ref: https://developer.mixpanel.com/reference/import-events
MAX_EVENT_BYTES: Final = 1_000_000 - 1
#: "fewer than 255 properties", nested objects "fewer than 255 keys", arrays "fewer than 255
#: elements", "max nesting depth is 3".
# ref: https://developer.mixpanel.com/reference/import-events
MAX_KEYS: Final = 254
MAX_DEPTH: Final = 3
#: Times before 1971-01-01 are refused; Mixpanel reads a time as seconds or milliseconds, so we
#: send milliseconds and refuse anything small enough to read as seconds (before 1973-03-03,
#: the threshold docs/rules.md uses too).
# ref: https://developer.mixpanel.com/reference/import-events
MIN_TIME_MS: Final = 100_000_000_000
#: Backoff on 429 (and 502/503) starts at 2 s.
# ref: https://developer.mixpanel.com/reference/import-events (Rate Limits)
MIN_BACKOFF_S: Final = 2.0
#: Below this many bytes gzip saves less than it costs (about one packet either way).
GZIP_MIN_BYTES: Final = 1400

LIMITS: Final = SinkLimits(
    # ref: https://developer.mixpanel.com/reference/import-events ("up to 2000 events")
    max_events=MAX_EVENTS,
    # ref: https://docs.mixpanel.com/troubleshooting/errors/413-payload-too-large (2097152 bytes);
    # the batcher counts each item plus one separator, the array adds "[" and "]": one byte less.
    max_bytes=BODY_LIMIT - 1,
    # ref: https://developer.mixpanel.com/reference/import-events ("smaller than 1MB")
    max_event_bytes=MAX_EVENT_BYTES,
    # ref: https://developer.mixpanel.com/reference/import-events (2 GB/min, ~30k events/s, no
    # request rate: concurrency is the only throttle; Mixpanel suggests 10-20 clients)
    concurrency=4,
    per_item_overhead=1,
)

HOSTS: Final = {
    # ref: https://docs.mixpanel.com/reference/overview (data residency)
    "US": "https://api.mixpanel.com",
    "EU": "https://api-eu.mixpanel.com",
    "IN": "https://api-in.mixpanel.com",
}

_INSERT_ID = re.compile(r"[A-Za-z0-9-]{1,36}")
_RESERVED = ("time", "distinct_id", "$insert_id", "token")
_encoder = msgspec.json.Encoder()


def blacklisted(value: str) -> bool:
    """Whether Mixpanel refuses ``value`` as a distinct_id or $insert_id (case-insensitively)."""
    return value.strip().lower() in _MIXPANEL_BLACKLIST


# ---- settings ---------------------------------------------------------------------------------


class ServiceAccount(msgspec.Struct, forbid_unknown_fields=True):
    username: Any
    secret: Any


class MixpanelSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``sinks.mixpanel``; credentials are strings, ``{env: NAME}`` or ``{file: PATH}``."""

    endpoint: str = HOSTS["US"]
    project_id: str | int | None = None
    service_account: ServiceAccount | None = None
    project_token: Any = None


def _endpoint(value: str) -> str:
    url = HOSTS.get(value.strip().upper(), value.strip()).rstrip("/")
    if not re.fullmatch(r"https?://[^/?#\s]+(/[^?#\s]*)?", url):
        raise ValueError(f"sinks.mixpanel.endpoint: {value!r} is not US, EU, IN or an http(s) URL")
    return url


# ---- the sink ---------------------------------------------------------------------------------


class _Capture:
    """A mixpanel-library consumer that keeps the message instead of sending it."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str]] = []

    def send(
        self, endpoint: str, json_message: str, api_key: Any = None, api_secret: Any = None
    ) -> None:
        self.messages.append((endpoint, json_message))


class MixpanelSink:
    name = "mixpanel"
    limits = LIMITS

    def __init__(self, settings: MixpanelSettings) -> None:
        self.endpoint = _endpoint(settings.endpoint)
        self.project_id: str | None = None
        self._auth: Secret | None = None
        self._secrets: list[Secret] = []
        account, token = settings.service_account, settings.project_token
        if account is not None and token is not None:
            raise ValueError(
                "sinks.mixpanel: give service_account (with project_id) or project_token, not both"
            )
        if account is not None:
            if settings.project_id is None or not str(settings.project_id).strip():
                raise ValueError("sinks.mixpanel: service_account needs project_id")
            self.project_id = str(settings.project_id).strip()
            user = _credential(account.username, "service_account.username")
            secret = _credential(account.secret, "service_account.secret")
            self._auth = Secret(f"{user.reveal()}:{secret.reveal()}")
            self._secrets.append(secret)
        elif token is not None:
            # The project token as the Basic username, empty password, no project_id.
            project_token = _credential(token, "project_token")
            self._auth = Secret(f"{project_token.reveal()}:")
            self._secrets.append(project_token)
        #: No credentials: the delivery layer logs requests instead of sending them.
        self.dry_run = self._auth is None
        url = f"{self.endpoint}/import?strict=1"
        if self.project_id is not None:
            url += f"&project_id={quote(self.project_id, safe='')}"
        self.url = url
        # Imported here, not at module level: the rules engine needs OUTPUTS without the library.
        library = importlib.import_module("mixpanel")
        self._capture = _Capture()
        # The token is only copied into each event (we drop it there): none is needed.
        self._mixpanel: Any = library.Mixpanel("", consumer=self._capture)

    def secrets(self) -> list[str]:
        """Every form the credentials take on the wire, for redaction (see router Sink)."""
        if self._auth is None:
            return []
        return [s.reveal() for s in self._secrets] + [self._basic()]

    def _basic(self) -> str:
        assert self._auth is not None
        return base64.b64encode(self._auth.reveal().encode()).decode()

    # ---- prepare ---------------------------------------------------------------------------

    def prepare(self, output: Routed, idempotency_key: str, event: Event) -> Prepared:
        payload = output.payload
        name = payload.get("event")
        if not isinstance(name, str) or not name:
            raise ValueError("event: Mixpanel needs a non-empty event name")
        distinct_id = payload.get("distinct_id")
        if not isinstance(distinct_id, str):
            raise ValueError("distinct_id: Mixpanel needs a distinct_id (text)")
        if blacklisted(distinct_id):
            raise ValueError(f"distinct_id: {distinct_id!r} is a value Mixpanel rejects as an id")
        when_value = payload.get("time")
        when = event_time_ms(event.timestamp if when_value is None else when_value)
        properties = payload.get("properties") or {}
        if not isinstance(properties, dict):
            raise ValueError("properties: Mixpanel needs a map")
        insert_id = insert_id_for(idempotency_key)
        own = {k: v for k, v in properties.items() if k not in _RESERVED}
        try:
            self._mixpanel.import_data(
                None, distinct_id, name, when, {**own, "$insert_id": insert_id}
            )
            _, message = self._capture.messages.pop()
            built: dict[str, Any] = msgspec.json.decode(message)
        except (TypeError, ValueError, OverflowError, RecursionError, msgspec.DecodeError) as exc:
            raise ValueError(f"properties: not JSON that Mixpanel accepts ({exc})") from None
        finally:
            self._capture.messages.clear()
        props: dict[str, Any] = built["properties"]
        props.pop("token", None)
        # The library lets caller properties win; the dedup fields must be ours.
        props["distinct_id"] = distinct_id
        props["time"] = when
        props["$insert_id"] = insert_id
        problem = properties_problem(props)
        if problem is not None:
            raise ValueError(problem)
        return Prepared(_encoder.encode(built))

    # ---- build -----------------------------------------------------------------------------

    def build(self, items: Sequence[Prepared]) -> list[HttpRequest]:
        """One request per chunk of at most 2,000 events and 2 MB (the batcher keeps to both)."""
        requests: list[HttpRequest] = []
        chunk: list[int] = []
        size = 1  # "[" + "]" - one separator fewer than items
        for index, item in enumerate(items):
            cost = len(item.body) + 1
            if chunk and (len(chunk) >= MAX_EVENTS or size + cost > BODY_LIMIT):
                requests.append(self._request(items, chunk))
                chunk, size = [], 1
            chunk.append(index)
            size += cost
        if chunk:
            requests.append(self._request(items, chunk))
        return requests

    def _request(self, items: Sequence[Prepared], indexes: list[int]) -> HttpRequest:
        body = json_items([items[i] for i in indexes])
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        # A dry run logs the body: keep it readable.
        if len(body) >= GZIP_MIN_BYTES and not self.dry_run:
            # mtime=0: the same batch always compresses to the same bytes.
            body = gzip.compress(body, compresslevel=6, mtime=0)
            headers["Content-Encoding"] = "gzip"
        if self._auth is not None:
            headers["Authorization"] = f"Basic {self._basic()}"
        return HttpRequest("POST", self.url, headers, body, tuple(indexes))

    # ---- classify --------------------------------------------------------------------------

    def classify(self, request: HttpRequest, response: HttpResponse) -> Outcome:
        status = response.status
        if 200 <= status < 300:
            return Delivered()
        detail = f"HTTP {status}: {excerpt(response.body, 300)}"
        if status == 400:
            rejected = failed_records(response.body, len(request.items))
            if rejected:
                return Partial(rejected=rejected, reason=detail)
            return Reject(detail)
        if status == 413:
            return Split(detail)
        if status in (401, 403):
            return Pause(detail)
        if status in (429, 502, 503):
            after = parse_retry_after(response.headers.get("retry-after"))
            return Retry(detail, max(after or 0.0, MIN_BACKOFF_S))
        # 3xx and 404: the endpoint setting is wrong (no event is at fault): pause, as every sink.
        return classify_by_status(
            response, endpoint_hint=f"check sinks.mixpanel.endpoint: {self.endpoint}"
        )

    def health_request(self) -> HttpRequest | None:
        """No probe: Mixpanel's ingestion API has no request that checks credentials for free.

        Every /import that authenticates either ingests an event or is refused for its body
        (an empty batch is invalid), and whether a refused body is checked before or after the
        credentials is not documented; a probe event would show up in the customer's project.
        The delivery layer's pause probe (re-sending a parked batch) is the honest check.
        """
        return None


def _credential(value: Any, field: str) -> Secret:
    try:
        return secret_from(value)
    except ValueError as exc:
        raise ValueError(f"sinks.mixpanel.{field}: {exc}") from None


def insert_id_for(idempotency_key: str) -> str:
    """The key itself when Mixpanel accepts it as $insert_id, else a UUID derived from it."""
    if _INSERT_ID.fullmatch(idempotency_key) and not blacklisted(idempotency_key):
        return idempotency_key
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"mixpanel:{idempotency_key}"))


def event_time_ms(value: Any) -> int:
    """A rule's time (see :func:`router.events.rule_datetime`) as the integer ms Mixpanel takes."""
    ms = rule_time_ms(value, "time")
    if ms < MIN_TIME_MS:
        raise ValueError(f"time: {ms} ms is before 1973-03-03, which Mixpanel would misread")
    return ms


def properties_problem(properties: Mapping[str, Any]) -> str | None:
    """Why Mixpanel's strict validation would refuse these event properties (None if not)."""
    if len(properties) > MAX_KEYS:
        return f"properties: {len(properties)} properties; Mixpanel allows fewer than 255"
    # properties itself is level 1 (the stricter reading of "max nesting depth is 3"): an object
    # or array may sit at properties.a.b, not at properties.a.b.c.
    stack: list[tuple[str, Any, int]] = [(f"properties.{k}", v, 2) for k, v in properties.items()]
    while stack:
        path, value, depth = stack.pop()
        if isinstance(value, dict):
            children = [(f"{path}.{k}", v) for k, v in value.items()]
        elif isinstance(value, list):
            children = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        else:
            continue
        if depth > MAX_DEPTH:
            return f"{path}: nested deeper than Mixpanel's {MAX_DEPTH} levels"
        if len(children) > MAX_KEYS:
            return f"{path}: {len(children)} entries; Mixpanel allows fewer than 255"
        stack.extend((p, v, depth + 1) for p, v in children)
    return None


def failed_records(body: bytes, count: int) -> dict[int, str]:
    """A strict 400's ``failed_records`` -> {index in the request: Mixpanel's message}.

    Indexes outside the request are ignored (an empty result rejects the whole request).
    """
    answer = json_answer(body)
    records = answer.get("failed_records") if isinstance(answer, dict) else None
    if not isinstance(records, list):
        return {}
    rejected: dict[int, str] = {}
    for record in records:
        if not isinstance(record, dict):
            continue
        index = record.get("index")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            continue
        message = record.get("message")
        field = record.get("field")
        reason = str(message) if message else f"{field or 'event'} is invalid"
        if field and str(field) not in reason:
            reason = f"{field}: {reason}"
        rejected[index] = f"{rejected[index]}; {reason}" if index in rejected else reason
    return rejected


def create(config: Mapping[str, Any]) -> MixpanelSink:
    """The sink from its settings (``sinks.mixpanel``); ValueError explains a bad config."""
    return MixpanelSink(sink_settings(config, MixpanelSettings, "mixpanel"))
