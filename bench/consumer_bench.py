"""Sink consumer benchmark: what one ``router sink`` process costs per event, and its memory.

Throughput mode (the default), in one run:

1. a fresh topic ``bench.consumer.<random>`` (3 partitions) is pre-filled with ``--events``
   canonical Track events (``bench/payloads.py``: a dozen event names with realistic, varied
   properties and context), published with ``KafkaBus.publish`` and ``to_record`` in batches of
   500; the fake sink gets a rules file (:data:`RULES`) of five rules, one routing every track
   event, three narrower ones (about 20% of the events get a second or third output) and one that
   never matches; the bench evaluates the same rules and the same ``FakeSink.prepare`` in-process
   to know exactly which items (idempotency keys) the destination must receive;
2. ``bench/blackhole.py``, its own aiohttp + uvloop process, reads each body and answers 200
   ``{}``; for each ``--batches`` size (1, 25, 500: ``sinks.fake.max_events``, with ``max_bytes``
   8 MiB, ``linger_s`` 0.05, ``concurrency`` 4) a ``python -m router.cli --config CFG sink fake``
   subprocess (``plugins: [tests.fakes.fake_sink]``, cwd = the repo) with a fresh consumer group
   reads the topic from the beginning until the blackhole has every item and the group's
   committed offsets reach the end of every partition, then gets SIGTERM;
3. the comparison at 25: ``bench/bare_client.py``, a bare aiohttp client (uvloop, same
   concurrency and connection limit, no Kafka, no rules) posts the same items as the same JSON
   arrays of 25 (built by the fake sink's own ``prepare`` and ``json_items``) to the same
   blackhole.

**The figure that compares is CPU time**: utime+stime of the consumer (or bare client) process
from ``/proc/<pid>/stat``, read by this process. For the consumer the measured window is the
whole run minus start-up: from the moment ``/readyz`` answers 200 (imports, Kafka connections and
the group join done; consumption starts then) to the moment the blackhole has received every
item; CPU per event divides by the events on the topic. The commit wait and shutdown after it
are not counted. For the bare client: from "go" to its last response.

Outage mode (``--outage``): a fresh topic, the consumer at ``--outage-batch`` (25), a producer
in this process publishing ``--rate`` (200) events/s for the whole run; ``--outage-warmup`` s
(60) of normal delivery, then the blackhole answers 503 to everything for ``--outage-minutes``
(10), then it answers 200 again and the producer stops; the run waits until every expected item
has arrived and the offsets are committed to the end (at most ``--recovery-timeout`` s). The
consumer's RSS (``/proc/<pid>/status`` VmRSS) is sampled every ``--sample-s`` s (5); baseline =
the RSS at the end of the warm-up, target: peak - baseline <= 64 MiB.

Kafka: the broker on ``$KAFKA_PORT`` (default 19092) through ``deploy/kafka/kafkactl``, started
if it is not running and then stopped at the end; a broker that was already running is left
running. Every subprocess this script starts is stopped at the end, also on error, Ctrl-C or
SIGTERM; the bench topics (events, the sink's retry and dead-letter topics) are deleted
(``--keep-topic`` keeps them).

Usage::

    KAFKA_PORT=19792 .venv/bin/python bench/consumer_bench.py [--events 200000]
        [--batches 1,25,500] [--concurrency 4] [--write docs/benchmarks.md] [--check]
        [--workdir DIR] [--profile DIR [--py-spy PATH]] [--keep-topic]
    KAFKA_PORT=19792 .venv/bin/python bench/consumer_bench.py --outage [--outage-minutes 10]
        [--rate 200] [--outage-warmup 60] [--sample-s 5] [--write docs/benchmarks.md]

Prints a markdown report on stdout and the progress on stderr. ``--write PATH`` puts the report
between ``<!-- consumer-bench:start -->`` and ``<!-- consumer-bench:end -->`` (outage mode:
``consumer-outage``) if PATH has those markers, else appends it. ``--check``: exit 1 when a
target fails (2 when the benchmark itself failed). ``--profile DIR`` attaches py-spy to the
consumer during each measured window (it skews that run's figures) and writes the raw profiles
and their summaries (``bench/profile_summary.py``) there.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import http.client
import importlib
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import payloads
from common import (
    BENCH,
    HOST,
    KAFKA_ENV,
    ROOT,
    BenchError,
    Children,
    Kafka,
    bench_run,
    code_line,
    command_line,
    find_py_spy,
    fmt,
    free_port,
    log_problems,
    log_problems_note,
    log_tail,
    machine_jiffies,
    machine_line,
    make_log,
    make_workdir,
    notes_lines,
    proc_cpu_s,
    run_header,
    software_line,
    start_py_spy,
    started_utc,
    summarise_py_spy,
    targets_lines,
    wait_http_ok,
    write_report,
)

from router.bus import KafkaBus
from router.delivery.sink import Prepared, idempotency_key, json_items
from router.events import Event, Record, decode_event, decode_track, now_ms, to_record
from router.rules.engine import Failed, RuleSet
from router.rules.live import LiveRules, RulesError
from router.settings import KafkaSettings

SINK = "fake"
TOKEN = "bench-token"  # noqa: S105  (the blackhole checks nothing)
MAX_BYTES = 8 * 1024 * 1024
LINGER_S = 0.05
PUBLISH_BATCH = 500

# Targets (issue 4).
BARE_FACTOR = 2.5  # consumer CPU/event at batch 25 <= 2.5 x the bare client's
EVENT_BUDGET_US = 10.0  # <= 10 µs of consumer CPU per event at batch >= 500
MEMORY_BUDGET_MIB = 64.0  # RSS within 64 MiB of the baseline through an outage

MARKERS = {
    "throughput": ("<!-- consumer-bench:start -->", "<!-- consumer-bench:end -->"),
    "outage": ("<!-- consumer-outage:start -->", "<!-- consumer-outage:end -->"),
}

RULES = """\
sink: fake
description: >-
  Consumer benchmark rules: every track event as it is, purchases again as an order, failed
  non-retryable errors and big reports as their own events, and a guide rule that never matches
  a Track event (evaluated for every event, routes none).
