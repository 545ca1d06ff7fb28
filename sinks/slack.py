"""Slack sink: one message per routed event, by incoming webhook or by ``chat.postMessage``.

Each rule output of kind ``message`` (``text`` and/or Block Kit ``blocks``, optionally
``channel``, ``thread_ts``, ``username``, ...) becomes one Slack message and one HTTP request
(``max_events`` is 1). Two transports (sinks.md §5):

- **Incoming webhook** (``webhook_url``, a secret): ``POST`` the JSON message to the webhook URL.
  The webhook decides the channel, name and icon (Slack app webhooks cannot override them), so
  ``channel``, ``username``, ``icon_emoji`` and ``icon_url`` are left out of the body. Success is
  HTTP 200 (body ``ok``); errors are plain-text codes with an HTTP status (400
  ``invalid_payload``, 403 ``action_prohibited``, 404 ``channel_not_found``, 410
  ``channel_is_archived``, ...). Every message shares one rate-limit key (one channel).
- **chat.postMessage** (``bot_token``, a secret, and ``channel``, the default channel): ``POST
  {endpoint}/chat.postMessage`` with ``Authorization: Bearer <token>`` and a JSON body. The
  channel is the rule's ``channel``, else the default; it is the rate-limit key
  (``Prepared.key``). Slack answers HTTP 200 with ``{"ok": true, ...}`` or ``{"ok": false,
  "error": "<code>"}``.

Outcomes (both transports): ``invalid_payload``, ``no_text``, ``too_many_attachments``,
``msg_too_long``, ``invalid_blocks`` and other message faults are dead-lettered (Reject);
``channel_not_found``, ``channel_is_archived``/``is_archived``, ``not_in_channel``,
``invalid_auth``, ``not_authed``, ``token_revoked``, ``account_inactive``, ``no_permission``,
``missing_scope``, a removed webhook (``no_service``) and the like pause the sink: they are
configuration problems (alert, don't drop), and the events wait. HTTP 429 (or ``rate_limited``)
and 5xx are retried, never sooner than the integer ``Retry-After``. The delivery layer keeps to
Slack's 1 message per second per channel with a short burst (``per_key_rate_per_s``), and a 429's
``Retry-After`` holds that channel's bucket, so queued messages to it wait too.

Settings (``sinks.slack``): ``webhook_url`` (a secret: a string, ``{env: NAME}`` or ``{file:
PATH}``), or ``bot_token`` (a secret) with ``channel`` (the default channel) and ``endpoint``
(default ``https://slack.com/api``). Giving both credentials is an error; giving neither makes
the sink a dry run (requests are logged, not sent). The webhook URL and the token are never put
in a log, a repr or an error message; :meth:`SlackSink.secrets` lists every form they take on
the wire, for redaction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec

from router.delivery.retry import parse_retry_after
from router.delivery.sink import (
    Delivered,
    HttpRequest,
    HttpResponse,
    Outcome,
    Pause,
    Prepared,
    Reject,
    Retry,
    SinkLimits,
    excerpt,
    json_answer,
    optional_secret,
    sink_settings,
)
from router.events import Event
from router.rules.engine import Routed
from router.rules.outputs import FieldSpec, OutputKind, SinkOutputs, all_of, max_len, nonempty
from router.settings import Secret

# ref: https://api.slack.com/methods/chat.postMessage


def _slack_blocks(value: Any) -> str | None:
    if isinstance(value, list):
        if len(value) > 50:
            return f"{len(value)} blocks; Slack allows 50 per message"
        for index, block in enumerate(value):
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                return f"block {index} must be an object with a type"
    return None


OUTPUTS = SinkOutputs(
    "slack",
    {
        "message": OutputKind(
            "message",
            {
                "text": FieldSpec("string", all_of(nonempty, max_len(40_000))),
                "blocks": FieldSpec("list", _slack_blocks),
                "channel": FieldSpec("string", nonempty),
                "username": FieldSpec("string"),
                "icon_emoji": FieldSpec("string"),
                "icon_url": FieldSpec("string"),
                "thread_ts": FieldSpec("string"),
                "mrkdwn": FieldSpec("boolean"),
                "unfurl_links": FieldSpec("boolean"),
                "unfurl_media": FieldSpec("boolean"),
            },
            (("text", "blocks"),),
        )
    },
)

DEFAULT_ENDPOINT: Final = "https://slack.com/api"
POST_MESSAGE: Final = "/chat.postMessage"
AUTH_TEST: Final = "/auth.test"
#: The rate-limit key of every webhook message: a webhook posts to one channel.
WEBHOOK_KEY: Final = "webhook"

#: The message fields sent, in this order (the rule output's other keys are not Slack's).
_FIELDS: Final = (
    "channel",
    "text",
    "blocks",
    "thread_ts",
    "mrkdwn",
    "unfurl_links",
    "unfurl_media",
    "username",
    "icon_emoji",
    "icon_url",
)
#: Fields an incoming webhook cannot override (the app's installation fixed them).
_WEBHOOK_FIXED: Final = frozenset({"channel", "username", "icon_emoji", "icon_url"})

#: A message is never near this: Slack's own limits (40,000 characters of text, 50 blocks,
#: 3,000 characters per section) come first and are answered with an error code.
MAX_MESSAGE_BYTES: Final = 1_000_000

LIMITS = SinkLimits(
    # ref: https://api.slack.com/methods/chat.postMessage (one message per call) and
    # https://api.slack.com/messaging/webhooks (one message per POST to the webhook URL)
    max_events=1,
    # ref: https://api.slack.com/methods/chat.postMessage (no documented body limit; text is
    # truncated past 40,000 characters, msg_too_long): a bound for the process only
    max_bytes=MAX_MESSAGE_BYTES,
    max_event_bytes=MAX_MESSAGE_BYTES,
    # ref: https://api.slack.com/methods/chat.postMessage (one message per request: no batch
    # to wait for)
    linger_s=0.0,
    # ref: https://api.slack.com/apis/rate-limits ("chat.postMessage ... generally allows
    # posting one message per second per channel, while also allowing short bursts";
    # incoming webhooks: "1 per second ... short bursts ... are permitted")
    per_key_rate_per_s=1.0,
    per_key_burst=2.0,
    # ref: https://github.com/slackapi/python-slack-sdk (WebClient and WebhookClient
    # timeout=30 seconds)
    timeout_s=30.0,
    # ref: https://api.slack.com/apis/rate-limits (the per-channel limit is the real one;
    # a few requests in flight spread over channels)
    concurrency=4,
    # ref: https://api.slack.com/methods/chat.postMessage (the body is the one message: no
    # separators or envelope around it)
    per_item_overhead=0,
)

# ---- error codes ---------------------------------------------------------------------------
# ref: https://api.slack.com/methods/chat.postMessage#errors and
# https://api.slack.com/changelog/2016-05-17-changes-to-errors-for-incoming-webhooks

#: The message itself is at fault: dead-letter it.
REJECT_CODES: Final = frozenset(
    {
        "invalid_payload",
        "no_text",
        "too_many_attachments",
        "msg_too_long",
        "msg_blocks_too_long",
        "invalid_blocks",
        "invalid_blocks_format",
        "invalid_attachments",
        "invalid_metadata_format",
        "invalid_metadata_schema",
        "metadata_too_large",
        "markdown_text_conflict",
        "invalid_arguments",
        "invalid_form_data",
        "invalid_post_type",
        "missing_post_type",
        "invalid_charset",
        "invalid_json",
        "json_not_object",
        "user_not_found",
        "thread_not_found",
        "cannot_reply_to_message",
        "duplicate_message_not_found",
    }
)
#: The configuration (channel, credentials, permissions, the webhook) is at fault: pause.
PAUSE_CODES: Final = frozenset(
    {
        "channel_not_found",
        "channel_is_archived",
        "is_archived",
        "not_in_channel",
        "invalid_auth",
        "not_authed",
        "token_revoked",
        "token_expired",
        "account_inactive",
        "no_permission",
        "missing_scope",
        "not_allowed_token_type",
        "access_denied",
        "team_access_not_granted",
        "org_login_required",
        "team_added_to_org",  # a migration to an Enterprise org: temporary, workspace-wide
        "two_factor_setup_required",
        "enterprise_is_restricted",
        "ekm_access_denied",
        "as_user_not_supported",
        "action_prohibited",
        "posting_to_general_channel_denied",
        "no_service",
        "no_service_id",
        "no_team",
        "team_disabled",
        "invalid_token",
        "no_active_hooks",
    }
)
#: Slack's side is busy or failing: retry.
RETRY_CODES: Final = frozenset(
    {
        "rate_limited",
        "ratelimited",
        "request_timeout",
        "fatal_error",
        "internal_error",
        "service_unavailable",
        "rollup_error",
    }
)
#: Retry-After when Slack says rate_limited without one (python-slack-sdk waits 1 s then).
DEFAULT_RATE_LIMIT_WAIT_S: Final = 1.0


#: restricted_action variants about one message's thread_ts (a reply into a non-threadable
#: channel, a top-level message into a thread-only one): that message is at fault, not the
#: channel, and pausing would stall every channel behind it.
# ref: https://github.com/slack-ruby/slack-api-ref/blob/master/methods/chat/chat.postMessage.json
MESSAGE_RESTRICTIONS: Final = frozenset(
    {"restricted_action_non_threadable_channel", "restricted_action_thread_only_channel"}
)


def verdict_for_code(code: str) -> str:
    """``"reject"``, ``"pause"`` or ``"retry"`` for a Slack error code; unknown codes reject."""
    if code in MESSAGE_RESTRICTIONS:
        return "reject"
    if code in PAUSE_CODES or code.startswith("restricted_action"):
        return "pause"
    if code in RETRY_CODES:
        return "retry"
    return "reject"


class SlackSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``sinks.slack``: a webhook URL, or a bot token and a default channel (neither = dry run)."""

    # Secrets: a string, {env: NAME} or {file: PATH}; converted with router.settings.secret_from.
    webhook_url: str | dict[str, str] | None = None
    bot_token: str | dict[str, str] | None = None
    # The channel (ID or name) of messages whose rule sets none (chat.postMessage only).
    channel: str | None = None
    endpoint: str = DEFAULT_ENDPOINT


