"""GA4 Measurement Protocol sink: rule outputs as GA4 events, sent to ``/mp/collect``.

What the rules produce (``OUTPUTS``, one kind: ``event`` with ``name``, ``client_id``,
``user_id``, ``params``, ``user_properties``, ``timestamp``) is checked by the rules engine on
every rendered output; the transport below checks it again, completely, because GA4 answers
**2xx even for an event it then silently drops** (shared/contracts/sinks.md §3). So every
documented rule is validated locally in ``prepare`` before anything is sent: the event name
(charset, first character, length, reserved names and prefixes), parameter names, count and
values (scalars of at most 100 characters; ``items`` as a list of objects with at most 10 custom
item parameters), user properties (count, names, reserved names, values of at most 36
characters), ``user_id`` being UTF-8, and the 72-hour backdating window (event time against the
wall clock, injectable for tests). A broken rule raises ``ValueError`` naming it, and the
delivery layer dead-letters the output as ``invalid_payload`` with that reason: an invalid event
is never sent to be dropped. A request body must stay under 130 kB; an event too large to fit
any request alone is dead-lettered as ``too_large`` by the delivery layer (``LIMITS``).

Wire format. ``prepare`` returns the event as a complete one-event request body (compact JSON)::

    {"client_id": ..., "user_id"?: ..., "timestamp_micros": ..., "user_properties"?: {...},
     "events": [{"name": ..., "params"?: {...}}]}

with ``Prepared.key`` = the client id, so the delivery layer never mixes clients in a batch.
``client_id`` becomes ``app_instance_id`` for an app stream (``firebase_app_id`` set).
``user_properties`` are sent as ``{"name": {"value": v}}``. ``timestamp_micros`` is the rule's
``timestamp`` (else the event time) in microseconds, always sent.

Grouping (``build``). ``user_id``, ``user_properties`` and ``timestamp_micros`` are request-level
fields in the Measurement Protocol as sinks.md documents it (events carry only ``name`` and
``params``), so ``build`` merges only events that agree on all three, up to 25 events and under
130 kB per request, in batch order. Events of one visitor at different times therefore go in
separate requests: correct times are worth more than fewer requests (and GA4 has no documented
request rate limit). Google's current guide describes a per-event ``timestamp_micros`` that
would lift this, but sinks.md does not list it, so it is not relied on.

How a visitor becomes a ``client_id`` is the rules' choice (``rules/ga4.yaml``: SHA-256 of the
visitor id: stable, so one visitor stays one GA4 client, and no e-mail address reaches Google).

Settings (``sinks.ga4``): ``endpoint`` (default ``https://www.google-analytics.com``; EU
``https://region1.google-analytics.com``), ``measurement_id`` (web streams) or
``firebase_app_id`` (app streams), ``api_secret`` (a string, ``{env: NAME}`` or ``{file: PATH}``;
absent = dry run: requests are logged, not sent), ``max_backdate_hours`` (default and maximum 72;
lower it to leave room for retries) and ``validate_with_debug_endpoint``. The api_secret travels
in the query string, so ``secrets()`` lists it raw and URL-quoted for redaction.

Debug validation (``validate_with_debug_endpoint``): ``preflight(request)`` gives the same
request for ``/debug/mp/collect`` and ``classify`` reads its ``validationMessages`` (none:
``Delivered``, i.e. valid; messages naming an event: ``Partial`` rejecting those events; others:
``Reject``; a 2xx that is not a debug answer: ``Retry``). The delivery layer sends the preflight
before the real request, and only what it lets through goes to ``/mp/collect``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final
from urllib.parse import quote, quote_plus, urlencode, urlsplit

import msgspec

from router.delivery.sink import (
    Delivered,
    HttpRequest,
    HttpResponse,
    Outcome,
    Partial,
    Prepared,
    Reject,
    Retry,
    SinkLimits,
    classify_by_status,
    endpoint_url,
    excerpt,
    json_answer,
    optional_secret,
    sink_settings,
)
from router.events import Event, rule_time_ms
from router.rules.engine import Routed
from router.rules.outputs import FieldSpec, OutputKind, SinkOutputs, ValueCheck, nonempty
from router.settings import Secret

# ref: https://developers.google.com/analytics/devguides/collection/protocol/ga4/sending-events#limitations

_GA4_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")  # fullmatch: "$" would let "name\n" pass
_GA4_RESERVED_EVENTS = frozenset(
    {
        "ad_activeview",
        "ad_click",
        "ad_exposure",
        "ad_impression",
        "ad_query",
        "ad_reward",
        "adunit_exposure",
        "app_background",
        "app_clear_data",
        "app_exception",
        "app_remove",
        "app_store_refund",
        "app_store_subscription_cancel",
        "app_store_subscription_convert",
        "app_store_subscription_renew",
        "app_update",
        "app_upgrade",
        "dynamic_link_app_open",
        "dynamic_link_app_update",
        "dynamic_link_first_open",
        "error",
        "firebase_campaign",
        "first_open",
        "first_visit",
        "in_app_purchase",
        "notification_dismiss",
        "notification_foreground",
        "notification_open",
        "notification_receive",
        "os_update",
        "screen_view",
        "session_start",
        "session_start_with_rollout",
        "user_engagement",
    }
)
_GA4_RESERVED_PREFIXES = ("_", "firebase_", "ga_", "google_")
_GA4_RESERVED_USER_PROPERTIES = frozenset(
    {
        "first_open_time",
        "first_visit_time",
        "last_deep_link_referrer",
        "user_id",
        "first_open_after_install",
    }
)


def _ga4_name(limit: int, what: str, reserved: frozenset[str] = frozenset()) -> ValueCheck:
    def check(value: Any) -> str | None:
        if not isinstance(value, str):
            return None
        if not value:
            return f"{what} must not be empty"
        if len(value) > limit:
            return f"{what} {value!r} is longer than {limit} characters"
        if not _GA4_NAME.fullmatch(value):
            return (
                f"{what} {value!r}: only letters, digits and _, starting with a letter "
                "(GA4 drops it otherwise)"
            )
        lowered = value.lower()
        if lowered.startswith(_GA4_RESERVED_PREFIXES[1:]):
            return f"{what} {value!r} uses a reserved prefix (firebase_, ga_, google_)"
        if lowered in reserved:
            return f"{what} {value!r} is reserved by Google Analytics"
        return None

    return check


def _ga4_params(output: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    params = output.get("params")
    if isinstance(params, dict):
        if len(params) > 25:
            problems.append(f"params: {len(params)} parameters; GA4 allows 25 per event")
        for key, value in params.items():
            if isinstance(value, str) and len(value) > 100:
                problems.append(f"params.{key}: value longer than 100 characters")
            elif isinstance(value, (dict, list)) and key != "items":
                problems.append(f"params.{key}: GA4 parameter values must be scalars")
    user_properties = output.get("user_properties")
    if isinstance(user_properties, dict):
        if len(user_properties) > 25:
            problems.append(f"user_properties: {len(user_properties)}; GA4 allows 25")
        for key, value in user_properties.items():
            if isinstance(value, str) and len(value) > 36:
                problems.append(f"user_properties.{key}: value longer than 36 characters")
    return problems


OUTPUTS = SinkOutputs(
    "ga4",
    {
        "event": OutputKind(
            "event",
            {
                "name": FieldSpec("string", _ga4_name(40, "event name", _GA4_RESERVED_EVENTS)),
                "client_id": FieldSpec("string", nonempty),
                "user_id": FieldSpec("string", nonempty),
                "params": FieldSpec("object", key_check=_ga4_name(40, "parameter name")),
                "user_properties": FieldSpec(
                    "object",
                    key_check=_ga4_name(24, "user property name", _GA4_RESERVED_USER_PROPERTIES),
                ),
                "timestamp": FieldSpec("time"),
            },
            (("name",), ("client_id",)),
            _ga4_params,
        )
    },
    # Google's terms forbid sending personally identifiable information to Analytics.
    deny=frozenset(
        {
            "email",
            "email_address",
            "phone",
            "phone_number",
            "ip",
            "ip_address",
            "first_name",
            "last_name",
            "full_name",
            "street_address",
        }
    ),
)

# ---- transport ----------------------------------------------------------------------------

GLOBAL_ENDPOINT: Final = "https://www.google-analytics.com"
EU_ENDPOINT: Final = "https://region1.google-analytics.com"
COLLECT_PATH: Final = "/mp/collect"
DEBUG_PATH: Final = "/debug/mp/collect"

# ref: https://developers.google.com/analytics/devguides/collection/protocol/ga4/sending-events#limitations
# (sinks.md §3 "Limits"); every one is checked locally since GA4 drops behind a 2xx.
MAX_EVENTS: Final = 25  # events per request
MAX_PARAMS: Final = 25  # parameters per event
MAX_USER_PROPERTIES: Final = 25
MAX_EVENT_NAME: Final = 40
MAX_PARAM_NAME: Final = 40  # item parameter names too
MAX_PARAM_VALUE: Final = 100  # item parameter values too
MAX_USER_PROPERTY_NAME: Final = 24
MAX_USER_PROPERTY_VALUE: Final = 36
MAX_ITEM_CUSTOM_PARAMS: Final = 10
#: "post body < 130 kB": strictly under 130,000 bytes (the strict reading of kB).
MAX_BODY_BYTES: Final = 130_000
# ref: https://developers.google.com/analytics/devguides/collection/protocol/ga4/sending-events
# ("events up to 72 hours" may be backdated)
MAX_BACKDATE_HOURS: Final = 72

#: Item parameters GA4 predefines; every other key of an item is a custom item parameter.
# ref: https://developers.google.com/analytics/devguides/collection/protocol/ga4/reference/events
ITEM_PARAMS: Final = frozenset(
    {
        "item_id",
        "item_name",
        "affiliation",
        "coupon",
        "discount",
        "index",
        "item_brand",
        "item_category",
        "item_category2",
        "item_category3",
        "item_category4",
        "item_category5",
        "item_list_id",
        "item_list_name",
        "item_variant",
        "location_id",
        "price",
        "quantity",
        "promotion_id",
        "promotion_name",
        "creative_name",
        "creative_slot",
    }
)

LIMITS = SinkLimits(
    # ref: https://developers.google.com/analytics/devguides/collection/protocol/ga4/sending-events#limitations
    # ("Requests can have a maximum of 25 events"); a batch is one client_id (Prepared.key)
    max_events=MAX_EVENTS,
    # ref: https://developers.google.com/analytics/devguides/collection/protocol/ga4/sending-events#limitations
    # ("post body must be smaller than 130kB"). Each item is a whole one-event request and the
    # batcher counts one separator more per item than a body has, so the sum it allows
    # (<= 130,000) bounds a merged body to <= 129,999 bytes: under the limit.
    max_bytes=MAX_BODY_BYTES,
    # ref: https://developers.google.com/analytics/devguides/collection/protocol/ga4/sending-events#limitations
    # (the same 130 kB: one event whose one-event request is larger can never be sent)
    max_event_bytes=MAX_BODY_BYTES - 1,
    # ref: https://developers.google.com/analytics/devguides/collection/protocol/ga4/reference
    # (no request rate limit is documented for the Measurement Protocol)
    rate_per_s=None,
    # ref: https://developers.google.com/analytics/devguides/collection/protocol/ga4/reference
    # (no timeout documented; a 204 comes back at once, 10 s covers a slow network)
    timeout_s=10.0,
    # ref: https://developers.google.com/analytics/devguides/collection/protocol/ga4/sending-events
    # (events of one client_id per request: with many visitors nearly every request carries one
    # event, so throughput is requests in flight / round trip; 4 would cap it at ~40-80 events/s
    # over a 50-100 ms round trip). No concurrency limit is documented; tune with
    # sinks.ga4.delivery.concurrency.
    concurrency=16,
)


class Ga4Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``sinks.ga4``: endpoint, stream id, api_secret (absent = dry run) and checks."""

    endpoint: str = GLOBAL_ENDPOINT
    measurement_id: str | None = None  # web streams (client_id in the body)
    firebase_app_id: str | None = None  # app streams (app_instance_id in the body)
    # A string, {env: NAME} or {file: PATH}; converted with router.settings.secret_from.
    api_secret: str | dict[str, str] | None = None
    validate_with_debug_endpoint: bool = False
    max_backdate_hours: float = MAX_BACKDATE_HOURS