rules:
  - id: tracks
    when: {path: type, eq: track.event}
    map:
      name: {path: name}
      visitor: {path: visitor_id}
      properties: {path: properties}
  - id: orders
    when:
      all:
        - {path: type, eq: track.event}
        - {path: name, in: [purchase_completed, checkout_started]}
    map:
      name: {const: Order}
      visitor: {path: visitor_id}
      properties:
        fields:
          amount: {path: properties.amount}
          currency: {path: properties.currency}
          product: {path: properties.product_id}
          account: {path: account_id}
  - id: hard-errors
    when:
      all:
        - {path: name, eq: error_shown}
        - {path: properties.retryable, eq: false}
    map:
      name: {template: "error {properties.code}"}
      visitor: {path: visitor_id}
      properties: {path: properties}
  - id: big-reports
    when:
      all:
        - {path: name, in: [report_generated, filter_applied]}
        - {path: properties.rows, gte: 50000}
    map:
      name: {const: Big report}
      visitor: {path: visitor_id}
      properties:
        fields:
          rows: {path: properties.rows}
          page: {path: context.url}
  - id: guides
    when: {path: type, in: [guide.viewed, guide.advanced, guide.dismissed, guide.completed]}
    map:
      name: {path: type}
      visitor: {path: visitor_id}
tests:
  - name: a track event
    event: {type: track.event, name: x, visitor_id: v, properties: {a: 1}}
    expect: {tracks: {name: x, visitor: v, properties: {a: 1}}}
"""


log = make_log("consumer-bench")


def http_json(port: int, method: str, path: str, timeout_s: float = 5.0) -> Any:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        body = response.read()
        return response.status, (json.loads(body) if body else None)
    finally:
        conn.close()


def wait_ready(
    port: int, path: str, proc: subprocess.Popen[Any], log_path: Path, timeout_s: float
) -> None:
    # Polled every 20 ms: a run's start-up seconds end when this returns.
    wait_http_ok(port, path, proc, log_path, timeout_s, poll_s=0.02, who=f"{path}: process")


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


# ---- Kafka -------------------------------------------------------------------------------------


def kafka_settings(kafka: Kafka, topic: str) -> KafkaSettings:
    """The bench topic on the bench broker, as the producer in this process publishes to it."""
    return KafkaSettings(
        bootstrap_servers=kafka.bootstrap,
        topic=topic,
        partitions=3,
        retention_ms=3_600_000,
        client_id="consumer-bench",
        startup_timeout_s=60,
    )


async def group_progress(bootstrap: str, group: str, topics: list[str]) -> dict[str, int]:
    """For each topic: records past the group's committed position ("lag") and its end offsets."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await asyncio.wait_for(consumer.start(), 30)
    try:
        out: dict[str, int] = {}
        for topic in topics:
            parts = consumer.partitions_for_topic(topic)
            if parts is None:
                await consumer._client.force_metadata_update()
                parts = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            ends = await consumer.end_offsets(tps) if tps else {}
            lag = 0
            for tp in tps:
                committed = await consumer.committed(tp) or 0
                lag += max(0, ends[tp] - committed)
            out[f"{topic}:lag"] = lag
            out[f"{topic}:end"] = sum(ends.values())
        return out
    finally:
        await asyncio.wait_for(consumer.stop(), 10)


def wait_committed(bootstrap: str, group: str, topic: str, timeout_s: float) -> tuple[bool, float]:
    """Poll until the group has committed the end of every partition of ``topic``."""

    async def poll() -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            progress = await group_progress(bootstrap, group, [topic])
            if progress[f"{topic}:lag"] == 0:
                return True
            if time.monotonic() > deadline:
                log(f"offsets not committed to the end after {timeout_s:g}s: {progress}")
                return False
            await asyncio.sleep(0.25)

    started = time.monotonic()
    ok = asyncio.run(poll())
    return ok, time.monotonic() - started


def topic_records(bootstrap: str, topic: str) -> int:
    """Records in a topic (sum of end offsets; 0 when the topic does not exist)."""

    async def count() -> int:
        progress = await group_progress(bootstrap, f"bench-probe-{uuid.uuid4().hex[:8]}", [topic])
        return progress[f"{topic}:end"]

    return asyncio.run(count())


# ---- events, rules and the expected items ------------------------------------------------------


def fake_sink(url: str, batch: int, concurrency: int) -> Any:
    """The fake sink (tests/fakes/fake_sink.py) built in this process, as the consumer builds it."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    importlib.import_module("tests.fakes.fake_sink")
    import sinks

    return sinks.create(SINK, sink_config(url, batch, concurrency))


def sink_config(url: str, batch: int, concurrency: int) -> dict[str, Any]:
    return {
        "url": url,
        "token": TOKEN,
        "max_events": batch,
        "max_bytes": MAX_BYTES,
        "max_event_bytes": 1024 * 1024,
        "linger_s": LINGER_S,
        "concurrency": concurrency,
        "timeout_s": 10,
    }


def write_rules(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{SINK}.yaml").write_text(RULES)
    return directory


def load_ruleset(workdir: Path) -> RuleSet:
    """The bench rules, written into ``workdir/rules`` and compiled (with their tests)."""
    write_rules(workdir / "rules")
    try:
        return LiveRules(workdir / "rules" / f"{SINK}.yaml").current
    except RulesError as exc:
        raise BenchError(f"the bench rules do not load: {exc}") from exc


class EventSource:
    """Deterministic Track events, as canonical events and their Kafka records."""

    def __init__(self, seed: int = 4) -> None:
        self.rng = random.Random(seed)
        self.index = 0

    def take(self, count: int) -> tuple[list[Event], list[Record]]:
        tracks = [payloads.track_event(self.rng, self.index + i) for i in range(count)]
        self.index += count
        received = now_ms()
        events: list[Event] = []
        for start in range(0, count, PUBLISH_BATCH):
            body = json.dumps(tracks[start : start + PUBLISH_BATCH], separators=(",", ":"))
            events.extend(decode_track(body.encode(), received, PUBLISH_BATCH))
        return events, [to_record(e) for e in events]


class Expected:
    """What the consumer must deliver for the records: the fake sink's items, in record order."""

    def __init__(self, ruleset: RuleSet, sink: Any) -> None:
        self.ruleset = ruleset
        self.sink = sink
        self.keys: set[str] = set()
        self.bodies: list[bytes] = []
        self.events = 0
        self.failed = 0
        self.per_rule: collections.Counter[str] = collections.Counter()

    def add(self, records: list[Record], keep_bodies: bool) -> None:
        for record in records:
            event = decode_event(record.value)  # what the consumer decodes, not our Event
            self.events += 1
            for output in self.ruleset.evaluate(event):
                if isinstance(output, Failed):
                    self.failed += 1
                    continue
                key = idempotency_key(event.id, SINK, output.rule_id)
                self.per_rule[output.rule_id] += 1
                self.keys.add(key)
                if keep_bodies:
                    self.bodies.append(self.sink.prepare(output, key, event).body)

    @property
    def items(self) -> int:
        return len(self.keys)


