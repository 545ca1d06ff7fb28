"""The canonical event envelope and the decoders for the three Pendo ingest shapes.

Everything that enters the router becomes one :class:`Event`, whatever it arrived as:

- the dotted webhook shape (``event_type`` = ``guide.viewed``..., ISO ``timestamp``, fields under
  ``data``);
- Pendo's URL-webhook shape (``event`` = ``guideDisplayed``..., ``uniqueId``, ``timestamp`` in
  seconds);
- Track-API events (``type: "track"``, ``timestamp`` in milliseconds), one object or an array.

Field names are normalised (``guideId`` and ``guide_id`` both become ``properties.guide_id``) so
that one rule matches an event whichever shape Pendo used; the exact bytes received are kept in
``raw``. The event id is Pendo's ``uniqueId`` where present, otherwise a hash of the decoded
content in a canonical encoding, so a re-sent event keeps its id even if it was re-serialised.
"""

from __future__ import annotations

import hashlib
import math
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal

import msgspec

from router.errors import validation_error_parts

NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]

SOURCE_WEBHOOK: Final = "webhook"
SOURCE_TRACK: Final = "track"

#: Canonical event types. A Pendo kind that maps to none of these is typed ``unknown`` and keeps
#: Pendo's own name in ``Event.name``: accepted, never refused.
EVENT_TYPES: Final = frozenset(
    {
        "guide.viewed",
        "guide.advanced",
        "guide.dismissed",
        "guide.completed",
        "guide.snoozed",
        "poll.viewed",
        "poll.response",
        "nps.viewed",
        "nps.response",
        "track.event",
        "page.viewed",
        "feature.clicked",
        "visitor.created",
        "account.created",
        "orchestrate.unsubscribed",
    }
)
UNKNOWN_TYPE: Final = "unknown"

# Pendo URL-webhook `event` values (and the Segment-type webhook names for the same events).
URL_EVENT_TYPES: Final[dict[str, str]] = {
    "guideDisplayed": "guide.viewed",
    "guideSeen": "guide.viewed",
    "guideAdvanced": "guide.advanced",
    "guideDismissed": "guide.dismissed",
    "guideSnoozed": "guide.snoozed",
    "pollDisplayed": "poll.viewed",
    "pollSeen": "poll.viewed",
    "pollSubmitted": "poll.response",
    "npsDisplayed": "nps.viewed",
    "NPSSeen": "nps.viewed",
    "npsSubmitted": "nps.response",
    "NPSSubmitted": "nps.response",
    "trackEventReceived": "track.event",
    "visitorCreated": "visitor.created",
    "accountCreated": "account.created",
    "featureClicked": "feature.clicked",
    "pageLoaded": "page.viewed",
}

# camelCase property names of the URL shape -> the names the dotted shape uses.
_URL_PROPERTY_NAMES: Final[dict[str, str]] = {
    "guideId": "guide_id",
    "guideStepId": "step_id",
    "pollId": "poll_id",
    "pollResponse": "response",
    "reason": "comment",
}

# From here on an epoch number is milliseconds, below it seconds (URL-webhook timestamps, and
# every time a rule maps, as docs/rules.md says): 1e11 s is the year 5138 while 1e11 ms is 1973,
# so the two units cannot be confused for any real event time.
MS_THRESHOLD: Final = 100_000_000_000
# 9999-12-31T23:59:59.999Z in ms: the last instant a datetime holds. Larger values are refused
# with a schema error rather than overflowing into a 500.
_MAX_MS: Final = 253_402_300_799_999
_MIN_MS: Final = -62_135_596_800_000  # 0001-01-01T00:00:00Z
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)


class Event(msgspec.Struct, kw_only=True):
    """The canonical envelope; the Kafka record value is this, JSON-encoded.

    Not ``forbid_unknown_fields``: this is our own schema, read by our own consumers, which must
    tolerate fields added by a newer ingest during a rolling upgrade.
    """

    id: str
    source: str
    type: str
    name: str
    visitor_id: str | None = None
    account_id: str | None = None
    properties: dict[str, Any] = msgspec.field(default_factory=dict)
    context: dict[str, Any] = msgspec.field(default_factory=dict)
    #: Event time and receive time: integer milliseconds since the Unix epoch (UTC).
    timestamp: int
    received_at: int
    raw: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))

    def partition_key(self) -> bytes:
        """Kafka key: per-visitor order within a partition (account, then id, when no visitor)."""
        return (self.visitor_id or self.account_id or self.id).encode()


