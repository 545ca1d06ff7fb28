"""End-to-end benchmark (issues 5 and 6): ingest -> Kafka -> five sink consumers -> emulators.

One run starts, each as its own process on this machine:

- the five destination emulators in one process (``bench/emulators_server.py``), each on its own
  port, stamping every accepted message with its receipt time;
- ``router serve`` (the ingest) and one ``router sink NAME`` per sink (what ``router up`` runs),
  with a temp config: the benchmark broker, a fresh topic, fresh consumer groups and DLQ/retry
  topics, the sinks pointed at the emulators with credentials they accept, everything else at
  its defaults (so each sink's ``SinkLimits.linger_s`` applies);
- the load generator (``bench/e2e_loadgen.py``): open loop, fixed rate, Track-API batches plus
  signed guide and NPS webhooks, every event with the current time and its sequence number as a
  tag (a track property, a webhook's guide id) that every sink's message carries.

Then it waits until every routed event arrived (or ``--drain-timeout``), and reports: events/s
accepted by the ingest and delivered per sink, end-to-end latency (ingest 2xx as seen by the
load generator -> emulator receipt, both ``CLOCK_MONOTONIC``) p50/p99 per sink, lost and
duplicated events, and the CPU of every process over the measured window (``/proc``; warm-up
excluded), and each consumer's dead-letter, mapping-error and retry counters (its /metrics).
Routing (rules/*.yaml): track events -> Segment, Mixpanel, Amplitude, GA4; guide webhooks ->
Segment, Mixpanel, GA4; NPS -> Segment, Mixpanel, Amplitude, Slack. Dead letters are read back
from each sink's DLQ topic and counted apart (with their reasons), not as lost: e.g. GA4 takes
scalar parameters only, so a track event with a list property dies there as mapping_error.

Kafka: the broker on ``$KAFKA_PORT`` (default 19092), started with ``deploy/kafka/kafkactl`` if
it is not running and then stopped at the end. Every process started is stopped at the end, also
on error or Ctrl-C; every wait is bounded.

Usage::

    KAFKA_PORT=19892 .venv/bin/python bench/e2e_bench.py [--track-rate 1000] [--batch 100]
        [--webhook-rate 100] [--nps-rate 0.5] [--warmup 5] [--duration 25] [--workdir DIR]

Prints a markdown report on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import queue
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from common import (
    BENCH,
    HOST,
    INTEGRATION_KEY,
    ROOT,
    WEBHOOK_SECRET,
    BenchError,
    Children,
    Kafka,
    bench_run,
    code_version,
    command_line,
    fmt,
    free_port,
    line_reader,
    log_problems,
    log_tail,
    machine_jiffies,
    machine_line,
    make_log,
    make_workdir,
    proc_cpu_s,
    run_header,
    software_line,
    started_utc,
    wait_http_ok,
)

sys.path.insert(0, str(ROOT))  # the repository: the emulators' shared sink settings
from tests.emulators import sink_configs

SINKS = ("segment", "mixpanel", "amplitude", "ga4", "slack")
ROUTES = {  # load kind -> sinks its events reach (rules/*.yaml)
    "track": ("segment", "mixpanel", "amplitude", "ga4"),
    "guide": ("segment", "mixpanel", "ga4"),
    "nps": ("segment", "mixpanel", "amplitude", "slack"),
}
TAG = re.compile(r"bv-(\d{9})")
METRICS = ("router_sink_dead_lettered_total", "router_sink_mapping_errors_total")
METRICS += ("router_sink_retried_total",)


log = make_log("e2e-bench")


def http_get(port: int, path: str, timeout_s: float = 10.0) -> bytes:
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout_s) as response:
        return bytes(response.read())


def router_bin() -> list[str]:
    script = Path(sys.executable).parent / "router"
    return [str(script)] if script.exists() else [sys.executable, "-m", "router.cli"]


def linger_of(sink: str) -> float | None:
    try:
        module = __import__(f"sinks.{sink}", fromlist=["LIMITS"])
        return float(module.LIMITS.linger_s)
    except Exception:
        return None


def write_config(workdir: Path, kafka: Kafka, run_id: str, ingest_port: int, emu: dict[str, int]):
    url = {name: f"http://{HOST}:{port}" for name, port in emu.items()}
    config = {
        "log_level": "INFO",
        "kafka": {
            "bootstrap_servers": kafka.bootstrap,
            "topic": f"bench.e2e.{run_id}",
            "client_id": "e2e-bench",
            "retention_ms": 3_600_000,
            "startup_timeout_s": 60,
        },
        "ingest": {
            "host": HOST,
            "port": ingest_port,
            "webhook_secrets": [WEBHOOK_SECRET],
            "integration_keys": [INTEGRATION_KEY],
        },
        "rules": {"dir": str(ROOT / "rules")},
        "consumer": {
            "group_prefix": f"bench-e2e-{run_id}-",
            "dlq_topic": f"bench.e2e.{run_id}.dlq.{{sink}}",
            "retry_topic": f"bench.e2e.{run_id}.retry.{{sink}}",
            "health_host": HOST,
        },
        "sinks": sink_configs(url),
    }
    path = workdir / "router.yaml"
    path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
    return path, config


# ---- the run -----------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[Any]
    log: Path


def start_emulators(children: Children, workdir: Path) -> tuple[Proc, dict[str, int]]:
    log_path = workdir / "emulators.log"
    argv = [sys.executable, str(BENCH / "emulators_server.py"), "--max-runtime", "1200"]
    proc = children.start(argv, log_path, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    lines = line_reader(proc.stdout)
    deadline = time.monotonic() + 30
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise BenchError(f"emulators not ready in 30 s:\n{log_tail(log_path)}") from None
        if line is None:
            raise BenchError(f"emulators exited ({proc.wait()}):\n{log_tail(log_path)}")
        text = line.decode().strip()
        if text.startswith("ready "):
            ports = json.loads(text[6:])
            log(f"emulators ready (PID {proc.pid}): {ports}")
            return Proc("emulators", proc, log_path), ports


def cpu_snapshot(procs: dict[str, int | None]) -> dict[str, Any]:
    snap: dict[str, Any] = {name: proc_cpu_s(pid) for name, pid in procs.items()}
    snap["_at"] = time.monotonic()
    snap["_machine"] = machine_jiffies()
    return snap


def wait_delivered(control: int, expected: dict[str, int], timeout_s: float) -> dict[str, int]:
    """Poll the emulators until each sink has its expected count (or no progress / timeout)."""
    deadline = time.monotonic() + timeout_s
    counts: dict[str, int] = {}
    last_change, last = time.monotonic(), None
    while time.monotonic() < deadline:
        counts = json.loads(http_get(control, "/counts"))
        if all(counts.get(s, 0) >= n for s, n in expected.items()):
            return counts
        if counts != last:
            last, last_change = counts, time.monotonic()
        elif time.monotonic() - last_change > 10:
            log(f"no progress for 10 s: {counts} (expected {expected}; dead letters aside)")
            return counts
        time.sleep(0.5)
    log(f"drain timeout: {counts} (expected {expected})")
    return counts


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def sink_counters(port: int) -> dict[str, float]:
    """Sums of the consumer's dead-letter, mapping-error and retry counters (its /metrics)."""
    sums = dict.fromkeys(METRICS, 0.0)
    try:
        text = http_get(port, "/metrics").decode()
    except OSError as exc:
        log(f"cannot read metrics on :{port}: {exc!r}")
        return sums
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in sums:
            sums[name] += float(line.rsplit(" ", 1)[1])
    return sums