def publish_all(settings: KafkaSettings, records: list[Record], concurrency: int = 4) -> float:
    async def go() -> None:
        bus = KafkaBus(settings)
        await bus.start()
        gate = asyncio.Semaphore(concurrency)

        async def one(chunk: list[Record]) -> None:
            async with gate:
                await bus.publish(chunk)

        try:
            await asyncio.gather(
                *(
                    one(records[i : i + PUBLISH_BATCH])
                    for i in range(0, len(records), PUBLISH_BATCH)
                )
            )
        finally:
            await bus.stop()

    started = time.monotonic()
    asyncio.run(go())
    return time.monotonic() - started


# ---- the consumer under test -------------------------------------------------------------------


@dataclass
class Topics:
    events: str

    @property
    def retry(self) -> str:
        return f"{self.events}.retry.{SINK}"

    @property
    def dlq(self) -> str:
        return f"{self.events}.dlq.{SINK}"

    def all(self) -> list[str]:
        return [self.events, self.retry, self.dlq]


def write_router_config(
    workdir: Path,
    name: str,
    kafka: Kafka,
    topics: Topics,
    group_prefix: str,
    url: str,
    batch: int,
    concurrency: int,
    health_port: int,
) -> Path:
    config = workdir / f"router-{name}.yaml"
    sink = sink_config(url, batch, concurrency)
    config.write_text(
        "# Written by bench/consumer_bench.py for one benchmark run.\n"
        "kafka:\n"
        f"  bootstrap_servers: '{kafka.bootstrap}'\n"
        f"  topic: {topics.events}\n"
        "  partitions: 3\n"
        "  client_id: consumer-bench\n"
        "  retention_ms: 3600000\n"
        f"rules: {{dir: '{workdir / 'rules'}'}}\n"
        "plugins: [tests.fakes.fake_sink]\n"
        "sinks:\n"
        f"  {SINK}: {json.dumps(sink)}\n"
        "consumer:\n"
        f"  group_prefix: '{group_prefix}'\n"
        f"  dlq_topic: '{topics.events}.dlq.{{sink}}'\n"
        f"  retry_topic: '{topics.events}.retry.{{sink}}'\n"
        f"  health_host: {HOST}\n"
        f"  health_port: {health_port}\n"
        "log_level: INFO\n"
    )
    return config


def consumer_argv(config: Path, router_cmd: str | None = None) -> list[str]:
    if router_cmd:
        return [*shlex.split(router_cmd), "--config", str(config), "sink", SINK]
    return [sys.executable, "-m", "router.cli", "--config", str(config), "sink", SINK]


