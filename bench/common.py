"""Helpers shared by the benchmark scripts in ``bench/``.

The scripts are run as ``python bench/X.py``, so ``bench/`` is ``sys.path[0]`` and they import
this module as ``common`` (as they import ``payloads`` and ``profile_summary``); nothing here is
a package of the router.

What lives here is what more than one benchmark does the same way:

- processes: :class:`Children` (every subprocess a run starts, all stopped at the end),
  :func:`free_port`, :func:`wait_http_ok`, :func:`log_tail`, :func:`line_reader`,
  :func:`log_problems` and :func:`log_problems_note`;
- CPU accounting from ``/proc``: :func:`proc_cpu_s`, :func:`machine_jiffies`;
- the benchmark broker through ``deploy/kafka/kafkactl``: :class:`Kafka`;
- py-spy: :func:`find_py_spy`, :func:`start_py_spy`, :func:`summarise_py_spy`;
- the report: the header lines (command, machine, software, code), targets and notes, and
  :func:`write_report` (between markers in e.g. ``docs/benchmarks.md``);
- the run itself: :func:`make_log`, :func:`bench_run`, :func:`make_workdir`,
  :func:`started_utc`;
- the small aiohttp servers (``blackhole.py``, ``hello_server.py``): :func:`add_healthz`,
  :func:`serve_main`.

What a benchmark measures and how its report reads stays in its own script.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import http.client
import importlib.metadata
import os
import platform
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import profile_summary

if TYPE_CHECKING:
    from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
KAFKACTL = ROOT / "deploy" / "kafka" / "kafkactl"
KAFKA_LIBS = ROOT / "deploy" / "kafka" / "target" / "libs"
HOST = "127.0.0.1"

# Benchmark-only credentials, written into the temporary router config of each run.
WEBHOOK_SECRET = "bench-webhook-secret"  # noqa: S105
INTEGRATION_KEY = "bench-integration-key"

CLK_TCK = os.sysconf("SC_CLK_TCK")

# The environment that changes a run that starts Kafka or the router: it goes into the report's
# command line (ROUTER_* settings reach `router serve` / `router sink`).
KAFKA_ENV = ("KAFKA_PORT", "KAFKA_STATE_DIR")
ROUTER_ENV_PREFIXES = ("ROUTER_",)

Log = Callable[[str], None]


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


# ---- the run -----------------------------------------------------------------------------------


def make_log(name: str) -> Log:
    """A progress logger: ``[name HH:MM:SS] message`` on stderr (stdout carries the report)."""

    def log(message: str) -> None:
        sys.stderr.write(f"[{name} {time.strftime('%H:%M:%S')}] {message}\n")
        sys.stderr.flush()

    return log


def exit_on_sigterm() -> None:
    """SIGTERM ends the run like Ctrl-C: the finally blocks stop what this run started."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@contextlib.contextmanager
def bench_run(log: Log) -> Iterator[tuple[Kafka, Children]]:
    """The broker (started if need be) and the children of one run that uses Kafka.

    On the way out, also on error, Ctrl-C or SIGTERM, every child is stopped, and the broker
    too if this run started it. A :class:`BenchError` is logged as the run's failure before
    that clean-up (so the reason comes first on stderr) and raised on: the caller exits 2.
    """
    exit_on_sigterm()
    kafka = Kafka.from_env(log)
    children = Children()
    try:
        kafka.ensure_running()
        yield kafka, children
    except BenchError as exc:
        log(f"failed: {exc}")
        raise
    finally:
        children.stop_all()
        kafka.stop_if_started()


