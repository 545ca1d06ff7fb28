"""``router up``: the whole pipeline on one machine, for `make run` and demos.

Starts the ingest (`router serve`) and one consumer per sink (`router sink NAME`) as child
processes, each with its own health port, and prefixes their log lines with the component's name.
SIGINT/SIGTERM stops them all (each drains as it would in production); if one exits on its own,
the others are stopped too and the exit status says so. In production, run each as its own
deployment instead (deploy/).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence

import sinks
from router.settings import Settings


def components() -> list[str]:
    """The sinks to run: every sink with a transport (built-in first, then plugins)."""
    names = [n for n in sinks.BUILT_IN if n in sinks.FACTORIES]
    names += sorted(n for n in sinks.FACTORIES if n not in sinks.BUILT_IN)
    return names


# Log lines longer than this are cut (asyncio's readline limit is 64 KiB by default; past it
# the pump stopped and the child blocked on its next write once the pipe was full).
_LINE_LIMIT = 1 << 20


async def _pump(name: str, stream: asyncio.StreamReader) -> None:
    width = 16
    while True:
        try:
            line = await stream.readline()
        except ValueError:  # a line over the limit: readline has dropped it; keep reading
            line = b"[a log line over 1 MiB was cut]\n"
        if not line:
            return
        sys.stdout.write(f"{name:<{width}}| {line.decode(errors='replace')}")
        sys.stdout.flush()


def _grace_s(settings: Settings) -> float:
    """How long a child may take to drain after SIGTERM: its own shutdown timeout, plus room."""
    return max(settings.ingest.shutdown_timeout_s, settings.consumer.shutdown_timeout_s) + 15.0


async def run_up(settings: Settings, config_args: Sequence[str]) -> int:
    try:
        sinks.load_plugins(settings.plugins)
    except ValueError as exc:
        sys.stderr.write(f"router up: {exc}\n")
        return 2
    cli = [sys.executable, "-m", "router.cli", *config_args]
    base_port = settings.consumer.health_port
    plan: list[tuple[str, list[str], dict[str, str]]] = [("ingest", [*cli, "serve"], {})]
    for index, name in enumerate(components()):
        port = {"ROUTER_CONSUMER__HEALTH_PORT": str(base_port + index)}
        plan.append((f"sink:{name}", [*cli, "sink", name], port))
    if len(plan) == 1:
        sys.stderr.write("router up: no sink has a transport yet; running the ingest only\n")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Before the first child exists: a signal during the spawning must stop what was spawned.
    # SIGHUP too (the terminal running `make run` closed): the children have their own
    # sessions, so nothing else would stop them.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    children: list[tuple[str, asyncio.subprocess.Process]] = []
    pumps: list[asyncio.Task[None]] = []
    died: list[str] = []
    try:
        for name, argv, extra_env in plan:
            if stop.is_set():
                break
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, **extra_env},
                start_new_session=True,  # our signal handling decides when children stop
                limit=_LINE_LIMIT,
            )
            assert process.stdout is not None
            children.append((name, process))
            pumps.append(asyncio.create_task(_pump(name, process.stdout)))
        waits = {asyncio.create_task(p.wait()): n for n, p in children}
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([*waits, stopper], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        died = [waits[t] for t in done if t in waits]
        for name in died:
            sys.stderr.write(f"router up: {name} exited; stopping the others\n")
    finally:
        killed = await _stop_children(children, _grace_s(settings))
        await asyncio.gather(*pumps, return_exceptions=True)
    # A child that had to be killed, or did not exit 0 on SIGTERM, did not drain cleanly.
    failed = [name for name, process in children if process.returncode != 0]
    return 1 if died or killed or failed else 0


async def _stop_children(
    children: Sequence[tuple[str, asyncio.subprocess.Process]], grace_s: float
) -> list[str]:
    """SIGTERM every child still running; SIGKILL (and name) those not gone within grace_s."""
    for _, process in children:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
    killed: list[str] = []
    deadline = asyncio.get_running_loop().time() + grace_s  # one deadline for them all
    for name, process in children:
        # At least a moment: a child that exited meanwhile is reaped, not reported as killed.
        remaining = max(0.5, deadline - asyncio.get_running_loop().time())
        try:
            await asyncio.wait_for(process.wait(), timeout=remaining)
        except TimeoutError:
            sys.stderr.write(f"router up: {name} still running after {grace_s:g}s; killing it\n")
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            killed.append(name)
    return killed