async def _read_topics(bootstrap: str, topics: list[str], timeout_s: float) -> dict[str, list]:
    """Every record value of ``topics`` (the ones that exist), oldest first; bounded."""
    from aiokafka import AIOKafkaConsumer

    values: dict[str, list[bytes]] = {t: [] for t in topics}
    probe = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await asyncio.wait_for(probe.start(), 30)
    try:
        existing = [t for t in topics if t in await asyncio.wait_for(probe.topics(), 30)]
    finally:
        await asyncio.wait_for(probe.stop(), 10)
    if not existing:
        return values
    consumer = AIOKafkaConsumer(
        *existing,
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await asyncio.wait_for(consumer.start(), 30)
    try:
        deadline = time.monotonic() + timeout_s
        end: dict[Any, int] = {}
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for tp, recs in batch.items():
                values[tp.topic].extend(r.value for r in recs if r.value is not None)
            parts = consumer.assignment()
            if not parts:
                continue
            if set(end) != set(parts):
                end = await consumer.end_offsets(list(parts))
            positions = [await consumer.position(tp) for tp in parts]
            if all(pos >= end[tp] for pos, tp in zip(positions, parts, strict=True)):
                break
    finally:
        await asyncio.wait_for(consumer.stop(), 10)
    return values


def read_dead_letters(kafka: Kafka, run_id: str) -> dict[str, Any]:
    """Per sink: the tags of its dead-lettered events and a count per reason/detail."""
    topics = {sink: f"bench.e2e.{run_id}.dlq.{sink}" for sink in SINKS}
    try:
        values = asyncio.run(_read_topics(kafka.bootstrap, list(topics.values()), 60))
    except Exception as exc:
        log(f"cannot read the DLQ topics: {exc!r}")
        values = {}
    out: dict[str, Any] = {}
    for sink, topic in topics.items():
        seqs: set[int] = set()
        reasons: collections.Counter[str] = collections.Counter()
        for value in values.get(topic, []):
            match = TAG.search(value.decode(errors="replace"))
            if match:
                seqs.add(int(match.group(1)))
            try:
                letter = json.loads(value)
                detail = re.sub(r"\b\d+\b", "N", str(letter.get("detail", "")))[:90]
                reasons[f"{letter.get('reason')}: {detail}"] += 1
            except ValueError:
                reasons["(not JSON)"] += 1
        out[sink] = {"seqs": seqs, "letters": len(values.get(topic, [])), "reasons": reasons}
    return out


def analyse(
    records: list[Any],
    dead: dict[str, Any],
    emulated: dict[str, Any],
    window: tuple[float, float],
) -> dict[str, Any]:
    """Per sink: delivered, lost, duplicates, unexpected, latency, delivered/s in the window."""
    total = max((first + count for _, first, count, *_ in records), default=0)
    answered = [math.nan] * total  # seq -> the ingest's 2xx time (nan: not accepted)
    kind_of = [""] * total
    sent_at = [math.nan] * total
    for kind, first, count, sent, done, status in records:
        for seq in range(first, first + count):
            kind_of[seq] = kind
            sent_at[seq] = sent
            if 200 <= status < 300:
                answered[seq] = done
    start, end = window
    out: dict[str, Any] = {}
    for sink in SINKS:
        expected = {
            seq
            for seq in range(total)
            if sink in ROUTES.get(kind_of[seq], ()) and answered[seq] == answered[seq]
        }
        refused = expected & dead[sink]["seqs"]
        expected -= refused
        data = emulated[sink]
        seqs = []
        for key in data["keys"]:
            match = TAG.search(key)
            seqs.append(int(match.group(1)) if match else -1)
        first_seen: dict[int, float] = {}
        stores = 0
        for seq, at in zip(seqs, data["times"], strict=True):
            stores += 1
            if seq not in first_seen or at < first_seen[seq]:
                first_seen[seq] = at
        delivered = set(first_seen)
        lost = expected - delivered
        unexpected = delivered - expected
        latencies = sorted(
            first_seen[seq] - answered[seq]
            for seq in expected & delivered
            if start <= sent_at[seq] < end
        )
        in_window = sum(1 for at in data["times"] if start <= at < end)
        # Latency trend: events sent in the first vs the last fifth of the window (a backlog grows)
        fifth = (end - start) / 5
        early = sorted(
            first_seen[seq] - answered[seq]
            for seq in expected & delivered
            if start <= sent_at[seq] < start + fifth
        )
        late = sorted(
            first_seen[seq] - answered[seq]
            for seq in expected & delivered
            if end - fifth <= sent_at[seq] < end
        )
        out[sink] = {
            "expected": len(expected),
            "dead_lettered": len(refused),
            "dead_letters": dead[sink]["letters"],
            "dead_reasons": dead[sink]["reasons"].most_common(3),
            "delivered": len(delivered & expected),
            "lost": len(lost),
            "lost_samples": sorted(lost)[:5],
            "unexpected": len(unexpected),
            "duplicates": (stores - len(delivered)) + int(data["duplicates"]),
            "dropped": int(data["dropped"]),
            "statuses": data["statuses"],
            "per_s": in_window / (end - start),
            "p50_ms": None if not latencies else percentile(latencies, 0.5) * 1000,  # type: ignore[operator]
            "p99_ms": None if not latencies else percentile(latencies, 0.99) * 1000,  # type: ignore[operator]
            "max_ms": None if not latencies else latencies[-1] * 1000,
            "samples": len(latencies),
            "p50_early_ms": None if not early else percentile(early, 0.5) * 1000,  # type: ignore[operator]
            "p50_late_ms": None if not late else percentile(late, 0.5) * 1000,  # type: ignore[operator]
            "last_receipt": max(data["times"], default=math.nan),
        }
    return out


def run(args: argparse.Namespace, children: Children, kafka: Kafka, workdir: Path) -> dict:
    run_id = uuid.uuid4().hex[:10]
    emulators, emu_ports = start_emulators(children, workdir)
    control = emu_ports.pop("control")
    ingest_port = free_port()
    config_path, config = write_config(workdir, kafka, run_id, ingest_port, emu_ports)
    args.topic = config["kafka"]["topic"]
    procs: dict[str, Proc] = {"emulators": emulators}
    ingest_log = workdir / "ingest.log"
    ingest = children.start([*router_bin(), "--config", str(config_path), "serve"], ingest_log)
    procs["ingest"] = Proc("ingest", ingest, ingest_log)
    wait_http_ok(ingest_port, "/readyz", ingest, ingest_log, 120)
    log(f"ingest ready on :{ingest_port} (PID {ingest.pid})")
    health: dict[str, int] = {}
    for sink in SINKS:
        health[sink] = free_port()
        env = {**os.environ, "ROUTER_CONSUMER__HEALTH_PORT": str(health[sink])}
        path = workdir / f"sink-{sink}.log"
        proc = children.start(
            [*router_bin(), "--config", str(config_path), "sink", sink], path, env=env
        )
        procs[f"sink:{sink}"] = Proc(f"sink:{sink}", proc, path)
    for sink in SINKS:
        p = procs[f"sink:{sink}"]
        wait_http_ok(health[sink], "/readyz", p.proc, p.log, 120)
        log(f"sink {sink} ready (PID {p.proc.pid}, health :{health[sink]})")
    log(f"settling {args.settle:g} s (consumer groups join)")
    time.sleep(args.settle)

    records_path = workdir / "loadgen-records.msgpack"
    loadgen_log = workdir / "loadgen.log"
    argv = [
        sys.executable,
        str(BENCH / "e2e_loadgen.py"),
        "--port",
        str(ingest_port),
        "--out",
        str(records_path),
        "--duration",
        str(args.warmup + args.duration),
        "--track-rate",
        str(args.track_rate),
        "--batch",
        str(args.batch),
        "--webhook-rate",
        str(args.webhook_rate),
        "--nps-rate",
        str(args.nps_rate),
        "--webhook-secret",
        WEBHOOK_SECRET,
        "--integration-key",
        INTEGRATION_KEY,
    ]
    log(
        f"load: {args.track_rate:g} track events/s in batches of {args.batch}, "
        f"{args.webhook_rate:g} guide webhooks/s, {args.nps_rate:g} NPS webhooks/s, "
        f"warm-up {args.warmup:g} s + window {args.duration:g} s"
    )
    loadgen = children.start(argv, loadgen_log, stdout=subprocess.PIPE)
    procs["loadgen"] = Proc("loadgen", loadgen, loadgen_log)
    pids: dict[str, int | None] = {name: p.proc.pid for name, p in procs.items()}
    pids["broker"] = kafka.pid()
    t0 = time.monotonic()
    time.sleep(args.warmup)
    snap_a = cpu_snapshot(pids)
    time.sleep(max(0.0, t0 + args.warmup + args.duration - time.monotonic()))
    snap_b = cpu_snapshot(pids)
    try:
        out, _ = loadgen.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        raise BenchError("the load generator did not finish in time") from None
    if loadgen.returncode != 0:
        raise BenchError(f"load generator exited {loadgen.returncode}:\n{log_tail(loadgen_log)}")
    summary = json.loads(out.decode().strip().splitlines()[-1])
    records = msgspec.msgpack.decode(records_path.read_bytes())
    log(f"load done: {summary}")
    expected: dict[str, int] = dict.fromkeys(SINKS, 0)
    for kind, _first, count, _sent, _done, status in records:
        if 200 <= status < 300:
            for sink in ROUTES[kind]:
                expected[sink] += count
    load_end = time.monotonic()
    counts = wait_delivered(control, expected, args.drain_timeout)
    drained_in = time.monotonic() - load_end
    log(f"delivered: {counts} (expected {expected}); waited {drained_in:.1f} s after the load")
    time.sleep(1.0)  # late duplicates would arrive now
    counters = {sink: sink_counters(health[sink]) for sink in SINKS}
    emulated = msgspec.msgpack.decode(http_get(control, "/records", timeout_s=60))
    window = (snap_a["_at"], snap_b["_at"])
    dead = read_dead_letters(kafka, run_id)
    per_sink = analyse(records, dead, emulated, window)
    for sink in SINKS:
        per_sink[sink]["counters"] = counters[sink]
    window_s = window[1] - window[0]
    accepted = sum(
        count
        for _k, _f, count, _s, done, status in records
        if 200 <= status < 300 and window[0] <= done < window[1]
    )
    cpu = {
        name: (
            None if snap_a[name] is None or snap_b[name] is None else snap_b[name] - snap_a[name]
        )
        for name in pids
    }
    busy = (snap_b["_machine"][0] - snap_a["_machine"][0]) / max(
        1, snap_b["_machine"][1] - snap_a["_machine"][1]
    )
    problems = {}
    for name, p in procs.items():
        if name in ("emulators", "loadgen"):
            continue
        found = log_problems(p.log)
        if found:
            problems[name] = found.most_common(3)
    return {
        "summary": summary,
        "records": len(records),
        "window_s": window_s,
        "accepted_per_s": accepted / window_s,
        "per_sink": per_sink,
        "cpu": cpu,
        "busy": busy,
        "load_end": load_end,
        "problems": problems,
        "expected": expected,
    }


# ---- report ------------------------------------------------------------------------------------


def report(args: argparse.Namespace, result: dict[str, Any], kafka: Kafka, started: str) -> str:
    window = result["window_s"]
    summary = result["summary"]
    out = [
        *run_header(started, command_line()),
        machine_line(
            "the broker, the ingest, five consumers, the emulators and the load generator all "
            "share it."
        ),
        software_line(
            ("aiohttp", "aiokafka", "uvloop"), f"; {kafka.describe()}; {code_version()}."
        ),
        f"- Load (open loop, fixed rate): {args.track_rate:g} track events/s as Track-API batches"
        f" of {args.batch}, {args.webhook_rate:g} signed guide webhooks/s, {args.nps_rate:g} "
        f"NPS webhooks/s; warm-up {args.warmup:g} s then a {window:.1f} s measured window. "
        f"Sent {summary['events']:,} events in {summary['requests']:,} requests, statuses "
        f"{summary['statuses']}, skipped (over 256 in flight) {summary['skipped']}, errors "
        f"{summary['errors']}.",
        "- Router settings: defaults (fresh topic, 6 partitions; one process per sink), sinks "
        "pointed at the emulators. Consumer linger (SinkLimits.linger_s): "
        + ", ".join(f"{s} {fmt(linger_of(s), 'g')} s" for s in SINKS)
        + ".",
        "- Latency: ingest 2xx seen by the load generator -> the emulator storing the message "
        "(first copy), both CLOCK_MONOTONIC, events sent in the measured window only.",
        "",
        f"Ingest accepted **{result['accepted_per_s']:,.0f} events/s** (2xx answers in the "
        "window).",
        "",
        "| sink | events expected | delivered | lost | duplicates | unexpected | delivered/s "
        "(window) | p50 ms | p99 ms | max ms | p50 ms first / last fifth | dead-lettered | "
        "retried | emulator HTTP statuses |",
        "| --- " + "| ---: " * 12 + "| --- |",
    ]
    for sink in SINKS:
        r = result["per_sink"][sink]
        c = r["counters"]
        out.append(
            f"| {sink} | {r['expected']:,} | {r['delivered']:,} | {r['lost']} | "
            f"{r['duplicates']} | {r['unexpected']} | {r['per_s']:,.0f} | "
            f"{fmt(r['p50_ms'], ',.0f')} | {fmt(r['p99_ms'], ',.0f')} | "
            f"{fmt(r['max_ms'], ',.0f')} | "
            f"{fmt(r['p50_early_ms'], ',.0f')} / {fmt(r['p50_late_ms'], ',.0f')} | "
            f"{r['dead_lettered']:,} | "
            f"{c['router_sink_retried_total']:,.0f} | {r['statuses']} |"
        )
    out += [
        "",
        "CPU over the measured window (percent of one core; the machine has "
        f"{os.cpu_count()}; whole machine busy {result['busy'] * (os.cpu_count() or 1) * 100:.0f}%"
        "):",
        "",
        "| process | CPU % |",
        "| --- | ---: |",
    ]
    for name, seconds in result["cpu"].items():
        out.append(
            f"| {name} | {fmt(None if seconds is None else seconds / window * 100, '.0f')} |"
        )
    reasons = [
        f"- {sink}: {r['dead_letters']:,} dead letter(s): "
        + "; ".join(f"{n:,} x `{m}`" for m, n in r["dead_reasons"])
        for sink, r in result["per_sink"].items()
        if r["dead_letters"]
    ]
    if reasons:
        out += ["", "Dead letters (read back from each sink's DLQ topic):", "", *reasons]
    if result["problems"]:
        out += ["", "Warnings/errors logged:", ""]
        for name, found in result["problems"].items():
            out.append(f"- {name}: " + "; ".join(f"{n} x `{m}`" for m, n in found))
    return "\n".join(out) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--track-rate", type=float, default=1000.0, help="track events/s (1000)")
    parser.add_argument("--batch", type=int, default=100, help="track events per request (100)")
    parser.add_argument("--webhook-rate", type=float, default=100.0, help="guide webhooks/s (100)")
    parser.add_argument("--nps-rate", type=float, default=0.5, help="NPS webhooks/s (0.5)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds not measured (5)")
    parser.add_argument("--duration", type=float, default=25.0, help="measured seconds (25)")
    parser.add_argument("--settle", type=float, default=5.0, help="wait after readiness (5)")
    parser.add_argument(
        "--drain-timeout", type=float, default=120.0, help="wait for deliveries (120)"
    )
    parser.add_argument("--workdir", type=Path, help="keep config, logs and records here")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    started = started_utc()
    try:
        with bench_run(log) as (kafka, children), contextlib.ExitStack() as stack:
            workdir = make_workdir(stack, args.workdir, "e2e-")
            try:
                result = run(args, children, kafka, workdir)
            finally:
                children.stop_all()  # before the temp workdir (their logs) is deleted
    except BenchError:
        return 2  # bench_run logged why
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    sys.stdout.write(report(args, result, kafka, started))
    lost = sum(r["lost"] for r in result["per_sink"].values())
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
