"""An emulator of the GA4 Measurement Protocol (sinks.md §3), strict where the docs are.

Endpoints (``POST`` only; other methods get aiohttp's 405):

- ``/mp/collect``: **204** with an empty body for every request that arrives, as GA4 answers
  (⚠ 204 observed, [GA-204]), even when it keeps nothing. Events that break a documented rule
  are recorded in ``dropped`` (with the validation code and description the debug endpoint would
  give) and never reach the ``ledger``. A problem with a request-level field (the body, the
  client id, ``user_id``, ``timestamp_micros``, ``user_properties``, the event count) drops every
  event of the request; a problem with one event drops that event only. The query must carry
  ``api_secret`` (one of ``api_secrets`` when set) and exactly one of ``measurement_id`` (body
  id ``client_id``) or ``firebase_app_id`` (body id ``app_instance_id``), one of ``streams`` when
  set; else every event is dropped (``AUTH``, our code: GA4 gives no code for it).
- ``/debug/mp/collect``: **200** ``{"validationMessages": [...]}`` listing every problem, each
  ``{"fieldPath", "description", "validationCode"}`` with the documented codes (VALUE_INVALID,
  VALUE_REQUIRED, NAME_INVALID, NAME_RESERVED, VALUE_OUT_OF_BOUNDS, EXCEEDED_MAX_ENTITIES,
  NAME_DUPLICATED); ``[]`` for a valid request (⚠ observed). Event problems are described
  "Event at index: [N] ..." as in the documented example. It checks neither the api_secret nor
  the stream id, and records nothing in the ledger. A body that is not JSON gets VALUE_INVALID
  with fieldPath "" (⚠ GA4's answer to one is not documented).

⚠ Not documented either way, and accepted here: boolean parameter values (JSON true/false), and
unknown body fields (``consent``, ``device``... are passed over, not validated).

The rules (sinks.md §3 "Limits"): a body under 130,000 bytes (strict reading of 130 kB) of JSON
(no NaN, no duplicate keys: NAME_DUPLICATED); the body id a non-empty string; ``user_id`` a
UTF-8 string; ``validation_behavior`` RELAXED or ENFORCE_RECOMMENDATIONS when given;
``timestamp_micros`` an integer no more than 72 hours before ``now()``;
``events`` a non-empty list of at most 25 objects; event names 1-40 characters of
``[A-Za-z0-9_]`` starting with a letter, not reserved (the listed names, SDK additions included)
and without a reserved prefix (``_``, ``firebase_``, ``ga_``, ``google_``); at most 25 params,
named like events (also not ``gtag.``), valued by strings of at most 100 characters, numbers or
booleans; ``items`` a list of objects whose parameters follow the same rules, with at most 10
custom (not predefined) item parameters; at most 25 user properties, names of at most 24
characters, not reserved, values ``{"value": v}`` with strings of at most 36 characters. Names
are compared with reserved ones case-insensitively: the strict reading.

Faults are scripted per request (``script``, then ``default``) as for the Segment emulator.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

MAX_BODY_BYTES = 130_000  # "post body must be smaller than 130kB"
MAX_EVENTS = 25
MAX_PARAMS = 25
MAX_USER_PROPERTIES = 25
MAX_NAME = 40  # event and parameter names (item parameters too)
MAX_USER_PROPERTY_NAME = 24
MAX_PARAM_VALUE = 100
MAX_USER_PROPERTY_VALUE = 36
MAX_ITEM_CUSTOM_PARAMS = 10
MAX_BACKDATE_MICROS = 72 * 3600 * 1_000_000

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
RESERVED_PREFIXES = ("_", "firebase_", "ga_", "google_")
PARAM_RESERVED_PREFIXES = (*RESERVED_PREFIXES, "gtag.")
RESERVED_EVENTS = frozenset(
    [
        "ad_activeview",
        "ad_click",
        "ad_exposure",
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
        "first_open",
        "first_visit",
        "notification_dismiss",
        "notification_foreground",
        "notification_open",
        "notification_receive",
        "os_update",
        "session_start",
        "session_start_with_rollout",
        "user_engagement",
        "firebase_campaign",
        "in_app_purchase",
        "ad_impression",
        "screen_view",
    ]
)
RESERVED_USER_PROPERTIES = frozenset(
    {"first_open_time", "first_visit_time", "last_deep_link_referrer", "user_id"}
    | {"first_open_after_install"}
)
ITEM_PARAMS = frozenset(
    [
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
    ]
)


@dataclass(frozen=True)
class Message:
    field_path: str
    description: str
    code: str
    event: int | None = None  # index of the event at fault; None = the whole request

    def as_json(self) -> dict[str, str]:
        return {
            "fieldPath": self.field_path,
            "description": self.description,
            "validationCode": self.code,
        }


@dataclass
class Fault:
    status: int = 204
    retry_after: str | None = None
    body: bytes = b""


@dataclass
class Accepted:
    stream: str  # the measurement_id or firebase_app_id
    client_id: str  # client_id or app_instance_id
    user_id: str | None
    timestamp_micros: int | None
    user_properties: dict[str, Any] | None
    event: dict[str, Any]
    request: int  # index into Ga4Emulator.requests


@dataclass
class Dropped:
    code: str
    description: str
    event: Any  # the event dropped (the whole body when no event could be read)


@dataclass
class Request:
    path: str
    query: dict[str, str]
    status: int
    body: bytes
    messages: list[Message] = field(default_factory=list)


@dataclass
class Ga4Emulator:
    api_secrets: set[str] | None = None  # None: any non-empty secret
    streams: set[str] | None = None  # None: any non-empty measurement_id / firebase_app_id
    now: Callable[[], float] = time.time  # seconds since the epoch
    script: list[Fault] = field(default_factory=list)
    default: Fault = field(default_factory=Fault)
    ledger: list[Accepted] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def events(self) -> list[dict[str, Any]]:
        return [entry.event for entry in self.ledger]

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/mp/collect", self.collect)
        app.router.add_post("/debug/mp/collect", self.debug)
        return app

    # ---- HTTP ----------------------------------------------------------------------------

    def _fault(self) -> Fault:
        return self.script.pop(0) if self.script else self.default

    async def collect(self, request: web.Request) -> web.Response:
        raw = await request.read()
        record = Request(request.path, dict(request.query), 0, raw)
        self.requests.append(record)
        fault = self._fault()
        if not 200 <= fault.status < 300:
            record.status = fault.status
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            return web.Response(status=fault.status, body=fault.body, headers=headers)
        app = "firebase_app_id" in request.query
        body, messages = self.validate(raw, app)
        record.messages = messages
        auth = self._auth_problem(request.query)
        if auth is not None:
            messages = [Message("", auth, "AUTH"), *messages]
        request_level = [m for m in messages if m.event is None]
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list):
            events = []
        if request_level:
            first = request_level[0]
            self.dropped.extend(Dropped(first.code, first.description, e) for e in events)
            if not events:
                self.dropped.append(Dropped(first.code, first.description, body))
        else:
            assert isinstance(body, dict)
            by_event: dict[int, Message] = {}
            for message in messages:
                assert message.event is not None
                by_event.setdefault(message.event, message)
            stream = request.query.get("firebase_app_id" if app else "measurement_id", "")
            id_field = "app_instance_id" if app else "client_id"
            properties = body.get("user_properties")
            for index, event in enumerate(events):
                problem = by_event.get(index)
                if problem is not None:
                    self.dropped.append(Dropped(problem.code, problem.description, event))
                    continue
                self.ledger.append(
                    Accepted(
                        stream,
                        body[id_field],
                        body.get("user_id"),
                        body.get("timestamp_micros"),
                        properties,
                        event,
                        len(self.requests) - 1,
                    )
                )
        record.status = fault.status
        return web.Response(status=fault.status)

    async def debug(self, request: web.Request) -> web.Response:
        raw = await request.read()
        record = Request(request.path, dict(request.query), 200, raw)
        self.requests.append(record)
        fault = self._fault()
        if not 200 <= fault.status < 300:
            record.status = fault.status
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            return web.Response(status=fault.status, body=fault.body, headers=headers)
        _, messages = self.validate(raw, "firebase_app_id" in request.query)
        record.messages = messages
        return web.json_response({"validationMessages": [m.as_json() for m in messages]})

    def _auth_problem(self, query: Any) -> str | None:
        secret = query.get("api_secret", "")
        if not secret:
            return "api_secret is required"
        if self.api_secrets is not None and secret not in self.api_secrets:
            return "api_secret is not a secret of this stream"
        ids = [query.get(k, "") for k in ("measurement_id", "firebase_app_id") if k in query]
        if len(ids) != 1 or not ids[0]:
            return "exactly one of measurement_id or firebase_app_id is required"
        if self.streams is not None and ids[0] not in self.streams:
            return f"unknown stream {ids[0]}"
        return None

    # ---- validation ----------------------------------------------------------------------

    def validate(self, raw: bytes, app: bool) -> tuple[Any, list[Message]]:
        """The decoded body and every rule it breaks."""
        messages: list[Message] = []
        if len(raw) >= MAX_BODY_BYTES:
            messages.append(
                Message(
                    "",
                    f"Post body is {len(raw)} bytes; it must be smaller than 130kB.",
                    "VALUE_OUT_OF_BOUNDS",
                )
            )
        duplicates: list[str] = []
        try:
            body = json.loads(
                raw.decode("utf-8"),
                parse_constant=_not_json,
                object_pairs_hook=lambda pairs: _no_duplicates(pairs, duplicates),
            )
        except (UnicodeDecodeError, ValueError):
            messages.append(Message("", "Unable to parse the body as JSON.", "VALUE_INVALID"))
            return None, messages
        for name in duplicates:
            messages.append(
                Message(name, f"Field [{name}] appears more than once.", "NAME_DUPLICATED")
            )
        if not isinstance(body, dict):
            messages.append(Message("", "The body must be a JSON object.", "VALUE_INVALID"))
            return body, messages
        messages.extend(self._request_fields(body, app))
        events = body.get("events")
        if events is None or events == []:
            messages.append(Message("events", "events is required.", "VALUE_REQUIRED"))
        elif not isinstance(events, list):
            messages.append(Message("events", "events must be a list.", "VALUE_INVALID"))
        else:
            if len(events) > MAX_EVENTS:
                messages.append(
                    Message(
                        "events",
                        f"{len(events)} events; a request can have at most {MAX_EVENTS}.",
                        "EXCEEDED_MAX_ENTITIES",
                    )
                )
            for index, event in enumerate(events):
                messages.extend(_event_messages(index, event))
        return body, messages

    def _request_fields(self, body: dict[str, Any], app: bool) -> list[Message]:
        out: list[Message] = []
        id_field = "app_instance_id" if app else "client_id"
        client_id = body.get(id_field)
        if client_id is None or client_id == "":
            out.append(Message(id_field, f"{id_field} is required.", "VALUE_REQUIRED"))
        elif not isinstance(client_id, str) or not _utf8(client_id):
            out.append(Message(id_field, f"{id_field} must be a string.", "VALUE_INVALID"))
        user_id = body.get("user_id")
        if user_id is not None and (not isinstance(user_id, str) or not _utf8(user_id)):
            out.append(Message("user_id", "user_id must be a UTF-8 string.", "VALUE_INVALID"))
        stamp = body.get("timestamp_micros")
        if stamp is not None:
            if isinstance(stamp, bool) or not isinstance(stamp, int):
                out.append(
                    Message(
                        "timestamp_micros",
                        "timestamp_micros must be an integer number of microseconds.",
                        "VALUE_INVALID",
                    )
                )
            elif int(self.now() * 1_000_000) - stamp > MAX_BACKDATE_MICROS:
                out.append(
                    Message(
                        "timestamp_micros",
                        f"timestamp_micros [{stamp}] is more than 72 hours in the past.",
                        "VALUE_OUT_OF_BOUNDS",
                    )
                )
        behavior = body.get("validation_behavior")
        if behavior is not None and behavior not in ("RELAXED", "ENFORCE_RECOMMENDATIONS"):
            out.append(
                Message(
                    "validation_behavior",
                    "validation_behavior must be RELAXED or ENFORCE_RECOMMENDATIONS.",
                    "VALUE_INVALID",
                )
            )
        properties = body.get("user_properties")
        if properties is not None:
            out.extend(_user_property_messages(properties))
        return out


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]], duplicates: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            duplicates.append(key)
        out[key] = value
    return out


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _name_messages(
    name: Any,
    limit: int,
    where: str,
    what: str,
    prefixes: tuple[str, ...],
    reserved: frozenset[str] = frozenset(),
    event: int | None = None,
) -> list[Message]:
    """NAME_INVALID / NAME_RESERVED for a name, described as GA4's example describes one."""
    if not isinstance(name, str) or not name:
        return [Message(where, f"{what} has no name.", "VALUE_REQUIRED", event)]
    if len(name) > limit:
        return [
            Message(
                where,
                f"{what} has invalid name [{name}]. Names must be at most {limit} characters.",
                "NAME_INVALID",
                event,
            )
        ]
    if NAME.fullmatch(name) is None:
        return [
            Message(
                where,
                f"{what} has invalid name [{name}]. Names must start with an alphabetic "
                "character and contain only alphanumeric characters and underscores.",
                "NAME_INVALID",
                event,
            )
        ]
    lowered = name.lower()
    if lowered.startswith(prefixes):
        return [
            Message(
                where, f"{what} has name [{name}] with a reserved prefix.", "NAME_RESERVED", event
            )
        ]
    if lowered in reserved:
        return [Message(where, f"{what} has reserved name [{name}].", "NAME_RESERVED", event)]
    return []


