"""``router sink NAME``: one sink's consumer process, with its health and metrics endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

import sinks
from router.aio import unless_stopped
from router.consumer import SinkConsumer
from router.delivery.sink import sink_secrets
from router.dlq import Redactor, secret_values
from router.rules.live import LiveRules, RulesError, RulesMetrics
from router.settings import Settings
from router.sink_metrics import SinkMetrics

log = logging.getLogger(__name__)


def health_app(consumer: SinkConsumer, registry: CollectorRegistry) -> web.Application:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "state": consumer.state})

    async def readyz(request: web.Request) -> web.Response:
        kafka = await consumer.kafka_reachable() if consumer.started else "not started"
        ready = consumer.started and not consumer.stopping and kafka == "ok"
        body = {
            "status": "ready" if ready else "unavailable",
            "kafka": kafka,
            "state": consumer.state,
            "ruleset": consumer.rules.current.hash,
            "inflight_events": consumer.inflight_events,
            "healthcheck": consumer.health,
        }
        return web.json_response(body, status=200 if ready else 503)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def run_sink(settings: Settings, name: str) -> int:
    config = settings.sinks.get(name, {})
    try:
        sinks.load_plugins(settings.plugins)
        sink = sinks.create(name, config)
    except (LookupError, ValueError, KeyError) as exc:
        log.error("cannot start sink %s: %s", name, exc)
        return 2
    registry = CollectorRegistry()
    try:
        live = LiveRules(Path(settings.rules.dir) / f"{name}.yaml", RulesMetrics(registry))
    except RulesError as exc:
        log.error("cannot start sink %s: its rules are not usable: %s", name, exc)
        return 1
    redact = Redactor([*secret_values(config), *sink_secrets(sink)])
    consumer = SinkConsumer(settings, sink, live, SinkMetrics(name, registry), redact)
    runner = web.AppRunner(health_app(consumer, registry), access_log=None, handle_signals=False)
    await runner.setup()
    host, port = settings.consumer.health_host, settings.consumer.health_port
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:  # a port in use, a host that does not resolve
        log.error("cannot start sink %s: health port %s:%s: %s", name, host, port, exc)
        await runner.cleanup()
        return 2
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    live.install_sighup(loop)
    try:
        started = await unless_stopped(consumer.start(), stop)
    except Exception as exc:
        log.error("cannot start sink %s: %r", name, exc)
        await runner.cleanup()
        return 1
    if not started:  # SIGTERM during start-up: stop now rather than after it
        await runner.cleanup()
        return 0
    # The consumer allocates several container objects per event and keeps up to
    # max_inflight_events of them alive: with the default gen-0 threshold (700) the collector
    # runs every few hundred events and walks them again. Freeze what start-up made, collect less
    # often (the per-event garbage is acyclic and freed by reference counting anyway).
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    watcher = asyncio.create_task(live.watch(settings.rules.reload_interval_s, stop))
    # Beside consumption, not before it: a slow or failing destination is the delivery layer's
    # business (retry, pause); the check only tells the operator early.
    healthcheck = asyncio.create_task(consumer.healthcheck())
    try:
        await consumer.run(stop)
    finally:
        stop.set()
        healthcheck.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(watcher, 5)
        await runner.cleanup()
    return 0
