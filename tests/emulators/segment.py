"""An emulator of Segment's HTTP Tracking API (sinks.md §1), strict where the docs are.

Endpoints: ``POST /v1/batch`` and the single calls ``POST /v1/{track,identify,page,screen,group,
alias}``. What it answers, and why (sinks.md section 1 unless noted):

- ``Content-Type`` other than ``application/json``, a body that is not JSON (or not an object,
  or a batch that is not a list), a body over 500 KB (500,000 bytes, the strict reading), or any
  message over 32 KB (``len(json.dumps(message))`` > 32,768, the library's own measure): **400**
  and nothing of the request is accepted. The error body is ``{"code": ..., "message": ...}``,
  the only error shape segment-analytics-python parses (⚠ codes are ours, not documented).
- Everything else: **200** ``{"success": true}`` (⚠ body observed, not documented), even for
  messages Segment then drops. Dropped messages are listed in ``dropped`` with the reason (what
  Segment's Debugger would show) and never reach the ledger: more than 2,500 in a batch (the
  excess), no write key (neither ``writeKey`` in the body nor HTTP Basic; ⚠ the status for this
  is not documented, the general rule gives 200), a write key not in ``write_keys`` (when set),
  a missing or unknown ``type``, neither ``userId`` nor ``anonymousId`` (``no_user_anon_id``),
  a track without ``event``, a group without ``groupId``, an alias without ``previousId``, a
  ``messageId`` that is not a string under 100 characters, a ``timestamp`` that is not ISO-8601.
- Top-level ``context`` and ``integrations`` of a batch are merged into each message (the
  message's own keys win). A message without ``messageId`` gets one (the API assigns it).
- Dedup on ``messageId`` alone, across write keys: a repeated id is answered 200 like any other
  but counted in ``duplicates``, not stored twice.
- Faults are scripted per request (``script``, then ``default``) as in tests/fakes/destination.py:
  a status with an optional ``Retry-After`` (429 also carries ``X-RateLimit-Reset``).
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiohttp import web

MAX_MESSAGE_BYTES = 32 << 10  # segment-analytics-python consumer.py MAX_MSG_SIZE
MAX_BODY_BYTES = 500_000
MAX_BATCH_EVENTS = 2500
MAX_MESSAGE_ID_CHARS = 99  # "must be < 100 chars"
TYPES = ("track", "identify", "page", "screen", "group", "alias")


@dataclass
class Fault:
    status: int = 200
    retry_after: str | None = None
    body: bytes | None = None  # default: {"code": ..., "message": ...}


@dataclass
class Accepted:
    message_id: str
    write_key: str
    message: dict[str, Any]
    request: int  # index into SegmentEmulator.requests


@dataclass
class Request:
    path: str
    status: int
    headers: dict[str, str]
    body: Any  # the decoded JSON body (None when it was not JSON)


@dataclass
class SegmentEmulator:
    write_keys: set[str] | None = None  # None: any non-empty key is a source's key
    script: list[Fault] = field(default_factory=list)
    default: Fault = field(default_factory=Fault)
    ledger: dict[str, Accepted] = field(default_factory=dict)  # messageId -> first copy
    duplicates: list[str] = field(default_factory=list)
    dropped: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (reason, message)
    requests: list[Request] = field(default_factory=list)

    def messages(self) -> list[dict[str, Any]]:
        return [entry.message for entry in self.ledger.values()]

    # ---- HTTP ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        # Room for bodies over the limit, so the handler (not aiohttp) answers them as Segment does.
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/batch", self.handle)
        for kind in TYPES:
            app.router.add_post(f"/v1/{kind}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()  # aiohttp has already undone Content-Encoding: gzip
        index = len(self.requests)
        record = Request(request.path, 0, dict(request.headers), None)
        self.requests.append(record)
        response = self._answer(request, raw, index, record)
        record.status = response.status
        return response

    def _answer(
        self, request: web.Request, raw: bytes, index: int, record: Request
    ) -> web.Response:
        fault = self.script.pop(0) if self.script else self.default
        if fault.status != 200:
            headers = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = fault.retry_after
                if fault.status == 429:
                    headers["X-RateLimit-Reset"] = fault.retry_after
            body = fault.body
            if body is None:
                body = _error_body("injected", f"injected fault {fault.status}")
            return web.Response(
                status=fault.status, body=body, headers=headers, content_type="application/json"
            )
        if request.content_type != "application/json":
            return _bad_request("invalid_request", "Content-Type must be application/json")
        single = request.path != "/v1/batch"
        limit = MAX_MESSAGE_BYTES if single else MAX_BODY_BYTES
        if len(raw) > limit:
            return _bad_request("request_too_large", f"body is {len(raw)} bytes, limit {limit}")
        try:
            body = json.loads(raw, parse_constant=_not_json)  # NaN, Infinity: not JSON
        except (UnicodeDecodeError, ValueError):
            return _bad_request("invalid_json", "the body is not valid JSON")
        record.body = body
        if not isinstance(body, dict):
            return _bad_request("invalid_json", "the body must be a JSON object")
        if single:
            messages: list[Any] = [{**body, "type": request.path.rsplit("/", 1)[1]}]
        else:
            batch = body.get("batch")
            if not isinstance(batch, list):
                return _bad_request("invalid_json", "batch must be a list of messages")
            messages = batch
        for message in messages:
            size = len(json.dumps(message).encode())
            if size > MAX_MESSAGE_BYTES:
                return _bad_request(
                    "message_too_large", f"a message is {size} bytes, limit {MAX_MESSAGE_BYTES}"
                )
        write_key = _write_key(body, request.headers.get("Authorization", ""))
        key_problem = None
        if not write_key:
            key_problem = "no_write_key"
        elif self.write_keys is not None and write_key not in self.write_keys:
            key_problem = "invalid_write_key"
        for position, message in enumerate(messages):
            if not isinstance(message, dict):
                self.dropped.append(("invalid_message", {"value": message}))
                continue
            if position >= MAX_BATCH_EVENTS:
                self.dropped.append(("too_many_events", message))
                continue
            merged = self._merge(body, message) if not single else dict(message)
            problem = key_problem or _message_problem(merged)
            if problem is not None:
                self.dropped.append((problem, merged))
                continue
            message_id = merged.setdefault("messageId", str(uuid.uuid4()))
            if message_id in self.ledger:
                self.duplicates.append(message_id)
                continue
            self.ledger[message_id] = Accepted(message_id, write_key, merged, index)
        return web.json_response({"success": True})

    @staticmethod
    def _merge(body: dict[str, Any], message: dict[str, Any]) -> dict[str, Any]:
        merged = dict(message)
        for name in ("context", "integrations"):
            top = body.get(name)
            if isinstance(top, dict):
                own = merged.get(name)
                merged[name] = {**top, **own} if isinstance(own, dict) else dict(top)
        return merged


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"code": code, "message": message}).encode()


def _bad_request(code: str, message: str) -> web.Response:
    return web.Response(
        status=400, body=_error_body(code, message), content_type="application/json"
    )


def _write_key(body: dict[str, Any], authorization: str) -> str:
    """``writeKey`` in the body, else the user of HTTP Basic (``base64("<key>:")``)."""
    in_body = body.get("writeKey")
    if isinstance(in_body, str) and in_body:
        return in_body
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "basic" or not token:
        return ""
    try:
        decoded = base64.b64decode(token, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return ""
    user, colon, _password = decoded.partition(":")
    return user if colon else ""


def _nonempty_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return (isinstance(value, str) and value != "") or isinstance(value, (int, float))


def _message_problem(message: dict[str, Any]) -> str | None:
    kind = message.get("type")
    if not isinstance(kind, str) or not kind:
        return "missing_type"
    if kind not in TYPES:
        return "invalid_type"
    if not (_nonempty_id(message.get("userId")) or _nonempty_id(message.get("anonymousId"))):
        return "no_user_anon_id"
    if kind == "track" and not (isinstance(message.get("event"), str) and message["event"]):
        return "missing_event"
    if kind == "group" and not _nonempty_id(message.get("groupId")):
        return "missing_group_id"
    if kind == "alias" and not _nonempty_id(message.get("previousId")):
        return "missing_previous_id"
    message_id = message.get("messageId")
    if message_id is not None and (
        not isinstance(message_id, str) or not message_id or len(message_id) > MAX_MESSAGE_ID_CHARS
    ):
        return "invalid_message_id"
    timestamp = message.get("timestamp")
    if timestamp is not None:
        if not isinstance(timestamp, str):
            return "invalid_timestamp"
        try:
            datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
        except ValueError:
            return "invalid_timestamp"
    for name in ("properties", "traits", "context", "integrations"):
        if name in message and message[name] is not None and not isinstance(message[name], dict):
            return f"invalid_{name}"
    return None
