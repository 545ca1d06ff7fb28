"""A local Mixpanel ingestion API: ``POST /import``, per shared/contracts/sinks.md section 2a.

Strict mode (``strict=1``, JSON array or NDJSON, optionally gzip) validates every record and
answers exactly Mixpanel's documented bodies: 200 ``num_records_imported``; 400 with
``failed_records`` where valid records **are** ingested (a partial success); 401, 413, 429.
The body limit is the conservative 2 MB (2,097,152 bytes) and applies to the uncompressed size
even when gzipped; at most 2,000 events per request.

Requests the official Python library sends (form-encoded ``data=<json>&verbose=1&ip=0``, section
2a ⚠ and 7b) get the legacy verbose answer ``{"status": 1, "error": null}`` (or ``status: 0``
with the first validation message), the same validation applied.

Ingested events go to ``received`` (every copy, like raw export) and ``events`` (deduplicated
on (event, distinct_id, time in ms, $insert_id), the latest copy kept, as queries show them).
Faults are scripted per request (``script``, consumed in order, then ``default``) as in
tests/fakes/destination.py, and per ``$insert_id`` (``poison``: field and message to fail with).
The server clock (``now``, epoch seconds) is injectable for the "1 hour in the future" rule.

Where the sources say nothing (the exact messages of checks other than ``properties.time``, the
answer to more than 2,000 events, float times, blacklist case), the emulator takes the stricter
reading: an emulator more lenient than the real API would hide bugs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import msgspec
from aiohttp import web

from tests.emulators import cut_strings

BODY_LIMIT = 2_097_152  # bytes, uncompressed (the OpenAPI and 413 example)
MAX_EVENTS = 2000
MAX_EVENT_BYTES = 1_000_000  # "smaller than 1MB" (10^6, the stricter reading)
MAX_KEYS = 255  # "fewer than 255" properties / keys / elements
MAX_DEPTH = 3
MIN_TIME_S = 31_536_000  # 1971-01-01T00:00:00Z
MS_THRESHOLD = 100_000_000_000  # a time from here up is milliseconds (⚠ Mixpanel's rule unstated)
FUTURE_S = 3600

BLACKLIST = frozenset(
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
_INSERT_ID = re.compile(r"[A-Za-z0-9-]+")

OK_STATUS = "OK"
BODIES: dict[int, dict[str, Any]] = {
    401: {"code": 401, "error": "Invalid credentials", "status": "Unauthorized"},
    413: {
        "code": 413,
        "error": f"request exceeds max limit of {BODY_LIMIT} bytes",
        "status": "Request Entity Too Large",
    },
    429: {
        "code": 429,
        "error": "Project exceeded rate limits. Please retry the request with exponential backoff.",
        "status": "Too Many Requests",
    },
    500: {"code": 500, "error": "Internal Server Error", "status": "Internal Server Error"},
    502: {"code": 502, "error": "Bad Gateway", "status": "Bad Gateway"},
    503: {"code": 503, "error": "Service Unavailable", "status": "Service Unavailable"},
}
PARTIAL_ERROR = "some data points in the request failed validation"


@dataclass
class Fault:
    status: int | None = None  # None: behave normally
    retry_after: str | None = None
    hang_s: float = 0.0
    reset: bool = False
    body: bytes | None = None  # None: Mixpanel's body for that status


@dataclass
class Failure:
    index: int
    insert_id: str
    field: str
    message: str

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "insert_id": self.insert_id,
            "field": self.field,
            "message": self.message,
        }


class BadRequest(Exception):
    """The request as a whole is refused with a 400 (not per record)."""


@dataclass
class MixpanelEmulator:
    project_id: str = "123456"
    username: str = "sa-user.123.mp-service-account"
    secret: str = "sa-secret"
    token: str = "project-token"
    api_secret: str | None = None  # legacy Basic "<api_secret>:" (deprecated, the SDK's fallback)
    now: Callable[[], float] = time.time
    script: list[Fault] = field(default_factory=list)
    default: Fault = field(default_factory=Fault)
    poison: dict[str, tuple[str, str]] = field(default_factory=dict)  # $insert_id -> field, msg
    received: list[dict[str, Any]] = field(default_factory=list)
    events: dict[tuple[str, str, int, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[int, int, str]] = field(default_factory=list)  # status, records, mode

    # ---- HTTP ------------------------------------------------------------------------------

    def app(self) -> web.Application:
        # Large enough that the emulator, not aiohttp, answers an oversized body with 413.
        # auto_decompress off: the emulator decodes gzip itself, to measure and refuse as Mixpanel.
        app = web.Application(
            client_max_size=64 * 1024 * 1024, handler_args={"auto_decompress": False}
        )
        app.router.add_post("/import", self.handle_import)
        return app

    async def handle_import(self, request: web.Request) -> web.StreamResponse:
        fault = self.script.pop(0) if self.script else self.default
        raw = await request.read()
        if fault.hang_s:
            await asyncio.sleep(fault.hang_s)
        if fault.reset:
            assert request.transport is not None
            request.transport.abort()
            self.requests.append((0, 0, "reset"))
            return web.Response(status=500)
        if fault.status is not None:
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            body = fault.body or msgspec.json.encode(
                BODIES.get(fault.status, {"code": fault.status, "error": "injected"})
            )
            self.requests.append((fault.status, 0, "fault"))
            return web.Response(
                status=fault.status, body=body, headers=headers, content_type="application/json"
            )
        if not self.authorized(request):
            return self._answer(401, BODIES[401], "auth")
        try:
            body = self._decompress(raw, request.headers.get("Content-Encoding", ""))
        except _TooLarge:
            return self._answer(413, BODIES[413], "size")
        except BadRequest as exc:
            return self._bad_request(str(exc))
        if len(body) > BODY_LIMIT:
            return self._answer(413, BODIES[413], "size")
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type == "application/x-www-form-urlencoded":
            return self._legacy(body)
        try:
            records = self._records(body, content_type)
        except BadRequest as exc:
            return self._bad_request(str(exc))
        strict = request.query.get("strict") == "1"
        failures = self.ingest(records)
        imported = len(records) - len({f.index for f in failures})
        if failures and strict:
            answer = {
                "code": 400,
                "error": PARTIAL_ERROR,
                "status": "Bad Request",
                "num_records_imported": imported,
                "failed_records": [f.as_json() for f in failures],
            }
            return self._answer(400, answer, "strict", len(records))
        # Without strict=1 invalid records are dropped silently (⚠ inferred from the docs).
        answer = {"code": 200, "num_records_imported": imported, "status": OK_STATUS}
        return self._answer(200, answer, "strict" if strict else "lenient", len(records))

    def _answer(self, status: int, body: dict[str, Any], mode: str, count: int = 0) -> web.Response:
        self.requests.append((status, count, mode))
        return web.Response(
            status=status, body=msgspec.json.encode(body), content_type="application/json"
        )

    def _bad_request(self, error: str) -> web.Response:
        return self._answer(400, {"code": 400, "error": error, "status": "Bad Request"}, "bad")

    def authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        project_id = request.query.get("project_id")
        if project_id is not None:  # service account
            return (user, password, project_id) == (self.username, self.secret, self.project_id)
        if password == "" and user == self.token:  # project token, no project_id
            return True
        return self.api_secret is not None and (user, password) == (self.api_secret, "")

    @staticmethod
    def _decompress(raw: bytes, encoding: str) -> bytes:
        encoding = encoding.strip().lower()
        if encoding in ("", "identity"):
            return raw
        if encoding != "gzip":
            raise BadRequest(f"unsupported Content-Encoding {encoding!r}")
        # Every gzip member counts: the limit is on the uncompressed size of the whole body.
        body = b""
        rest = raw
        while rest:
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            try:
                body += inflater.decompress(rest, BODY_LIMIT + 1 - len(body))
            except zlib.error as exc:
                raise BadRequest(f"invalid gzip body: {exc}") from None
            if len(body) > BODY_LIMIT:
                raise _TooLarge
            if not inflater.eof:
                if inflater.unconsumed_tail:  # stopped at the limit with more to come
                    raise _TooLarge
                raise BadRequest("invalid gzip body: truncated")
            rest = inflater.unused_data
        return body

    @staticmethod
    def _records(body: bytes, content_type: str) -> list[msgspec.Raw]:
        if content_type == "application/json":
            try:
                records = msgspec.json.decode(body, type=list[msgspec.Raw])
            except msgspec.DecodeError as exc:
                raise BadRequest(f"unable to parse request body as a JSON array: {exc}") from None
        elif content_type == "application/x-ndjson":
            lines = [line for line in body.split(b"\n") if line.strip()]
            records = [msgspec.Raw(line.strip()) for line in lines]
        else:
            raise BadRequest("Content-Type must be application/json or application/x-ndjson")
        if not records:
            raise BadRequest("request body must contain at least one event")
        if len(records) > MAX_EVENTS:
            raise BadRequest(f"request contains {len(records)} events; the limit is {MAX_EVENTS}")
        return records

    def _legacy(self, body: bytes) -> web.Response:
        """The form-encoded mode of the Python library: verbose ``{"status", "error"}``."""
        form = parse_qs(body.decode("utf-8", "replace"))
        verbose = form.get("verbose", ["0"])[0] == "1"
        data = form.get("data", [""])[0].encode()
        try:
            decoded = msgspec.json.decode(data)
            if isinstance(decoded, dict):
                records = [msgspec.Raw(data)]
            else:
                records = msgspec.json.decode(data, type=list[msgspec.Raw])
        except msgspec.DecodeError:
            return self._legacy_answer(verbose, "data, missing or empty")
        if not records or len(records) > MAX_EVENTS:
            return self._legacy_answer(verbose, f"between 1 and {MAX_EVENTS} events per request")
        failures = self.ingest(records)
        return self._legacy_answer(verbose, failures[0].message if failures else None, len(records))

    def _legacy_answer(self, verbose: bool, error: str | None, count: int = 0) -> web.Response:
        status = 1 if error is None else 0
        self.requests.append((200, count, "form"))
        if verbose:
            return web.Response(
                body=msgspec.json.encode({"error": error, "status": status}),
                content_type="application/json",
            )
        return web.Response(text=str(status), content_type="text/plain")

    # ---- validation and ledger -------------------------------------------------------------

    def ingest(self, records: list[msgspec.Raw]) -> list[Failure]:
        """Validate each record; store the valid ones; return the failures."""
        failures: list[Failure] = []
        for index, raw in enumerate(records):
            failure = self.validate(index, raw)
            if failure is not None:
                failures.append(failure)
                continue
            event = cut_strings(msgspec.json.decode(raw), MAX_STRING)
            properties = event["properties"]
            self.received.append(event)
            key = (
                event["event"],
                properties["distinct_id"],
                _ms(properties["time"]),
                properties["$insert_id"],
            )
            self.events.pop(key, None)  # the latest ingested copy is the one shown
            self.events[key] = event
        return failures

    def validate(self, index: int, raw: msgspec.Raw) -> Failure | None:
        def fail(field_name: str, why: str) -> Failure:
            return Failure(index, insert_id, field_name, f"'{field_name}' is invalid: {why}")

        insert_id = ""
        try:
            event = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return Failure(index, "", "event", "event is not valid JSON")
        if not isinstance(event, dict):
            return Failure(index, "", "event", "'event' is invalid: must be a JSON object")
        properties = event.get("properties")
        if isinstance(properties, dict) and isinstance(properties.get("$insert_id"), str):
            insert_id = properties["$insert_id"]
        if len(raw) >= MAX_EVENT_BYTES:
            return fail("event", f"event must be smaller than {MAX_EVENT_BYTES} bytes")
        name = event.get("event")
        if not isinstance(name, str) or not name:
            return fail("event", "must be a non-empty string")
        if not isinstance(properties, dict):
            return fail("properties", "must be a JSON object")
        if len(properties) >= MAX_KEYS:
            return fail("properties", f"must have fewer than {MAX_KEYS} properties")
        when = properties.get("time")
        if isinstance(when, bool) or not isinstance(when, int):
            # Floats: ⚠ unconfirmed, refused (the OpenAPI types time as integer).
            return fail("properties.time", "must be specified as seconds since epoch")
        seconds = when / 1000 if when >= MS_THRESHOLD else when
        if seconds < MIN_TIME_S:
            return fail("properties.time", "must be after 1971-01-01")
        if seconds > self.now() + FUTURE_S:
            return fail("properties.time", "must not be more than 1 hour in the future")
        distinct_id = properties.get("distinct_id")
        if not isinstance(distinct_id, str):
            return fail("properties.distinct_id", "must be a string")
        if distinct_id.strip().lower() in BLACKLIST:
            return fail("properties.distinct_id", f"{distinct_id!r} is not allowed")
        if "$insert_id" not in properties:
            return fail("properties.$insert_id", "is required")
        if not isinstance(properties["$insert_id"], str):
            return fail("properties.$insert_id", "must be a string")
        if len(insert_id.encode()) > 36 or not _INSERT_ID.fullmatch(insert_id):
            return fail(
                "properties.$insert_id",
                "must be at most 36 bytes of alphanumeric characters or '-'",
            )
        if insert_id.strip().lower() in BLACKLIST:
            return fail("properties.$insert_id", f"{insert_id!r} is not allowed")
        nested = _nesting_problem(properties)
        if nested is not None:
            return fail(*nested)
        if insert_id in self.poison:
            field_name, message = self.poison[insert_id]
            return Failure(index, insert_id, field_name, message)
        return None

    # ---- views -----------------------------------------------------------------------------

    def insert_ids(self) -> list[str]:
        """$insert_ids of the deduplicated events, in ingestion order."""
        return [key[3] for key in self.events]


class _TooLarge(Exception):
    pass


def _ms(value: int) -> int:
    return value if value >= MS_THRESHOLD else value * 1000


def _nesting_problem(properties: dict[str, Any]) -> tuple[str, str] | None:
    """Objects < 255 keys, arrays < 255 elements, nesting depth at most 3.

    The depth counts ``properties`` itself as level 1 (the stricter of the readings of "max
    nesting depth is 3"): ``properties.a.b`` may be an object, ``properties.a.b.c`` may not.
    """
    stack: list[tuple[str, Any, int]] = [(f"properties.{k}", v, 2) for k, v in properties.items()]
    while stack:
        path, value, depth = stack.pop()
        if isinstance(value, dict):
            children = [(f"{path}.{k}", v) for k, v in value.items()]
            what = "keys"
        elif isinstance(value, list):
            children = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
            what = "elements"
        else:
            continue
        if depth > MAX_DEPTH:
            return path, f"max nesting depth is {MAX_DEPTH}"
        if len(children) >= MAX_KEYS:
            return path, f"must have fewer than {MAX_KEYS} {what}"
        stack.extend((p, v, depth + 1) for p, v in children)
    return None


#: "strings are truncated to 255 chars" (contract §2a): what Mixpanel keeps is cut there.
MAX_STRING = 255