def _normalise_endpoint(endpoint: str) -> str:
    return endpoint_url(
        endpoint,
        "sinks.ga4.endpoint",
        COLLECT_PATH,
        f"global: {GLOBAL_ENDPOINT}, EU: {EU_ENDPOINT}",
    )


def _epoch_ms(value: Any, event: Event) -> int:
    """The event time in ms: the rule's ``timestamp`` if it maps one, else the event's."""
    return event.timestamp if value is None else rule_time_ms(value, "timestamp")


def _name_problem(name: Any, what: str, limit: int, reserved: frozenset[str]) -> str | None:
    """Why ``name`` is not a valid GA4 name (event, parameter, user property), or None."""
    if not isinstance(name, str):
        return f"{what} must be a string"
    if not name:
        return f"{what} must not be empty"
    if len(name) > limit:
        return f"{what} {name!r} is longer than {limit} characters"
    if not _GA4_NAME.fullmatch(name):
        return (
            f"{what} {name!r}: only letters, digits and _, starting with a letter "
            "(GA4 drops it otherwise)"
        )
    lowered = name.lower()
    # "_" cannot start a name that passed the charset check; compared case-insensitively, as
    # the rule-level check does (the strict reading: GA4 does not say these are case-sensitive).
    if lowered.startswith(_GA4_RESERVED_PREFIXES):
        return f"{what} {name!r} uses a reserved prefix (firebase_, ga_, google_)"
    if lowered in reserved:
        return f"{what} {name!r} is reserved by Google Analytics"
    return None


