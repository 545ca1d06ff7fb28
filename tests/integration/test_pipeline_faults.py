"""The whole pipeline under faults: ingest -> Kafka -> five ``router sink`` processes -> emulators.

One test, on its own broker (``$KAFKA_OUTAGE_PORT``, default 19392, like the other tests that stop
Kafka, so that restarting it disturbs no other test): ``router serve`` and one ``router sink NAME``
process per sink (Segment, Mixpanel, Amplitude, GA4, Slack) with the default rule files in
``rules/``, each sink pointed at its emulator (tests/emulators, served by this test). While a
load sender keeps posting recent events through the ingest, three faults are injected one after
the other:

1. ``kill -9`` of the Mixpanel consumer, then a new Mixpanel consumer;
2. an outage of the Segment emulator: every request answered 503 for ``OUTAGE_S`` seconds;
3. Kafka stopped for a moment and started again (the ingest must answer 503, never a 2xx).

See :func:`test_pipeline_under_faults` for what is then checked and the duplicate bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

import sinks
from router import dlq
from router.delivery.sink import Sink, idempotency_key
from router.events import Event, decode_event
from router.rules.engine import Failed, RuleSet
from router.rules.loader import load_rules
from router.settings import Settings
from router.signature import sign
from tests.emulators import SLACK_HOOK_PATH, sink_configs
from tests.emulators import amplitude as amplitude_emulator
from tests.emulators import ga4 as ga4_emulator
from tests.emulators import mixpanel as mixpanel_emulator
from tests.emulators import segment as segment_emulator
from tests.emulators import slack as slack_emulator
from tests.fixtures import PENDO_FIXTURES
from tests.integration.conftest import Broker, free_port, make_settings, unique_topic, wait_ready
from tests.integration.dlq_helpers import end_offsets, read_to_end

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
SINKS = ("segment", "mixpanel", "amplitude", "ga4", "slack")
KILLED = "mixpanel"  # its consumer process is killed with SIGKILL, then started again
OUTAGE = "segment"  # its emulator answers 503 for OUTAGE_S seconds
WEBHOOK_SECRET = "pipeline-secret"
INTEGRATION_KEY = "pipeline-key"

# The schedule, in seconds from the start of the load.
KILL_AT = 2.0
OUTAGE_AT = 11.0
OUTAGE_S = 6.0
KAFKA_STOP_AT = 19.0
KAFKA_DOWN_S = 2.0  # between `kafkactl stop` returning and `kafkactl start` being called
LOAD_AFTER_KAFKA_S = 4.0  # the load goes on this long once Kafka is back

# The load: every TICK_S a Track-API batch, every other tick a webhook, now and then an NPS one.
TICK_S = 0.1
TRACK_BATCH = 6  # ~60 track events/s
NPS_EVERY = 20  # ticks: 0.5/s (Slack posts 1 message/s per channel)
VISITORS = 500
TRACK_NAMES = ("custom_feature_used", "report_exported", "purchase_completed", "dashboard_viewed")
WEBHOOKS = (
    ("webhook-dotted", "guide.viewed"),
    ("webhook-dotted", "guide.advanced"),
    ("webhook-url", "guideDisplayed"),
    ("webhook-dotted", "guide.dismissed"),
    ("webhook-dotted", "poll.response"),
    ("webhook-dotted", "guide.completed"),
    ("webhook-url", "pollSubmitted"),
    ("webhook-dotted", "track.event"),
    ("webhook-url", "trackEventReceived"),
)
NPS = (("webhook-dotted", "nps.response"), ("webhook-url", "npsSubmitted"))
REQUEST_TIMEOUT_S = 10.0
GIVE_UP_AFTER_S = 60.0  # a request not accepted by then fails the test


# ---- the broker, the processes and the emulators ----------------------------------------------


@dataclass
class Receipt:
    """One request an emulator answered, as it came off the wire."""

    at: float  # time.monotonic() when answered
    path: str
    status: int
    body: bytes  # decompressed


@dataclass
class Emulated:
    name: str
    emulator: Any
    server: TestServer
    receipts: list[Receipt] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


async def start_emulator(name: str) -> Emulated:
    emulator: Any = {
        "segment": segment_emulator.SegmentEmulator,
        "mixpanel": mixpanel_emulator.MixpanelEmulator,
        "amplitude": amplitude_emulator.AmplitudeEmulator,
        "ga4": ga4_emulator.Ga4Emulator,
        "slack": slack_emulator.SlackEmulator,
    }[name]()
    app = emulator.app()
    receipts: list[Receipt] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()  # cached: the handler reads the same bytes
        response: web.StreamResponse = await handler(request)
        if raw[:2] == b"\x1f\x8b":  # Mixpanel's app leaves gzip to its handler
            raw = gzip.decompress(raw)
        receipts.append(Receipt(time.monotonic(), request.path, response.status, raw))
        return response

    app.middlewares.append(record)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return Emulated(name, emulator, server, receipts)


class Processes:
    """The ingest and the sink consumers as child processes; all killed at the end."""

    def __init__(self, config: Path, logs: Path) -> None:
        self.config = config
        self.logs = logs
        self.all: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(self, label: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{label}.log").open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "router.cli", "--config", str(self.config), *args],
                cwd=ROOT,
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.all.append((label, process))
        return process

    def log_tail(self, label: str, lines: int = 30) -> str:
        text = (self.logs / f"{label}.log").read_text(errors="replace").splitlines()
        return f"--- {label}.log ---\n" + "\n".join(text[-lines:])

    def kill_all(self) -> None:
        for _, process in self.all:
            if process.poll() is None:
                process.kill()
                process.wait()


async def wait_http_ok(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            assert process.poll() is None, f"{url}: the process exited during start-up"
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            assert loop.time() < deadline, f"{url} not ready in {timeout_s} s"
            await asyncio.sleep(0.2)


# ---- the load sender ----------------------------------------------------------------------------


@dataclass
class Attempt:
    sent: float  # time.monotonic()
    answered: float
    status: int  # 0: no answer (connection error, timeout)


@dataclass
class Request:
    kind: str
    route: str
    body: bytes
    headers: dict[str, str]
    attempts: list[Attempt] = field(default_factory=list)
    accepted_at: float | None = None  # time.monotonic() of the 2xx
    ids: list[str] = field(default_factory=list)  # the event ids the 2xx named


def _template(shape: str, name: str) -> Any:
    return json.loads((PENDO_FIXTURES / shape / f"{name}.json").read_text())


class Load:
    """A Pendo-like sender: recent events, each request re-sent as is until a 2xx.

    A 503 is retried after its Retry-After (the ingest is configured to say 1 s), a request
    without an answer after 1 s: the same bytes, so the same event ids. An event counts as
    accepted only once a 2xx named it. Every event carries a unique tag (``pf-NNNNNN``) in a field
    every sink's message keeps, so that GA4 and Slack messages, which have no idempotency key,
    are told apart by their content. Some events are made to fail a sink's rules on purpose.
    """

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.rng = random.Random(20240615)
        self.seq = 0
        self.requests: list[Request] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.stop = asyncio.Event()
        self.templates = {(s, n): _template(s, n) for s, n in (*WEBHOOKS, *NPS)}

    def tag(self) -> str:
        self.seq += 1
        return f"pf-{self.seq:06d}"

    def visitor(self) -> str:
        return f"visitor-{self.rng.randrange(VISITORS):04d}"

    def track_event(self) -> dict[str, Any]:
        tag = self.tag()
        now_ms = int(time.time() * 1000)
        event: dict[str, Any] = {
            "type": "track",
            "event": self.rng.choice(TRACK_NAMES),
            "visitorId": self.visitor(),
            "accountId": f"account-{self.rng.randrange(40):03d}",
            "properties": {"seq": tag, "plan": self.rng.choice(["free", "pro"])},
            "context": {"ip": "203.0.113.7", "userAgent": "Mozilla/5.0"},
            "timestamp": now_ms - self.rng.randrange(60_000),
        }
        poison = self.seq % 50
        if poison == 0:  # not a GA4 name once lower-cased: GA4 mapping_error
            event["event"] = "Report Exported"
        elif poison == 1:  # a list parameter: GA4 mapping_error
            event["properties"]["tags"] = ["a", "b"]
        elif poison == 2:  # five days old: past GA4's 72 hours, invalid_payload
            event["timestamp"] = now_ms - 5 * 86_400_000
        elif poison == 3:  # shorter than Amplitude's 5-character id minimum: mapping_error
            event["visitorId"] = f"v{self.rng.randrange(10)}"
        return event

    def webhook(self, shape: str, name: str) -> dict[str, Any]:
        hook = json.loads(json.dumps(self.templates[(shape, name)]))
        tag = self.tag()
        now = time.time()
        nps = "nps" in name.lower()
        if shape == "webhook-dotted":
            data = hook["data"]
            hook["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
            data["visitor_id"] = f"nps-{tag}" if nps else self.visitor()
            if name == "track.event":
                data["properties"]["seq"] = tag
            else:
                data["guide_id"] = tag
            if nps:
                data["score"] = self.rng.randrange(11)
                data["comment"] = f"comment {tag}"
        else:
            props = hook["properties"]
            hook["timestamp"] = int(now)
            hook["visitorId"] = f"nps-{tag}" if nps else self.visitor()
            hook["uniqueId"] = f"{self.seq:040x}"
            if name == "trackEventReceived":
                props["eventProperties"]["seq"] = tag
            else:
                props["guideId"] = tag
            if nps:
                props["score"] = self.rng.randrange(11)
                props["reason"] = f"comment {tag}"
        return hook  # type: ignore[no-any-return]

    def send(self, session: aiohttp.ClientSession, kind: str, body: bytes) -> None:
        if kind == "track":
            route, headers = "/data/track", {"x-pendo-integration-key": INTEGRATION_KEY}
        else:
            route = "/webhooks/pendo"
            headers = {"X-Pendo-Signature": sign(WEBHOOK_SECRET.encode(), body)}
        headers["Content-Type"] = "application/json"
        request = Request(kind, route, body, headers)
        self.requests.append(request)
        task = asyncio.create_task(self.deliver(session, request))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def deliver(self, session: aiohttp.ClientSession, request: Request) -> None:
        first = time.monotonic()
        while time.monotonic() - first < GIVE_UP_AFTER_S:
            sent = time.monotonic()
            status, wait = 0, 1.0
            try:
                async with session.post(
                    self.base_url + request.route, data=request.body, headers=request.headers
                ) as response:
                    status = response.status
                    answer = await response.read()
                    wait = float(response.headers.get("Retry-After", "1"))
            except (aiohttp.ClientError, TimeoutError):
                pass
            request.attempts.append(Attempt(sent, time.monotonic(), status))
            if 200 <= status < 300:
                request.accepted_at = time.monotonic()
                request.ids = json.loads(answer)["ids"]
                return
            if status not in (0, 503):
                return  # a refusal: reported by the test
            await asyncio.sleep(wait)

    async def run(self, session: aiohttp.ClientSession) -> None:
        start = time.monotonic()
        tick = 0
        while not self.stop.is_set():
            events = [self.track_event() for _ in range(TRACK_BATCH)]
            self.send(session, "track", json.dumps(events, separators=(",", ":")).encode())
            if tick % 2 == 0:
                shape, name = WEBHOOKS[(tick // 2) % len(WEBHOOKS)]
                self.send(session, name, json.dumps(self.webhook(shape, name)).encode())
            if tick % NPS_EVERY == 0:
                shape, name = NPS[(tick // NPS_EVERY) % len(NPS)]
                self.send(session, name, json.dumps(self.webhook(shape, name)).encode())
            tick += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), start + tick * TICK_S - time.monotonic())

    async def finish(self) -> None:
        """Wait until every request is accepted (or given up on)."""
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=GIVE_UP_AFTER_S + 2 * REQUEST_TIMEOUT_S)


# ---- Kafka-side views ---------------------------------------------------------------------------


async def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offset per partition of ``topic`` (0 where none)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await asyncio.wait_for(consumer.start(), 30)
    try:
        out: dict[int, int] = {}
        for p in range(partitions):
            out[p] = await asyncio.wait_for(consumer.committed(TopicPartition(topic, p)), 10) or 0
        return out
    finally:
        await asyncio.wait_for(consumer.stop(), 10)


@dataclass
class Window:
    """The records a fault may make a sink's group read again.

    From the group's committed offset on, among the records that existed when the fault hit
    (Kafka's CreateTime up to ``until_ms``).
    """

    fault: str
    committed: dict[int, int]
    until_ms: int

    def holds(self, record: ConsumerRecord[bytes, bytes]) -> bool:
        offset: int = record.offset
        created_ms: int = record.timestamp
        return offset >= self.committed[record.partition] and created_ms <= self.until_ms


# ---- what each sink should have received -----------------------------------------------------


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def ga4_one_event_bodies(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**body, "events": [event]} for event in body["events"]]


def message_key(sink: str, message: Any) -> str:
    """How a message is known at the destination: its idempotency key, else its content."""
    if sink == "segment":
        return str(message["messageId"])
    if sink == "mixpanel":
        return str(message["properties"]["$insert_id"])
    if sink == "amplitude":
        return str(message["insert_id"])
    return canonical(message)  # GA4 (a one-event body) and Slack: no key


DELIVERY_PATHS = {  # where events are sent (not health checks: GA4's goes to /debug/mp/collect)
    "segment": "/v1/batch",
    "mixpanel": "/import",
    "amplitude": "/2/httpapi",
    "ga4": "/mp/collect",
    "slack": SLACK_HOOK_PATH,
}


def wire_messages(sink: str, receipt: Receipt) -> list[Any]:
    """The messages of one request an emulator answered with a 2xx."""
    if receipt.path != DELIVERY_PATHS[sink]:
        return []
    body = json.loads(receipt.body)
    if sink == "segment":
        return list(body["batch"])
    if sink == "mixpanel":
        return list(body)
    if sink == "amplitude":
        return list(body["events"])
    if sink == "ga4":
        return ga4_one_event_bodies(body)
    return [body]


def stored_messages(sink: str, emulator: Any) -> list[Any]:
    """What the emulator accepted and kept (one copy per key where it deduplicates)."""
    if sink == "segment":
        return [entry.message for entry in emulator.ledger.values()]
    if sink == "mixpanel":
        return list(emulator.events.values())
    if sink == "amplitude":
        return [entry.event for entry in emulator.ledger]
    if sink == "ga4":
        out = []
        for entry in emulator.ledger:
            body: dict[str, Any] = {"client_id": entry.client_id}
            if entry.user_id is not None:
                body["user_id"] = entry.user_id
            body["timestamp_micros"] = entry.timestamp_micros
            if entry.user_properties is not None:
                body["user_properties"] = entry.user_properties
            body["events"] = [entry.event]
            out.append(body)
        return out
    return emulator.messages()  # type: ignore[no-any-return]


_HOURS = re.compile(r"\d+(\.\d+)? hours old")


def letter_id(
    event_id: str | None, rule_id: str | None, reason: str, detail: str
) -> tuple[Any, ...]:
    # GA4's backdating detail names the age at the time it was checked.
    return (event_id, rule_id, reason, _HOURS.sub("N hours old", detail))


@dataclass
class Expected:
    deliveries: dict[str, Any] = field(default_factory=dict)  # message key -> message
    event_of: dict[str, str] = field(default_factory=dict)  # message key -> event id
    letters: set[tuple[Any, ...]] = field(default_factory=set)


def expected_for(sink: Sink, ruleset: RuleSet, events: list[Event]) -> Expected:
    """Run the sink's rules and ``prepare`` as its consumer does, over the accepted events."""
    out = Expected()
    for event in events:
        for output in ruleset.evaluate(event):
            if isinstance(output, Failed):
                detail = f"{output.field}: {output.reason}"
                out.letters.add(letter_id(event.id, output.rule_id, dlq.MAPPING_ERROR, detail))
                continue
            key = idempotency_key(event.id, sink.name, output.rule_id)
            try:
                prepared = sink.prepare(output, key, event)
            except ValueError as exc:
                out.letters.add(letter_id(event.id, output.rule_id, dlq.INVALID_PAYLOAD, str(exc)))
                continue
            message = json.loads(prepared.body)
            message_id = message_key(sink.name, message)
            assert message_id not in out.deliveries, f"{sink.name}: two events give {message_id}"
            out.deliveries[message_id] = message
            out.event_of[message_id] = event.id
    return out


def report(name: str, **figures: object) -> None:
    """Print the measured figures (pytest -s shows them)."""
    print(f"\n[{name}] " + ", ".join(f"{k}={v}" for k, v in figures.items()))


# ---- the test -----------------------------------------------------------------------------------


async def test_pipeline_under_faults(outage_broker: Broker, tmp_path: Path) -> None:
    """Nothing routed is lost, dead letters are exactly the rules' failures, duplicates bounded.

    After the load and the faults, for every sink:

    - every event the rules route to it (its rules and its ``prepare``, run here over the events
      that the ingest accepted with a 2xx, as read back from the topic) reached its emulator, the
      message exactly as the sink renders it; nothing else reached it;
    - every output its rules fail (mapping_error) or its sink refuses before sending
      (invalid_payload: GA4's 72 hours) is in its DLQ with that reason and detail, and nothing
      else is (no retries_exhausted, no rejected_by_api);
    - duplicates (copies of one message answered 2xx, counted on the wire) are explained: an
      extra copy of an event is allowed once per extra record of it on the topic (a request
      answered 503 whose events Kafka still took, then sent again) and once per fault window that
      holds one of its records. A fault window is what the fault may make the group read again:
      the records at or past the group's committed offset among those that existed when the
      fault hit (the kill: offsets committed after the kill, records created before it; the
      Kafka restart: offsets committed before the stop, records created before the start). The
      bound, per sink, is the sum of these allowances over its routed events; every extra copy
      must fall within its own event's allowance;
    - the group committed to the end (nothing stuck after the faults).

    And: every accepted event is on the topic and every event on it was accepted; while Kafka was
    down the ingest answered 503, never a 2xx; the Segment outage held up Segment only: every
    event accepted in the first half of the outage and routed to another sink reached that sink
    before the outage ended, while Segment got nothing in the outage and those events afterwards.
    """
    broker = outage_broker
    topic = unique_topic("router.pipeline")
    settings: Settings = make_settings(broker, topic)
    emulators = {name: await start_emulator(name) for name in SINKS}
    configs = sink_configs({name: e.url for name, e in emulators.items()})
    ingest_port = free_port()
    config = tmp_path / "router.yaml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "kafka": {
                    "bootstrap_servers": broker.bootstrap,
                    "topic": topic,
                    "partitions": 3,
                    "produce_timeout_ms": 2000,
                    "startup_timeout_s": 30,
                },
                "ingest": {
                    "host": "127.0.0.1",
                    "port": ingest_port,
                    "webhook_secrets": [WEBHOOK_SECRET],
                    "integration_keys": [INTEGRATION_KEY],
                    "retry_after_s": 1,
                },
                "rules": {"dir": str(ROOT / "rules")},
                "consumer": {
                    "group_prefix": f"{topic}-",
                    "dlq_topic": f"{topic}.dlq.{{sink}}",
                    "retry_topic": f"{topic}.retry.{{sink}}",
                    "commit_interval_s": 0.5,
                    "session_timeout_ms": 6000,
                    "revoke_timeout_s": 5,
                    "shutdown_timeout_s": 5,
                    "retry_base_s": 0.2,
                    "retry_cap_s": 1.0,
                },
                "sinks": configs,
            }
        )
    )
    procs = Processes(config, tmp_path)
    ingest_url = f"http://127.0.0.1:{ingest_port}"
    groups = {name: f"{topic}-{name}" for name in SINKS}
    windows: dict[str, list[Window]] = {name: [] for name in SINKS}
    marks: dict[str, float] = {}
    load = Load(ingest_url)

    def spawn_sink(name: str, label: str) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        return procs.spawn(label, "sink", name, ROUTER_CONSUMER__HEALTH_PORT=str(port)), port

    async def snapshot(names: tuple[str, ...]) -> dict[str, dict[int, int]]:
        return {
            n: await committed(broker.bootstrap, groups[n], topic, settings.kafka.partitions)
            for n in names
        }

    async def faults(start: float) -> None:
        async def at(offset: float) -> None:
            await asyncio.sleep(max(0.0, start + offset - time.monotonic()))

        await at(KILL_AT)
        # Right after the emulator has answered one of its requests: the events of that
        # request are delivered and, most likely, not yet committed (commit_interval_s 0.5).
        receipts = emulators[KILLED].receipts
        seen, deadline = len(receipts), time.monotonic() + 20
        while not any(r.status == 200 for r in receipts[seen:]):
            assert time.monotonic() < deadline, f"{KILLED} delivers nothing"
            await asyncio.sleep(0.002)
        victim = consumers[KILLED][0]
        os.kill(victim.pid, signal.SIGKILL)
        await asyncio.to_thread(victim.wait, 10)
        killed_ms = int(time.time() * 1000)
        marks["kill"] = time.monotonic()
        after_kill = await snapshot((KILLED,))
        windows[KILLED].append(Window("kill -9", after_kill[KILLED], killed_ms))
        consumers[KILLED] = spawn_sink(KILLED, f"sink-{KILLED}-restarted")

        await at(OUTAGE_AT)
        outage = emulators[OUTAGE].emulator
        outage.default = segment_emulator.Fault(status=503)
        marks["outage_start"] = time.monotonic()
        await asyncio.sleep(OUTAGE_S)
        outage.default = segment_emulator.Fault()
        marks["outage_end"] = time.monotonic()

        await at(KAFKA_STOP_AT)
        before_stop = await snapshot(SINKS)
        await asyncio.to_thread(broker.ctl, "stop")
        marks["kafka_down"] = time.monotonic()
        await asyncio.sleep(KAFKA_DOWN_S)
        marks["kafka_start"] = time.monotonic()
        start_ms = int(time.time() * 1000)
        for name in SINKS:
            windows[name].append(Window("kafka restart", before_stop[name], start_ms))
        await asyncio.to_thread(broker.ctl, "start")
        marks["kafka_up"] = time.monotonic()
        await asyncio.sleep(LOAD_AFTER_KAFKA_S)
        load.stop.set()

    consumers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        ingest = procs.spawn("ingest", "serve")
        for name in SINKS:
            consumers[name] = spawn_sink(name, f"sink-{name}")
        await wait_ready(ingest_url, ingest)
        for process, port in consumers.values():
            await wait_http_ok(f"http://127.0.0.1:{port}/readyz", process, 60)

        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        connector = aiohttp.TCPConnector(limit=200)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            started = time.monotonic()
            try:
                await asyncio.gather(load.run(session), faults(started))
            finally:
                load.stop.set()
                await load.finish()
        load_s = time.monotonic() - started

        # -- the ingest: everything accepted in the end, 503 (never 2xx) while Kafka was down
        statuses = Counter(a.status for r in load.requests for a in r.attempts)
        refused = [r for r in load.requests if r.accepted_at is None]
        assert not refused, f"{len(refused)} request(s) never accepted: {refused[0].attempts}"
        assert set(statuses) <= {200, 503, 0}, statuses
        # While the broker was stopped (0.5 s of grace for an acknowledgement it sent just
        # before): only 503s (or no answer), and a request sent then got its 2xx only after
        # Kafka was started again.
        attempts = [a for r in load.requests for a in r.attempts]
        down, up = marks["kafka_down"], marks["kafka_start"]
        answered_down = Counter(a.status for a in attempts if down + 0.5 < a.answered < up)
        assert answered_down[503] > 0, answered_down
        assert set(answered_down) <= {503, 0}, answered_down
        sent_down = [a for a in attempts if down < a.sent < up]
        assert all(a.answered > up for a in sent_down if a.status == 200)
        accepted_at = {i: r.accepted_at for r in load.requests for i in r.ids}

        # -- the topic: every accepted event on it, nothing on it that was not accepted
        records = await read_to_end(settings, topic)
        events: dict[str, Event] = {}
        records_of: dict[str, list[ConsumerRecord[bytes, bytes]]] = {}
        for record in records:
            event = decode_event(record.value)
            events.setdefault(event.id, event)
            records_of.setdefault(event.id, []).append(record)
        assert set(accepted_at) == set(events)
        accepted = [events[i] for i in sorted(events)]

        expected: dict[str, Expected] = {}
        for name in SINKS:
            ruleset = load_rules(ROOT / "rules" / f"{name}.yaml").ruleset
            assert ruleset is not None
            expected[name] = expected_for(sinks.create(name, configs[name]), ruleset, accepted)

        def arrived(name: str) -> bool:
            stored = {message_key(name, m) for m in stored_messages(name, emulators[name].emulator)}
            return stored >= set(expected[name].deliveries)

        deadline = time.monotonic() + 45
        while not all(arrived(name) for name in SINKS):
            missing = {
                n: len(
                    set(expected[n].deliveries)
                    - {message_key(n, m) for m in stored_messages(n, emulators[n].emulator)}
                )
                for n in SINKS
            }
            assert time.monotonic() < deadline, f"events missing at the emulators: {missing}"
            await asyncio.sleep(0.5)
        drained_s = time.monotonic() - started - load_s
        ends = await end_offsets(settings, topic)
        deadline = time.monotonic() + 30
        while True:
            done = await snapshot(SINKS)
            stuck = {n: c for n, c in done.items() if c != ends}
            if not stuck:
                break
            assert time.monotonic() < deadline, f"groups not committed to the end {ends}: {stuck}"
            await asyncio.sleep(0.5)
        for label, process in procs.all:
            if label != f"sink-{KILLED}":
                assert process.poll() is None, procs.log_tail(label)
    finally:
        procs.kill_all()
        for emulated in emulators.values():
            await emulated.server.close()

    figures: dict[str, dict[str, Any]] = {}
    for name in SINKS:
        emulated = emulators[name]
        want = expected[name]
        # Arrived, as rendered, and nothing else.
        stored = {message_key(name, m): m for m in stored_messages(name, emulated.emulator)}
        assert set(stored) == set(want.deliveries), name
        for key, message in want.deliveries.items():
            assert stored[key] == message, (name, key)
        assert getattr(emulated.emulator, "dropped", []) == [], name

        # Dead letters: exactly the rules' and the sink's refusals, with their reasons.
        letters = [dlq.decode(r.value) for r in await read_to_end(settings, f"{topic}.dlq.{name}")]
        got = {letter_id(x.event_id, x.rule_id, x.reason, x.detail) for x in letters}
        assert got == want.letters, (name, got ^ want.letters)

        # Duplicates, counted on the wire, each within its event's allowance.
        copies: Counter[str] = Counter()
        first_at: dict[str, float] = {}
        for receipt in emulated.receipts:
            if 200 <= receipt.status < 300 and receipt.body:
                for message in wire_messages(name, receipt):
                    key = message_key(name, message)
                    copies[key] += 1
                    first_at.setdefault(key, receipt.at)
        assert set(copies) == set(want.deliveries), name

        def allowance(event_id: str, sink: str = name) -> int:
            recs = records_of[event_id]
            return len(recs) - 1 + sum(w.holds(r) for w in windows[sink] for r in recs)

        unexplained = {
            key: (n, allowance(want.event_of[key]))
            for key, n in copies.items()
            if n - 1 > allowance(want.event_of[key])
        }
        assert not unexplained, (name, unexplained)
        duplicates = sum(n - 1 for n in copies.values())
        bound = sum(allowance(want.event_of[key]) for key in want.deliveries)
        assert duplicates <= bound

        # The outage held up Segment only.
        outage_start, outage_end = marks["outage_start"], marks["outage_end"]
        in_outage = [
            key
            for key in want.deliveries
            if outage_start <= (accepted_at[want.event_of[key]] or 0) <= outage_start + OUTAGE_S / 2
        ]
        assert in_outage, name
        late = [first_at[k] - outage_end for k in in_outage if first_at[k] > outage_end]
        if name == OUTAGE:
            answered = [r for r in emulated.receipts if outage_start < r.at < outage_end]
            assert {r.status for r in answered} == {503}
            assert len(late) == len(in_outage)
        else:
            assert not late, (name, f"{len(late)} held up, up to {max(late):.1f}s past the outage")
        latencies = sorted(
            first_at[k] - (accepted_at[want.event_of[k]] or 0) for k in want.deliveries
        )
        in_windows = {
            w.fault: sum(
                w.holds(r) for key in want.deliveries for r in records_of[want.event_of[key]]
            )
            for w in windows[name]
        }
        figures[name] = {
            "routed": len(want.deliveries),
            "windows": in_windows,
            "dead_lettered": len(want.letters),
            "dlq_records": len(letters),
            "duplicates": duplicates,
            "bound": bound,
            "p50_s": round(latencies[len(latencies) // 2], 2),
            "max_s": round(latencies[-1], 2),
        }

    topic_duplicates = len(records) - len(events)
    report(
        "pipeline",
        events=len(events),
        requests=len(load.requests),
        attempts=sum(statuses.values()),
        statuses=dict(statuses),
        topic_duplicates=topic_duplicates,
        load_s=round(load_s, 1),
        drain_s=round(drained_s, 1),
        kafka_down_s=round(marks["kafka_up"] - marks["kafka_down"], 1),
    )
    for name, numbers in figures.items():
        report(name, **numbers)