def start_consumer(
    children: Children, config: Path, log_path: Path, router_cmd: str | None
) -> subprocess.Popen[Any]:
    """The consumer, from the repo root with it on PYTHONPATH (for ``tests.fakes.fake_sink``)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    return children.start(consumer_argv(config, router_cmd), log_path, cwd=ROOT, env=env)


def stop_consumer(
    proc: subprocess.Popen[Any], log_path: Path, notes: list[str], name: str
) -> int | None:
    code = Children.stop(proc, grace_s=40.0)
    if code != 0:
        notes.append(f"{name}: the consumer exited with {code} after SIGTERM.")
        log(f"{name}: consumer exited with {code}:\n{log_tail(log_path)}")
    problems = log_problems(log_path, fold_numbers=True)
    note = log_problems_note(problems, f"{name}: the consumer", log, shown=8)
    if note:
        notes.append(f"{name}: the consumer {note}")
    return code


# ---- throughput --------------------------------------------------------------------------------


@dataclass
class RunResult:
    batch: int
    events: int
    items: int
    startup_s: float
    startup_cpu_s: float
    work_s: float  # ready -> every item received
    work_cpu_s: float
    first_to_last_s: float
    requests: int
    duplicates: int
    missing: int
    dead_letters: int
    committed: bool
    commit_wait_s: float
    blackhole_cpu_s: float | None
    broker_cpu_s: float | None
    machine_busy: float
    rss_ready_mib: float
    rss_peak_mib: float
    exit_code: int | None

    @property
    def eps(self) -> float:
        return self.events / self.work_s

    @property
    def cpu_us_per_event(self) -> float:
        return self.work_cpu_s / self.events * 1e6

    @property
    def cpu_us_per_item(self) -> float:
        return self.work_cpu_s / self.items * 1e6

    @property
    def cpu_us_per_request(self) -> float:
        return self.work_cpu_s / max(1, self.requests) * 1e6


@dataclass
class BareResult:
    batch: int
    events: int
    items: int
    requests: int
    elapsed_s: float
    cpu_s: float
    statuses: dict[str, int]
    errors: int

    @property
    def eps(self) -> float:
        return self.events / self.elapsed_s

    @property
    def cpu_us_per_event(self) -> float:
        return self.cpu_s / self.events * 1e6

    @property
    def cpu_us_per_item(self) -> float:
        return self.cpu_s / self.items * 1e6

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s / max(1, self.requests) * 1e6


def run_consumer(
    args: argparse.Namespace,
    children: Children,
    kafka: Kafka,
    topics: Topics,
    expected: Expected,
    blackhole: tuple[int, int],
    workdir: Path,
    notes: list[str],
) -> RunResult:
    batch = args.current_batch
    name = f"batch {batch}"
    bh_port, bh_pid = blackhole
    http_json(bh_port, "POST", "/control?status=200&reset=1")
    group_prefix = f"{topics.events}.b{batch}-"
    health = free_port()
    config = write_router_config(
        workdir, f"b{batch}", kafka, topics, group_prefix, args.url, batch, args.concurrency, health
    )
    dlq_before = topic_records(kafka.bootstrap, topics.dlq)
    log_path = workdir / f"consumer-b{batch}.log"
    log(
        f"{name}: starting `router sink {SINK}` (max_events {batch}, "
        f"concurrency {args.concurrency})"
    )
    started = time.monotonic()
    proc = start_consumer(children, config, log_path, args.router_cmd)
    profiler: subprocess.Popen[Any] | None = None
    try:
        wait_ready(health, "/readyz", proc, log_path, timeout_s=120)
        ready_at = time.monotonic()
        cpu_ready = proc_cpu_s(proc.pid)
        bh_ready, broker_ready, machine_ready = (
            proc_cpu_s(bh_pid),
            proc_cpu_s(kafka.pid()),
            machine_jiffies(),
        )
        rss_ready = rss_kib(proc.pid) or 0
        if args.profile:
            profiler = start_profiler(children, args, f"b{batch}", proc.pid)
        log(f"{name}: ready after {ready_at - started:.1f}s (start-up CPU {cpu_ready:.2f}s)")
        rss_peak = rss_ready
        deadline = ready_at + args.run_timeout
        stats: dict[str, Any] = {}
        last_log = ready_at
        while True:
            _, stats = http_json(bh_port, "GET", "/stats")
            now = time.monotonic()
            rss_peak = max(rss_peak, rss_kib(proc.pid) or 0)
            if stats["distinct_keys"] >= expected.items:
                break
            if proc.poll() is not None:
                raise BenchError(
                    f"{name}: the consumer exited ({proc.returncode}):\n{log_tail(log_path)}"
                )
            if now > deadline:
                raise BenchError(
                    f"{name}: {stats['distinct_keys']} of {expected.items} items after "
                    f"{args.run_timeout:g}s:\n{log_tail(log_path)}"
                )
            if now - last_log > 15:
                log(f"{name}: {stats['distinct_keys']:,} of {expected.items:,} items")
                last_log = now
            time.sleep(0.05)
        done_at = time.monotonic()
        cpu_done = proc_cpu_s(proc.pid)
        bh_done, broker_done, machine_done = (
            proc_cpu_s(bh_pid),
            proc_cpu_s(kafka.pid()),
            machine_jiffies(),
        )
        if profiler is not None:
            finish_profiler(profiler, args, f"b{batch}")
            profiler = None
        if cpu_ready is None or cpu_done is None:
            raise BenchError(f"{name}: the consumer went away during the run")
        group = f"{group_prefix}{SINK}"
        committed, commit_wait = wait_committed(kafka.bootstrap, group, topics.events, 60)
        _, stats = http_json(bh_port, "GET", "/stats")
    finally:
        if profiler is not None:
            Children.stop(profiler, grace_s=30.0, sig=signal.SIGINT)
        code = stop_consumer(proc, log_path, notes, name)
    dead = topic_records(kafka.bootstrap, topics.dlq) - dlq_before
    busy = (machine_done[0] - machine_ready[0]) / max(1, machine_done[1] - machine_ready[1])
    first_to_last = (stats["last_at"] or 0) - (stats["first_at"] or 0)
    result = RunResult(
        batch=batch,
        events=expected.events,
        items=expected.items,
        startup_s=ready_at - started,
        startup_cpu_s=cpu_ready,
        work_s=done_at - ready_at,
        work_cpu_s=cpu_done - cpu_ready,
        first_to_last_s=first_to_last,
        requests=stats["requests"],
        duplicates=stats["items"] - stats["distinct_keys"],
        missing=expected.items - stats["distinct_keys"],
        dead_letters=dead,
        committed=committed,
        commit_wait_s=commit_wait,
        blackhole_cpu_s=None if bh_ready is None or bh_done is None else bh_done - bh_ready,
        broker_cpu_s=(
            None if broker_ready is None or broker_done is None else broker_done - broker_ready
        ),
        machine_busy=busy,
        rss_ready_mib=rss_ready / 1024,
        rss_peak_mib=rss_peak / 1024,
        exit_code=code,
    )
    log(summary_line(result))
    return result


def summary_line(r: RunResult) -> str:
    return (
        f"batch {r.batch}: {r.eps:,.0f} events/s over {r.work_s:.1f}s, consumer CPU "
        f"{r.cpu_us_per_event:.1f} µs/event ({r.cpu_us_per_item:.1f} µs/item, "
        f"{r.cpu_us_per_request:,.0f} µs/request), {r.requests:,} requests, dups {r.duplicates}, "
        f"dead {r.dead_letters}, committed {r.committed}"
    )


def write_bare_pool(path: Path, expected: Expected, batch: int, url: str, sink: Any) -> int:
    bodies = [
        json_items([Prepared(b) for b in expected.bodies[i : i + batch]])
        for i in range(0, len(expected.bodies), batch)
    ]
    request = sink.build([Prepared(expected.bodies[0])])[0]
    pool = {
        "bodies": bodies,
        "items": len(expected.bodies),
        "url": url,
        "headers": dict(request.headers),
    }
    path.write_bytes(msgspec.msgpack.encode(pool))
    return len(bodies)


def run_bare(
    args: argparse.Namespace,
    children: Children,
    expected: Expected,
    blackhole: tuple[int, int],
    workdir: Path,
    sink: Any,
    batch: int,
) -> BareResult:
    bh_port, _ = blackhole
    pool = workdir / f"bare-{batch}.msgpack"
    requests = write_bare_pool(pool, expected, batch, args.url, sink)
    http_json(bh_port, "POST", "/control?status=200&reset=1")
    log(f"bare client: {requests:,} requests of {batch} items, concurrency {args.concurrency}")
    log_path = workdir / f"bare-{batch}.log"
    proc = children.start(
        [
            sys.executable,
            str(BENCH / "bare_client.py"),
            "--pool",
            str(pool),
            "--concurrency",
            str(args.concurrency),
        ],
        log_path,
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdin is not None
    try:
        line = proc.stdout.readline().decode().strip()
        if line != "ready":
            raise BenchError(f"bare client: expected 'ready', got {line!r}:\n{log_tail(log_path)}")
        cpu_start = proc_cpu_s(proc.pid)
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        line = proc.stdout.readline().decode().strip()
        cpu_end = proc_cpu_s(proc.pid)
        if not line.startswith("{") or cpu_start is None or cpu_end is None:
            raise BenchError(f"bare client: no result ({line!r}):\n{log_tail(log_path)}")
        result = json.loads(line)
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        Children.stop(proc, grace_s=10)
    _, stats = http_json(bh_port, "GET", "/stats")
    if stats["distinct_keys"] != expected.items:
        raise BenchError(f"bare client: the blackhole got {stats['distinct_keys']} items")
    bare = BareResult(
        batch=batch,
        events=expected.events,
        items=result["items"],
        requests=result["requests"],
        elapsed_s=result["elapsed_s"],
        cpu_s=cpu_end - cpu_start,
        statuses=result["statuses"],
        errors=result["errors"],
    )
    log(
        f"bare client: {bare.eps:,.0f} events/s, CPU {bare.cpu_us_per_event:.2f} µs/event "
        f"({bare.cpu_us_per_request:,.0f} µs/request), statuses {bare.statuses}, "
        f"errors {bare.errors}"
    )
    return bare


# ---- profiling (optional) ---------------------------------------------------------------------


def start_profiler(
    children: Children, args: argparse.Namespace, name: str, pid: int
) -> subprocess.Popen[Any]:
    """py-spy on the consumer for the measured window, non-blocking; SIGINT ends it."""
    return start_py_spy(children, args.py_spy, args.profile, name, pid)


def finish_profiler(proc: subprocess.Popen[Any], args: argparse.Namespace, name: str) -> None:
    Children.stop(proc, grace_s=30, sig=signal.SIGINT)
    if summarise_py_spy(args.profile, name, log) is not None:
        log(f"{name}: profile in {args.profile / f'{name}.txt'}, summary in {name}-summary.txt")


# ---- blackhole ---------------------------------------------------------------------------------


@contextlib.contextmanager
def blackhole_server(children: Children, workdir: Path) -> Iterator[tuple[int, int]]:
    port = free_port()
    log_path = workdir / "blackhole.log"
    proc = children.start(
        [sys.executable, str(BENCH / "blackhole.py"), "--host", HOST, "--port", str(port)],
        log_path,
    )
    try:
        wait_ready(port, "/healthz", proc, log_path, timeout_s=30)
        log(f"blackhole ready on :{port} (PID {proc.pid})")
        yield port, proc.pid
    finally:
        Children.stop(proc, grace_s=10)


# ---- throughput mode ---------------------------------------------------------------------------


def prepare_topic(
    args: argparse.Namespace, kafka: Kafka, topics: Topics, workdir: Path
) -> tuple[Expected, Any]:
    sink = fake_sink(args.url, 25, args.concurrency)  # registers the sink, before its rules
    expected = Expected(load_ruleset(workdir), sink)
    source = EventSource()
    started = time.monotonic()
    _, records = source.take(args.events)
    expected.add(records, keep_bodies=True)
    if expected.failed:
        raise BenchError(f"the bench rules failed on {expected.failed} event(s)")
    sizes = [len(r.value) for r in records]
    args.record_bytes = sum(sizes) / len(sizes)
    args.item_bytes = sum(map(len, expected.bodies)) / len(expected.bodies)
    log(
        f"built {len(records):,} events ({args.record_bytes:.0f} bytes per record) -> "
        f"{expected.items:,} items ({args.item_bytes:.0f} bytes each; per rule "
        f"{dict(expected.per_rule)}) in {time.monotonic() - started:.1f}s"
    )
    took = publish_all(kafka_settings(kafka, topics.events), records)
    log(f"published {len(records):,} events to {topics.events} in {took:.1f}s")
    args.publish_s = took
    return expected, sink


def run_throughput(
    args: argparse.Namespace, children: Children, kafka: Kafka, workdir: Path, notes: list[str]
) -> tuple[list[RunResult], BareResult | None]:
    topics = Topics(f"bench.consumer.{uuid.uuid4().hex[:12]}")
    args.topic = topics.events
    results: list[RunResult] = []
    bare: BareResult | None = None
    with blackhole_server(children, workdir) as blackhole:
        args.url = f"http://{HOST}:{blackhole[0]}/collect"
        try:
            expected, sink = prepare_topic(args, kafka, topics, workdir)
            for batch in args.batches:
                args.current_batch = batch
                results.append(
                    run_consumer(args, children, kafka, topics, expected, blackhole, workdir, notes)
                )
                if batch == args.bare_batch and not args.no_bare:
                    bare = run_bare(
                        args, children, expected, blackhole, workdir, sink, args.bare_batch
                    )
            if bare is None and not args.no_bare:
                bare = run_bare(args, children, expected, blackhole, workdir, sink, args.bare_batch)
        finally:
            if not args.keep_topic:
                kafka.delete_topics(topics.all())
    return results, bare


# ---- outage mode -------------------------------------------------------------------------------


@dataclass
class Sample:
    at: float  # seconds since the consumer was ready
    phase: str
    rss_mib: float
    cpu_s: float
    inflight: int | None
    state: str | None
    delivered: int
    refused_requests: int
    produced: int


@dataclass
class OutageResult:
    batch: int
    rate: float
    warmup_s: float
    outage_s: float
    produced: int
    expected_items: int
    delivered_items: int
    duplicates: int
    missing: int
    dead_letters: int
    committed: bool
    recovery_s: float | None  # destination back -> every item received
    refused_requests: int
    rss_ready_mib: float
    baseline_mib: float
    peak_mib: float
    peak_phase: str
    peak_at_s: float
    final_mib: float
    samples: list[Sample] = field(default_factory=list)
    exit_code: int | None = None
    missing_sample: list[str] = field(default_factory=list)

    @property
    def growth_mib(self) -> float:
        return self.peak_mib - self.baseline_mib


async def _get_json(session: Any, url: str) -> Any:
    async with session.get(url) as response:
        return await response.json()


async def outage_scenario(
    args: argparse.Namespace,
    children: Children,
    kafka: Kafka,
    topics: Topics,
    workdir: Path,
    blackhole: tuple[int, int],
    notes: list[str],
) -> OutageResult:
    import aiohttp

    bh_port, _ = blackhole
    bh = f"http://{HOST}:{bh_port}"
    sink = fake_sink(args.url, args.outage_batch, args.concurrency)
    expected = Expected(load_ruleset(workdir), sink)
    source = EventSource(seed=5)
    bus = KafkaBus(kafka_settings(kafka, topics.events))
    await bus.start()  # creates the topic
    health = free_port()
    group_prefix = f"{topics.events}.outage-"
    config = write_router_config(
        workdir,
        "outage",
        kafka,
        topics,
        group_prefix,
        args.url,
        args.outage_batch,
        args.concurrency,
        health,
    )
    log_path = workdir / "consumer-outage.log"
    samples: list[Sample] = []
    phase = "start-up"
    produce = True
    async with aiohttp.ClientSession() as session:
        await _get_json(session, f"{bh}/stats")
        async with session.post(f"{bh}/control?status=200&reset=1") as response:
            await response.read()
        proc = start_consumer(children, config, log_path, args.router_cmd)
        try:
            await asyncio.to_thread(wait_ready, health, "/readyz", proc, log_path, 120)
            ready_at = time.monotonic()
            rss_ready = (rss_kib(proc.pid) or 0) / 1024
            log(f"outage: consumer ready (RSS {rss_ready:.1f} MiB); producing {args.rate:g}/s")

            async def producer() -> None:
                tick = 0.1
                per_tick = args.rate * tick
                owed = 0.0
                next_at = time.monotonic()
                while produce:
                    owed += per_tick
                    count = int(owed)
                    owed -= count
                    if count:
                        _, records = source.take(count)
                        await bus.publish(records)
                        expected.add(records, keep_bodies=False)
                    next_at += tick
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))

            async def sample() -> Sample:
                stats = await _get_json(session, f"{bh}/stats")
                try:
                    ready = await _get_json(session, f"http://{HOST}:{health}/readyz")
                except (aiohttp.ClientError, ValueError):
                    ready = {}
                s = Sample(
                    at=time.monotonic() - ready_at,
                    phase=phase,
                    rss_mib=(rss_kib(proc.pid) or 0) / 1024,
                    cpu_s=proc_cpu_s(proc.pid) or 0.0,
                    inflight=ready.get("inflight_events"),
                    state=ready.get("state"),
                    delivered=stats["distinct_keys"],
                    refused_requests=stats["refused_requests"],
                    produced=expected.events,
                )
                samples.append(s)
                return s

            async def sample_for(seconds: float) -> Sample:
                end = time.monotonic() + seconds
                last = await sample()
                next_log = time.monotonic() + 60
                while time.monotonic() < end:
                    if proc.poll() is not None:
                        raise BenchError(f"outage: the consumer exited:\n{log_tail(log_path)}")
                    await asyncio.sleep(min(args.sample_s, max(0.0, end - time.monotonic())))
                    last = await sample()
                    if time.monotonic() >= next_log:
                        log(
                            f"outage: {phase} t={last.at:.0f}s RSS {last.rss_mib:.1f} MiB, "
                            f"inflight {last.inflight}, state {last.state}, delivered "
                            f"{last.delivered:,} of {expected.items:,}"
                        )
                        next_log += 60
                return last

            producing = asyncio.create_task(producer())
            try:
                phase = "warm-up"
                last = await sample_for(args.outage_warmup)
                baseline = last.rss_mib
                log(f"outage: baseline RSS {baseline:.1f} MiB; the destination now answers 503")
                phase = "outage"
                async with session.post(f"{bh}/control?status=503") as response:
                    await response.read()
                await sample_for(args.outage_minutes * 60)
                phase = "recovery"
                async with session.post(f"{bh}/control?status=200") as response:
                    await response.read()
                recovered_at = time.monotonic()
                produce = False
                await producing
                log(
                    f"outage: destination back; {expected.events:,} events produced, waiting for "
                    f"{expected.items:,} items"
                )
                recovery_s: float | None = None
                deadline = recovered_at + args.recovery_timeout
                while time.monotonic() < deadline:
                    last = await sample_for(min(args.sample_s, 2.0))
                    if last.delivered >= expected.items:
                        recovery_s = time.monotonic() - recovered_at
                        break
                group = f"{group_prefix}{SINK}"
                committed, _ = await asyncio.to_thread(
                    wait_committed, kafka.bootstrap, group, topics.events, 60
                )
                phase = "after"
                await asyncio.sleep(args.sample_s)
                final = await sample()
                stats = await _get_json(session, f"{bh}/stats")
                async with session.get(f"{bh}/keys") as response:
                    delivered_keys = set(await response.json())
            finally:
                produce = False
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producing, 10)
                await bus.stop()
        finally:
            code = await asyncio.to_thread(stop_consumer, proc, log_path, notes, "outage")
    missing = expected.keys - delivered_keys
    dead = await asyncio.to_thread(topic_records, kafka.bootstrap, topics.dlq)
    peak = max(samples, key=lambda s: s.rss_mib)
    return OutageResult(
        batch=args.outage_batch,
        rate=args.rate,
        warmup_s=args.outage_warmup,
        outage_s=args.outage_minutes * 60,
        produced=expected.events,
        expected_items=expected.items,
        delivered_items=len(delivered_keys & expected.keys),
        duplicates=stats["items"] - stats["distinct_keys"],
        missing=len(missing),
        dead_letters=dead,
        committed=committed,
        recovery_s=recovery_s,
        refused_requests=stats["refused_requests"],
        rss_ready_mib=rss_ready,
        baseline_mib=baseline,
        peak_mib=peak.rss_mib,
        peak_phase=peak.phase,
        peak_at_s=peak.at,
        final_mib=final.rss_mib,
        samples=samples,
        exit_code=code,
        missing_sample=sorted(missing)[:5],
    )


def run_outage(
    args: argparse.Namespace, children: Children, kafka: Kafka, workdir: Path, notes: list[str]
) -> OutageResult:
    topics = Topics(f"bench.consumer.outage.{uuid.uuid4().hex[:12]}")
    args.topic = topics.events
    with blackhole_server(children, workdir) as blackhole:
        args.url = f"http://{HOST}:{blackhole[0]}/collect"
        try:
            return asyncio.run(
                outage_scenario(args, children, kafka, topics, workdir, blackhole, notes)
            )
        finally:
            if not args.keep_topic:
                kafka.delete_topics(topics.all())


# ---- report ------------------------------------------------------------------------------------


def header(args: argparse.Namespace, kafka: Kafka, started: str, mode: str) -> list[str]:
    start, _ = MARKERS[mode]
    return [
        start,
        *run_header(started, command_line((*KAFKA_ENV, "CONSUMER_PATCHES"))),
        machine_line(
            "shared by the broker, the consumer, the blackhole and whatever else runs on it."
        ),
        software_line(
            ("aiohttp", "aiokafka", "msgspec", "uvloop", "prometheus-client"),
            f"; {kafka.describe()}.",
        ),
        code_line(args.router_cmd),
    ]


def throughput_targets(results: list[RunResult], bare: BareResult | None) -> list[tuple[bool, str]]:
    checks: list[tuple[bool, str]] = []
    by_batch = {r.batch: r for r in results}
    at25 = by_batch.get(25)
    if at25 and bare:
        limit = bare.cpu_us_per_event * BARE_FACTOR
        checks.append(
            (
                at25.cpu_us_per_event <= limit,
                f"batch 25: consumer CPU {at25.cpu_us_per_event:.2f} µs/event <= {limit:.2f} µs "
                f"({BARE_FACTOR} x the bare client's {bare.cpu_us_per_event:.2f}); ratio "
                f"{at25.cpu_us_per_event / bare.cpu_us_per_event:.2f}",
            )
        )
    for r in results:
        if r.batch >= 500:
            checks.append(
                (
                    r.cpu_us_per_event <= EVENT_BUDGET_US,
                    f"batch {r.batch}: consumer CPU {r.cpu_us_per_event:.2f} µs/event <= "
                    f"{EVENT_BUDGET_US:g} µs ({1e6 / r.cpu_us_per_event:,.0f} events per "
                    "CPU-second; target 100,000)",
                )
            )
    bad = [r for r in results if r.missing or r.dead_letters or not r.committed or r.exit_code]
    checks.append(
        (
            not bad,
            "every item delivered, no dead letter, offsets committed to the end, clean exit"
            + "".join(
                f" (batch {r.batch}: missing {r.missing}, dead {r.dead_letters}, committed "
                f"{r.committed}, exit {r.exit_code})"
                for r in bad
            ),
        )
    )
    return checks


def throughput_report(
    args: argparse.Namespace,
    results: list[RunResult],
    bare: BareResult | None,
    kafka: Kafka,
    started: str,
    notes: list[str],
) -> str:
    out = header(args, kafka, started, "throughput")
    items = results[0].items if results else 0
    out += [
        f"- Data: {args.events:,} Track events on topic `{args.topic}` (3 partitions, "
        f"{args.record_bytes:.0f} bytes per record), published in {args.publish_s:.1f} s; five "
        f"rules give {items:,} items ({items / args.events:.3f} per event, "
        f"{args.item_bytes:.0f} bytes each).",
        f"- Consumer: `router sink {SINK}` (tests/fakes/fake_sink.py), max_bytes 8 MiB, linger "
        f"{LINGER_S:g} s, concurrency {args.concurrency}, every other setting the default "
        "(max_inflight_events 10,000, max_poll_records 1,000, commit every 1 s); a fresh "
        "consumer group per batch size, from the beginning of the topic.",
        "- CPU = utime+stime of the consumer process from `/readyz` 200 (start-up excluded) to "
        "the blackhole holding every item (/proc/<pid>/stat, 10 ms ticks); per event = over the "
        "events on the topic, per item = over the items delivered. Events/s over the same window.",
        "",
        "| run | events/s | CPU µs/event | CPU µs/item | CPU µs/request | requests | "
        "start-up s (CPU s) | first→last request s | RSS MiB (ready / peak) | duplicates | "
        "dead letters |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        out.append(
            f"| consumer, batch {r.batch} | {r.eps:,.0f} | **{r.cpu_us_per_event:.2f}** | "
            f"{r.cpu_us_per_item:.2f} | {r.cpu_us_per_request:,.0f} | {r.requests:,} | "
            f"{r.startup_s:.1f} ({r.startup_cpu_s:.1f}) | {r.first_to_last_s:.1f} | "
            f"{r.rss_ready_mib:.0f} / {r.rss_peak_mib:.0f} | {r.duplicates} | {r.dead_letters} |"
        )
    if bare:
        out.append(
            f"| bare aiohttp client, batch {bare.batch} | {bare.eps:,.0f} | "
            f"**{bare.cpu_us_per_event:.2f}** | {bare.cpu_us_per_item:.2f} | "
            f"{bare.cpu_us_per_request:,.0f} | {bare.requests:,} | - | {bare.elapsed_s:.1f} | - | "
            "- | - |"
        )
    out += [
        "",
        "Where the CPU went during each consumer window (percent of one core; the machine has "
        f"{os.cpu_count()}):",
        "",
        "| run | consumer | blackhole | Kafka broker | whole machine busy | window s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        bh = None if r.blackhole_cpu_s is None else r.blackhole_cpu_s / r.work_s * 100
        broker = None if r.broker_cpu_s is None else r.broker_cpu_s / r.work_s * 100
        out.append(
            f"| batch {r.batch} | {r.work_cpu_s / r.work_s * 100:.0f}% | {fmt(bh, '.0f')}% | "
            f"{fmt(broker, '.0f')}% | {r.machine_busy * (os.cpu_count() or 1) * 100:.0f}% | "
            f"{r.work_s:.1f} |"
        )
    out += targets_lines(throughput_targets(results, bare))
    if args.profile:
        notes.append(
            f"Profiled run (py-spy attached during each window, profiles in {args.profile}): "
            "py-spy competes for the same cores, so these figures are not comparable with "
            "unprofiled runs."
        )
    out += notes_lines(notes)
    out.append(MARKERS["throughput"][1])
    return "\n".join(out) + "\n"


def outage_targets(r: OutageResult) -> list[tuple[bool, str]]:
    return [
        (
            r.growth_mib <= MEMORY_BUDGET_MIB,
            f"RSS peak {r.peak_mib:.1f} MiB - baseline {r.baseline_mib:.1f} MiB = "
            f"{r.growth_mib:+.1f} MiB <= {MEMORY_BUDGET_MIB:g} MiB (peak during {r.peak_phase}, "
            f"t={r.peak_at_s:.0f}s)",
        ),
        (
            r.missing == 0 and r.committed and r.dead_letters == 0,
            f"after recovery every item delivered ({r.delivered_items:,} of "
            f"{r.expected_items:,}; missing {r.missing}"
            + (f", e.g. {r.missing_sample}" if r.missing_sample else "")
            + f"), dead letters {r.dead_letters}, offsets committed to the end: {r.committed}",
        ),
    ]


def outage_report(
    args: argparse.Namespace, r: OutageResult, kafka: Kafka, started: str, notes: list[str]
) -> str:
    out = header(args, kafka, started, "outage")
    out += [
        f"- Scenario: topic `{args.topic}` (3 partitions); `router sink {SINK}` with max_events "
        f"{r.batch}, concurrency {args.concurrency}, default consumer settings (retry base 1 s, "
        "cap 300 s, max_inflight_events 10,000); a producer publishing "
        f"{r.rate:g} events/s throughout; {r.warmup_s:g} s of normal delivery, then "
        f"**{r.outage_s / 60:g} minutes of 503 for every request**, then 200 again (the producer "
        "stops then).",
        f"- RSS = VmRSS of the consumer process, sampled every {args.sample_s:g} s; baseline = "
        "the last sample of the warm-up.",
        "",
        "| figure | value |",
        "| --- | ---: |",
        f"| RSS when ready | {r.rss_ready_mib:.1f} MiB |",
        f"| RSS baseline (end of warm-up) | {r.baseline_mib:.1f} MiB |",
        f"| RSS peak | {r.peak_mib:.1f} MiB ({r.peak_phase}, t={r.peak_at_s:.0f} s) |",
        f"| RSS final (all delivered and committed) | {r.final_mib:.1f} MiB |",
        f"| peak - baseline | {r.growth_mib:+.1f} MiB |",
        f"| events produced | {r.produced:,} |",
        f"| items expected / delivered | {r.expected_items:,} / {r.delivered_items:,} |",
        f"| requests refused (503) | {r.refused_requests:,} |",
        f"| destination back -> every item received | {fmt(r.recovery_s, '.0f')} s |",
        f"| duplicates / dead letters | {r.duplicates} / {r.dead_letters} |",
        "",
        "RSS by phase (MiB; min / max of the samples) and the consumer's in-flight events:",
        "",
        "| phase | samples | RSS min | RSS max | in-flight max | states |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for phase in ("warm-up", "outage", "recovery", "after"):
        group = [s for s in r.samples if s.phase == phase]
        if not group:
            continue
        inflight = [s.inflight for s in group if s.inflight is not None]
        states = sorted({s.state for s in group if s.state})
        out.append(
            f"| {phase} | {len(group)} | {min(s.rss_mib for s in group):.1f} | "
            f"{max(s.rss_mib for s in group):.1f} | {max(inflight) if inflight else 'n/a'} | "
            f"{', '.join(states)} |"
        )
    out += targets_lines(outage_targets(r))
    out += notes_lines(notes)
    out.append(MARKERS["outage"][1])
    return "\n".join(out) + "\n"


# ---- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="events on the topic (200000)")
    parser.add_argument("--batches", default="1,25,500", help="max_events sizes (1,25,500)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (4)")
    parser.add_argument("--bare-batch", type=int, default=25, help="bare client batch (25)")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare client")
    parser.add_argument(
        "--run-timeout", type=float, default=900.0, help="seconds per consumer run (900)"
    )
    parser.add_argument("--outage", action="store_true", help="run the memory-under-outage mode")
    parser.add_argument("--outage-minutes", type=float, default=10.0, help="503 window (10)")
    parser.add_argument("--outage-warmup", type=float, default=60.0, help="seconds before (60)")
    parser.add_argument("--outage-batch", type=int, default=25, help="max_events (25)")
    parser.add_argument("--rate", type=float, default=200.0, help="events/s produced (200)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling period (5)")
    parser.add_argument(
        "--recovery-timeout", type=float, default=900.0, help="seconds to drain after (900)"
    )
    parser.add_argument("--write", type=Path, help="also write the report into this file")
    parser.add_argument("--keep-topic", action="store_true", help="do not delete the topics")
    parser.add_argument("--workdir", type=Path, help="keep configs, pools and logs here")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target fails")
    parser.add_argument("--profile", type=Path, help="py-spy the consumer into this directory")
    parser.add_argument("--py-spy", help="the py-spy binary (default: beside python, on PATH)")
    parser.add_argument(
        "--router-cmd",
        help="run this instead of `python -m router.cli` (`--config CFG sink fake` is appended), "
        "e.g. a wrapper script that patches router first, to measure a proposed change",
    )
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if args.events < 1 or not args.batches or min(args.batches) < 1 or args.concurrency < 1:
        parser.error("--events, --batches and --concurrency must be >= 1")
    if args.profile is not None:
        args.py_spy = find_py_spy(args.py_spy) or find_py_spy("/tmp/pyspy/bin/py-spy")  # noqa: S108
        if args.py_spy is None:
            parser.error("--profile needs py-spy (pip install py-spy, or --py-spy PATH)")
        args.profile.mkdir(parents=True, exist_ok=True)
        args.profile = args.profile.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = started_utc()
    notes: list[str] = []
    mode = "outage" if args.outage else "throughput"
    try:
        with bench_run(log) as (kafka, children), contextlib.ExitStack() as stack:
            workdir = make_workdir(stack, args.workdir, "consumer-bench-")
            if args.outage:
                outage = run_outage(args, children, kafka, workdir, notes)
                text = outage_report(args, outage, kafka, started, notes)
                checks = outage_targets(outage)
            else:
                results, bare = run_throughput(args, children, kafka, workdir, notes)
                text = throughput_report(args, results, bare, kafka, started, notes)
                checks = throughput_targets(results, bare)
    except BenchError:
        return 2  # bench_run logged why
    sys.stdout.write(text)
    if args.write:
        write_report(args.write, text, MARKERS[mode], log)
    if args.check and not all(ok for ok, _ in checks):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