def _utf8_problem(value: str) -> str | None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8 (a lone surrogate)"
    return None


def _scalar_problem(value: Any, limit: int) -> str | None:
    """Why ``value`` is not a valid parameter / user property value, or None."""
    if isinstance(value, str):
        if len(value) > limit:
            return f"value longer than {limit} characters"
        return _utf8_problem(value)
    if isinstance(value, bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value!r} is not a JSON number"
    if value is None:
        return "null is not a value GA4 accepts"
    return f"GA4 values are strings or numbers, got {type(value).__name__}"


def _items_problem(items: Any) -> str | None:
    if not isinstance(items, list):
        return "items must be a list of objects"
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            return f"items[{position}] must be an object"
        custom = [key for key in item if key not in ITEM_PARAMS]
        if len(custom) > MAX_ITEM_CUSTOM_PARAMS:
            return (
                f"items[{position}]: {len(custom)} custom item parameters; GA4 allows "
                f"{MAX_ITEM_CUSTOM_PARAMS}"
            )
        for key, value in item.items():
            problem = _name_problem(key, "item parameter name", MAX_PARAM_NAME, frozenset())
            if problem is None:
                problem = _scalar_problem(value, MAX_PARAM_VALUE)
            if problem is not None:
                return f"items[{position}].{key}: {problem}"
    return None


