"""The ingest service: Pendo webhooks and Track-API events over HTTP, onto the Kafka event topic.

A 2xx means every event of the request is acknowledged by Kafka; anything else earns a 4xx with
a JSON error naming the field and the reason, or a 503 with Retry-After when Kafka does not
acknowledge in time. Routes:

- ``POST /webhooks/pendo``: ``X-Pendo-Signature: sha256=<hex>`` over the raw body (401 first);
- ``POST /data/track``: ``x-pendo-integration-key``; one event or a JSON array;
- ``GET /healthz``, ``GET /readyz``, ``GET /metrics``, ``GET /openapi.yaml``.
"""

from __future__ import annotations

import hmac
import logging
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from importlib import resources
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from router import signature
from router.bus import EventBus, KafkaBus, PublishError, RecordTooLarge
from router.events import PayloadError, Record, decode_webhook, now_ms, to_record, track_records
from router.metrics import IngestMetrics
from router.settings import Settings

log = logging.getLogger(__name__)

SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
BUS: web.AppKey[EventBus] = web.AppKey("bus", EventBus)
METRICS: web.AppKey[IngestMetrics] = web.AppKey("metrics", IngestMetrics)

SIGNATURE_HEADER = "X-Pendo-Signature"
INTEGRATION_KEY_HEADER = "x-pendo-integration-key"

_json = msgspec.json.Encoder()
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class IngestState:
    """Per-app mutable state: the secrets as bytes (decoded once) and the in-flight count."""

    def __init__(self, settings: Settings) -> None:
        ingest = settings.ingest
        self.webhook_secrets = [s.reveal().encode() for s in ingest.webhook_secrets]
        self.integration_keys = [k.reveal().encode() for k in ingest.integration_keys]
        self.allow_unsigned = ingest.allow_unsigned
        self.max_batch_events = ingest.max_batch_events
        self.max_inflight = ingest.max_inflight_requests
        self.retry_after = str(ingest.retry_after_s)
        self.inflight = 0


STATE: web.AppKey[IngestState] = web.AppKey("state", IngestState)


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=_json.encode(body), content_type="application/json", headers=headers
    )


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response(status, {"error": code, "message": message}, headers)


class Rejected(Exception):
    """Ends a request with a JSON error; ``reason`` is the metric label."""

    def __init__(self, response: web.Response, reason: str) -> None:
        self.response = response
        self.reason = reason


def _require_json(request: web.Request) -> None:
    if request.content_type != "application/json":
        raise Rejected(
            error_response(
                415,
                "unsupported_media_type",
                f"Content-Type must be application/json, got {request.content_type}",
            ),
            "content_type",
        )


# zlib window bits per Content-Encoding: gzip, and deflate as zlib (RFC 9110) or raw.
_ENCODINGS: dict[str, tuple[int, ...]] = {
    "gzip": (16 + zlib.MAX_WBITS,),
    "x-gzip": (16 + zlib.MAX_WBITS,),
    "deflate": (zlib.MAX_WBITS, -zlib.MAX_WBITS),
}


def _too_large(limit: int) -> Rejected:
    return Rejected(
        error_response(
            413,
            "body_too_large",
            f"The request body (decompressed) exceeds the limit of {limit} bytes",
        ),
        "too_large",
    )


def _unreadable(reason: str) -> Rejected:
    return Rejected(
        error_response(400, "unreadable_body", f"The request body cannot be read: {reason}"),
        "unreadable_body",
    )


def _inflate(raw: bytes, wbits: int, limit: int) -> bytes:
    """Decompress every member of ``raw`` (gzip may concatenate them), at most ``limit`` bytes."""
    body = b""
    rest = raw
    while rest:
        inflater = zlib.decompressobj(wbits)
        body += inflater.decompress(rest, limit + 1 - len(body))
        if len(body) > limit or inflater.unconsumed_tail:
            raise _too_large(limit)
        if not inflater.eof:
            raise zlib.error("truncated")
        rest = inflater.unused_data
    return body


async def _read_body(request: web.Request) -> bytes:
    """The request body, decompressed.

    Here rather than by aiohttp, whose parser answers an encoding it cannot decode (br, zstd)
    with a plain-text 400 before the app runs.
    """
    limit = request.app[SETTINGS].ingest.max_body_bytes
    try:
        raw = await request.read()  # client_max_size bounds what was sent
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
    except RequestPayloadError as exc:  # a truncated upload
        raise _unreadable(str(exc)) from None
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return raw
    attempts = _ENCODINGS.get(encoding)
    if attempts is None:
        raise Rejected(
            error_response(
                415,
                "unsupported_encoding",
                f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none",
            ),
            "content_encoding",
        )
    for wbits in attempts:
        try:
            return _inflate(raw, wbits, limit)
        except zlib.error as exc:
            problem = str(exc)
    raise _unreadable(f"{encoding}: {problem}")


def _unauthorized(message: str, reason: str) -> Rejected:
    return Rejected(error_response(401, "unauthorized", message), reason)


async def webhook_handler(request: web.Request) -> web.Response:
    state = request.app[STATE]
    header = request.headers.get(SIGNATURE_HEADER)
    digest = signature.parse_signature(header)
    if header is None and not state.allow_unsigned:
        raise _unauthorized(f"Missing {SIGNATURE_HEADER} header", "signature_missing")
    if header is not None and digest is None:
        raise _unauthorized(
            f"Malformed {SIGNATURE_HEADER} header: expected sha256=<64 hex digits>",
            "signature_malformed",
        )
    _require_json(request)
    body = await _read_body(request)
    if digest is not None and not signature.verify(state.webhook_secrets, body, digest):
        raise _unauthorized(
            "Signature does not match the request body for any configured secret",
            "signature_mismatch",
        )
    try:
        record = to_record(decode_webhook(body, now_ms()))
    except PayloadError as exc:
        raise Rejected(json_response(exc.status, exc.to_dict()), exc.code) from None
    return await _publish(request, [record], "webhook")


