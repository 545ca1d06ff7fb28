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


async def _pump(name: str, stream: asyncio.StreamReader) -> None:
    width = 16
    while line := await stream.readline():
        sys.stdout.write(f"{name:<{width}}| {line.decode(errors='replace')}")
        sys.stdout.flush()


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
    children: list[tuple[str, asyncio.subprocess.Process]] = []
    pumps: list[asyncio.Task[None]] = []
    for name, argv, extra_env in plan:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **extra_env},
            start_new_session=True,  # our signal handling decides when children stop
        )
        assert process.stdout is not None
        children.append((name, process))
        pumps.append(asyncio.create_task(_pump(name, process.stdout)))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waits = {asyncio.create_task(p.wait()): n for n, p in children}
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*waits, stopper], return_when=asyncio.FIRST_COMPLETED)
    died = [waits[t] for t in done if t in waits]
    for name in died:
        sys.stderr.write(f"router up: {name} exited; stopping the others\n")
    for _, process in children:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
    for _, process in children:
        try:
            await asyncio.wait_for(process.wait(), timeout=40)
        except TimeoutError:
            process.kill()
            await process.wait()
    await asyncio.gather(*pumps, return_exceptions=True)
    stopper.cancel()
    return 1 if died else 0
