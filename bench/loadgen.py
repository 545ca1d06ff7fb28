"""Closed-loop HTTP/1.1 load generator for the ingest benchmark (run as its own process).

It keeps ``--connections`` keep-alive connections to ``127.0.0.1:PORT`` busy with pre-built
request bytes (read from a msgpack file written by ``ingest_bench.py``: the complete requests,
head and body, cycled in order across all connections), one request in flight per connection.
Responses are parsed just enough to find their status and ``Content-Length``.

Timeline, announced on stdout so that the parent can sample the server's CPU time at the exact
edges of the measured window::

    warm-up (--warmup s) -> "window-start" -> measured (--duration s) -> "window-end"
    -> drain (in-flight requests finish; no new ones) -> one JSON line with the results

Only responses completed inside the window count towards the request rate and the latency
percentiles; status codes are counted over warm-up and window both, so any non-2xx is seen.
The generator stops by itself: the drain is bounded by ``--drain-timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, cast

import msgspec

WARMUP, MEASURE, DRAIN = 0, 1, 2


class RequestPool(msgspec.Struct):
    """The file format shared with ``ingest_bench.py``."""

    requests: list[bytes]
    events_per_request: int


class Stats:
    def __init__(self) -> None:
        self.phase = WARMUP
        self.next_index = 0
        self.window_latencies_ns: list[int] = []
        self.window_bytes_sent = 0
        self.statuses: dict[int, int] = {}
        self.window_statuses: dict[int, int] = {}
        self.errors: list[str] = []
        self.connections: list[Connection] = []
        self.in_flight = 0
        self.idle = asyncio.Event()


class Connection(asyncio.Protocol):
    """One keep-alive connection, one request at a time; the next is sent from the callback."""

    def __init__(self, requests: list[bytes], stats: Stats, lost: asyncio.Future[None]) -> None:
        self.requests = requests
        self.stats = stats
        self.lost = lost
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.body_left = -1  # -1: still reading the head
        self.status = 0
        self.sent_at = 0
        self.sent_bytes = 0
        self.waiting = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.send_next()

    def send_next(self) -> None:
        stats = self.stats
        if stats.phase == DRAIN or self.transport is None:
            if stats.in_flight == 0:
                stats.idle.set()
            return
        request = self.requests[stats.next_index % len(self.requests)]
        stats.next_index += 1
        stats.in_flight += 1
        self.waiting = True
        self.sent_bytes = len(request)
        self.sent_at = time.perf_counter_ns()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while True:
            if self.body_left < 0:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buffer[:end]).lower()
                del buffer[: end + 4]
                self.status = int(head[9:12])
                marker = head.find(b"\r\ncontent-length:")
                if marker < 0:
                    self.fail("response without Content-Length")
                    return
                line_end = head.find(b"\r\n", marker + 2)
                self.body_left = int(head[marker + 17 : line_end if line_end > 0 else None])
            if len(buffer) < self.body_left:
                return
            del buffer[: self.body_left]
            self.body_left = -1
            self.completed()

    def completed(self) -> None:
        stats = self.stats
        elapsed = time.perf_counter_ns() - self.sent_at
        stats.in_flight -= 1
        self.waiting = False
        status = self.status
        stats.statuses[status] = stats.statuses.get(status, 0) + 1
        if stats.phase == MEASURE:
            stats.window_latencies_ns.append(elapsed)
            stats.window_bytes_sent += self.sent_bytes
            stats.window_statuses[status] = stats.window_statuses.get(status, 0) + 1
        self.send_next()

    def fail(self, reason: str) -> None:
        self.stats.errors.append(reason)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        stats = self.stats
        self.transport = None
        if self.waiting:
            self.waiting = False
            stats.in_flight -= 1
            stats.errors.append(f"connection lost with a request in flight: {exc!r}")
        elif stats.phase != DRAIN:
            stats.errors.append(f"idle connection closed by the server: {exc!r}")
        if stats.phase == DRAIN and stats.in_flight == 0:
            stats.idle.set()
        if not self.lost.done():
            self.lost.set_result(None)


async def connection_loop(
    host: str, port: int, requests: list[bytes], stats: Stats, connect_timeout: float
) -> None:
    """Keep one connection going until the drain; reconnect (and count an error) if it drops."""
    loop = asyncio.get_running_loop()
    while stats.phase != DRAIN:
        lost: asyncio.Future[None] = loop.create_future()
        protocol = Connection(requests, stats, lost)
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda p=protocol: p, host, port), connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            stats.errors.append(f"connect: {exc!r}")
            await asyncio.sleep(0.2)
            continue
        stats.connections.append(protocol)
        await lost


def percentile_ms(sorted_ns: list[int], fraction: float) -> float | None:
    """Nearest-rank percentile, in milliseconds; None without samples."""
    if not sorted_ns:
        return None
    index = min(len(sorted_ns) - 1, max(0, math.ceil(fraction * len(sorted_ns)) - 1))
    return sorted_ns[index] / 1e6


async def run(args: argparse.Namespace, pool: RequestPool) -> dict[str, Any]:
    stats = Stats()

    def on_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        stats.errors.append(f"{context.get('message')}: {context.get('exception')!r}")
        loop.default_exception_handler(context)

    asyncio.get_running_loop().set_exception_handler(on_error)
    tasks = [
        asyncio.create_task(
            connection_loop(args.host, args.port, pool.requests, stats, args.connect_timeout)
        )
        for _ in range(args.connections)
    ]
    await asyncio.sleep(args.warmup)
    stats.phase = MEASURE
    started = time.perf_counter_ns()
    sys.stdout.write("window-start\n")
    sys.stdout.flush()
    await asyncio.sleep(args.duration)
    stats.phase = DRAIN
    ended = time.perf_counter_ns()
    sys.stdout.write("window-end\n")
    sys.stdout.flush()
    drained = True
    if stats.in_flight:
        try:
            await asyncio.wait_for(stats.idle.wait(), args.drain_timeout)
        except TimeoutError:
            drained = False
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for connection in stats.connections:
        if connection.transport is not None:
            connection.transport.close()
    latencies = sorted(stats.window_latencies_ns)
    window_s = (ended - started) / 1e9
    return {
        "connections": args.connections,
        "window_s": window_s,
        "requests": len(latencies),
        "events_per_request": pool.events_per_request,
        "distinct_requests": len(pool.requests),
        "bytes_sent": stats.window_bytes_sent,
        "p50_ms": percentile_ms(latencies, 0.50),
        "p99_ms": percentile_ms(latencies, 0.99),
        "max_ms": percentile_ms(latencies, 1.0),
        "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
        "window_statuses": {str(k): v for k, v in sorted(stats.window_statuses.items())},
        "errors": len(stats.errors),
        "error_samples": sorted(set(stats.errors))[:5],
        "drained": drained,
        "in_flight_at_end": stats.in_flight,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--requests", required=True, help="msgpack request pool file")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--drain-timeout", type=float, default=15.0)
    parser.add_argument("--connect-timeout", type=float, default=5.0)
    args = parser.parse_args()
    pool = msgspec.msgpack.decode(Path(args.requests).read_bytes(), type=RequestPool)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency of the project
        result = asyncio.run(run(args, pool))
    else:
        result = uvloop.run(run(args, pool))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