def validate_event(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The GA4 event object for one output; ValueError names the first rule it breaks.

    Checks the name and ``params``; the request-level fields are checked by the sink.
    """
    name = payload.get("name")
    problem = _name_problem(name, "event name", MAX_EVENT_NAME, _GA4_RESERVED_EVENTS)
    if problem is not None:
        raise ValueError(f"name: {problem}")
    event: dict[str, Any] = {"name": name}
    params = payload.get("params")
    if params is None:
        return event
    if not isinstance(params, dict):
        raise ValueError(f"params: expected an object, got {type(params).__name__}")
    if len(params) > MAX_PARAMS:
        raise ValueError(f"params: {len(params)} parameters; GA4 allows {MAX_PARAMS} per event")
    for key, value in params.items():
        problem = _name_problem(key, "parameter name", MAX_PARAM_NAME, frozenset())
        if problem is None:
            if key == "items":
                problem = _items_problem(value)
            else:
                problem = _scalar_problem(value, MAX_PARAM_VALUE)
        if problem is not None:
            raise ValueError(f"params.{key}: {problem}")
    event["params"] = params
    return event


def user_properties(value: Any) -> dict[str, dict[str, Any]] | None:
    """The rule's ``{name: value}`` as GA4's ``{name: {"value": value}}``, checked."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"user_properties: expected an object, got {type(value).__name__}")
    if len(value) > MAX_USER_PROPERTIES:
        raise ValueError(
            f"user_properties: {len(value)} user properties; GA4 allows {MAX_USER_PROPERTIES}"
        )
    out: dict[str, dict[str, Any]] = {}
    for key, item in value.items():
        problem = _name_problem(
            key, "user property name", MAX_USER_PROPERTY_NAME, _GA4_RESERVED_USER_PROPERTIES
        )
        if problem is None:
            problem = _scalar_problem(item, MAX_USER_PROPERTY_VALUE)
        if problem is not None:
            raise ValueError(f"user_properties.{key}: {problem}")
        out[key] = {"value": item}
    return out or None


def encode(body: Mapping[str, Any]) -> bytes:
    """Compact JSON, UTF-8; ValueError for what is not JSON (NaN) or not UTF-8."""
    try:
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
            "utf-8"
        )
    except (ValueError, UnicodeEncodeError) as exc:
        raise ValueError(f"not encodable as UTF-8 JSON: {exc}") from None


