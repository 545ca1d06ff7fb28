"""The consumer benchmark's comparison: a bare aiohttp client posting pre-encoded batches.

No Kafka, no rules, no batching, no offsets: ``--concurrency`` coroutines share one
``aiohttp.ClientSession`` (uvloop, a ``TCPConnector`` with the consumer's connection limit) and
POST the bodies of a pool file, each once, in order, with the fake sink's headers, reading every
response body. The pool (msgpack ``{"bodies": [bytes...], "items": int, "url": str,
"headers": {...}}``) is written by ``consumer_bench.py``: the very JSON arrays the fake sink
would build for the same events, 25 items each. What this process spends per event is the floor
of an aiohttp client doing the same HTTP work as the consumer.

Protocol with the parent, which reads this process's CPU time from ``/proc`` at the edges::

    load the pool, open the session -> "ready" on stdout -> wait for "go" on stdin
    -> post everything -> one JSON line with the results -> wait for stdin to close, exit

Usage: ``python bench/bare_client.py --pool FILE [--concurrency 4] [--timeout 30]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import msgspec


class Pool(msgspec.Struct):
    bodies: list[bytes]
    items: int
    url: str
    headers: dict[str, str]


async def run(pool: Pool, concurrency: int, timeout_s: float) -> dict[str, object]:
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        connector=aiohttp.TCPConnector(limit=concurrency * 2),
    )
    statuses: dict[str, int] = {}
    errors: list[str] = []
    bodies: Iterator[bytes] = iter(pool.bodies)
    url, headers = pool.url, pool.headers

    async def worker() -> None:
        for body in bodies:
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    key = str(response.status)
                    statuses[key] = statuses.get(key, 0) + 1
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                errors.append(repr(exc))

    try:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if line.strip() != "go":
            return {"aborted": True}
        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    finally:
        await session.close()
    return {
        "requests": sum(statuses.values()),
        "items": pool.items,
        "elapsed_s": elapsed,
        "statuses": statuses,
        "errors": len(errors),
        "error_samples": errors[:5],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    pool = msgspec.msgpack.decode(args.pool.read_bytes(), type=Pool)
    import uvloop

    result = uvloop.run(run(pool, args.concurrency, args.timeout))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    sys.stdin.read()  # the parent closes stdin once it has read our CPU time
    return 0


if __name__ == "__main__":
    sys.exit(main())
