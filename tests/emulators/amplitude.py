"""An emulator of Amplitude's HTTP V2 API and Batch Event Upload API (shared/contracts/sinks.md §4).

``POST /2/httpapi`` and ``POST /batch`` take ``{"api_key", "events", "options"}`` and answer as
the contract says, never more leniently:

- request checks, in order: path (400 ``Invalid request path``), empty body (400 ``Missing
  request body``), size (V2 >= 1,000,000 bytes, Batch > 20,000,000 -> 413 ``Payload too large``),
  JSON (400 ``Invalid JSON request body``), ``api_key``/``events`` present (400 ``Request missing
  required field`` with ``missing_field``), event count (V2 >= 2,000, Batch > 2,000 -> 413), key
  known (400 ``Invalid API key: <the key>``: Amplitude echoes the key, as reported in
  github.com/amplitude/Amplitude-Swift issue 260 and Amplitude-Kotlin issue 215; also what a key
  of the other data centre, US or EU, gets);
- per event (any failure: 400, nothing ingested): ``event_type`` present and not reserved, ids
  not in the invalid list, ids shorter than ``options.min_id_length`` (default 5) removed and an
  event left without one refused, ``time`` an integer of milliseconds, ``insert_id`` a string;
  ``events_with_invalid_fields`` / ``events_with_missing_fields`` give ``{field: [indexes]}``;
- silenced devices (``silenced``): 400 ``Events silenced for device_id`` with ``silenced_events``;
- throttling: a user or device over ``eps_threshold`` events/s (V2 30, averaged over
  ``v2_window_s``; Batch 1,000 averaged over 30 s) gets 429 with ``throttled_users`` /
  ``throttled_devices`` / ``throttled_events`` and stays throttled for 30 s (V2); Batch only: a
  user or device past ``daily_quota`` events in a rolling 24 h -> 429 with
  ``exceeded_daily_quota_users`` / ``_devices``. A 429 ingests nothing;
- dedup: an event whose ``insert_id`` was seen on the same device (device_id, else one derived
  from user_id) within 7 days is answered 200 and not stored again.

Accepted events go to ``ledger``. Faults are scripted per request as in tests/fakes/destination.py
(``script`` then ``default``). The clock is injectable (``clock``) so tests can move time.

⚠ Not in the contract and chosen here: an empty ``events`` list answered as a missing field;
the missing-id field name (``user_id``); a reserved event name as an invalid ``event_type``;
``events_ingested`` counting every event of an accepted request (the contract leaves open whether
duplicates count); the throttle window (``v2_window_s``, 1 s: "averaged" over an unstated span).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from tests.emulators import cut_strings

V2_PATH = "/2/httpapi"
BATCH_PATH = "/batch"
V2_MAX_BYTES = 1_000_000  # "< 1 MB": 1,000,000 bytes and more is too large
V2_MAX_EVENTS = 2_000  # "< 2,000 events"
BATCH_MAX_BYTES = 20_000_000  # "≤ 20 MB"
BATCH_MAX_EVENTS = 2_000  # "≤ 2,000 events/batch"
DEDUP_S = 7 * 24 * 3600
DAY_S = 24 * 3600
THROTTLE_PAUSE_S = 30.0

INVALID_IDS = frozenset(
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
RESERVED_EVENTS = frozenset(
    {
        "[Amplitude] Start Session",
        "[Amplitude] End Session",
        "[Amplitude] Revenue",
        "[Amplitude] Revenue (Verified)",
        "[Amplitude] Revenue (Unverified)",
        "[Amplitude] Merged User",
    }
)


@dataclass
class Fault:
    status: int = 200
    body: bytes | None = None  # None: the contract's body for the status
    hang_s: float = 0.0
    reset: bool = False


@dataclass(frozen=True)
class Ingested:
    api: str  # "v2" or "batch"
    insert_id: str | None
    user_id: str | None
    device_id: str
    event_type: str
    time: int | None
    event: dict[str, Any]
    at: float


@dataclass(frozen=True)
class Api:
    name: str
    bytes_too_many: Callable[[int], bool]
    events_too_many: Callable[[int], bool]
    eps_threshold: int
    window_s: float
    pause_s: float  # how long a throttled id stays throttled
    daily_quota: bool


def _bad_id(value: Any) -> bool:
    return not isinstance(value, str) or value.strip().lower() in INVALID_IDS


def _derived_device(user_id: str) -> str:
    return "derived-" + hashlib.sha256(user_id.encode()).hexdigest()[:32]


@dataclass
class AmplitudeEmulator:
    api_keys: set[str] = field(default_factory=lambda: {"test-amplitude-api-key"})
    script: list[Fault] = field(default_factory=list)
    default: Fault | None = None
    silenced: set[str] = field(default_factory=set)  # device ids
    v2_eps: int = 30
    v2_window_s: float = 1.0
    batch_eps: int = 1000
    batch_window_s: float = 30.0
    daily_quota: int = 500_000
    clock: Callable[[], float] = time.time
    ledger: list[Ingested] = field(default_factory=list)
    requests: list[tuple[str, int, int]] = field(default_factory=list)  # (path, status, events)
    duplicates: int = 0
    _seen: dict[tuple[str, str, str], float] = field(default_factory=dict)  # (app, device, id)
    _recent: dict[tuple[str, str], deque[float]] = field(default_factory=lambda: defaultdict(deque))
    _throttled_until: dict[tuple[str, str], float] = field(default_factory=dict)

    def apis(self) -> dict[str, Api]:
        return {
            V2_PATH: Api(
                "v2",
                lambda n: n >= V2_MAX_BYTES,
                lambda n: n >= V2_MAX_EVENTS,
                self.v2_eps,
                self.v2_window_s,
                THROTTLE_PAUSE_S,
                daily_quota=False,
            ),
            BATCH_PATH: Api(
                "batch",
                lambda n: n > BATCH_MAX_BYTES,
                lambda n: n > BATCH_MAX_EVENTS,
                self.batch_eps,
                self.batch_window_s,
                0.0,
                daily_quota=True,
            ),
        }

    def inserted_ids(self) -> list[str | None]:
        return [entry.insert_id for entry in self.ledger]

    # ---- HTTP ---------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        fault = self.script.pop(0) if self.script else self.default
        body = await request.read()
        if fault is not None:
            if fault.hang_s:
                await asyncio.sleep(fault.hang_s)
            if fault.reset:
                assert request.transport is not None
                request.transport.abort()
                self.requests.append((request.path, 0, 0))
                return web.Response(status=500)
            if fault.status != 200:
                self.requests.append((request.path, fault.status, 0))
                answer = fault.body or _default_body(fault.status)
                return web.Response(
                    status=fault.status, body=answer, content_type="application/json"
                )
        api = self.apis().get(request.path) if request.method == "POST" else None
        if api is None:
            status, answer = 400, {"code": 400, "error": "Invalid request path"}
        else:
            status, answer = self.answer(api, body)
        self.requests.append((request.path, status, len(answer.get("_events", ()))))
        answer.pop("_events", None)
        return web.json_response(answer, status=status)

    def answer(self, api: Api, body: bytes) -> tuple[int, dict[str, Any]]:
        """The status and JSON body Amplitude gives ``body`` on ``api``; ingests if accepted."""
        if not body:
            return 400, {"code": 400, "error": "Missing request body"}
        if api.bytes_too_many(len(body)):
            return 413, {"code": 413, "error": "Payload too large"}
        try:
            data = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return 400, {"code": 400, "error": "Invalid JSON request body"}
        if not isinstance(data, dict):
            return 400, {"code": 400, "error": "Invalid JSON request body"}
        for required in ("api_key", "events"):
            if data.get(required) in (None, "", []):
                return 400, {
                    "code": 400,
                    "error": "Request missing required field",
                    "missing_field": required,
                }
        events = data["events"]
        api_key = data["api_key"]
        options = data.get("options", {})
        if not isinstance(events, list) or not isinstance(api_key, str):
            return 400, {"code": 400, "error": "Invalid JSON request body"}
        if not isinstance(options, dict):
            return 400, {"code": 400, "error": "Invalid JSON request body"}
        if api.events_too_many(len(events)):
            return 413, {"code": 413, "error": "Payload too large"}
        if api_key not in self.api_keys:
            return 400, {"code": 400, "error": f"Invalid API key: {api_key}"}
        min_id = options.get("min_id_length", 5)
        if isinstance(min_id, bool) or not isinstance(min_id, int) or min_id < 1:
            return 400, {"code": 400, "error": "Invalid JSON request body"}

        invalid: dict[str, list[int]] = defaultdict(list)
        missing: dict[str, list[int]] = defaultdict(list)
        cleaned: list[dict[str, Any]] = []
        for index, raw in enumerate(events):
            if not isinstance(raw, dict):
                return 400, {"code": 400, "error": "Invalid event JSON"}
            event = dict(raw)
            event_type = event.get("event_type")
            if event_type is None or event_type == "":
                missing["event_type"].append(index)
            elif not isinstance(event_type, str) or event_type in RESERVED_EVENTS:
                invalid["event_type"].append(index)
            for name in ("user_id", "device_id"):
                if name not in event or event[name] is None:
                    event.pop(name, None)
                elif _bad_id(event[name]):
                    invalid[name].append(index)
                elif len(event[name]) < min_id or (
                    name == "device_id" and set(event[name]) <= {"0", "-"}
                ):
                    event.pop(name)  # too short or all zeros: removed, not refused
            if (
                "user_id" not in event
                and "device_id" not in event
                and index not in {i for indexes in invalid.values() for i in indexes}
            ):
                missing["user_id"].append(index)
            if "time" in event:
                value = event["time"]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    invalid["time"].append(index)
            if "insert_id" in event and not isinstance(event["insert_id"], str):
                invalid["insert_id"].append(index)
            cleaned.append(event)
        if invalid or missing:
            answer: dict[str, Any] = {
                "code": 400,
                "error": "Invalid field values on some events"
                if invalid
                else "Request missing required field",
            }
            if invalid:
                answer["events_with_invalid_fields"] = dict(invalid)
            if missing:
                answer["events_with_missing_fields"] = dict(missing)
            return 400, answer

        silenced_events = [
            i for i, event in enumerate(cleaned) if event.get("device_id") in self.silenced
        ]
        if silenced_events:
            return 400, {
                "code": 400,
                "error": "Events silenced for device_id",
                "eps_threshold": api.eps_threshold,
                "exceeded_daily_quota_devices": {},
                "silenced_devices": sorted(self.silenced),
                "silenced_events": silenced_events,
                "throttled_devices": {},
                "throttled_events": [],
            }

        now = self.clock()
        throttled = self._throttle(api, cleaned, now)
        if throttled is not None:
            return 429, throttled

        for event in cleaned:
            device = event.get("device_id") or _derived_device(event["user_id"])
            for id_key in self._ids(api, event):
                self._recent[id_key].append(now)
            insert_id = event.get("insert_id")
            if insert_id is not None:
                # "same insert_id on the same device_id within 7 days (per app)": an app is an
                # API key here.
                dedup_key = (api_key, device, insert_id)
                seen = self._seen.get(dedup_key)
                if seen is not None and now - seen < DEDUP_S:
                    self.duplicates += 1
                    continue
                self._seen[dedup_key] = now
            event = _within_limits(event)
            self.ledger.append(
                Ingested(
                    api.name,
                    insert_id,
                    event.get("user_id"),
                    device,
                    event["event_type"],
                    event.get("time"),
                    event,
                    now,
                )
            )
        return 200, {
            "code": 200,
            "events_ingested": len(cleaned),
            "payload_size_bytes": len(body),
            "server_upload_time": int(now * 1000),
            "_events": cleaned,
        }

    # ---- throttling ---------------------------------------------------------------------------

    @staticmethod
    def _ids(api: Api, event: dict[str, Any]) -> list[tuple[str, str]]:
        ids = []
        if "user_id" in event:
            ids.append((f"{api.name}:user", event["user_id"]))
        if "device_id" in event:
            ids.append((f"{api.name}:device", event["device_id"]))
        return ids

    def _throttle(
        self, api: Api, events: list[dict[str, Any]], now: float
    ) -> dict[str, Any] | None:
        incoming: dict[tuple[str, str], int] = defaultdict(int)
        for event in events:
            for id_key in self._ids(api, event):
                incoming[id_key] += 1
        over_rate: dict[tuple[str, str], float] = {}
        over_quota: dict[tuple[str, str], int] = {}
        for id_key, count in incoming.items():
            recent = self._recent[id_key]
            while recent and now - recent[0] >= DAY_S:
                recent.popleft()
            in_window = sum(1 for t in recent if now - t < api.window_s) + count
            eps = in_window / api.window_s
            if eps > api.eps_threshold or self._throttled_until.get(id_key, 0.0) > now:
                over_rate[id_key] = round(eps, 2)
                if api.pause_s:
                    self._throttled_until[id_key] = max(
                        self._throttled_until.get(id_key, 0.0), now + api.pause_s
                    )
            if api.daily_quota and len(recent) + count > self.daily_quota:
                over_quota[id_key] = len(recent) + count
        blocked = set(over_rate) | set(over_quota)
        if not blocked:
            return None
        throttled_events = [
            i for i, event in enumerate(events) if set(self._ids(api, event)) & blocked
        ]
        answer: dict[str, Any] = {
            "code": 429,
            "error": "Too many requests for some devices and users",
            "eps_threshold": api.eps_threshold,
            "throttled_devices": {k[1]: v for k, v in over_rate.items() if k[0].endswith("device")},
            "throttled_users": {k[1]: v for k, v in over_rate.items() if k[0].endswith("user")},
            "throttled_events": throttled_events,
        }
        if api.daily_quota:
            answer["exceeded_daily_quota_users"] = {
                k[1]: v for k, v in over_quota.items() if k[0].endswith("user")
            }
            answer["exceeded_daily_quota_devices"] = {
                k[1]: v for k, v in over_quota.items() if k[0].endswith("device")
            }
        return answer

    def app(self) -> web.Application:
        app = web.Application(client_max_size=BATCH_MAX_BYTES + 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


def _default_body(status: int) -> bytes:
    errors = {
        400: "Invalid JSON request body",
        403: "Forbidden",
        413: "Payload too large",
        429: "Too many requests for some devices and users",
    }
    answer: dict[str, Any] = {"code": status, "error": errors.get(status, "Internal server error")}
    if status == 429:  # the contract's whole shape, not just its first two keys
        answer |= {
            "eps_threshold": 30,
            "throttled_devices": {},
            "throttled_users": {},
            "throttled_events": [],
        }
    return msgspec.json.encode(answer)


# "All string values <= 1024 chars; ... groups <= 5 types / 10 values (extra ignored)."
MAX_STRING = 1024
MAX_GROUP_TYPES = 5
MAX_GROUP_VALUES = 10


def _within_limits(event: dict[str, Any]) -> dict[str, Any]:
    """The event as stored: longer strings cut at 1,024 characters, extra groups ignored.

    Stored, not refused: the contract names limits without a refusal, so what exceeds them is
    not what the project keeps (a test comparing what arrived sees the cut).
    """
    stored: dict[str, Any] = cut_strings(event, MAX_STRING)
    groups = stored.get("groups")
    if isinstance(groups, dict):
        stored["groups"] = {
            name: values[:MAX_GROUP_VALUES] if isinstance(values, list) else values
            for name, values in list(groups.items())[:MAX_GROUP_TYPES]
        }
    return stored
