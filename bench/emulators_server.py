"""The five destination emulators in one process, for the end-to-end benchmark (``e2e_bench.py``).

Runs ``tests/emulators``' Segment, Mixpanel, Amplitude, GA4 and Slack apps, each on its own
loopback port, plus a control app. Each emulator's ledger is swapped for a container that stamps
every accepted message with ``time.monotonic()`` (``CLOCK_MONOTONIC``: the same clock in every
process on the machine, so it compares with the load generator's stamps) when it is stored.

Prints one line ``ready {"segment": port, ..., "control": port}`` on stdout once listening.
Control endpoints: ``GET /counts`` (accepted messages per sink, as JSON) and ``GET /records``
(msgpack: per sink the receipt times and the visitor key of every accepted message, the
emulator's own duplicate and drop counters, and the HTTP status counts it answered). Stops on
SIGTERM/SIGINT, or by itself after ``--max-runtime`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.emulators import amplitude, ga4, mixpanel, segment, slack

HOST = "127.0.0.1"
SINKS = ("segment", "mixpanel", "amplitude", "ga4", "slack")


class TimedList(list[Any]):
    """A ledger list that remembers when each entry was appended."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, item: Any) -> None:
        self.times.append(time.monotonic())
        super().append(item)


class TimedDict(dict[Any, Any]):
    """A ledger dict that remembers every store (a re-store of a key is a duplicate)."""

    def __init__(self) -> None:
        super().__init__()
        self.stores: list[tuple[float, Any]] = []

    def __setitem__(self, key: Any, value: Any) -> None:
        self.stores.append((time.monotonic(), value))
        super().__setitem__(key, value)


def build() -> dict[str, Any]:
    emulators: dict[str, Any] = {
        "segment": segment.SegmentEmulator(),
        "mixpanel": mixpanel.MixpanelEmulator(),
        "amplitude": amplitude.AmplitudeEmulator(),
        "ga4": ga4.Ga4Emulator(),
        "slack": slack.SlackEmulator(),
    }
    emulators["segment"].ledger = TimedDict()
    emulators["mixpanel"].events = TimedDict()
    for name in ("amplitude", "ga4", "slack"):
        emulators[name].ledger = TimedList()
    return emulators


def statuses_middleware(counter: collections.Counter[int]) -> Any:
    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        response = await handler(request)
        counter[response.status] += 1
        return response

    return count


def records(emulators: dict[str, Any], statuses: dict[str, collections.Counter[int]]) -> bytes:
    """Receipt time and JSON text of every accepted message, per sink."""
    out: dict[str, Any] = {}
    seg = emulators["segment"].ledger
    out["segment"] = {
        "times": [t for t, _ in seg.stores],
        "keys": [json.dumps(v.message) for _, v in seg.stores],
        "duplicates": len(emulators["segment"].duplicates),
        "dropped": len(emulators["segment"].dropped),
    }
    mp = emulators["mixpanel"].events
    out["mixpanel"] = {
        "times": [t for t, _ in mp.stores],
        "keys": [json.dumps(v) for _, v in mp.stores],
        "duplicates": 0,
        "dropped": 0,
    }
    amp = emulators["amplitude"]
    out["amplitude"] = {
        "times": list(amp.ledger.times),
        "keys": [json.dumps(e.event) for e in amp.ledger],
        "duplicates": amp.duplicates,
        "dropped": 0,
    }
    g = emulators["ga4"]
    out["ga4"] = {
        "times": list(g.ledger.times),
        "keys": [json.dumps(e.event) for e in g.ledger],
        "duplicates": 0,
        "dropped": len(g.dropped),
    }
    s = emulators["slack"]
    out["slack"] = {
        "times": list(s.ledger.times),
        "keys": [json.dumps(p.message) for p in s.ledger],
        "duplicates": 0,
        "dropped": 0,
    }
    for name in SINKS:
        out[name]["statuses"] = {str(k): v for k, v in sorted(statuses[name].items())}
    return msgspec.msgpack.encode(out)


async def main(args: argparse.Namespace) -> int:
    emulators = build()
    statuses = {name: collections.Counter[int]() for name in SINKS}
    runners: list[web.AppRunner] = []
    ports: dict[str, int] = {}

    async def counts(request: web.Request) -> web.Response:
        sizes = {
            "segment": len(emulators["segment"].ledger.stores),
            "mixpanel": len(emulators["mixpanel"].events.stores),
        }
        for name in ("amplitude", "ga4", "slack"):
            sizes[name] = len(emulators[name].ledger)
        return web.json_response(sizes)

    async def dump(request: web.Request) -> web.Response:
        return web.Response(body=records(emulators, statuses))

    control = web.Application()
    control.router.add_get("/counts", counts)
    control.router.add_get("/records", dump)
    apps = {name: emulators[name].app() for name in SINKS}
    for name, app in apps.items():
        app.middlewares.append(statuses_middleware(statuses[name]))
    apps["control"] = control
    try:
        for name, app in apps.items():
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            runners.append(runner)
            site = web.TCPSite(runner, HOST, 0, backlog=1024)
            await site.start()
            server = site._server
            assert server is not None
            ports[name] = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        sys.stdout.write("ready " + json.dumps(ports) + "\n")
        sys.stdout.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await asyncio.wait_for(stop.wait(), args.max_runtime)
        except TimeoutError:
            sys.stderr.write(f"emulators: stopping after --max-runtime {args.max_runtime:g}s\n")
    finally:
        for runner in runners:
            await runner.cleanup()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-runtime", type=float, default=900.0, help="seconds (900)")
    arguments = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency of the project
        sys.exit(asyncio.run(main(arguments)))
    sys.exit(uvloop.run(main(arguments)))