async def track_handler(request: web.Request) -> web.Response:
    state = request.app[STATE]
    key = request.headers.get(INTEGRATION_KEY_HEADER)
    if key is None:
        raise _unauthorized(f"Missing {INTEGRATION_KEY_HEADER} header", "key_missing")
    # surrogateescape: aiohttp decodes header bytes that are not UTF-8 that way.
    if not _key_matches(state.integration_keys, key.encode("utf-8", "surrogateescape")):
        raise _unauthorized(f"Unknown {INTEGRATION_KEY_HEADER}", "key_mismatch")
    _require_json(request)
    body = await _read_body(request)
    try:
        records = track_records(body, now_ms(), state.max_batch_events)
    except PayloadError as exc:
        raise Rejected(json_response(exc.status, exc.to_dict()), exc.code) from None
    return await _publish(request, records, "track")


def _key_matches(keys: Sequence[bytes], given: bytes) -> bool:
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(key, given)
    return matched


async def _publish(request: web.Request, records: list[Record], source: str) -> web.Response:
    app = request.app
    state = app[STATE]
    metrics = app[METRICS]
    if state.inflight >= state.max_inflight:
        raise Rejected(
            error_response(
                503,
                "overloaded",
                "Too many requests are waiting for Kafka; retry later",
                {"Retry-After": state.retry_after},
            ),
            "overloaded",
        )
    state.inflight += 1
    started = time.perf_counter()
    try:
        await app[BUS].publish(records)
    except RecordTooLarge as exc:
        raise Rejected(
            error_response(413, "event_too_large", str(exc)), "event_too_large"
        ) from None
    except PublishError as exc:
        log.warning("publish of %d event(s) failed: %s", len(records), exc)
        raise Rejected(
            error_response(
                503,
                "kafka_unavailable",
                "The events were not acknowledged by Kafka; nothing was accepted. Retry later",
                {"Retry-After": state.retry_after},
            ),
            "kafka_unavailable",
        ) from None
    finally:
        state.inflight -= 1
        metrics.produce_seconds.observe(time.perf_counter() - started)
    metrics.accepted(source).inc(len(records))
    return json_response(200, {"accepted": len(records), "ids": [r.id for r in records]})


async def healthz(request: web.Request) -> web.Response:
    return json_response(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ok, reason = await request.app[BUS].ready()
    if ok:
        return json_response(200, {"status": "ready"})
    return json_response(503, {"status": "unavailable", "reason": reason})


async def metrics_handler(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def openapi_document() -> bytes:
    return resources.files("router").joinpath("openapi.yaml").read_bytes()


async def openapi_handler(request: web.Request) -> web.Response:
    return web.Response(body=openapi_document(), content_type="application/yaml")


@web.middleware
async def _outcome_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Counts every response by route and status, and turns refusals into JSON errors."""
    route = request.match_info.route.resource
    route_name = route.canonical if route is not None else "unmatched"
    metrics = request.app[METRICS]
    try:
        response = await handler(request)
    except Rejected as rejected:
        metrics.rejection(route_name, rejected.reason).inc()
        response = rejected.response
    except web.HTTPException as exc:
        if exc.status >= 400:
            response = error_response(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
            for name in ("Allow",):
                if name in exc.headers:
                    response.headers[name] = exc.headers[name]
        else:
            raise
    except Exception:
        # A bug, not the client's doing: logged with its traceback, answered as JSON like every
        # other error, and counted (aiohttp's own 500 bypassed the request metric).
        log.exception("unexpected error handling %s %s", request.method, route_name)
        response = error_response(
            500, "internal_error", "Unexpected error; retry the request (re-sending is safe)"
        )
    metrics.request(route_name, str(response.status)).inc()
    return response


def create_app(settings: Settings, bus: EventBus | None = None) -> web.Application:
    """Build the ingest app; with no bus given, a Kafka bus is started and stopped with it."""
    app = web.Application(
        client_max_size=settings.ingest.max_body_bytes,
        middlewares=[_outcome_middleware],
        handler_args={"auto_decompress": False},  # see _read_body
    )
    app[SETTINGS] = settings
    state = app[STATE] = IngestState(settings)
    metrics = app[METRICS] = IngestMetrics(CollectorRegistry())
    metrics.inflight.set_function(lambda: state.inflight)
    if bus is not None:
        app[BUS] = bus
    else:
        app.cleanup_ctx.append(_kafka_bus_ctx)
    if not settings.ingest.webhook_secrets and not settings.ingest.allow_unsigned:
        log.warning(
            "no ingest.webhook_secrets configured and ingest.allow_unsigned is false: "
            "every webhook will be refused with 401"
        )
    app.router.add_post("/webhooks/pendo", webhook_handler)
    app.router.add_post("/data/track", track_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/openapi.yaml", openapi_handler)
    return app


async def _kafka_bus_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    bus = KafkaBus(settings.kafka)
    await bus.start()
    app[BUS] = bus
    yield
    # Runs after the server stopped accepting and in-flight handlers finished.
    await bus.stop(grace_s=min(10.0, settings.ingest.shutdown_timeout_s))