# ---- external schemas (Pendo's); unknown fields are refused with their path -------------------


class DottedWebhook(msgspec.Struct, forbid_unknown_fields=True):
    event_type: NonEmptyStr
    timestamp: datetime
    data: dict[str, Any]


class UrlWebhook(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    event: NonEmptyStr
    timestamp: (
        Annotated[float, msgspec.Meta(ge=0, le=_MAX_MS)]
        | Annotated[int, msgspec.Meta(ge=0, le=_MAX_MS)]
    )
    visitorId: str | None = None
    accountId: str | None = None
    uniqueId: NonEmptyStr | None = None
    properties: dict[str, Any] = msgspec.field(default_factory=dict)
    app: dict[str, Any] | None = None
    subscription: dict[str, Any] | None = None
    userAgent: str | None = None


class TrackEvent(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    type: Literal["track"]
    event: NonEmptyStr
    visitorId: NonEmptyStr
    timestamp: Annotated[int, msgspec.Meta(ge=0, le=_MAX_MS)]
    # Pendo's Track API requires `context`, even if empty.
    context: dict[str, Any]
    accountId: str | None = None
    properties: dict[str, Any] = msgspec.field(default_factory=dict)


class _WebhookProbe(msgspec.Struct):
    """Reads only the two discriminating keys, to pick the webhook shape."""

    event_type: Any = None
    event: Any = None


class PayloadError(Exception):
    """A request body that cannot become events: ``status`` 400 (not JSON) or 422 (schema)."""

    def __init__(self, status: int, code: str, message: str, path: str = "$") -> None:
        super().__init__(f"{path}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.path = path

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, "path": self.path}


# Built once: msgspec's typed decoders and encoders are compiled per type.
_probe_decoder = msgspec.json.Decoder(_WebhookProbe)
_dotted_decoder = msgspec.json.Decoder(DottedWebhook)
_url_decoder = msgspec.json.Decoder(UrlWebhook)
_track_decoder = msgspec.json.Decoder(TrackEvent)
_track_list_decoder = msgspec.json.Decoder(list[TrackEvent])
_raw_list_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_canonical_encoder = msgspec.json.Encoder(order="sorted")
_event_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(Event)


def encode_event(event: Event) -> bytes:
    return _event_encoder.encode(event)


def decode_event(data: bytes) -> Event:
    return _event_decoder.decode(data)


def content_id(shape: bytes, decoded: msgspec.Struct) -> str:
    """A deterministic id from the decoded content: key order and spacing do not change it."""
    return hashlib.sha256(shape + _canonical_encoder.encode(decoded)).hexdigest()[:40]


def _schema_error(exc: msgspec.ValidationError, prefix: str = "$") -> PayloadError:
    message, path = validation_error_parts(exc, prefix)
    return PayloadError(422, "invalid_event", message, path)


def _malformed(exc: msgspec.DecodeError) -> PayloadError:
    return PayloadError(400, "malformed_json", str(exc))


def _utc(value: datetime, path: str) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # 0001-01-01T00:00+01:00 is a valid RFC 3339 string but has no UTC datetime.
        raise PayloadError(422, "invalid_event", "Datetime out of range in UTC", path) from None


def _epoch_ms(value: float) -> int:
    """A URL-webhook timestamp (seconds, or milliseconds from 1e11 on) as integer milliseconds."""
    if value >= MS_THRESHOLD:
        return int(value)
    return round(value * 1000)


def datetime_ms(value: datetime) -> int:
    return (value - EPOCH) // _ONE_MS


def rule_datetime(value: Any, field: str) -> datetime:
    """A time a rule mapped, as an aware datetime; ``ValueError`` naming ``field`` otherwise.

    Accepted: a datetime (naive is UTC), ISO 8601 text, or an epoch number (seconds, or
    milliseconds from :data:`MS_THRESHOLD` on). Each sink then applies its API's own range.
    """
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{field}: {value!r} is not a time")
        try:
            if value >= MS_THRESHOLD:
                return EPOCH + timedelta(milliseconds=value)
            return EPOCH + timedelta(seconds=value)
        except OverflowError:
            raise ValueError(f"{field}: {value!r} is out of the date-time range") from None
    if isinstance(value, str):
        try:
            when = msgspec.convert(value, datetime)
        except msgspec.ValidationError:
            raise ValueError(f"{field}: {value!r} is not an ISO 8601 date-time") from None
        return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    raise ValueError(f"{field}: expected a date-time, got {type(value).__name__}")


def rule_time_ms(value: Any, field: str) -> int:
    """:func:`rule_datetime` as integer milliseconds since the epoch (no datetime for numbers)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{field}: {value!r} is not a time")
        ms = value if value >= MS_THRESHOLD else value * 1000
        if not _MIN_MS <= ms <= _MAX_MS:  # also -1e306 s, whose ms are -inf
            raise ValueError(f"{field}: {value!r} is out of the date-time range")
        return math.floor(ms)
    return datetime_ms(rule_datetime(value, field))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _optional_id(data: dict[str, Any], key: str, path: str) -> str | None:
    value = data.get(key)
    if value is None or isinstance(value, str):
        return value or None
    raise PayloadError(422, "invalid_event", f"Expected str, got {type(value).__name__}", path)


# ---- webhooks ----------------------------------------------------------------------------------


def _check_bytes(body: bytes) -> None:
    """Refuse a body that is not UTF-8 (RFC 8259 8.1) before any decoder reads it.

    msgspec checks the strings it decodes, but not those inside Raw values (the Track maps),
    whose bytes would reach Kafka unchecked and fail every consumer's decode.
    """
    if not body.isascii():
        try:
            body.decode()
        except UnicodeDecodeError as exc:
            raise PayloadError(
                400, "malformed_json", f"Invalid UTF-8 at byte {exc.start} of the body", "$"
            ) from None


def _too_deep() -> PayloadError:
    # msgspec decodes recursively: JSON nested ~1,000 deep (2 KB) exhausts the recursion limit.
    return PayloadError(422, "invalid_event", "JSON nested too deeply to read", "$")


def decode_webhook(body: bytes, received_at: int) -> Event:
    """Decode one Pendo webhook body (either webhook shape) into the canonical event."""
    _check_bytes(body)
    try:
        return _decode_webhook(body, received_at)
    except RecursionError:
        raise _too_deep() from None


def _decode_webhook(body: bytes, received_at: int) -> Event:
    try:
        probe = _probe_decoder.decode(body)
    except msgspec.ValidationError:
        raise PayloadError(
            422, "invalid_event", "Expected a JSON object (one webhook event)", "$"
        ) from None
    except msgspec.DecodeError as exc:
        raise _malformed(exc) from None
    try:
        if probe.event_type is not None:
            return _from_dotted(_dotted_decoder.decode(body), body, received_at)
        if probe.event is not None:
            return _from_url(_url_decoder.decode(body), body, received_at)
    except msgspec.ValidationError as exc:
        raise _schema_error(exc) from None
    raise PayloadError(
        422,
        "invalid_event",
        "Object missing required field event_type (dotted webhook) or event (URL webhook)",
        "$",
    )


def _from_dotted(hook: DottedWebhook, body: bytes, received_at: int) -> Event:
    data = hook.data
    visitor_id = _optional_id(data, "visitor_id", "$.data.visitor_id")
    account_id = _optional_id(data, "account_id", "$.data.account_id")
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise PayloadError(422, "invalid_event", "Expected object", "$.data.metadata")
    event_type = hook.event_type if hook.event_type in EVENT_TYPES else UNKNOWN_TYPE
    properties = {
        k: v for k, v in data.items() if k not in ("visitor_id", "account_id", "metadata")
    }
    name = hook.event_type
    if event_type == "track.event":
        track_name = properties.pop("event", None)
        if not isinstance(track_name, str) or not track_name:
            raise PayloadError(
                422,
                "invalid_event",
                "Expected a non-empty str (the track event name)",
                "$.data.event",
            )
        inner = properties.pop("properties", None)
        inner = {} if inner is None else inner
        if not isinstance(inner, dict):
            raise PayloadError(422, "invalid_event", "Expected object", "$.data.properties")
        name = track_name
        properties = {**properties, **inner}
    return Event(
        id=content_id(b"pendo-webhook-dotted\0", hook),
        source=SOURCE_WEBHOOK,
        type=event_type,
        name=name,
        visitor_id=visitor_id,
        account_id=account_id,
        properties=properties,
        context=dict(metadata) if metadata else {},
        timestamp=datetime_ms(_utc(hook.timestamp, "$.timestamp")),
        received_at=received_at,
        raw=msgspec.Raw(body.strip()),
    )


def _from_url(hook: UrlWebhook, body: bytes, received_at: int) -> Event:
    event_type = URL_EVENT_TYPES.get(hook.event, UNKNOWN_TYPE)
    source_props = hook.properties
    properties: dict[str, Any] = {}
    context: dict[str, Any] = {}
    name = hook.event
    if event_type == "track.event":
        track_name = source_props.get("name")
        if not isinstance(track_name, str) or not track_name:
            raise PayloadError(
                422,
                "invalid_event",
                "Expected a non-empty str (the track event name)",
                "$.properties.name",
            )
        name = track_name
        inner = source_props.get("eventProperties")
        inner = {} if inner is None else inner
        if not isinstance(inner, dict):
            raise PayloadError(
                422, "invalid_event", "Expected object", "$.properties.eventProperties"
            )
        properties.update(inner)
        for key, value in source_props.items():
            if key not in ("name", "eventProperties"):
                context[key] = value
    else:
        for key, value in source_props.items():
            if key == "guideProperties" and isinstance(value, dict):
                _guide_properties(value, source_props.get("guideStepId"), properties)
            else:
                properties[_URL_PROPERTY_NAMES.get(key, key)] = value
    if hook.app is not None:
        context["app"] = hook.app
    if hook.subscription is not None:
        context["subscription"] = hook.subscription
    if hook.userAgent is not None:
        context["user_agent"] = hook.userAgent
    return Event(
        id=hook.uniqueId or content_id(b"pendo-webhook-url\0", hook),
        source=SOURCE_WEBHOOK,
        type=event_type,
        name=name,
        visitor_id=hook.visitorId or None,
        account_id=hook.accountId or None,
        properties=properties,
        context=context,
        timestamp=_epoch_ms(hook.timestamp),
        received_at=received_at,
        raw=msgspec.Raw(body.strip()),
    )


def _guide_properties(guide: dict[str, Any], step_id: Any, out: dict[str, Any]) -> None:
    name = guide.get("name")
    if name is not None:
        out["guide_name"] = name
    steps = guide.get("steps")
    if step_id is not None and isinstance(steps, list):
        for index, step in enumerate(steps):
            if isinstance(step, dict) and step.get("id") == step_id:
                out["step_index"] = index
                break


# ---- Track API -------------------------------------------------------------------------------


class _TrackWire(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The Track-API schema, with the free-form maps left as raw JSON.

    The ingest never looks inside ``properties`` or ``context``; copying their bytes instead of
    building Python dicts halves the per-event cost of a batch.
    """

    type: Literal["track"]
    event: NonEmptyStr
    visitorId: NonEmptyStr
    timestamp: Annotated[int, msgspec.Meta(ge=0, le=_MAX_MS)]
    context: msgspec.Raw
    accountId: str | None = None
    properties: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"{}"))