def _value_messages(
    value: Any, limit: int, where: str, what: str, event: int | None = None
) -> list[Message]:
    if isinstance(value, str):
        if len(value) > limit:
            return [
                Message(
                    where,
                    f"{what} has a value longer than {limit} characters.",
                    "VALUE_OUT_OF_BOUNDS",
                    event,
                )
            ]
        if not _utf8(value):
            return [
                Message(where, f"{what} has a value that is not UTF-8.", "VALUE_INVALID", event)
            ]
        return []
    if isinstance(value, bool | int) or (isinstance(value, float) and math.isfinite(value)):
        return []
    return [Message(where, f"{what} must be a string or a number.", "VALUE_INVALID", event)]


def _event_messages(index: int, event: Any) -> list[Message]:
    at = f"Event at index: [{index}]"
    if not isinstance(event, dict):
        return [Message("events", f"{at} is not an object.", "VALUE_INVALID", index)]
    out = _name_messages(
        event.get("name"), MAX_NAME, "events", at, RESERVED_PREFIXES, RESERVED_EVENTS, index
    )
    params = event.get("params")
    if params is None:
        return out
    if not isinstance(params, dict):
        return [
            *out,
            Message(
                "events.params", f"{at} has params that are not an object.", "VALUE_INVALID", index
            ),
        ]
    if len(params) > MAX_PARAMS:
        out.append(
            Message(
                "events.params",
                f"{at} has {len(params)} params; at most {MAX_PARAMS} are allowed.",
                "EXCEEDED_MAX_ENTITIES",
                index,
            )
        )
    for key, value in params.items():
        what = f"{at} param [{key}]"
        out.extend(
            _name_messages(
                key, MAX_NAME, "events.params", what, PARAM_RESERVED_PREFIXES, event=index
            )
        )
        if key == "items":
            out.extend(_items_messages(value, at, index))
        else:
            out.extend(_value_messages(value, MAX_PARAM_VALUE, "events.params", what, index))
    return out


