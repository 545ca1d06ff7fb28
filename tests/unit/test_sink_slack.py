"""The Slack sink (sinks/slack.py) and its emulator (tests/emulators/slack.py).

- prepare/build/classify in both modes (incoming webhook, chat.postMessage): messages, channel
  keys, auth, endpoints, dry run, limits, every error mapping, secrets;
- golden requests for every shared Pendo fixture (tests/golden/slack/{webhook,api}/);
- the emulator's answers (sinks.md §5): plain-text webhook errors, ok:false codes, Block Kit,
  the 1/s per channel limit with integer Retry-After, scripted faults;
- conformance: python-slack-sdk's WebhookClient and WebClient against the emulator (so the
  emulator accepts what Slack's own SDK sends and the SDK understands its answers);
- end to end: what the sink builds from rules/slack.yaml (detractors included) is posted by the
  emulator over HTTP, and the sink's limits never trip the emulator's rate limit.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler
from slack_sdk.models.blocks import (
    Block,
    ContextBlock,
    HeaderBlock,
    MarkdownTextObject,
    PlainTextObject,
    SectionBlock,
)
from slack_sdk.webhook import WebhookClient

from router.delivery.batching import Batcher
from router.delivery.ratelimit import RateLimiter
from router.delivery.sink import (
    Delivered,
    HttpRequest,
    HttpResponse,
    Pause,
    Prepared,
    Reject,
    Retry,
    idempotency_key,
)
from router.dlq import Redactor
from router.events import Event
from router.rules.engine import Routed
from router.rules.loader import load_rules
from sinks import slack
from sinks.slack import LIMITS, PAUSE_CODES, REJECT_CODES, RETRY_CODES, SlackSink, create
from tests.emulators.slack import (
    BOT_TOKEN,
    HOOK_PATH,
    Channel,
    Fault,
    Hook,
    SlackEmulator,
)
from tests.golden import ROOT, check_golden, fixture_events, golden_requests

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]
ServerFactory = Callable[..., Awaitable[TestServer]]

# Fakes: the golden files show them masked.
WEBHOOK_URL = "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"
TOKEN = "xoxb-test-token"
WEBHOOK = {"webhook_url": WEBHOOK_URL}
API = {"bot_token": TOKEN, "channel": "#general"}
EVENT_MS = 1705329000000
KEY = idempotency_key("evt-1", "slack", "rule-1")
DETRACTOR_BLOCKS = [
    {"type": "header", "text": {"type": "plain_text", "text": ":rotating_light: Detractor"}},
    {"type": "section", "text": {"type": "plain_text", "text": "Exports keep timing out"}},
]


def event(**overrides: Any) -> Event:
    fields: dict[str, Any] = {
        "id": "evt-1",
        "source": "webhook",
        "type": "nps.response",
        "name": "nps.response",
        "visitor_id": "user_555",
        "account_id": "account_900",
        "timestamp": EVENT_MS,
        "received_at": EVENT_MS + 1500,
    }
    return Event(**{**fields, **overrides})


def routed(**payload: Any) -> Routed:
    return Routed(rule_id="rule-1", kind="message", payload=payload, ruleset="test")


def webhook_sink(**config: Any) -> SlackSink:
    return create({**WEBHOOK, **config})


def api_sink(**config: Any) -> SlackSink:
    return create({**API, **config})


def body_of(prepared: Prepared) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(prepared.body)
    return decoded


def response(status: int, body: bytes = b"", **headers: str) -> HttpResponse:
    return HttpResponse(status, {k.replace("_", "-"): v for k, v in headers.items()}, body)


def ok_false(code: str) -> bytes:
    return json.dumps({"ok": False, "error": code}).encode()


REQUEST = HttpRequest("POST", "https://slack.com/api/chat.postMessage", {}, b"{}", (0,))


# ---- prepare ------------------------------------------------------------------------------


def test_api_message_has_the_rules_channel_and_fields_in_order() -> None:
    output = routed(
        channel="#product-insights",
        text="NPS detractor",
        blocks=DETRACTOR_BLOCKS,
        thread_ts="1705329000.000100",
        mrkdwn=False,
        unfurl_links=False,
        unfurl_media=True,
        username="Pendo",
        icon_emoji=":bar_chart:",
        icon_url="https://example.com/i.png",
    )
    prepared = api_sink().prepare(output, KEY, event())
    assert prepared.key == "#product-insights"  # one rate-limit bucket per channel
    assert list(body_of(prepared)) == [
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
    ]
    assert body_of(prepared)["blocks"] == DETRACTOR_BLOCKS
    assert body_of(prepared)["channel"] == "#product-insights"


def test_api_message_falls_back_to_the_default_channel() -> None:
    prepared = api_sink().prepare(routed(text="hi"), KEY, event())
    assert body_of(prepared) == {"channel": "#general", "text": "hi"}
    assert prepared.key == "#general"
    assert prepared.body == b'{"channel":"#general","text":"hi"}'


def test_api_message_without_any_channel_is_a_value_error() -> None:
    s = create({"bot_token": TOKEN})
    with pytest.raises(ValueError, match="no channel"):
        s.prepare(routed(text="hi"), KEY, event())
    assert body_of(s.prepare(routed(text="hi", channel="C1"), KEY, event()))["channel"] == "C1"


def test_webhook_message_leaves_out_what_a_webhook_cannot_override() -> None:
    output = routed(
        channel="#product-insights",
        text="t",
        blocks=DETRACTOR_BLOCKS,
        username="Pendo",
        icon_emoji=":x:",
        icon_url="https://example.com/i.png",
        thread_ts="1.2",
        unfurl_links=False,
    )
    prepared = webhook_sink().prepare(output, KEY, event())
    assert body_of(prepared) == {
        "text": "t",
        "blocks": DETRACTOR_BLOCKS,
        "thread_ts": "1.2",
        "unfurl_links": False,
    }
    assert prepared.key == slack.WEBHOOK_KEY  # the webhook's one channel; never the URL


def test_unicode_is_sent_as_utf8_and_nan_is_refused() -> None:
    prepared = api_sink().prepare(routed(text="Très bien 👍"), KEY, event())
    assert "Très bien 👍".encode() in prepared.body
    with pytest.raises(ValueError, match="not encodable"):
        api_sink().prepare(
            routed(text="x", blocks=[{"type": "x", "n": float("nan")}]), KEY, event()
        )
    with pytest.raises(ValueError, match="no output kind"):
        api_sink().prepare(Routed("r", "track", {"text": "x"}, "t"), KEY, event())
    with pytest.raises(ValueError, match="text or blocks"):
        api_sink().prepare(routed(channel="C1"), KEY, event())


# ---- build --------------------------------------------------------------------------------


def test_api_build_posts_each_message_with_bearer_auth() -> None:
    s = api_sink()
    items = [s.prepare(routed(text=f"m{i}"), KEY, event()) for i in range(2)]
    requests = s.build(items)
    assert [r.items for r in requests] == [(0,), (1,)]
    request = requests[0]
    assert request.method == "POST"
    assert request.url == "https://slack.com/api/chat.postMessage"
    assert request.headers == {
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": "pendo-event-router",
        "Authorization": f"Bearer {TOKEN}",
    }
    assert request.body == items[0].body
    assert "token" not in json.loads(request.body)


def test_webhook_build_posts_to_the_webhook_url_without_auth() -> None:
    s = webhook_sink()
    (request,) = s.build([s.prepare(routed(text="m"), KEY, event())])
    assert request.url == WEBHOOK_URL
    assert "Authorization" not in request.headers
    assert request.headers["Content-Type"] == "application/json; charset=utf-8"
    assert s.health_request() is None  # any valid webhook POST posts a message


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("https://slack.com/api", "https://slack.com/api/chat.postMessage"),
        ("https://slack.com/api/", "https://slack.com/api/chat.postMessage"),
        ("http://127.0.0.1:8080/api", "http://127.0.0.1:8080/api/chat.postMessage"),
    ],
)
def test_endpoint_override(endpoint: str, url: str) -> None:
    s = api_sink(endpoint=endpoint)
    assert s.build([Prepared(b"{}", "C1")])[0].url == url
    health = s.health_request()
    assert health is not None
    assert health.url == url.replace("chat.postMessage", "auth.test")
    assert health.headers["Authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"endpoint": "slack.com/api"}, "not an http"),
        ({"endpoint": "https://slack.com/api/chat.postMessage"}, "API base only"),
        ({"endpoint": "https://slack.com/api?x=1"}, "query"),
        ({"webhook_url": WEBHOOK_URL, "bot_token": TOKEN}, "not both"),
        ({"webhook_url": "hooks.slack.com/services/T/B/XXXXXXXXXX"}, "not an http"),
        ({"webhook_url": "https://hooks.slack.com"}, "no path"),
        ({"webhook_url": ""}, "empty"),
        ({"bot_token": 42}, "Expected"),
        ({"channel": " "}, "must not be empty"),
        ({"token": TOKEN}, "unknown field"),
    ],
)
def test_bad_settings_are_value_errors(config: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as info:
        create(config)
    assert "XXXXXXXXXX" not in str(info.value)
    assert TOKEN not in str(info.value)


def test_credentials_from_env_and_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-from-env")
    from_env = create({"bot_token": {"env": "SLACK_BOT_TOKEN"}, "channel": "C1"})
    assert from_env.build([Prepared(b"{}")])[0].headers["Authorization"] == "Bearer xoxb-from-env"
    path = tmp_path / "hook"
    path.write_text(WEBHOOK_URL + "\n")
    from_file = create({"webhook_url": {"file": str(path)}})
    assert from_file.build([Prepared(b"{}")])[0].url == WEBHOOK_URL
    monkeypatch.delenv("SLACK_BOT_TOKEN")
    with pytest.raises(ValueError, match="SLACK_BOT_TOKEN is unset"):
        create({"bot_token": {"env": "SLACK_BOT_TOKEN"}})


def test_neither_credential_is_a_dry_run() -> None:
    s = create({"channel": "#product-insights"})
    assert s.dry_run is True
    assert s.health_request() is None
    (request,) = s.build([s.prepare(routed(text="hi"), KEY, event())])
    assert request.url == "https://slack.com/api/chat.postMessage"
    assert "Authorization" not in request.headers
    assert webhook_sink().dry_run is False
    assert api_sink().dry_run is False
    assert repr(create({})) == (
        "SlackSink(mode='chat.postMessage', endpoint='https://slack.com/api', channel=None, "
        "dry_run=True)"
    )


def test_secrets_are_every_wire_form_and_never_in_repr_or_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    hook = webhook_sink()
    path = "/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"
    assert hook.secrets() == [WEBHOOK_URL, path, "XXXXXXXXXXXXXXXXXXXXXXXX"]
    api = api_sink()
    assert api.secrets() == [TOKEN, f"Bearer {TOKEN}"]
    assert create({}).secrets() == []
    for s in (hook, api):
        (request,) = s.build([s.prepare(routed(text="x"), KEY, event())])
        s.classify(request, response(404, b"no_service"))
        s.classify(request, response(200, ok_false("invalid_auth")))
        for text in (repr(s), str(s), caplog.text, request.body.decode()):
            assert "XXXXXXXXXXXXXXXXXXXXXXXX" not in text
            assert TOKEN not in text
        redact = Redactor(s.secrets())
        masked = redact(f"{request.url} {dict(request.headers)}")
        assert "XXXXXXXXXXXXXXXXXXXXXXXX" not in masked
        assert TOKEN not in masked
    assert repr(hook) == (
        "SlackSink(mode='webhook', endpoint='<webhook>', channel=None, dry_run=False)"
    )


def test_limits_one_message_per_request_one_per_second_per_channel() -> None:
    assert LIMITS.max_events == 1
    assert LIMITS.per_key_rate_per_s == 1.0
    assert LIMITS.per_key_burst is not None
    assert 1.0 <= LIMITS.per_key_burst <= SlackEmulator().burst
    assert LIMITS.rate_per_s is None
    # The largest message the rules can produce (40,000 characters of 4-byte text, 50 blocks
    # of 3,000-character sections) fits.
    section = {"type": "section", "text": {"type": "plain_text", "text": "😀" * 3000}}
    big = api_sink().prepare(routed(text="😀" * 40_000, blocks=[section] * 50), KEY, event())
    assert len(big.body) <= LIMITS.max_event_bytes
    # A message at max_event_bytes is one request of exactly its bytes.
    batcher: Batcher[Prepared] = Batcher(
        LIMITS.max_events, LIMITS.max_bytes, LIMITS.linger_s, LIMITS.per_item_overhead
    )
    assert batcher.fits_alone(LIMITS.max_event_bytes)
    item = Prepared(b"x" * LIMITS.max_event_bytes, "C1")
    assert batcher.add(item, len(item.body), item.key, 0.0) == [[item]]
    assert [r.body for r in api_sink().build([item])] == [item.body]


# ---- classify -----------------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(REJECT_CODES))
def test_api_reject_codes(code: str) -> None:
    outcome = api_sink().classify(REQUEST, response(200, ok_false(code)))
    assert isinstance(outcome, Reject)
    assert code in outcome.reason


@pytest.mark.parametrize("code", [*sorted(PAUSE_CODES), "restricted_action_read_only_channel"])
def test_api_pause_codes(code: str) -> None:
    outcome = api_sink().classify(REQUEST, response(200, ok_false(code)))
    assert isinstance(outcome, Pause)
    assert code in outcome.reason


@pytest.mark.parametrize(
    "code", ["restricted_action_non_threadable_channel", "restricted_action_thread_only_channel"]
)
def test_a_thread_restriction_rejects_that_message_and_does_not_pause_the_sink(code: str) -> None:
    # About one message's thread_ts, not the channel: pausing stalled every channel for good.
    outcome = api_sink().classify(REQUEST, response(200, ok_false(code)))
    assert isinstance(outcome, Reject)
    assert code in outcome.reason


@pytest.mark.parametrize("code", sorted(RETRY_CODES))
def test_api_retry_codes(code: str) -> None:
    outcome = api_sink().classify(REQUEST, response(200, ok_false(code), retry_after="4"))
    assert isinstance(outcome, Retry)
    assert outcome.after_s == 4.0


def test_the_issues_codes_are_mapped_as_it_says() -> None:
    for code in ("invalid_payload", "no_text", "too_many_attachments", "msg_too_long"):
        assert slack.verdict_for_code(code) == "reject"
    for code in (
        "channel_not_found",
        "channel_is_archived",
        "is_archived",
        "invalid_auth",
        "token_revoked",
        "not_in_channel",
        "account_inactive",
        "no_permission",
        "missing_scope",
    ):
        assert slack.verdict_for_code(code) == "pause"
    assert slack.verdict_for_code("rate_limited") == "retry"
    assert slack.verdict_for_code("something_new") == "reject"


def test_api_classify() -> None:
    s = api_sink()
    assert s.classify(REQUEST, response(200, b'{"ok":true,"ts":"1.2"}')) == Delivered()
    assert s.classify(REQUEST, response(429, ok_false("ratelimited"), retry_after="3")) == Retry(
        'HTTP 429: {"ok": false, "error": "ratelimited"}', 3.0
    )
    # 429 without Retry-After: python-slack-sdk's 1 second.
    assert s.classify(REQUEST, response(429, b"")) == Retry("HTTP 429: ", 1.0)
    rate_limited = s.classify(REQUEST, response(200, ok_false("rate_limited")))
    assert isinstance(rate_limited, Retry)
    assert rate_limited.after_s == 1.0
    for status in (500, 502, 503, 408):
        outcome = s.classify(REQUEST, response(status, b"<html>", retry_after="2"))
        assert isinstance(outcome, Retry)
        assert outcome.after_s == 2.0
    for status in (301, 401, 403, 404, 410):
        outcome = s.classify(REQUEST, response(status, b"nope"))
        assert isinstance(outcome, Pause)
        assert "sinks.slack.endpoint" in outcome.reason
    assert isinstance(s.classify(REQUEST, response(400, b"bad")), Reject)
    # A 200 that is not the Web API's JSON: the endpoint is wrong, no message is at fault.
    for body in (b"<html>proxy</html>", b"[]", b'{"ok": "yes"}'):
        outcome = s.classify(REQUEST, response(200, body))
        assert isinstance(outcome, Pause)
    assert s.classify(REQUEST, response(200, b'{"ok": false}')) == Reject(
        'Slack error unknown_error: {"ok": false}'
    )


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, b"ok", Delivered),
        (400, b"invalid_payload", Reject),
        (400, b"no_text", Reject),
        (400, b"too_many_attachments", Reject),
        (400, b"msg_too_long", Reject),
        (400, b"invalid_blocks", Reject),
        (400, b"user_not_found", Pause),  # the webhook's own destination: no user is sent
        (403, b"action_prohibited", Pause),
        (404, b"channel_not_found", Pause),
        (410, b"channel_is_archived", Pause),
        (404, b"no_service", Pause),
        (403, b"invalid_token", Pause),
        (400, b"no_team", Pause),
        (403, b"team_disabled", Pause),
        (403, b"posting_to_general_channel_denied", Pause),
        (404, b"no_active_hooks", Pause),
        (404, b"no_service_id", Pause),
        (500, b"rollup_error", Retry),
        (503, b"", Retry),
        (429, b"rate_limited", Retry),
        (408, b"", Retry),
        (404, b"<html>not found</html>", Pause),
        (401, b"", Pause),
        (302, b"", Pause),
        (204, b"", Pause),
        (400, b"something else", Reject),
    ],
)
def test_webhook_classify(status: int, body: bytes, expected: type) -> None:
    outcome = webhook_sink().classify(REQUEST, response(status, body))
    assert isinstance(outcome, expected)
    if body and not isinstance(outcome, Delivered):
        assert body.decode() in getattr(outcome, "reason", "")


def test_webhook_classify_honours_integer_retry_after() -> None:
    s = webhook_sink()
    assert s.classify(REQUEST, response(429, b"rate_limited", retry_after="5")) == Retry(
        "HTTP 429: rate_limited", 5.0
    )
    outcome = s.classify(REQUEST, response(500, b"rollup_error", retry_after="2"))
    assert outcome == Retry("HTTP 500: rollup_error", 2.0)
    pause = s.classify(REQUEST, response(404, b"channel_not_found"))
    assert isinstance(pause, Pause)
    assert "webhook_url" in pause.reason


# ---- golden -------------------------------------------------------------------------------


def test_golden_requests_webhook() -> None:
    check_golden("slack/webhook", golden_requests(webhook_sink(), WEBHOOK))


def test_golden_requests_chat_post_message() -> None:
    check_golden("slack/chat.postMessage", golden_requests(api_sink(), API))


def test_golden_detractors_are_posted_and_secrets_masked() -> None:
    requests = golden_requests(api_sink(), API)
    posted = [r for rs in requests.values() for r in rs]
    assert {r["rule"] for r in posted} == {"nps-detractors"}  # both NPS fixtures score 3
    assert len(posted) == 2
    for request in posted:
        assert request["headers"]["Authorization"] == "***"  # the whole Bearer value
        assert request["body"]["blocks"][0]["text"]["text"] == ":rotating_light: Detractor"
    hooks = [r for rs in golden_requests(webhook_sink(), WEBHOOK).values() for r in rs]
    assert {r["url"] for r in hooks} == {"***"}


def test_module_exports_the_factory_and_outputs() -> None:
    assert slack.OUTPUTS.sink == "slack"
    assert set(slack.OUTPUTS.kinds) == {"message"}
    assert isinstance(slack.create(API), SlackSink)


# ---- the emulator -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def emulator(clock: Clock) -> SlackEmulator:
    return SlackEmulator(
        channels={
            "C0PRODUCT1": Channel("C0PRODUCT1", "product-insights"),
            "C0ARCHIVED": Channel("C0ARCHIVED", "old", archived=True),
            "C0OUTSIDE1": Channel("C0OUTSIDE1", "private", member=False),
        },
        hooks={
            HOOK_PATH: Hook("C0PRODUCT1"),
            "/services/T1/B1/archived": Hook("C0ARCHIVED"),
            "/services/T1/B1/deleted": Hook("C0GONE0000"),
            "/services/T1/B1/prohibited": Hook("C0PRODUCT1", prohibited=True),
        },
        revoked={"xoxb-revoked"},
        inactive={"xoxb-inactive"},
        unscoped={"xoxb-unscoped"},
        clock=clock,
    )


@pytest.fixture
async def api(aiohttp_client: ClientFactory, emulator: SlackEmulator) -> TestClient[Any, Any]:
    return await aiohttp_client(emulator.app())


async def hook(
    api: TestClient[Any, Any], body: Any, path: str = HOOK_PATH, raw: bytes | None = None
) -> tuple[int, str]:
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    async with api.post(path, data=data, headers=headers) as resp:
        assert resp.content_type == "text/html"
        return resp.status, await resp.text()


async def post(
    api: TestClient[Any, Any],
    body: Any,
    token: str | None = BOT_TOKEN,
    raw: bytes | None = None,
    content_type: str = "application/json; charset=utf-8",
) -> tuple[int, dict[str, Any], Any]:
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else json.dumps(body).encode()
    async with api.post("/api/chat.postMessage", data=data, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers.get("Retry-After")


async def test_emulator_webhook_posts_and_ignores_channel_overrides(
    api: TestClient[Any, Any], emulator: SlackEmulator
) -> None:
    assert await hook(api, {"text": "hi", "channel": "#elsewhere", "username": "x"}) == (200, "ok")
    assert await hook(api, {"blocks": DETRACTOR_BLOCKS}) == (200, "ok")
    assert await hook(api, {"attachments": [{"text": "a"}]}) == (200, "ok")
    assert [(p.via, p.channel) for p in emulator.ledger] == [("webhook", "C0PRODUCT1")] * 3
    assert emulator.messages()[0] == {"text": "hi", "channel": "#elsewhere", "username": "x"}


async def test_emulator_webhook_form_payload(
    api: TestClient[Any, Any], emulator: SlackEmulator
) -> None:
    async with api.post(HOOK_PATH, data={"payload": json.dumps({"text": "form"})}) as resp:
        assert (resp.status, await resp.text()) == (200, "ok")
    async with api.post(HOOK_PATH, data={"text": "form"}) as resp:
        assert (resp.status, await resp.text()) == (400, "invalid_payload")
    assert emulator.messages() == [{"text": "form"}]


@pytest.mark.parametrize(
    ("path", "body", "raw", "expected"),
    [
        ("/services/T1/B1/unknown", {"text": "x"}, None, (404, "no_service")),
        ("/services/T1/B1/deleted", {"text": "x"}, None, (404, "channel_not_found")),
        ("/services/T1/B1/archived", {"text": "x"}, None, (410, "channel_is_archived")),
        ("/services/T1/B1/prohibited", {"text": "x"}, None, (403, "action_prohibited")),
        (HOOK_PATH, None, b"{not json", (400, "invalid_payload")),
        (HOOK_PATH, None, b'{"text": NaN}', (400, "invalid_payload")),
        (HOOK_PATH, ["text"], None, (400, "invalid_payload")),
        (HOOK_PATH, {"text": 5}, None, (400, "invalid_payload")),
        (HOOK_PATH, {}, None, (400, "no_text")),
        (HOOK_PATH, {"text": ""}, None, (400, "no_text")),
        (HOOK_PATH, {"text": "x" * 40_001}, None, (400, "msg_too_long")),
        (HOOK_PATH, {"attachments": [{}] * 101}, None, (400, "too_many_attachments")),
        (HOOK_PATH, {"text": "x", "blocks": [{"type": "nope"}]}, None, (400, "invalid_blocks")),
    ],
)
async def test_emulator_webhook_errors_are_plain_text(
    api: TestClient[Any, Any],
    emulator: SlackEmulator,
    path: str,
    body: Any,
    raw: bytes | None,
    expected: tuple[int, str],
) -> None:
    assert await hook(api, body, path, raw) == expected
    assert emulator.ledger == []


async def test_emulator_webhook_limits_are_inclusive(
    api: TestClient[Any, Any], emulator: SlackEmulator, clock: Clock
) -> None:
    assert (await hook(api, {"text": "x" * 40_000}))[0] == 200
    assert (await hook(api, {"text": "a", "attachments": [{}] * 100}))[0] == 200
    clock.now += 10
    blocks = [{"type": "divider"}] * 50
    assert (await hook(api, {"text": "a", "blocks": blocks}))[0] == 200
    assert (await hook(api, {"text": "a", "blocks": [*blocks, {"type": "divider"}]}))[0] == 400


def _header(text: str) -> dict[str, Any]:
    return {"type": "header", "text": {"type": "plain_text", "text": text}}


def _section(text: str, kind: str = "plain_text") -> dict[str, Any]:
    return {"type": "section", "text": {"type": kind, "text": text}}


@pytest.mark.parametrize(
    ("block", "valid"),
    [
        (_header("x" * 150), True),
        (_header("x" * 151), False),
        ({"type": "header", "text": {"type": "mrkdwn", "text": "*x*"}}, False),
        (_header(""), False),
        (_section("x" * 3000), True),
        (_section("x" * 3001), False),
        (_section("*bold*", "mrkdwn"), True),
        (_section("x", "markdown"), False),
        ({"type": "section"}, False),
        ({"type": "section", "fields": [{"type": "plain_text", "text": "f"}] * 10}, True),
        ({"type": "section", "fields": [{"type": "plain_text", "text": "f"}] * 11}, False),
        ({"type": "section", "fields": []}, False),
        ({"type": "section", "fields": [{"type": "plain_text", "text": "x" * 2001}]}, False),
        ({"type": "section", "text": {"type": "plain_text", "text": "x", "emoji": True}}, True),
        ({"type": "section", "text": {"type": "plain_text", "text": "x", "emoji": "y"}}, False),
        ({"type": "section", "text": {"type": "plain_text", "text": "x", "verbatim": True}}, False),
        ({"type": "section", "text": {"type": "mrkdwn", "text": "x", "verbatim": True}}, True),
        ({"type": "context", "elements": [{"type": "mrkdwn", "text": "c"}] * 10}, True),
        ({"type": "context", "elements": [{"type": "mrkdwn", "text": "c"}] * 11}, False),
        ({"type": "context", "elements": []}, False),
        (
            {"type": "context", "elements": [{"type": "image", "image_url": "u", "alt_text": "a"}]},
            True,
        ),
        ({"type": "divider"}, True),
        ({"type": "divider", "text": "x"}, False),
        ({"type": "divider", "block_id": "x" * 255}, True),
        ({"type": "divider", "block_id": "x" * 256}, False),
        ({"type": "unknown"}, False),
        ("divider", False),
    ],
)
async def test_emulator_block_kit(
    api: TestClient[Any, Any], emulator: SlackEmulator, block: Any, valid: bool
) -> None:
    status, answer, _ = await post(api, {"channel": "C0PRODUCT1", "text": "t", "blocks": [block]})
    assert status == 200
    assert answer["ok"] is valid
    if not valid:
        assert answer == {"ok": False, "error": "invalid_blocks"}


async def test_emulator_post_message_answers(
    api: TestClient[Any, Any], emulator: SlackEmulator
) -> None:
    status, answer, _ = await post(
        api, {"channel": "#product-insights", "text": "hi", "blocks": DETRACTOR_BLOCKS}
    )
    assert status == 200
    assert answer["ok"] is True
    assert answer["channel"] == "C0PRODUCT1"
    assert answer["message"]["text"] == "hi"
    assert answer["message"]["blocks"] == DETRACTOR_BLOCKS
    assert answer["message"]["ts"] == answer["ts"]
    assert "warning" not in answer
    # By ID and by bare name too; a JSON body without charset gets Slack's warning.
    _, by_id, _ = await post(api, {"channel": "C0PRODUCT1", "text": "a"})
    _, by_name, _ = await post(
        api, {"channel": "product-insights", "text": "b"}, content_type="application/json"
    )
    assert by_id["ok"] is True
    assert by_name["warning"] == "missing_charset"
    assert by_name["response_metadata"] == {"warnings": ["missing_charset"]}
    assert len({by_id["ts"], by_name["ts"], answer["ts"]}) == 3
    assert [p.channel for p in emulator.ledger] == ["C0PRODUCT1"] * 3
    assert emulator.ledger[0].message == {
        "channel": "#product-insights",
        "text": "hi",
        "blocks": DETRACTOR_BLOCKS,
    }


@pytest.mark.parametrize(
    ("token", "body", "code"),
    [
        (None, {"channel": "C0PRODUCT1", "text": "x"}, "not_authed"),
        ("xoxb-wrong", {"channel": "C0PRODUCT1", "text": "x"}, "invalid_auth"),
        ("xoxb-revoked", {"channel": "C0PRODUCT1", "text": "x"}, "token_revoked"),
        ("xoxb-inactive", {"channel": "C0PRODUCT1", "text": "x"}, "account_inactive"),
        ("xoxb-unscoped", {"channel": "C0PRODUCT1", "text": "x"}, "missing_scope"),
        (BOT_TOKEN, {"text": "x"}, "channel_not_found"),
        (BOT_TOKEN, {"channel": "#nowhere", "text": "x"}, "channel_not_found"),
        (BOT_TOKEN, {"channel": "C0ARCHIVED", "text": "x"}, "is_archived"),
        (BOT_TOKEN, {"channel": "#private", "text": "x"}, "not_in_channel"),
        (BOT_TOKEN, {"channel": "C0PRODUCT1"}, "no_text"),
        (BOT_TOKEN, {"channel": "C0PRODUCT1", "text": ""}, "no_text"),
        (BOT_TOKEN, {"channel": "C0PRODUCT1", "text": 3}, "invalid_arguments"),
        (BOT_TOKEN, {"channel": "C0PRODUCT1", "text": "x", "mrkdwn": "no"}, "invalid_arguments"),
        (BOT_TOKEN, {"channel": "C0PRODUCT1", "text": "x" * 40_001}, "msg_too_long"),
        (BOT_TOKEN, {"channel": "C0PRODUCT1", "attachments": [{}] * 101}, "too_many_attachments"),
        (BOT_TOKEN, {"channel": "C0PRODUCT1", "attachments": {"a": 1}}, "invalid_attachments"),
        (
            BOT_TOKEN,
            {"channel": "C0PRODUCT1", "blocks": [{"type": "divider"}] * 51},
            "invalid_blocks",
        ),
        (BOT_TOKEN, ["not", "an", "object"], "json_not_object"),
    ],
)
async def test_emulator_post_message_errors_are_ok_false(
    api: TestClient[Any, Any], emulator: SlackEmulator, token: str | None, body: Any, code: str
) -> None:
    status, answer, _ = await post(api, body, token=token)
    assert (status, answer) == (200, {"ok": False, "error": code})
    assert emulator.ledger == []


async def test_emulator_post_message_body_formats(
    api: TestClient[Any, Any], emulator: SlackEmulator
) -> None:
    assert (await post(api, None, raw=b"{oops"))[1] == {"ok": False, "error": "invalid_json"}
    text_plain = await post(api, {"channel": "C0PRODUCT1", "text": "x"}, content_type="text/plain")
    assert text_plain[1] == {"ok": False, "error": "invalid_form_data"}
    # Form-urlencoded, the token as a field and blocks as a JSON string: accepted.
    form = {
        "token": BOT_TOKEN,
        "channel": "C0PRODUCT1",
        "text": "form",
        "blocks": json.dumps(DETRACTOR_BLOCKS),
    }
    async with api.post("/api/chat.postMessage", data=form) as resp:
        assert (await resp.json())["ok"] is True
    assert emulator.messages() == [
        {"channel": "C0PRODUCT1", "text": "form", "blocks": DETRACTOR_BLOCKS}
    ]
    # A token in a JSON body is not read (Slack reads it from the header or a form only).
    _, answer, _ = await post(api, {"token": BOT_TOKEN, "channel": "C0PRODUCT1", "text": "x"}, None)
    assert answer == {"ok": False, "error": "not_authed"}
    bad_blocks = {**form, "blocks": "[not json"}
    async with api.post("/api/chat.postMessage", data=bad_blocks) as resp:
        assert await resp.json() == {"ok": False, "error": "invalid_blocks"}


async def test_emulator_auth_test(api: TestClient[Any, Any]) -> None:
    headers = {"Authorization": f"Bearer {BOT_TOKEN}"}
    async with api.post("/api/auth.test", headers=headers) as resp:
        assert (await resp.json())["ok"] is True
    async with api.post("/api/auth.test", headers={"Authorization": "Bearer xoxb-revoked"}) as r:
        assert await r.json() == {"ok": False, "error": "token_revoked"}


async def test_emulator_rate_limit_one_per_second_per_channel_with_a_burst(
    api: TestClient[Any, Any], emulator: SlackEmulator, clock: Clock
) -> None:
    message = {"channel": "C0PRODUCT1", "text": "x"}
    for _ in range(3):  # the burst
        assert (await post(api, message))[1]["ok"] is True
    status, answer, retry_after = await post(api, message)
    assert (status, answer, retry_after) == (429, {"ok": False, "error": "ratelimited"}, "1")
    # Another channel (the webhook's is the same channel: it shares the bucket).
    emulator.channels["C0OTHER001"] = Channel("C0OTHER001", "other")
    assert (await post(api, {"channel": "C0OTHER001", "text": "x"}))[1]["ok"] is True
    async with api.post(HOOK_PATH, json={"text": "x"}) as resp:
        assert (resp.status, await resp.text(), resp.headers["Retry-After"]) == (
            429,
            "rate_limited",
            "1",
        )
    clock.now += 0.5
    assert (await post(api, message))[0] == 429
    clock.now += 0.5
    assert (await post(api, message))[1]["ok"] is True
    assert (await post(api, message))[0] == 429
    # A slower emulator says so in whole seconds: ceil, at least 1.
    emulator.rate_per_s = 0.25
    assert (await post(api, message))[2] == "4"
    # Refused messages do not count against the limit, and are not posted.
    assert len(emulator.ledger) == 5


async def test_emulator_scripted_faults(api: TestClient[Any, Any], emulator: SlackEmulator) -> None:
    emulator.script = [
        Fault(429, "rate_limited", retry_after="3"),
        Fault(500, "rollup_error"),
        Fault(200, "fatal_error"),
        Fault(503, retry_after="7"),
        Fault(502, body=b"<html>bad gateway</html>"),
    ]
    async with api.post(HOOK_PATH, json={"text": "x"}) as resp:
        assert (resp.status, await resp.text(), resp.headers["Retry-After"]) == (
            429,
            "rate_limited",
            "3",
        )
    assert await hook(api, {"text": "x"}) == (500, "rollup_error")
    assert await post(api, {"channel": "C0PRODUCT1", "text": "x"}) == (
        200,
        {"ok": False, "error": "fatal_error"},
        None,
    )
    assert await post(api, {"channel": "C0PRODUCT1", "text": "x"}) == (
        503,
        {"ok": False, "error": "fatal_error"},
        "7",
    )
    async with api.post(HOOK_PATH, json={"text": "x"}) as resp:
        assert (resp.status, await resp.read()) == (502, b"<html>bad gateway</html>")
    assert emulator.ledger == []
    assert await hook(api, {"text": "x"}) == (200, "ok")
    assert [r.status for r in emulator.requests] == [429, 500, 200, 503, 502, 200]


# ---- conformance: python-slack-sdk against the emulator ------------------------------------


async def test_sdk_webhook_client_is_accepted_and_reads_the_answers(
    aiohttp_server: ServerFactory,
) -> None:
    emulator = SlackEmulator(burst=100)
    server = await aiohttp_server(emulator.app())
    blocks = [
        HeaderBlock(text=PlainTextObject(text=":rotating_light: Detractor", emoji=True)),
        SectionBlock(
            fields=[PlainTextObject(text="Score: 3/10"), PlainTextObject(text="Visitor: u")]
        ),
        SectionBlock(text=PlainTextObject(text="Exports keep timing out")),
        ContextBlock(elements=[MarkdownTextObject(text="Pendo NPS survey `NPS2024Q1`")]),
    ]

    def calls() -> list[tuple[int, str]]:
        client = WebhookClient(str(server.make_url(HOOK_PATH)))
        gone = WebhookClient(str(server.make_url("/services/T1/B1/gone")))
        answers = [
            client.send(text="NPS detractor", blocks=blocks),
            client.send(text="plain", unfurl_links=False),
            client.send_dict({"text": "dict", "attachments": [{"text": "a"}]}),
            client.send(),  # nothing to post
            gone.send(text="x"),
        ]
        return [(a.status_code, a.body) for a in answers]

    answers = await asyncio.to_thread(calls)
    assert answers == [(200, "ok"), (200, "ok"), (200, "ok"), (400, "no_text"), (404, "no_service")]
    sent = [json.loads(r.body) for r in emulator.requests[:3]]
    assert emulator.messages() == sent
    assert sent[0]["blocks"] == [block.to_dict() for block in blocks]
    assert emulator.requests[0].headers["Content-Type"] == "application/json;charset=utf-8"


@pytest.mark.filterwarnings("ignore:The top-level `text` argument is missing")
async def test_sdk_web_client_is_accepted_and_reads_the_answers(
    aiohttp_server: ServerFactory,
) -> None:
    emulator = SlackEmulator(burst=100)
    emulator.channels["C0ARCHIVED"] = Channel("C0ARCHIVED", "old", archived=True)
    server = await aiohttp_server(emulator.app())
    base_url = str(server.make_url("/api/"))

    def calls() -> list[Any]:
        client = WebClient(token=BOT_TOKEN, base_url=base_url)
        results: list[Any] = [client.auth_test()["ok"]]
        answer = client.chat_postMessage(
            channel="#product-insights",
            text="NPS detractor",
            blocks=DETRACTOR_BLOCKS,
            unfurl_links=False,
        )
        results.append((answer["ok"], answer["channel"], answer["message"]["text"]))
        form = client.api_call("chat.postMessage", params={"channel": "C0PRODUCT1", "text": "f"})
        results.append(form["ok"])
        for kwargs in ({"channel": "C0ARCHIVED", "text": "x"}, {"channel": "C0PRODUCT1"}):
            try:
                client.chat_postMessage(**kwargs)
            except SlackApiError as exc:
                results.append(exc.response["error"])
        try:
            WebClient(token="xoxb-nope", base_url=base_url).chat_postMessage(
                channel="C0PRODUCT1", text="x"
            )
        except SlackApiError as exc:
            results.append(exc.response["error"])
        return results

    results = await asyncio.to_thread(calls)
    assert results == [
        True,
        (True, "C0PRODUCT1", "NPS detractor"),
        True,
        "is_archived",
        "no_text",
        "invalid_auth",
    ]
    assert emulator.messages() == [
        {
            "channel": "#product-insights",
            "text": "NPS detractor",
            "blocks": DETRACTOR_BLOCKS,
            "unfurl_links": False,
        },
        {"channel": "C0PRODUCT1", "text": "f"},
    ]
    assert emulator.requests[1].headers["Authorization"] == f"Bearer {BOT_TOKEN}"


async def test_sdk_retries_our_429_after_its_integer_retry_after(
    aiohttp_server: ServerFactory,
) -> None:
    emulator = SlackEmulator(burst=1)
    server = await aiohttp_server(emulator.app())
    base_url = str(server.make_url("/api/"))

    def calls() -> list[bool]:
        client = WebClient(token=BOT_TOKEN, base_url=base_url)
        client.retry_handlers.append(RateLimitErrorRetryHandler(max_retry_count=1))
        return [client.chat_postMessage(channel="C0PRODUCT1", text=f"m{i}")["ok"] for i in range(2)]

    assert await asyncio.to_thread(calls) == [True, True]
    assert [r.status for r in emulator.requests] == [200, 429, 200]
    assert emulator.messages() == [
        {"channel": "C0PRODUCT1", "text": "m0"},
        {"channel": "C0PRODUCT1", "text": "m1"},
    ]


def _rule_blocks() -> list[list[dict[str, Any]]]:
    """The blocks rules/slack.yaml produces for a detractor, a promoter and a scoreless answer."""
    ruleset = load_rules(ROOT / "rules" / "slack.yaml").ruleset
    assert ruleset is not None
    out = []
    for properties in ({"score": 0, "comment": "x" * 5000, "guide_id": "G"}, {"score": 9}, {}):
        for output in ruleset.evaluate(event(properties=properties)):
            assert isinstance(output, Routed)
            out.append(output.payload["blocks"])
    return out


def test_the_rules_blocks_pass_the_sdks_own_block_validation() -> None:
    all_blocks = _rule_blocks()
    assert len(all_blocks) == 3
    for blocks in all_blocks:
        for block in blocks:
            parsed = Block.parse(block)
            assert parsed is not None
            parsed.validate_json()  # raises SlackObjectFormationError
            assert parsed.to_dict() == block


# ---- end to end: the sink's requests against the emulator over HTTP ------------------------


async def send(request: HttpRequest) -> HttpResponse:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            request.method, request.url, headers=dict(request.headers), data=request.body
        ) as resp,
    ):
        headers = {k.lower(): v for k, v in resp.headers.items()}
        return HttpResponse(resp.status, headers, await resp.read())


def rule_items(s: SlackSink) -> list[tuple[str, Prepared]]:
    """The shared fixtures and a spread of NPS answers through rules/slack.yaml."""
    ruleset = load_rules(ROOT / "rules" / "slack.yaml").ruleset
    assert ruleset is not None
    events = [ev for evs in fixture_events().values() for ev in evs]
    answers: list[dict[str, Any]] = [
        {"score": 0, "comment": "<!channel> *fix* <https://evil.example|this>"},
        {"score": 6, "comment": "é" * 3500},
        {"score": 7, "comment": "fine", "guide_id": "NPS2024Q1"},
        {"score": 10},
        {"score": "3"},
        {},
    ]
    events += [event(id=f"nps-{i}", properties=p) for i, p in enumerate(answers)]
    items = []
    for ev in events:
        for output in ruleset.evaluate(ev):
            assert isinstance(output, Routed)
            key = idempotency_key(ev.id, s.name, output.rule_id)
            items.append((output.rule_id, s.prepare(output, key, ev)))
    return items


async def post_all(s: SlackSink, items: list[Prepared], clock: Clock) -> list[Any]:
    outcomes = []
    for item in items:
        (request,) = s.build([item])
        outcomes.append(s.classify(request, await send(request)))
        clock.now += 1.0  # the delivery layer's 1/s per channel
    return outcomes


@pytest.mark.parametrize("mode", ["webhook", "chat.postMessage"])
async def test_sink_requests_from_the_rules_are_posted_end_to_end(
    aiohttp_server: ServerFactory, clock: Clock, mode: str
) -> None:
    emulator = SlackEmulator(clock=clock)
    server = await aiohttp_server(emulator.app())
    if mode == "webhook":
        s = create({"webhook_url": str(server.make_url(HOOK_PATH))})
    else:
        s = create({"bot_token": BOT_TOKEN, "endpoint": str(server.make_url("/api"))})
    items = rule_items(s)
    rules = [rule for rule, _ in items]
    assert rules.count("nps-detractors") == 4  # the two NPS fixtures, scores 0 and 6
    assert rules.count("nps-passives-promoters") == 2
    assert rules.count("nps-without-score") == 2
    outcomes = await post_all(s, [item for _, item in items], clock)
    assert outcomes == [Delivered()] * len(items)
    assert [p.channel for p in emulator.ledger] == ["C0PRODUCT1"] * len(items)
    assert emulator.messages() == [json.loads(item.body) for _, item in items]
    detractors = [
        m
        for (rule, _), m in zip(items, emulator.messages(), strict=True)
        if rule == "nps-detractors"
    ]
    for message in detractors:
        assert message["text"].startswith(":rotating_light: NPS detractor")
        assert message["blocks"][0] == {
            "type": "header",
            "text": {"type": "plain_text", "text": ":rotating_light: Detractor", "emoji": True},
        }
    # The markup in a comment stays plain text; a long comment is cut to Slack's 3,000.
    assert detractors[2]["blocks"][2]["text"] == {
        "type": "plain_text",
        "text": "Comment: <!channel> *fix* <https://evil.example|this>",
    }
    assert detractors[3]["blocks"][2]["text"]["text"] == ("Comment: " + "é" * 3000)[:3000]


async def test_sink_outcomes_from_emulator_answers(
    aiohttp_server: ServerFactory, clock: Clock
) -> None:
    emulator = SlackEmulator(
        clock=clock,
        channels={
            "C0PRODUCT1": Channel("C0PRODUCT1", "product-insights"),
            "C0ARCHIVED": Channel("C0ARCHIVED", "old", archived=True),
        },
    )
    server = await aiohttp_server(emulator.app())
    endpoint = str(server.make_url("/api"))
    s = create({"bot_token": BOT_TOKEN, "endpoint": endpoint, "channel": "#product-insights"})

    async def outcome(sink: SlackSink, **payload: Any) -> Any:
        (request,) = sink.build([sink.prepare(routed(**payload), KEY, event())])
        return sink.classify(request, await send(request))

    assert await outcome(s, text="ok") == Delivered()
    too_long = await outcome(s, text="x" * 40_001)
    assert isinstance(too_long, Reject)
    assert "msg_too_long" in too_long.reason
    bad_block = await outcome(s, text="x", blocks=[_header("x" * 151)])
    assert isinstance(bad_block, Reject)
    for channel, code in (("#nowhere", "channel_not_found"), ("C0ARCHIVED", "is_archived")):
        paused = await outcome(s, text="x", channel=channel)
        assert isinstance(paused, Pause)
        assert code in paused.reason
    revoked = create({"bot_token": "xoxb-other", "endpoint": endpoint, "channel": "C0PRODUCT1"})
    paused = await outcome(revoked, text="x")
    assert isinstance(paused, Pause)
    assert "invalid_auth" in paused.reason
    for _ in range(2):  # the rest of the emulator's burst
        assert await outcome(s, text="x") == Delivered()
    limited = await outcome(s, text="x")
    assert isinstance(limited, Retry)
    assert limited.after_s == 1.0
    emulator.script = [Fault(503, retry_after="2")]
    clock.now += 5
    assert await outcome(s, text="x") == Retry(
        'HTTP 503: {"ok": false, "error": "fatal_error"}', 2.0
    )
    wrong = create(
        {"bot_token": BOT_TOKEN, "endpoint": str(server.make_url("/nope")), "channel": "C1"}
    )
    assert isinstance(await outcome(wrong, text="x"), Pause)
    health = s.health_request()
    assert health is not None
    assert s.classify(health, await send(health)) == Delivered()
    # The webhook: its channel archived is a pause, a bad message a reject.
    emulator.hooks["/services/T1/B1/old"] = Hook("C0ARCHIVED")
    archived = create({"webhook_url": str(server.make_url("/services/T1/B1/old"))})
    assert isinstance(await outcome(archived, text="x"), Pause)
    hook_sink = create({"webhook_url": str(server.make_url(HOOK_PATH))})
    clock.now += 5
    assert isinstance(await outcome(hook_sink, text="x" * 40_001), Reject)
    assert await outcome(hook_sink, text="fine") == Delivered()


@pytest.mark.parametrize("channels", [1, 3])
async def test_the_delivery_layers_limits_never_trip_the_emulators(
    aiohttp_server: ServerFactory, clock: Clock, channels: int
) -> None:
    """Sending as fast as LIMITS allow (the router's RateLimiter, same clock): no 429."""
    emulator = SlackEmulator(clock=clock)
    for i in range(channels):
        emulator.channels[f"C{i:09d}"] = Channel(f"C{i:09d}", f"c{i}")
    server = await aiohttp_server(emulator.app())
    s = create({"bot_token": BOT_TOKEN, "endpoint": str(server.make_url("/api"))})
    limiter = RateLimiter(
        LIMITS.rate_per_s, LIMITS.burst, LIMITS.per_key_rate_per_s, LIMITS.per_key_burst
    )
    for n in range(20):
        item = s.prepare(routed(text=f"m{n}", channel=f"C{n % channels:09d}"), KEY, event())
        wait = limiter.wait_time(clock.now, item.key)
        clock.now += max(0.0, wait)
        limiter.take(clock.now, item.key)
        (request,) = s.build([item])
        assert s.classify(request, await send(request)) == Delivered()
    assert len(emulator.ledger) == 20


async def test_a_detractor_with_an_empty_comment_is_posted(
    aiohttp_server: ServerFactory, clock: Clock
) -> None:
    emulator = SlackEmulator(clock=clock)
    server = await aiohttp_server(emulator.app())
    s = create({"bot_token": BOT_TOKEN, "endpoint": str(server.make_url("/api"))})
    ruleset = load_rules(ROOT / "rules" / "slack.yaml").ruleset
    assert ruleset is not None
    (output,) = ruleset.evaluate(event(properties={"score": 2, "comment": ""}))
    assert isinstance(output, Routed)
    assert output.rule_id == "nps-detractors"
    (request,) = s.build([s.prepare(output, KEY, event())])
    assert s.classify(request, await send(request)) == Delivered()