def started_utc() -> str:
    """The run's start as the report prints it (UTC, to the minute)."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M")


def make_workdir(stack: contextlib.ExitStack, given: Path | None, prefix: str) -> Path:
    """``--workdir``, created, or else a temp dir that ``stack`` deletes.

    The given one is made absolute: some children run with another working directory.
    """
    if given is not None:
        workdir = given.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        return workdir
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))


# ---- processes ---------------------------------------------------------------------------------


class Children:
    """Every subprocess started by this run; all of them are stopped by :meth:`stop_all`."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def start(self, argv: list[str], log_path: Path | None, **kwargs: Any) -> subprocess.Popen[Any]:
        out: IO[bytes] | int = subprocess.DEVNULL
        if log_path is not None:
            out = log_path.open("wb")
        kwargs.setdefault("stdout", out)  # never onto our stdout, which carries the report
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        # A session of its own: Ctrl-C in the terminal reaches this script, which stops the
        # children in order, rather than every process at once.
        proc = subprocess.Popen(argv, stderr=out, start_new_session=True, **kwargs)
        if not isinstance(out, int):
            out.close()  # the child has its own copy
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(
        proc: subprocess.Popen[Any], grace_s: float = 20.0, sig: int = signal.SIGTERM
    ) -> int | None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(10)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                self.stop(proc, grace_s=10.0)
        self.procs.clear()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


def wait_http_ok(
    port: int,
    path: str,
    proc: subprocess.Popen[Any],
    log_path: Path,
    timeout_s: float,
    *,
    poll_s: float = 0.25,
    who: str = "server",
) -> None:
    """Poll ``GET path`` until it answers 200; BenchError if ``proc`` exits or time runs out.

    ``poll_s`` is part of what a benchmark measures when it times start-up (the consumer
    benchmark's start-up seconds are ready-time minus start-time), so each caller keeps its own.
    """
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(
                f"{who} exited with {proc.returncode} during start-up:\n{log_tail(log_path)}"
            )
        conn = http.client.HTTPConnection(HOST, port, timeout=2)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            if response.status == 200:
                return
            last = f"{response.status} {body[:200]!r}"
        except OSError as exc:
            last = repr(exc)
        finally:
            conn.close()
        time.sleep(poll_s)
    raise BenchError(f"{who} not ready on :{port}{path} after {timeout_s:g}s ({last})")


def line_reader(stream: IO[bytes]) -> queue.Queue[bytes | None]:
    """The lines of a child's pipe through a queue (None at EOF), so reads can time out."""
    lines: queue.Queue[bytes | None] = queue.Queue()

    def pump() -> None:
        for line in iter(stream.readline, b""):
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def log_problems(path: Path, fold_numbers: bool = False) -> collections.Counter[str]:
    """WARNING/ERROR lines of a process log, counted by message (timestamps dropped).

    ``fold_numbers`` counts messages that differ only in numbers (offsets, counts, durations)
    as one, cut to 160 characters.
    """
    problems: collections.Counter[str] = collections.Counter()
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return problems
    for line in lines:
        match = re.search(r" (WARNING|ERROR|CRITICAL) (.*)$", line)
        if match:
            text = match.group(2)
            if fold_numbers:
                text = re.sub(r"\d+(\.\d+)?", "N", text)[:160]
            problems[f"{match.group(1)} {text}"] += 1
    return problems


def log_problems_note(
    problems: collections.Counter[str], who: str, log: Log, shown: int
) -> str | None:
    """Log the ``shown`` commonest problems; the tail of a report note about them, or None."""
    if not problems:
        return None
    total = sum(problems.values())
    log(f"{who} logged {total} warning(s)/error(s):")
    for message, count in problems.most_common(shown):
        log(f"  {count} x {message}")
    top, count = problems.most_common(1)[0]
    return f"logged {total} warning/error line(s), e.g. {count} x `{top}`."


# ---- CPU accounting ----------------------------------------------------------------------------


def proc_cpu_s(pid: int | None) -> float | None:
    """utime+stime of the whole process (all threads), in seconds; None if it is gone."""
    if pid is None:
        return None
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    idle = values[3] + values[4]
    return total - idle, total


# ---- Kafka -------------------------------------------------------------------------------------