class _TrackRecord(msgspec.Struct):
    """Encodes exactly as :class:`Event` does, with the maps passed through as raw JSON."""

    id: str
    source: str
    type: str
    name: str
    visitor_id: str
    account_id: str | None
    properties: msgspec.Raw
    context: msgspec.Raw
    timestamp: int
    received_at: int
    raw: msgspec.Raw


class Record(msgspec.Struct, frozen=True, gc=False):
    """One Kafka record: the event id, key, value (the encoded canonical event) and headers.

    A Struct without GC tracking: built once per event on the ingest's hot path, where a
    NamedTuple cost five times as much.
    """

    id: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


_track_wire_decoder = msgspec.json.Decoder(_TrackWire)
_track_wire_list_decoder = msgspec.json.Decoder(list[_TrackWire])
_record_encoder = msgspec.json.Encoder()
_TRACK_ID_PREFIX: Final = b"pendo-track\0"
_TRACK_SOURCE_HEADER: Final = ("source", b"track")
_TRACK_TYPE_HEADER: Final = ("type", b"track.event")
_OPEN_BRACE: Final = ord("{")


def track_id(raw: msgspec.Raw | bytes) -> str:
    """A Track event's id: SHA-256 of its exact bytes, so a re-sent event keeps its id.

    Unlike webhooks (hashed over a canonical re-encoding), a Track event re-serialised with other
    key order or spacing gets a new id: hashing the bytes avoids a second encoding per event.
    """
    digest = hashlib.sha256(_TRACK_ID_PREFIX)
    digest.update(raw)
    return digest.hexdigest()[:40]