class Ga4Sink:
    """The GA4 Measurement Protocol transport: see the module docstring."""

    name = "ga4"

    def __init__(
        self,
        settings: Ga4Settings,
        api_secret: Secret | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.endpoint = _normalise_endpoint(settings.endpoint)
        self.limits = LIMITS
        self.dry_run = api_secret is None
        self.validate_with_debug_endpoint = settings.validate_with_debug_endpoint
        if settings.measurement_id is not None and settings.firebase_app_id is not None:
            raise ValueError(
                "sinks.ga4: give measurement_id (web stream) or firebase_app_id (app stream), "
                "not both"
            )
        stream = [
            (name, value)
            for name, value in (
                ("measurement_id", settings.measurement_id),
                ("firebase_app_id", settings.firebase_app_id),
            )
            if value is not None
        ]
        if any(not value for _, value in stream):
            raise ValueError(f"sinks.ga4.{stream[0][0]}: must not be empty")
        if not stream and not self.dry_run:
            raise ValueError("sinks.ga4: measurement_id or firebase_app_id is required")
        if not 0 < settings.max_backdate_hours <= MAX_BACKDATE_HOURS:
            raise ValueError(
                f"sinks.ga4.max_backdate_hours: must be > 0 and <= {MAX_BACKDATE_HOURS} "
                "(GA4's backdating window)"
            )
        self.max_backdate_ms = int(settings.max_backdate_hours * 3_600_000)
        #: The body field naming the device: client_id (web) or app_instance_id (app).
        self.id_field = "app_instance_id" if settings.firebase_app_id is not None else "client_id"
        self._clock = clock
        query = list(stream)
        self._secrets: list[str] = []
        if api_secret is not None:
            raw = api_secret.reveal()
            query.append(("api_secret", raw))
            self._secrets = list(dict.fromkeys([raw, quote(raw, safe=""), quote_plus(raw)]))
        suffix = f"?{urlencode(query, quote_via=quote)}" if query else ""
        self.url = self.endpoint + COLLECT_PATH + suffix
        self.debug_url = self.endpoint + DEBUG_PATH + suffix
        self._headers = {
            "Content-Type": "application/json",
            "User-Agent": "pendo-event-router",
        }

    def secrets(self) -> list[str]:
        """Every form the api_secret takes on the wire (raw, URL-quoted), for redaction."""
        return list(self._secrets)

    def __repr__(self) -> str:
        return (
            f"Ga4Sink(endpoint={self.endpoint!r}, id_field={self.id_field!r}, "
            f"dry_run={self.dry_run})"
        )

    # ---- prepare -------------------------------------------------------------------------

    def request_body(self, output: Routed, event: Event) -> dict[str, Any]:
        """The one-event request for an output; ValueError names the GA4 rule it breaks."""
        if output.kind != "event":
            raise ValueError(f"ga4 has no output kind {output.kind!r}")
        payload = output.payload
        client_id = payload.get("client_id")
        if not isinstance(client_id, str) or not client_id:
            raise ValueError(f"client_id: required (GA4 drops a request without {self.id_field})")
        if (problem := _utf8_problem(client_id)) is not None:
            raise ValueError(f"client_id: {problem}")
        body: dict[str, Any] = {self.id_field: client_id}
        user_id = payload.get("user_id")
        if user_id not in (None, ""):  # "" is no user id (the rules never give one)
            if not isinstance(user_id, str):
                raise ValueError("user_id: must be a string")
            if (problem := _utf8_problem(user_id)) is not None:
                raise ValueError(f"user_id: {problem}")
            body["user_id"] = user_id
        when_ms = _epoch_ms(payload.get("timestamp"), event)
        age_ms = int(self._clock() * 1000) - when_ms
        if age_ms > self.max_backdate_ms:
            hours = self.max_backdate_ms / 3_600_000
            raise ValueError(
                f"timestamp: {age_ms / 3_600_000:.1f} hours old; GA4 accepts events backdated "
                f"up to {hours:g} hours"
            )
        body["timestamp_micros"] = when_ms * 1000
        properties = user_properties(payload.get("user_properties"))
        if properties is not None:
            body["user_properties"] = properties
        body["events"] = [validate_event(payload)]
        return body

    def prepare(self, output: Routed, idempotency_key: str, event: Event) -> Prepared:
        # GA4 has no event id (sinks.md §3: no dedup), so the idempotency key is not sent.
        body = self.request_body(output, event)
        return Prepared(encode(body), key=body[self.id_field])

    # ---- build ---------------------------------------------------------------------------

    def build(self, items: Sequence[Prepared]) -> list[HttpRequest]:
        """Requests of up to 25 events under 130 kB whose request-level fields agree."""
        groups: dict[bytes, tuple[bytes, list[tuple[int, list[bytes]]]]] = {}
        for index, item in enumerate(items):
            decoded = json.loads(item.body)
            events = [encode(e) for e in decoded.pop("events")]
            head = encode(decoded)[:-1] + b',"events":['
            groups.setdefault(head, (head, []))[1].append((index, events))
        requests: list[HttpRequest] = []
        for head, members in groups.values():
            chunk: list[int] = []
            chunk_events: list[bytes] = []
            for index, events in members:
                fits = (
                    len(chunk_events) + len(events) <= MAX_EVENTS
                    and _size(head, [*chunk_events, *events]) < MAX_BODY_BYTES
                )
                if chunk and not fits:
                    requests.append(self._request(head, chunk, chunk_events))
                    chunk, chunk_events = [], []
                chunk.append(index)
                chunk_events.extend(events)
            if chunk:
                requests.append(self._request(head, chunk, chunk_events))
        return requests

    def _request(self, head: bytes, indexes: list[int], events: list[bytes]) -> HttpRequest:
        body = head + b",".join(events) + b"]}"
        return HttpRequest("POST", self.url, dict(self._headers), body, tuple(indexes))

    def preflight(self, request: HttpRequest) -> HttpRequest | None:
        """The ``/debug/mp/collect`` twin of a request, when validate_with_debug_endpoint.

        For the delivery layer to send (and classify) before ``request``: see the module
        docstring. The debug endpoint records nothing, so it never counts an event.
        """
        if not self.validate_with_debug_endpoint or request.url != self.url:
            return None
        return HttpRequest(
            "POST", self.debug_url, dict(request.headers), request.body, request.items
        )

    def health_request(self) -> HttpRequest | None:
        """A one-event request to ``/debug/mp/collect``: checks DNS, TLS and the endpoint.

        The debug endpoint records nothing and does not check the api_secret (sinks.md §3), so
        this proves the endpoint, not the secret; a dry run has nothing to probe.
        """
        if self.dry_run:
            return None
        body = encode({self.id_field: "health-check", "events": [{"name": "health_check"}]})
        return HttpRequest("POST", self.debug_url, dict(self._headers), body, ())

    # ---- classify ------------------------------------------------------------------------

    def classify(self, request: HttpRequest, response: HttpResponse) -> Outcome:
        """GA4's semantics: any 2xx is delivered; the debug endpoint's answer is read.

        - ``/mp/collect`` 2xx: delivered (GA4 says nothing more: invalid events were never sent).
        - ``/debug/mp/collect`` 2xx (preflight, health): no ``validationMessages`` is
          ``Delivered``; messages naming an event ("Event at index: [N]") reject those events
          (``Partial``), any other message rejects the whole request.
        - 3xx and 404: the endpoint is wrong; pause rather than dead-letter everything.
        - Other 4xx: rejected ("If you don't get a 2xx, correct errors; don't retry the same
          request", sinks.md §3); 401/403 pause, 408/429/5xx retry, 413 splits (shared table).
        """
        if 200 <= response.status < 300:
            if urlsplit(request.url).path.endswith(DEBUG_PATH):
                return _classify_validation(request, response)
            return Delivered()
        return classify_by_status(
            response, endpoint_hint=f"check sinks.ga4.endpoint: {self.endpoint}"
        )


def _size(head: bytes, events: list[bytes]) -> int:
    return len(head) + sum(len(e) for e in events) + max(len(events) - 1, 0) + 2


# At most 25 events per request: a longer number names none of them (and int() of thousands of
# digits raises).
_EVENT_AT = re.compile(r"Event at index: \[(\d{1,6})\]")


def _classify_validation(request: HttpRequest, response: HttpResponse) -> Outcome:
    answer = json_answer(response.body)
    messages = answer.get("validationMessages") if isinstance(answer, dict) else None
    if not isinstance(messages, list):
        # A 2xx that is not the debug endpoint's answer judged no event: try again later
        # rather than dead-letter events GA4 never looked at.
        return Retry(f"debug endpoint: no validationMessages in {excerpt(response.body, 200)}")
    if not messages:
        return Delivered()
    # One event per item: the event at index N of the body is the request's item N.
    rejected: dict[int, str] = {}
    whole: list[str] = []
    for message in messages:
        text = (
            f"{message.get('validationCode')}: {message.get('description')}"
            if isinstance(message, dict)
            else str(message)
        )
        description = message.get("description") if isinstance(message, dict) else None
        found = _EVENT_AT.search(description) if isinstance(description, str) else None
        if found is not None and int(found.group(1)) < len(request.items):
            position = int(found.group(1))
            rejected[position] = rejected.get(position, "GA4 validation: ") + text + "; "
        else:
            whole.append(text)
    if whole or not request.items:
        return Reject("GA4 validation: " + "; ".join(whole or [m for m in map(str, messages)]))
    return Partial(rejected={i: reason.rstrip("; ") for i, reason in rejected.items()})


def create(config: Mapping[str, Any], clock: Callable[[], float] = time.time) -> Ga4Sink:
    """The sink from its settings (``sinks.ga4``); ValueError names what is wrong."""
    settings = sink_settings(config, Ga4Settings, "ga4")
    return Ga4Sink(settings, optional_secret(settings.api_secret, "sinks.ga4.api_secret"), clock)
