"""Ingest benchmark: what one ``router serve`` process costs per request and per event.

One run measures, each with its own warm-up and measured window:

1. ``hello``: the ceiling, an aiohttp "hello world" POST server (``bench/hello_server.py``, same
   aiohttp settings and uvloop) loaded with the same signed single-webhook requests;
2. ``webhook``: ``POST /webhooks/pendo``, one signed webhook per request (both Pendo shapes);
3. ``track100`` / ``track500``: ``POST /data/track`` with JSON arrays of 100 / 500 events.

Scenarios 2-3 run against the real ``router serve`` (a subprocess, with a config written to a
temp dir: the benchmark broker, a fresh topic with 3 partitions, a webhook secret and an
integration key), producing to Kafka with acks=all. The load comes from ``bench/loadgen.py``, a
separate uvloop process keeping ``--connections`` keep-alive connections busy with pre-built
requests (closed loop), loopback only.

The machine is small and shared (broker, server and load generator on the same cores), so
throughput and latency depend on what else runs; the figure that compares is the server
process's CPU time per request / per event: utime+stime from ``/proc/<pid>/stat``, read by this
process (not the load generator) at the edges of each measured window.

Kafka: uses the broker on ``$KAFKA_PORT`` (default 19092) through ``deploy/kafka/kafkactl``,
starting it if it is not running, and stopping it at the end only if this run started it. Every
subprocess this script starts is stopped at the end, also on error or Ctrl-C. The bench topic is
deleted at the end (``--keep-topic`` keeps it).

Usage::

    KAFKA_PORT=19592 .venv/bin/python bench/ingest_bench.py [--duration 10] [--warmup 2]
        [--connections 16] [--scenarios hello,webhook,track100,track500]
        [--write docs/benchmarks.md] [--check] [--workdir DIR] [--profile DIR]

Prints a markdown report (machine, code version, command, table, targets with PASS/FAIL) on
stdout and its progress on stderr. ``--write PATH`` also writes the report into PATH, between
``<!-- ingest-bench:start -->`` and ``<!-- ingest-bench:end -->`` if the file has those markers
(the rest of the file is kept), else appended to the file. ``--check`` makes the exit status 1
when a target fails or any response was not 2xx (2 means the benchmark itself failed).
``--workdir DIR`` keeps the router config, the request pools and the server and load-generator
logs. ``--profile DIR`` attaches py-spy (``.venv/bin/pip install py-spy``) to the ingest server
for each ingest window and writes the raw profiles and a summary
(``bench/profile_summary.py``) there; it skews the numbers of that run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
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
    INTEGRATION_KEY,
    WEBHOOK_SECRET,
    BenchError,
    Children,
    Kafka,
    bench_run,
    code_line,
    command_line,
    find_py_spy,
    fmt,
    free_port,
    line_reader,
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

# Targets (issue 2).
HELLO_FRACTION = 0.6  # webhook CPU/request <= hello CPU/request / 0.6
EVENT_BUDGET_US = 1e6 / 150_000  # 6.67 µs of ingest CPU per batched event

MARK_START = "<!-- ingest-bench:start -->"
MARK_END = "<!-- ingest-bench:end -->"

log = make_log("ingest-bench")


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    server: str  # "hello" or "ingest"
    pool: str  # request pool: "webhook", "track100", "track500"


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("hello", "hello world (ceiling), 1 webhook body/request", "hello", "webhook"),
        Scenario("webhook", "ingest: 1 signed webhook/request", "ingest", "webhook"),
        Scenario("track100", "ingest: Track batch of 100 events/request", "ingest", "track100"),
        Scenario("track500", "ingest: Track batch of 500 events/request", "ingest", "track500"),
    )
}
# How many distinct requests each pool holds (cycled by the load generator).
POOL_SIZES = {"webhook": 16_384, "track100": 256, "track500": 64}


# ---- CPU accounting ----------------------------------------------------------------------------


@dataclass
class Snapshot:
    at: float
    server: float | None
    loadgen: float | None
    broker: float | None
    machine: tuple[int, int]


def snapshot(server: int, loadgen: int, broker: int | None) -> Snapshot:
    return Snapshot(
        at=time.monotonic(),
        server=proc_cpu_s(server),
        loadgen=proc_cpu_s(loadgen),
        broker=proc_cpu_s(broker),
        machine=machine_jiffies(),
    )


def delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


# ---- one scenario ------------------------------------------------------------------------------


@dataclass
class Result:
    scenario: Scenario
    connections: int
    window_s: float
    requests: int
    events_per_request: int
    p50_ms: float
    p99_ms: float
    non_2xx: int
    statuses: dict[str, int]
    errors: int
    error_samples: list[str]
    server_cpu_s: float
    loadgen_cpu_s: float | None
    broker_cpu_s: float | None
    machine_busy: float  # fraction of all CPUs
    bytes_sent: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok_requests(self) -> int:
        return self.requests - sum(
            n for status, n in self.extra.get("window_statuses", {}).items() if status[0] != "2"
        )

    @property
    def events(self) -> int:
        return self.ok_requests * self.events_per_request

    @property
    def rps(self) -> float:
        return self.requests / self.window_s

    @property
    def eps(self) -> float:
        return self.events / self.window_s

    @property
    def cpu_us_per_request(self) -> float:
        return self.server_cpu_s / max(1, self.requests) * 1e6

    @property
    def cpu_us_per_event(self) -> float:
        return self.server_cpu_s / max(1, self.events) * 1e6

    @property
    def server_util(self) -> float:
        return self.server_cpu_s / self.window_s


def run_load(
    children: Children,
    scenario: Scenario,
    port: int,
    pool_file: Path,
    server_pid: int,
    broker_pid: int | None,
    args: argparse.Namespace,
    workdir: Path,
) -> Result:
    log(
        f"{scenario.name}: {args.connections} connections, warm-up {args.warmup:g}s, "
        f"window {args.duration:g}s"
    )
    loadgen_log = workdir / f"loadgen-{scenario.name}.log"
    proc = children.start(
        [
            sys.executable,
            str(BENCH / "loadgen.py"),
            "--host",
            HOST,
            "--port",
            str(port),
            "--requests",
            str(pool_file),
            "--connections",
            str(args.connections),
            "--warmup",
            str(args.warmup),
            "--duration",
            str(args.duration),
        ],
        loadgen_log,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    lines = line_reader(proc.stdout)
    deadline = time.monotonic() + args.warmup + args.duration + 60
    snaps: dict[str, Snapshot] = {}
    result: dict[str, Any] | None = None
    profiler: subprocess.Popen[Any] | None = None
    while result is None:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise BenchError(
                f"{scenario.name}: the load generator did not finish in time"
            ) from None
        if line is None:
            raise BenchError(
                f"{scenario.name}: the load generator exited ({proc.wait()}) without a result:\n"
                f"{log_tail(loadgen_log)}"
            )
        text = line.decode().strip()
        if text in ("window-start", "window-end"):
            snaps[text] = snapshot(server_pid, proc.pid, broker_pid)
            if text == "window-start" and args.profile and scenario.server == "ingest":
                profiler = start_profiler(children, args, scenario, server_pid)
        elif text.startswith("{"):
            result = msgspec.json.decode(text)
    Children.stop(proc)
    if profiler is not None:
        finish_profiler(profiler, args, scenario)
    if set(snaps) != {"window-start", "window-end"}:
        raise BenchError(f"{scenario.name}: the load generator did not announce its window")
    if not result["requests"]:
        raise BenchError(
            f"{scenario.name}: no response completed in the window (statuses "
            f"{result['statuses']}, errors {result['error_samples']}):\n{log_tail(loadgen_log)}"
        )
    a, b = snaps["window-start"], snaps["window-end"]
    server_cpu = delta(a.server, b.server)
    if server_cpu is None:
        raise BenchError(f"{scenario.name}: the server process went away during the window")
    busy = (b.machine[0] - a.machine[0]) / max(1, b.machine[1] - a.machine[1])
    statuses: dict[str, int] = result["statuses"]
    return Result(
        scenario=scenario,
        connections=args.connections,
        window_s=result["window_s"],
        requests=result["requests"],
        events_per_request=result["events_per_request"],
        p50_ms=result["p50_ms"],
        p99_ms=result["p99_ms"],
        non_2xx=sum(n for status, n in statuses.items() if not status.startswith("2")),
        statuses=statuses,
        errors=result["errors"],
        error_samples=result["error_samples"],
        server_cpu_s=server_cpu,
        loadgen_cpu_s=delta(a.loadgen, b.loadgen),
        broker_cpu_s=delta(a.broker, b.broker),
        machine_busy=busy,
        bytes_sent=result["bytes_sent"],
        extra={"window_statuses": result["window_statuses"], "drained": result["drained"]},
    )


# ---- profiling (optional) ---------------------------------------------------------------------


def start_profiler(
    children: Children, args: argparse.Namespace, scenario: Scenario, pid: int
) -> subprocess.Popen[Any]:
    """py-spy, attached to the server for the measured window, non-blocking (no pauses)."""
    duration_s = max(1, int(args.duration))
    return start_py_spy(children, args.py_spy, args.profile, scenario.name, pid, duration_s)


def finish_profiler(proc: subprocess.Popen[Any], args: argparse.Namespace, s: Scenario) -> None:
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        Children.stop(proc)
    summary = summarise_py_spy(args.profile, s.name, log)
    if summary is not None:
        out = args.profile / f"{s.name}.txt"
        log(f"{s.name}: profile in {out}, summary in {s.name}-summary.txt:\n{summary}")


# ---- the run -----------------------------------------------------------------------------------


def write_pool(path: Path, requests: list[bytes], events_per_request: int) -> Path:
    path.write_bytes(
        msgspec.msgpack.encode({"requests": requests, "events_per_request": events_per_request})
    )
    return path


def build_pools(names: set[str], workdir: Path) -> dict[str, Path]:
    started = time.monotonic()
    pools: dict[str, Path] = {}
    if "webhook" in names:
        requests = payloads.webhook_requests(POOL_SIZES["webhook"], WEBHOOK_SECRET.encode())
        pools["webhook"] = write_pool(workdir / "webhook.msgpack", requests, 1)
    for batch in (100, 500):
        name = f"track{batch}"
        if name in names:
            requests = payloads.track_requests(POOL_SIZES[name], batch, INTEGRATION_KEY)
            pools[name] = write_pool(workdir / f"{name}.msgpack", requests, batch)
    log(f"built request pools {sorted(pools)} in {time.monotonic() - started:.1f}s")
    return pools


def router_argv(config: Path, router_cmd: str | None) -> list[str]:
    if router_cmd:
        return [*shlex.split(router_cmd), "--config", str(config), "serve"]
    script = Path(sys.executable).parent / "router"
    if script.exists():
        return [str(script), "--config", str(config), "serve"]
    return [sys.executable, "-m", "router.cli", "--config", str(config), "serve"]


def write_router_config(workdir: Path, kafka: Kafka, topic: str, port: int) -> Path:
    config = workdir / "router.yaml"
    config.write_text(
        "# Written by bench/ingest_bench.py for one benchmark run.\n"
        "kafka:\n"
        f"  bootstrap_servers: '{kafka.bootstrap}'\n"
        f"  topic: {topic}\n"
        "  partitions: 3\n"
        "  client_id: ingest-bench\n"
        "  retention_ms: 3600000\n"
        "  startup_timeout_s: 60\n"
        "ingest:\n"
        f"  host: {HOST}\n"
        f"  port: {port}\n"
        f"  webhook_secrets: ['{WEBHOOK_SECRET}']\n"
        f"  integration_keys: ['{INTEGRATION_KEY}']\n"
        "log_level: INFO\n"
    )
    return config


@contextlib.contextmanager
def server(
    children: Children,
    kind: str,
    workdir: Path,
    kafka: Kafka,
    topic: str,
    notes: list[str],
    router_cmd: str | None = None,
) -> Iterator[tuple[int, int]]:
    """Start the hello server or ``router serve``; yield (port, pid); stop it afterwards."""
    port = free_port()
    log_path = workdir / f"{kind}-server.log"
    if kind == "hello":
        argv = [sys.executable, str(BENCH / "hello_server.py"), "--host", HOST, "--port", str(port)]
        ready_path, timeout_s = "/healthz", 30.0
    else:
        argv = router_argv(write_router_config(workdir, kafka, topic, port), router_cmd)
        ready_path, timeout_s = "/readyz", 120.0
    proc = children.start(argv, log_path)
    try:
        wait_http_ok(port, ready_path, proc, log_path, timeout_s)
        log(f"{kind} server ready on :{port} (PID {proc.pid})")
        yield port, proc.pid
    finally:
        code = Children.stop(proc, grace_s=30.0)
        if code not in (0, -signal.SIGTERM):
            log(f"{kind} server exited with {code}:\n{log_tail(log_path)}")
        note = log_problems_note(log_problems(log_path), f"{kind} server", log, shown=10)
        if note:
            notes.append(f"The {kind} server {note}")


def run_all(
    args: argparse.Namespace, children: Children, kafka: Kafka, notes: list[str]
) -> list[Result]:
    chosen = [SCENARIOS[name] for name in args.scenarios]
    results: list[Result] = []
    topic = f"bench.ingest.{uuid.uuid4().hex[:12]}"
    args.topic = topic
    with contextlib.ExitStack() as stack:
        workdir = make_workdir(stack, args.workdir, "ingest-bench-")
        pools = build_pools({s.pool for s in chosen}, workdir)
        broker_pid = kafka.pid()
        for kind in ("hello", "ingest"):
            group = [s for s in chosen if s.server == kind]
            if not group:
                continue
            try:
                with server(children, kind, workdir, kafka, topic, notes, args.router_cmd) as (
                    port,
                    pid,
                ):
                    for scenario in group:
                        results.append(
                            run_load(
                                children,
                                scenario,
                                port,
                                pools[scenario.pool],
                                pid,
                                broker_pid,
                                args,
                                workdir,
                            )
                        )
                        log(summary_line(results[-1]))
            finally:
                if kind == "ingest" and not args.keep_topic:
                    kafka.delete_topics([topic])
    return results


def summary_line(r: Result) -> str:
    return (
        f"{r.scenario.name}: {r.rps:,.0f} req/s, {r.eps:,.0f} events/s, p50 {r.p50_ms:.1f} ms, "
        f"p99 {r.p99_ms:.1f} ms, server CPU {r.cpu_us_per_request:,.0f} µs/req "
        f"({r.cpu_us_per_event:.2f} µs/event), non-2xx {r.non_2xx}, errors {r.errors}"
    )


# ---- report ------------------------------------------------------------------------------------


def targets(results: list[Result]) -> list[tuple[bool, str]]:
    by_name = {r.scenario.name: r for r in results}
    checks: list[tuple[bool, str]] = []
    hello, webhook = by_name.get("hello"), by_name.get("webhook")
    if hello and webhook:
        limit = hello.cpu_us_per_request / HELLO_FRACTION
        checks.append(
            (
                webhook.cpu_us_per_request <= limit,
                f"webhook CPU per request {webhook.cpu_us_per_request:.0f} µs <= "
                f"{limit:.0f} µs (hello world {hello.cpu_us_per_request:.0f} µs / "
                f"{HELLO_FRACTION}); ratio hello/webhook = "
                f"{hello.cpu_us_per_request / webhook.cpu_us_per_request:.2f} (target >= "
                f"{HELLO_FRACTION})",
            )
        )
    for name in ("track100", "track500"):
        r = by_name.get(name)
        if r:
            checks.append(
                (
                    r.cpu_us_per_event <= EVENT_BUDGET_US,
                    f"{name} CPU per event {r.cpu_us_per_event:.2f} µs <= {EVENT_BUDGET_US:.2f} µs"
                    f" ({1e6 / r.cpu_us_per_event:,.0f} events per CPU-second; target 150,000)",
                )
            )
    bad = [r for r in results if r.non_2xx or r.errors]
    detail = "; ".join(
        f"{r.scenario.name}: statuses {r.statuses}, errors {r.errors} {r.error_samples}"
        for r in bad
    )
    checks.append(
        (not bad, "every response 2xx, no connection errors" + (f" ({detail})" * bool(bad)))
    )
    return checks


def report(
    args: argparse.Namespace, results: list[Result], kafka: Kafka, started: str, notes: list[str]
) -> str:
    out = [
        MARK_START,
        *run_header(started, command_line()),
        machine_line("shared by the broker, the server under test and the load generator."),
        software_line(
            ("aiohttp", "aiokafka", "msgspec", "uvloop"),
            f"; {kafka.describe()}; producer acks=all, idempotent, linger 0.",
        ),
        code_line(args.router_cmd),
        f"- Load: {args.connections} keep-alive connections, closed loop, warm-up "
        f"{args.warmup:g} s then a {args.duration:g} s measured window per scenario; topic "
        f"`{args.topic}` (3 partitions), deleted afterwards"
        f"{' (kept)' if args.keep_topic else ''}.",
        "- CPU = utime+stime of the server process over the measured window "
        "(/proc/<pid>/stat, 10 ms ticks).",
        "",
        "| scenario | req/s | events/s | p50 ms | p99 ms | server CPU µs/req | "
        "server CPU µs/event | non-2xx |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        out.append(
            f"| {r.scenario.title} | {r.rps:,.0f} | {r.eps:,.0f} | {r.p50_ms:.1f} | "
            f"{r.p99_ms:.1f} | {r.cpu_us_per_request:,.0f} | "
            f"{fmt(r.cpu_us_per_event, '.2f') if r.scenario.server == 'ingest' else '-'} | "
            f"{r.non_2xx} |"
        )
    out += [
        "",
        "Where the CPU went during each window (percent of one core; the machine has "
        f"{os.cpu_count()}):",
        "",
        "| scenario | server | load generator | Kafka broker | broker CPU µs/event | "
        "whole machine busy |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        broker_per_event = (
            None
            if r.broker_cpu_s is None or r.scenario.server != "ingest"
            else r.broker_cpu_s / max(1, r.events) * 1e6
        )
        loadgen_pct = None if r.loadgen_cpu_s is None else r.loadgen_cpu_s / r.window_s * 100
        broker_pct = None if r.broker_cpu_s is None else r.broker_cpu_s / r.window_s * 100
        machine_pct = r.machine_busy * (os.cpu_count() or 1) * 100
        out.append(
            f"| {r.scenario.name} | {r.server_util * 100:.0f}% | {fmt(loadgen_pct, '.0f')}% | "
            f"{fmt(broker_pct, '.0f')}% | {fmt(broker_per_event, '.2f')} | {machine_pct:.0f}% |"
        )
    out += targets_lines(targets(results))
    if args.profile:
        notes.append(
            f"Profiled run (py-spy attached during each ingest window, profiles in "
            f"{args.profile}): py-spy competes for the same cores, so these numbers are not "
            "comparable with unprofiled runs."
        )
    out += notes_lines(notes)
    out.append(MARK_END)
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds (2)")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections (16)")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (all)",
    )
    parser.add_argument("--write", type=Path, help="also write the report into this file")
    parser.add_argument("--keep-topic", action="store_true", help="do not delete the bench topic")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the config, request pools and server/load-generator logs here "
        "(default: a temp dir, deleted)",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a target fails or a response was not 2xx"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="attach py-spy to the ingest server during each ingest window and write the "
        "profiles and their summaries into this directory (skews the numbers)",
    )
    parser.add_argument("--py-spy", help="the py-spy binary (default: beside python, or on PATH)")
    parser.add_argument(
        "--router-cmd",
        help="run this instead of `router` (`--config CFG serve` is appended), e.g. a wrapper "
        "that profiles or patches the ingest; it must exec the server in the same process",
    )
    args = parser.parse_args(argv)
    if args.profile is not None:
        args.py_spy = find_py_spy(args.py_spy)
        if args.py_spy is None:
            parser.error(
                "--profile needs py-spy: install it with `.venv/bin/pip install py-spy` "
                "or give its path with --py-spy"
            )
        args.profile.mkdir(parents=True, exist_ok=True)
        args.profile = args.profile.resolve()
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown or not args.scenarios:
        parser.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    if args.duration <= 0 or args.warmup < 0 or args.connections < 1:
        parser.error("--duration must be > 0, --warmup >= 0, --connections >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = started_utc()
    notes: list[str] = []
    try:
        with bench_run(log) as (kafka, children):
            results = run_all(args, children, kafka, notes)
    except BenchError:
        return 2  # bench_run logged why
    text = report(args, results, kafka, started, notes)
    sys.stdout.write(text)
    if args.write:
        write_report(args.write, text, (MARK_START, MARK_END), log)
    if args.check and not all(ok for ok, _ in targets(results)):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