def to_record(event: Event) -> Record:
    return Record(
        event.id,
        event.partition_key(),
        _event_encoder.encode(event),
        [
            ("event_id", event.id.encode()),
            ("source", event.source.encode()),
            ("type", event.type.encode()),
        ],
    )


def _split_track(
    body: bytes, max_events: int, one: msgspec.json.Decoder[Any], many: msgspec.json.Decoder[Any]
) -> tuple[list[Any], list[msgspec.Raw], str]:
    """The decoded events, each one's exact bytes, and the JSON path prefix of the first."""
    _check_bytes(body)
    start = body.lstrip()[:1]
    try:
        if start == b"[":
            # Two passes over the bytes are cheaper than one decode per item: the Raw slices keep
            # each event's exact bytes, the typed pass validates all events at C speed.
            raws = _raw_list_decoder.decode(body)
            if not raws:
                raise PayloadError(422, "empty_batch", "The array holds no events", "$")
            if len(raws) > max_events:
                raise PayloadError(
                    413,
                    "too_many_events",
                    f"The array holds {len(raws)} events; the limit is {max_events}",
                    "$",
                )
            return many.decode(body), raws, "array"
        if start == b"{":
            return [one.decode(body)], [msgspec.Raw(body.strip())], "object"
    except msgspec.DecodeError as exc:
        if isinstance(exc, msgspec.ValidationError):
            raise _schema_error(exc) from None
        raise _malformed(exc) from None
    except RecursionError:
        raise _too_deep() from None
    try:
        msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise _malformed(exc) from None
    except RecursionError:
        raise _too_deep() from None
    raise PayloadError(422, "invalid_event", "Expected a JSON object or an array of objects", "$")


