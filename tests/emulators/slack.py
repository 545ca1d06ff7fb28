"""An emulator of Slack's incoming webhooks and ``chat.postMessage`` (sinks.md §5), strict.

Endpoints: ``POST /services/{T}/{B}/{secret}`` (incoming webhooks, the ``hooks`` table),
``POST /api/chat.postMessage`` and ``POST /api/auth.test`` (``/api`` so that a client's
``base_url`` is ``http://host:port/api/``, as ``https://slack.com/api/`` is). What it answers:

Incoming webhook (sinks.md §5a): errors are **plain-text** codes with an HTTP status.

- unknown webhook path: 404 ``no_service`` (⚠ status from third-party clients); the hook's
  channel deleted: 404 ``channel_not_found``; archived: 410 ``channel_is_archived``; a hook
  with ``prohibited``: 403 ``action_prohibited``;
- a body that is not a JSON object (``application/json``, or form ``payload=<json>``): 400
  ``invalid_payload``;
- neither ``text``, ``blocks`` nor ``attachments``: 400 ``no_text``; more than 100
  attachments: 400 ``too_many_attachments``; text over 40,000 characters: 400
  ``msg_too_long``; Block Kit that does not validate (below): 400 ``invalid_blocks``
  (⚠ the three statuses are not verified; 400 is the documented status of a bad message);
- success: 200 ``ok`` (text/html). ``channel``, ``username`` and icons are ignored: an app's
  webhook posts to its own channel as its own app.

chat.postMessage (sinks.md §5b): every error is HTTP 200 ``{"ok": false, "error": code}``.

- no token (``Authorization: Bearer``, or the ``token`` form field: a JSON body cannot carry
  it): ``not_authed``; an unknown token ``invalid_auth``; a revoked one ``token_revoked``;
  a deactivated one ``account_inactive``; one without ``chat:write`` ``missing_scope``;
- a body that is neither ``application/json`` nor form-urlencoded: ``invalid_form_data``;
  JSON that does not parse: ``invalid_json``; not an object: ``json_not_object``; a JSON body
  without ``charset`` is accepted with the ``missing_charset`` warning, as Slack does;
- ``channel`` (ID, ``#name`` or name) missing or unknown: ``channel_not_found``; archived:
  ``is_archived``; the bot not a member: ``not_in_channel``;
- neither text, blocks nor attachments: ``no_text``; text not a string: ``invalid_arguments``;
  over 40,000 characters: ``msg_too_long``; over 100 attachments ``too_many_attachments``;
  bad Block Kit: ``invalid_blocks``;
- success: ``{"ok": true, "channel": ID, "ts": ..., "message": {...}}``.

Block Kit (both paths): at most 50 blocks, each an object of a known ``type``; a ``header``
has a ``plain_text`` text of at most 150 characters; a ``section`` has ``text`` (at most 3,000)
and/or 1-10 ``fields`` (at most 2,000 each); a ``context`` has 1-10 elements (text objects or
images); a text object is ``{"type": "plain_text"|"mrkdwn", "text": non-empty}`` plus only
``emoji`` (plain_text) or ``verbatim`` (mrkdwn); ``block_id`` at most 255 characters.

Rate limit (both paths, sinks.md §5 [SLACK-RL]): one message per second per channel with a
short burst (``burst``); over it, HTTP 429 with an **integer** ``Retry-After`` (webhook body
``rate_limited``, API body ``{"ok": false, "error": "ratelimited"}``) and nothing posted. Only
well-formed messages to a valid channel count against it. ``clock`` is injectable.

There is no idempotency: every accepted request posts a message to the ``ledger``. Faults are
scripted per request (``script``, then ``default``): a status, an error code, a Retry-After.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

MAX_TEXT_CHARS = 40_000
MAX_ATTACHMENTS = 100
MAX_BLOCKS = 50
MAX_HEADER_CHARS = 150
MAX_SECTION_TEXT_CHARS = 3000
MAX_FIELD_CHARS = 2000
MAX_FIELDS = 10
MAX_CONTEXT_ELEMENTS = 10
MAX_BLOCK_ID_CHARS = 255
BLOCK_TYPES = frozenset(
    {
        "actions",
        "context",
        "divider",
        "file",
        "header",
        "image",
        "input",
        "markdown",
        "rich_text",
        "section",
        "video",
    }
)
HOOK_PATH = "/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"
BOT_TOKEN = "xoxb-0000-0000-emulator"


@dataclass
class Fault:
    status: int = 200
    error: str | None = None  # the code: a webhook's text body, or the API's ok:false error
    retry_after: str | None = None
    body: bytes | None = None  # verbatim body instead


@dataclass
class Channel:
    id: str
    name: str
    archived: bool = False
    member: bool = True  # the bot is in it (chat.postMessage)


@dataclass
class Hook:
    channel: str  # channel id
    prohibited: bool = False


@dataclass
class Posted:
    via: str  # "webhook" | "chat.postMessage"
    channel: str  # channel id
    ts: str
    message: dict[str, Any]  # the message as sent
    request: int  # index into SlackEmulator.requests


@dataclass
class Request:
    path: str
    status: int
    headers: dict[str, str]
    body: bytes
    answer: Any = None  # the code (webhook) or JSON answer (API)


@dataclass
class _Bucket:
    tokens: float
    updated: float


def _default_channels() -> dict[str, Channel]:
    return {"C0PRODUCT1": Channel("C0PRODUCT1", "product-insights")}


def _default_hooks() -> dict[str, Hook]:
    return {HOOK_PATH: Hook("C0PRODUCT1")}


@dataclass
class SlackEmulator:
    channels: dict[str, Channel] = field(default_factory=_default_channels)
    hooks: dict[str, Hook] = field(default_factory=_default_hooks)  # path -> hook
    tokens: set[str] = field(default_factory=lambda: {BOT_TOKEN})
    revoked: set[str] = field(default_factory=set)
    inactive: set[str] = field(default_factory=set)
    unscoped: set[str] = field(default_factory=set)  # tokens without chat:write
    rate_per_s: float = 1.0
    burst: float = 3.0
    clock: Callable[[], float] = time.monotonic
    script: list[Fault] = field(default_factory=list)
    default: Fault = field(default_factory=Fault)
    ledger: list[Posted] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _ts: int = 0

    def messages(self) -> list[dict[str, Any]]:
        return [posted.message for posted in self.ledger]

    def channel(self, ref: str) -> Channel | None:
        if ref in self.channels:
            return self.channels[ref]
        name = ref[1:] if ref.startswith("#") else ref
        for channel in self.channels.values():
            if channel.name == name:
                return channel
        return None

    # ---- HTTP ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/services/{rest:.+}", self.webhook)
        app.router.add_post("/api/chat.postMessage", self.post_message)
        app.router.add_post("/api/auth.test", self.auth_test)
        return app

    async def _record(self, request: web.Request) -> tuple[Request, bytes]:
        raw = await request.read()
        record = Request(request.path, 0, dict(request.headers), raw)
        self.requests.append(record)
        return record, raw

    def _fault(self) -> Fault | None:
        fault = self.script.pop(0) if self.script else self.default
        return None if fault.status == 200 and fault.error is None and fault.body is None else fault

    def _retry_after(self, channel: str) -> int | None:
        """None if a message may be posted to ``channel`` now (and count it), else seconds."""
        now = self.clock()
        bucket = self._buckets.get(channel)
        if bucket is None:
            bucket = self._buckets[channel] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate_per_s)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return max(1, math.ceil((1.0 - bucket.tokens) / self.rate_per_s))

    def _next_ts(self) -> str:
        self._ts += 1
        return f"1705329000.{self._ts:06d}"

    # ---- incoming webhook ----------------------------------------------------------------

    async def webhook(self, request: web.Request) -> web.Response:
        record, raw = await self._record(request)
        response = self._webhook(request, raw, record)
        record.status = response.status
        return response

    def _webhook(self, request: web.Request, raw: bytes, record: Request) -> web.Response:
        def answer(status: int, code: str, headers: dict[str, str] | None = None) -> web.Response:
            record.answer = code
            return web.Response(status=status, text=code, headers=headers, content_type="text/html")

        fault = self._fault()
        if fault is not None:
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
            if fault.body is not None:
                record.answer = fault.body
                return web.Response(status=fault.status, body=fault.body, headers=headers)
            return answer(fault.status, fault.error or "injected_fault", headers)
        hook = self.hooks.get(request.path)
        if hook is None:
            return answer(404, "no_service")
        channel = self.channels.get(hook.channel)
        if channel is None:
            return answer(404, "channel_not_found")
        if channel.archived:
            return answer(410, "channel_is_archived")
        if hook.prohibited:
            return answer(403, "action_prohibited")
        message = _decode_payload(request.content_type, raw)
        if message is None:
            return answer(400, "invalid_payload")
        problem = _message_problem(message)
        if problem is not None:
            return answer(400, problem)
        wait = self._retry_after(channel.id)
        if wait is not None:
            return answer(429, "rate_limited", {"Retry-After": str(wait)})
        self.ledger.append(
            Posted("webhook", channel.id, self._next_ts(), message, len(self.requests) - 1)
        )
        return answer(200, "ok")

    # ---- Web API -------------------------------------------------------------------------

    async def post_message(self, request: web.Request) -> web.Response:
        record, raw = await self._record(request)
        status, answer, headers = self._post_message(request, raw)
        record.status, record.answer = status, answer
        return web.json_response(answer, status=status, headers=headers)

    async def auth_test(self, request: web.Request) -> web.Response:
        record, raw = await self._record(request)
        form = _form(raw) if request.content_type == "application/x-www-form-urlencoded" else {}
        error = self._auth_error(_token(request, form), scope=None)
        answer: dict[str, Any] = (
            {"ok": False, "error": error}
            if error
            else {
                "ok": True,
                "url": "https://emulator.slack.com/",
                "team": "Emulator",
                "user": "router",
                "team_id": "T00000000",
                "user_id": "U00000000",
                "bot_id": "B00000000",
            }
        )
        record.status, record.answer = 200, answer
        return web.json_response(answer)

    def _auth_error(self, token: str | None, scope: str | None) -> str | None:
        if not token:
            return "not_authed"
        if token in self.revoked:
            return "token_revoked"
        if token in self.inactive:
            return "account_inactive"
        if token not in self.tokens and token not in self.unscoped:
            return "invalid_auth"
        if scope is not None and token in self.unscoped:
            return "missing_scope"
        return None

    def _post_message(
        self, request: web.Request, raw: bytes
    ) -> tuple[int, dict[str, Any], dict[str, str] | None]:
        def error(code: str) -> tuple[int, dict[str, Any], dict[str, str] | None]:
            return 200, {"ok": False, "error": code}, None

        fault = self._fault()
        if fault is not None:
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
            body = {"ok": False, "error": fault.error or "fatal_error"}
            if fault.body is not None:
                body = json.loads(fault.body)
            return fault.status, body, headers
        content_type = request.content_type
        warnings: list[str] = []
        form: dict[str, str] = {}
        args: Any
        if content_type == "application/x-www-form-urlencoded":
            form = _form(raw)
            args = dict(form)
        elif content_type == "application/json":
            args = None
        else:
            return error("invalid_form_data")
        token = _token(request, form)
        auth = self._auth_error(token, scope="chat:write")
        if auth is not None:
            return error(auth)
        if content_type == "application/json":
            if request.charset is None:
                warnings.append("missing_charset")
            try:
                args = json.loads(raw, parse_constant=_not_json)
            except (UnicodeDecodeError, ValueError):
                return error("invalid_json")
            if not isinstance(args, dict):
                return error("json_not_object")
        else:
            for name in ("blocks", "attachments"):
                if name in args:
                    try:
                        args[name] = json.loads(args[name])
                    except ValueError:
                        return error(f"invalid_{name}")
        ref = args.get("channel")
        channel = self.channel(ref) if isinstance(ref, str) and ref else None
        if channel is None:
            return error("channel_not_found")
        if channel.archived:
            return error("is_archived")
        if not channel.member:
            return error("not_in_channel")
        problem = _message_problem(args)
        if problem is not None:
            if problem == "invalid_payload":
                problem = "invalid_arguments"
            return error(problem)
        wait = self._retry_after(channel.id)
        if wait is not None:
            return 429, {"ok": False, "error": "ratelimited"}, {"Retry-After": str(wait)}
        ts = self._next_ts()
        message = {k: v for k, v in args.items() if k != "token"}
        self.ledger.append(
            Posted("chat.postMessage", channel.id, ts, message, len(self.requests) - 1)
        )
        posted: dict[str, Any] = {"type": "message", "user": "U00000000", "bot_id": "B00000000"}
        posted.update({k: message[k] for k in ("text", "blocks", "attachments") if k in message})
        posted["ts"] = ts
        answer: dict[str, Any] = {"ok": True, "channel": channel.id, "ts": ts, "message": posted}
        if warnings:
            answer["warning"] = ",".join(warnings)
            answer["response_metadata"] = {"warnings": warnings}
        return 200, answer, None


# ---- checks --------------------------------------------------------------------------------


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _form(raw: bytes) -> dict[str, str]:
    try:
        parsed = parse_qs(raw.decode(), keep_blank_values=True)
    except UnicodeDecodeError:
        return {}
    return {name: values[-1] for name, values in parsed.items()}


def _token(request: web.Request, form: dict[str, str]) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    return form.get("token") or None


def _decode_payload(content_type: str, raw: bytes) -> dict[str, Any] | None:
    """A webhook body: JSON, or a form with ``payload=<json>``; None if neither."""
    if content_type == "application/x-www-form-urlencoded":
        text = _form(raw).get("payload")
        if text is None:
            return None
        raw = text.encode()
    elif content_type != "application/json":
        return None
    try:
        value = json.loads(raw, parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _message_problem(message: dict[str, Any]) -> str | None:
    """The error code of a message Slack would refuse, or None."""
    text = message.get("text")
    blocks = message.get("blocks")
    attachments = message.get("attachments")
    if text is not None and not isinstance(text, str):
        return "invalid_payload"
    if not text and not blocks and not attachments:
        return "no_text"
    if text is not None and len(text) > MAX_TEXT_CHARS:
        return "msg_too_long"
    if attachments is not None:
        if not isinstance(attachments, list):
            return "invalid_attachments"
        if len(attachments) > MAX_ATTACHMENTS:
            return "too_many_attachments"
    if blocks is not None and not _blocks_ok(blocks):
        return "invalid_blocks"
    for name in ("mrkdwn", "unfurl_links", "unfurl_media", "reply_broadcast"):
        if name in message and not isinstance(message[name], bool):
            return "invalid_payload"
    for name in ("thread_ts", "username", "icon_emoji", "icon_url"):
        if name in message and not isinstance(message[name], str):
            return "invalid_payload"
    return None


def _text_ok(value: Any, limit: int, plain_only: bool = False) -> bool:
    if not isinstance(value, dict):
        return False
    kind = value.get("type")
    if kind == "plain_text":
        allowed = {"type", "text", "emoji"}
    elif kind == "mrkdwn" and not plain_only:
        allowed = {"type", "text", "verbatim"}
    else:
        return False
    text = value.get("text")
    if set(value) - allowed or not isinstance(text, str) or not 1 <= len(text) <= limit:
        return False
    flag = value.get("emoji", value.get("verbatim", False))
    return isinstance(flag, bool)


def _block_ok(block: Any) -> bool:
    if not isinstance(block, dict) or block.get("type") not in BLOCK_TYPES:
        return False
    block_id = block.get("block_id")
    if block_id is not None and (
        not isinstance(block_id, str) or len(block_id) > MAX_BLOCK_ID_CHARS
    ):
        return False
    kind = block["type"]
    if kind == "header":
        return _text_ok(block.get("text"), MAX_HEADER_CHARS, plain_only=True)
    if kind == "section":
        text, fields = block.get("text"), block.get("fields")
        if text is None and fields is None:
            return False
        if text is not None and not _text_ok(text, MAX_SECTION_TEXT_CHARS):
            return False
        return fields is None or (
            isinstance(fields, list)
            and 1 <= len(fields) <= MAX_FIELDS
            and all(_text_ok(f, MAX_FIELD_CHARS) for f in fields)
        )
    if kind == "context":
        elements = block.get("elements")
        return (
            isinstance(elements, list)
            and 1 <= len(elements) <= MAX_CONTEXT_ELEMENTS
            and all(
                (isinstance(e, dict) and e.get("type") == "image") or _text_ok(e, MAX_TEXT_CHARS)
                for e in elements
            )
        )
    if kind == "divider":
        return set(block) <= {"type", "block_id"}
    return True


def _blocks_ok(blocks: Any) -> bool:
    return (
        isinstance(blocks, list)
        and len(blocks) <= MAX_BLOCKS
        and all(_block_ok(block) for block in blocks)
    )
