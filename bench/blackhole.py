"""The consumer benchmark's destination: a "blackhole" HTTP server, run as its own process.

aiohttp + uvloop, ``access_log=None``. ``POST /collect`` reads the body (a JSON array of items,
as the fake sink and ``bench/bare_client.py`` send), counts its items and their distinct
idempotency keys (each item's ``key``), and answers 200 ``{}`` at once: nothing else. The
benchmark switches it to refuse every request (``POST /control?status=503``) to simulate an
outage, and back. The counters are read with ``GET /stats`` and cleared with
``POST /control?reset=1``; ``GET /keys`` lists the distinct keys received.

Counting keys costs this process (not the consumer under test) a typed decode of each body, about
a quarter of a microsecond per item; the consumer's CPU is what the benchmark compares.

Usage: ``python bench/blackhole.py --port PORT``; SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import sys
import time

import msgspec
from aiohttp import web
from common import add_healthz, serve_main

CLIENT_MAX_SIZE = 64 * 1024 * 1024  # larger than any batch the benchmark configures
_OK = b"{}"
_REFUSED = b'{"error":"blackhole refusing requests (simulated outage)"}'


class _Item(msgspec.Struct):
    """Only the idempotency key of an item; every other field is skipped by the decoder."""

    key: str = ""


_items = msgspec.json.Decoder(list[_Item])


class Counters:
    def __init__(self) -> None:
        self.status = 200
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.items = 0
        self.bytes = 0
        self.refused_requests = 0
        self.refused_items = 0
        self.undecodable = 0
        self.keys: set[str] = set()
        self.first_at: float | None = None  # time.monotonic() of the first accepted request
        self.last_at: float | None = None

    def stats(self) -> dict[str, object]:
        return {
            "status": self.status,
            "requests": self.requests,
            "items": self.items,
            "distinct_keys": len(self.keys),
            "duplicates": self.items - len(self.keys),
            "bytes": self.bytes,
            "refused_requests": self.refused_requests,
            "refused_items": self.refused_items,
            "undecodable": self.undecodable,
            "first_at": self.first_at,
            "last_at": self.last_at,
            "now": time.monotonic(),
        }


def create_app(counters: Counters) -> web.Application:
    async def collect(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            items = _items.decode(body)
        except msgspec.DecodeError:
            counters.undecodable += 1
            items = []
        if counters.status != 200:
            counters.refused_requests += 1
            counters.refused_items += len(items)
            return web.Response(
                status=counters.status, body=_REFUSED, content_type="application/json"
            )
        now = time.monotonic()
        if counters.first_at is None:
            counters.first_at = now
        counters.last_at = now
        counters.requests += 1
        counters.items += len(items)
        counters.bytes += len(body)
        counters.keys.update(item.key for item in items)
        return web.Response(body=_OK, content_type="application/json")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(counters.stats())

    async def control(request: web.Request) -> web.Response:
        if "status" in request.query:
            counters.status = int(request.query["status"])
        if request.query.get("reset") == "1":
            counters.reset()
        return web.json_response(counters.stats())

    async def keys(request: web.Request) -> web.Response:
        return web.json_response(sorted(counters.keys))

    app = web.Application(client_max_size=CLIENT_MAX_SIZE)
    app.router.add_post("/collect", collect)
    app.router.add_get("/stats", stats)
    app.router.add_get("/keys", keys)
    app.router.add_post("/control", control)
    add_healthz(app, _OK)
    return app


def main() -> int:
    return serve_main(
        __doc__.splitlines()[0],
        lambda: create_app(Counters()),
        "blackhole listening on http://{host}:{port}/collect",
    )


if __name__ == "__main__":
    sys.exit(main())