# Digits as "0", "E" as "e", "+" dropped: see _may_hold_unreadable_numbers.
_NUMBER_SHAPES: Final = bytes.maketrans(b"123456789E", b"000000000e")


def _may_hold_unreadable_numbers(body: bytes) -> bool:
    """Whether the body may hold a number no decoder of ours reads back (cheap, over-approximate).

    The Raw maps of a Track event are checked for JSON syntax only; an integer of over 4,300
    digits or a float past 1.8e308 (309 digits, or an exponent of 3 digits) would go to Kafka
    and fail every consumer. One translate and two searches cost ~1 us per event, a tenth of
    what decoding the maps would; a hit (or a false one, like "file123") takes the full decode.
    """
    shapes = body.translate(_NUMBER_SHAPES, b"+")
    return b"e000" in shapes or b"0" * 309 in shapes


def track_records(body: bytes, received_at: int, max_events: int) -> list[Record]:
    """The ingest's fast path: a Track-API body straight to Kafka records."""
    tracks, raws, shape = _split_track(
        body, max_events, _track_wire_decoder, _track_wire_list_decoder
    )
    if _may_hold_unreadable_numbers(body):
        _split_track(body, max_events, _track_decoder, _track_list_decoder)  # raises with a path
    records: list[Record] = []
    encode = _record_encoder.encode
    for index, (track, raw) in enumerate(zip(tracks, raws, strict=True)):
        context, properties = track.context, track.properties
        # Raw fields are not type-checked by msgspec: both must be JSON objects. A Raw value is
        # never empty and starts at its first significant byte.
        if memoryview(context)[0] != _OPEN_BRACE or memoryview(properties)[0] != _OPEN_BRACE:
            name = "context" if memoryview(context)[0] != _OPEN_BRACE else "properties"
            prefix = f"$[{index}]" if shape == "array" else "$"
            raise PayloadError(422, "invalid_event", "Expected object", f"{prefix}.{name}")
        event_id = track_id(raw)
        visitor = track.visitorId
        records.append(
            Record(
                event_id,
                visitor.encode(),
                encode(
                    _TrackRecord(
                        event_id,
                        SOURCE_TRACK,
                        "track.event",
                        track.event,
                        visitor,
                        track.accountId or None,
                        properties,
                        context,
                        track.timestamp,
                        received_at,
                        raw,
                    )
                ),
                [("event_id", event_id.encode()), _TRACK_SOURCE_HEADER, _TRACK_TYPE_HEADER],
            )
        )
    return records


def decode_track(body: bytes, received_at: int, max_events: int) -> list[Event]:
    """Decode a Track-API body into canonical events (for rule tests and tools).

    Same validation, ids and values as :func:`track_records`, with the maps as Python dicts.
    """
    tracks, raws, _ = _split_track(body, max_events, _track_decoder, _track_list_decoder)
    return [
        Event(
            id=track_id(raw),
            source=SOURCE_TRACK,
            type="track.event",
            name=track.event,
            visitor_id=track.visitorId,
            account_id=track.accountId or None,
            properties=track.properties,
            context=track.context,
            timestamp=track.timestamp,
            received_at=received_at,
            raw=raw,
        )
        for track, raw in zip(tracks, raws, strict=True)
    ]