def _check_url(url: str, what: str, show: bool) -> None:
    """An http(s) URL with a host, no query or fragment; ``show=False`` keeps it out of errors."""
    parts = urlsplit(url)
    shown = f" {url!r}" if show else ""
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise ValueError(f"sinks.slack.{what}:{shown} is not an http(s) URL")
    if parts.query or parts.fragment:
        raise ValueError(f"sinks.slack.{what}: must not have a query or fragment")


def _normalise_endpoint(endpoint: str) -> str:
    _check_url(endpoint, "endpoint", show=True)
    if endpoint.rstrip("/").endswith(POST_MESSAGE):
        raise ValueError(
            f"sinks.slack.endpoint: give the API base only (default {DEFAULT_ENDPOINT}); "
            f"the sink appends {POST_MESSAGE}"
        )
    return endpoint.rstrip("/")


class SlackSink:
    """The Slack transport: see the module docstring."""

    name = "slack"

    def __init__(
        self,
        settings: SlackSettings,
        webhook_url: Secret | None = None,
        bot_token: Secret | None = None,
    ) -> None:
        if webhook_url is not None and bot_token is not None:
            raise ValueError("sinks.slack: give webhook_url or bot_token, not both")
        self.endpoint = _normalise_endpoint(settings.endpoint)
        self.channel = settings.channel
        if self.channel is not None and not self.channel.strip():
            raise ValueError("sinks.slack.channel: must not be empty")
        self.limits = LIMITS
        self.mode = "webhook" if webhook_url is not None else "chat.postMessage"
        self.dry_run = webhook_url is None and bot_token is None
        self._webhook_url = webhook_url
        self._headers: dict[str, str] = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "pendo-event-router",
        }
        self._secrets: list[str] = []
        if webhook_url is not None:
            url = webhook_url.reveal()
            _check_url(url, "webhook_url", show=False)
            path = urlsplit(url).path
            if path.strip("/") == "":
                raise ValueError("sinks.slack.webhook_url: has no path (…/services/T…/B…/…)")
            # The whole URL, its path (T…/B…/secret) and its last segment (the secret proper).
            self._secrets = [url, path]
            last = path.rstrip("/").rsplit("/", 1)[-1]
            if len(last) >= 8:
                self._secrets.append(last)
        if bot_token is not None:
            bearer = f"Bearer {bot_token.reveal()}"
            self._headers["Authorization"] = bearer
            self._secrets = [bot_token.reveal(), bearer]

    @property
    def url(self) -> str:
        """Where messages go (for a webhook, the secret URL: never log it)."""
        if self._webhook_url is not None:
            return self._webhook_url.reveal()
        return self.endpoint + POST_MESSAGE

    def secrets(self) -> list[str]:
        """Every form the credentials take on the wire, for redaction.

        The webhook URL, its path and its last segment; or the bot token and ``Bearer <token>``.
        """
        return list(self._secrets)

    def __repr__(self) -> str:
        endpoint = "<webhook>" if self.mode == "webhook" else self.endpoint
        return (
            f"SlackSink(mode={self.mode!r}, endpoint={endpoint!r}, channel={self.channel!r}, "
            f"dry_run={self.dry_run})"
        )

    # ---- prepare -------------------------------------------------------------------------

    def message(self, output: Routed) -> dict[str, Any]:
        """The JSON message for one rule output (the body of its request)."""
        if output.kind != "message":
            raise ValueError(f"slack has no output kind {output.kind!r}")
        payload = output.payload
        message: dict[str, Any] = {}
        if self.mode != "webhook":
            channel = payload.get("channel") or self.channel
            if not isinstance(channel, str) or not channel:
                raise ValueError(
                    "no channel: the rule maps none and sinks.slack.channel is not set"
                )
            message["channel"] = channel
        for name in _FIELDS[1:]:
            value = payload.get(name)
            if value is None or (self.mode == "webhook" and name in _WEBHOOK_FIXED):
                continue
            message[name] = value
        if "text" not in message and "blocks" not in message:
            raise ValueError("a Slack message needs text or blocks")
        return message

    def prepare(self, output: Routed, idempotency_key: str, event: Event) -> Prepared:
        # Slack has no idempotency key (sinks.md §5): a retried request may post twice.
        message = self.message(output)
        try:
            body = json.dumps(message, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not encodable as JSON: {exc}") from None
        key = WEBHOOK_KEY if self.mode == "webhook" else message["channel"]
        return Prepared(body.encode(), key)

    # ---- build ---------------------------------------------------------------------------

    def build(self, items: Sequence[Prepared]) -> list[HttpRequest]:
        return [
            HttpRequest("POST", self.url, dict(self._headers), item.body, (index,))
            for index, item in enumerate(items)
        ]

    def health_request(self) -> HttpRequest | None:
        """``auth.test`` with the bot token: proves the endpoint and the token, posts nothing.

        A webhook has no such probe (any valid POST posts a message) and a dry run has nothing
        to probe: None.
        """
        if self.dry_run or self.mode == "webhook":
            return None
        return HttpRequest("POST", self.endpoint + AUTH_TEST, dict(self._headers), b"", ())

    # ---- classify ------------------------------------------------------------------------

    def classify(self, request: HttpRequest, response: HttpResponse) -> Outcome:
        """Slack's answer as an outcome (see the module docstring for the table)."""
        status = response.status
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if status == 429:
            detail = f"HTTP 429: {excerpt(response.body, 200)}"
            return Retry(detail, retry_after if retry_after is not None else 1.0)
        if self.mode == "webhook":
            return self._classify_webhook(response, retry_after)
        return self._classify_api(response, retry_after)

    def _classify_webhook(self, response: HttpResponse, retry_after: float | None) -> Outcome:
        status = response.status
        code = response.body[:200].decode("utf-8", "replace").strip()
        detail = f"HTTP {status}: {excerpt(response.body, 200)}"
        if status == 200:
            return Delivered()
        if 200 < status < 300:
            # Not Slack's success answer: the URL points somewhere else.
            return Pause(f"{detail} (webhook_url does not answer as a Slack webhook)")
        if status >= 500:
            return Retry(detail, retry_after)
        if code == "user_not_found":
            # A webhook request names no user (the sink strips channel and username): the user
            # that is missing is the webhook's own destination, as with channel_not_found.
            return Pause(f"{detail} (check sinks.slack.webhook_url and its destination)")
        if code in REJECT_CODES or code in PAUSE_CODES or code in RETRY_CODES:
            verdict = verdict_for_code(code)
            if verdict == "retry":
                return Retry(detail, retry_after)
            if verdict == "pause":
                return Pause(f"{detail} (check sinks.slack.webhook_url and its channel)")
            return Reject(detail)
        # An unknown text: the status decides. The webhook or its channel is gone (404, 410),
        # refused (401, 403) or the URL is not a webhook (3xx): no message is at fault.
        if status in (401, 403, 404, 410) or 300 <= status < 400:
            return Pause(f"{detail} (check sinks.slack.webhook_url)")
        if status == 408:
            return Retry(detail, retry_after)
        return Reject(detail)

    def _classify_api(self, response: HttpResponse, retry_after: float | None) -> Outcome:
        status = response.status
        detail = f"HTTP {status}: {excerpt(response.body, 200)}"
        if status >= 500 or status == 408:
            return Retry(detail, retry_after)
        if 300 <= status < 400 or status in (401, 403, 404, 410):
            return Pause(f"{detail} (check sinks.slack.endpoint: {self.endpoint})")
        if status != 200:
            return Reject(detail) if 400 <= status < 500 else Pause(detail)
        answer = json_answer(response.body)
        if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
            return Pause(f"{detail} (not a Slack Web API answer: check sinks.slack.endpoint)")
        if answer["ok"]:
            return Delivered()
        code = str(answer.get("error") or "unknown_error")
        reason = f"Slack error {code}: {excerpt(response.body, 200)}"
        verdict = verdict_for_code(code)
        if verdict == "pause":
            return Pause(reason)
        if verdict == "retry":
            if code in ("rate_limited", "ratelimited") and retry_after is None:
                retry_after = DEFAULT_RATE_LIMIT_WAIT_S
            return Retry(reason, retry_after)
        return Reject(reason)


def create(config: Mapping[str, Any]) -> SlackSink:
    """The sink from its settings (``sinks.slack``); ValueError names what is wrong."""
    settings = sink_settings(config, SlackSettings, "slack")
    webhook_url = optional_secret(settings.webhook_url, "sinks.slack.webhook_url")
    bot_token = optional_secret(settings.bot_token, "sinks.slack.bot_token")
    return SlackSink(settings, webhook_url, bot_token)