def _items_messages(items: Any, at: str, index: int) -> list[Message]:
    where = "events.params.items"
    if not isinstance(items, list):
        return [Message(where, f"{at} has items that are not a list.", "VALUE_INVALID", index)]
    out: list[Message] = []
    for position, item in enumerate(items):
        what = f"{at} item [{position}]"
        if not isinstance(item, dict):
            out.append(Message(where, f"{what} is not an object.", "VALUE_INVALID", index))
            continue
        custom = [key for key in item if key not in ITEM_PARAMS]
        if len(custom) > MAX_ITEM_CUSTOM_PARAMS:
            out.append(
                Message(
                    where,
                    f"{what} has {len(custom)} custom item params; at most "
                    f"{MAX_ITEM_CUSTOM_PARAMS} are allowed.",
                    "EXCEEDED_MAX_ENTITIES",
                    index,
                )
            )
        for key, value in item.items():
            out.extend(
                _name_messages(
                    key,
                    MAX_NAME,
                    where,
                    f"{what} param [{key}]",
                    PARAM_RESERVED_PREFIXES,
                    event=index,
                )
            )
            out.extend(
                _value_messages(value, MAX_PARAM_VALUE, where, f"{what} param [{key}]", index)
            )
    return out


def _user_property_messages(properties: Any) -> list[Message]:
    where = "user_properties"
    if not isinstance(properties, dict):
        return [Message(where, "user_properties must be an object.", "VALUE_INVALID")]
    out: list[Message] = []
    if len(properties) > MAX_USER_PROPERTIES:
        out.append(
            Message(
                where,
                f"{len(properties)} user properties; at most {MAX_USER_PROPERTIES} are allowed.",
                "EXCEEDED_MAX_ENTITIES",
            )
        )
    for key, holder in properties.items():
        what = f"User property [{key}]"
        out.extend(
            _name_messages(
                key,
                MAX_USER_PROPERTY_NAME,
                where,
                what,
                RESERVED_PREFIXES,
                RESERVED_USER_PROPERTIES,
            )
        )
        if not isinstance(holder, dict) or "value" not in holder:
            out.append(Message(where, f'{what} must be {{"value": ...}}.', "VALUE_INVALID"))
            continue
        out.extend(_value_messages(holder["value"], MAX_USER_PROPERTY_VALUE, where, what))
    return out