class Kafka:
    """The benchmark broker on ``port``, through ``deploy/kafka/kafkactl``.

    Started if it is not running and then stopped by :meth:`stop_if_started`; a broker that was
    already running (someone else's, or a developer's) is left running.
    """

    def __init__(self, port: int, log: Log) -> None:
        self.port = port
        self.log = log
        self.bootstrap = f"{HOST}:{port}"
        self.started_here = False
        state_root = Path(os.environ.get("KAFKA_STATE_DIR") or ROOT / ".local")
        self.pid_file = state_root / f"kafka-{port}" / "kafka.pid"

    @classmethod
    def from_env(cls, log: Log) -> Kafka:
        return cls(int(os.environ.get("KAFKA_PORT", "19092")), log)

    def ctl(self, command: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KAFKA_PORT": str(self.port)}
        return subprocess.run(
            [str(KAFKACTL), command],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def ensure_running(self) -> None:
        if self.ctl("status", timeout_s=60).returncode == 0:
            self.log(f"kafka: using the running broker on {self.bootstrap}")
            return
        self.log(f"kafka: starting a broker on {self.bootstrap} (deploy/kafka/kafkactl start)")
        result = self.ctl("start")
        if result.returncode != 0:
            raise BenchError(f"kafkactl start failed:\n{result.stdout}\n{result.stderr}")
        self.started_here = True

    def stop_if_started(self) -> None:
        if self.started_here:
            self.log(f"kafka: stopping the broker this run started on {self.bootstrap}")
            result = self.ctl("stop")
            if result.returncode != 0:
                self.log(f"kafka: kafkactl stop failed:\n{result.stdout}\n{result.stderr}")
            self.started_here = False

    def pid(self) -> int | None:
        """The broker's PID (its CPU is reported), from kafkactl's PID file."""
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def describe(self) -> str:
        """The broker as the reports' software line names it."""
        return f"Kafka {kafka_version()} (one local KRaft broker, {self.bootstrap})"

    def delete_topics(self, topics: list[str]) -> None:
        """Delete the ``topics`` that exist; a failure is logged, not raised (clean-up only)."""
        from aiokafka.admin import AIOKafkaAdminClient

        async def delete() -> None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=15_000)
            await asyncio.wait_for(admin.start(), 20)
            try:
                existing = set(await asyncio.wait_for(admin.list_topics(), 20))
                gone = [t for t in topics if t in existing]
                if gone:
                    await asyncio.wait_for(admin.delete_topics(gone, timeout_ms=15_000), 20)
            finally:
                await asyncio.wait_for(admin.close(), 10)

        # The ingest bench deletes one topic, the consumer bench three (events, retry, DLQ).
        what = f"topic {topics[0]}" if len(topics) == 1 else f"topics {', '.join(topics)}"
        try:
            asyncio.run(delete())
            self.log(f"kafka: deleted {what}")
        except Exception as exc:
            failed = f"topic {topics[0]}" if len(topics) == 1 else f"topics {topics}"
            self.log(f"kafka: could not delete {failed}: {exc!r}")


def kafka_version() -> str:
    for jar in sorted(KAFKA_LIBS.glob("kafka_2.13-*.jar")):
        match = re.fullmatch(r"kafka_2\.13-(.+)\.jar", jar.name)
        if match:
            return match.group(1)
    return "unknown"


# ---- profiling (optional) ---------------------------------------------------------------------


def find_py_spy(given: str | None) -> str | None:
    if given:
        return given if Path(given).exists() or shutil.which(given) else None
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start_py_spy(
    children: Children,
    py_spy: str,
    directory: Path,
    name: str,
    pid: int,
    duration_s: int | None = None,
) -> subprocess.Popen[Any]:
    """py-spy on ``pid``, writing ``directory/name.txt`` (raw format).

    Non-blocking, so it never pauses the process it measures; without ``duration_s`` it
    records until SIGINT.
    """
    argv = [py_spy, "record", "--nonblocking", "--rate", "250", "--format", "raw"]
    if duration_s is not None:
        argv += ["--duration", str(duration_s)]
    argv += ["--pid", str(pid), "--output", str(directory / f"{name}.txt")]
    return children.start(argv, directory / f"{name}.py-spy.log")


def summarise_py_spy(directory: Path, name: str, log: Log) -> str | None:
    """Write ``name-summary.txt`` beside the raw profile and return it; None if there is none."""
    out = directory / f"{name}.txt"
    if not out.exists():
        log(f"{name}: py-spy wrote no profile:\n{log_tail(out.with_suffix('.py-spy.log'))}")
        return None
    summary = profile_summary.summarise(out, top=30)
    (directory / f"{name}-summary.txt").write_text(summary + "\n")
    return summary


# ---- report ------------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def code_version(subject: bool = True) -> str:
    """The commit the router code is at (with its subject line), and whether router/ is dirty."""

    def git(*argv: str) -> str:
        result = subprocess.run(
            ["git", "-C", str(ROOT), *argv], capture_output=True, text=True, check=False
        )
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "router (not a git checkout, or no commit yet)"
    dirty = git("status", "--porcelain", "--", "router")
    described = f"router at commit {commit}"
    if subject:
        described += f" ({git('log', '-1', '--format=%s')})"
    return described + (", with uncommitted changes in router/" if dirty else "")


def command_line(
    env_names: Collection[str] = KAFKA_ENV, env_prefixes: tuple[str, ...] = ROUTER_ENV_PREFIXES
) -> str:
    """The command as typed, after the environment variables that change the run."""
    argv = [os.path.relpath(sys.executable, Path.cwd()), *sys.argv]
    env = [
        f"{name}={shlex.quote(value)}"
        for name, value in sorted(os.environ.items())
        if name in env_names or name.startswith(env_prefixes)
    ]
    return " ".join([*env, shlex.join(argv)])


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted, or "n/a" when it is missing or NaN."""
    return "n/a" if value is None or value != value else format(value, spec)


def run_header(started: str, command: str) -> list[str]:
    """The first report lines: when, and the command in a code block."""
    return [f"Run {started} UTC, command:", "", "```sh", command, "```", ""]


def machine_line(sharing: str) -> str:
    """The report's machine line; ``sharing`` says what else ran on the cores."""
    return (
        f"- Machine: {cpu_model()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} "
        f"usable), {platform.system()} {platform.release()}; {sharing}"
    )


def software_line(dists: Iterable[str], rest: str) -> str:
    """The report's software line: Python and each distribution's version, then ``rest``."""
    versions = ", ".join(f"{dist} {version(dist)}" for dist in dists)
    return f"- Software: Python {platform.python_version()}, {versions}{rest}"


def code_line(router_cmd: str | None) -> str:
    return f"- Code: {code_version()}" + (f", run through `{router_cmd}`." if router_cmd else ".")


def targets_lines(checks: list[tuple[bool, str]]) -> list[str]:
    return [
        "",
        "Targets:",
        "",
        *(f"- **{'PASS' if ok else 'FAIL'}** {text}" for ok, text in checks),
    ]


def notes_lines(notes: list[str]) -> list[str]:
    return ["", "Notes:", "", *(f"- {note}" for note in notes)] if notes else []


def write_report(path: Path, text: str, markers: tuple[str, str], log: Log) -> None:
    """Put ``text`` between the ``markers`` in ``path``, keeping the rest of the file.

    A file without those markers gets the text appended; a missing file is created.
    """
    start, end = markers
    if path.exists():
        current = path.read_text()
        if start in current and end in current:
            before, rest = current.split(start, 1)
            after = rest.split(end, 1)[1].removeprefix("\n")
            path.write_text(before + text + after)
        else:
            path.write_text(current.rstrip("\n") + "\n\n" + text)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    log(f"wrote the report into {path}")


# ---- small aiohttp servers ---------------------------------------------------------------------


def add_healthz(app: web.Application, body: bytes) -> None:
    """``GET /healthz``, answering 200 with ``body``: what the bench polls before loading."""
    from aiohttp import web

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app.router.add_get("/healthz", healthz)


async def serve_app(
    make_app: Callable[[], web.Application], host: str, port: int, banner: str
) -> int:
    """Serve the app until SIGTERM or SIGINT.

    With the ingest's aiohttp settings (``access_log=None``, ``backlog=1024``), so that what
    these servers cost compares with what ``router serve`` costs.
    """
    from aiohttp import web

    runner = web.AppRunner(make_app(), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stderr.write(banner.format(host=host, port=port) + "\n")
    await stop.wait()
    await runner.cleanup()
    return 0


def serve_main(description: str, make_app: Callable[[], web.Application], banner: str) -> int:
    """``--host``/``--port`` from the command line, then :func:`serve_app` on uvloop.

    ``banner`` is formatted with ``host`` and ``port`` and written to stderr once listening.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import uvloop

    return uvloop.run(serve_app(make_app, args.host, args.port, banner))
