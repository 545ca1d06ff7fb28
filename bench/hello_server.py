"""The benchmark's ceiling: an aiohttp "hello world" POST server, run as its own process.

Same aiohttp stack and settings as ``router serve`` (uvloop, ``AppRunner(access_log=None)``,
``TCPSite(backlog=1024)``, the ingest's ``client_max_size``), but the handler only reads the
body and answers 200 with a tiny JSON body: no middleware, no signature, no JSON, no Kafka.
The CPU time it spends per request is the floor any aiohttp handler pays.

Usage: ``python bench/hello_server.py --port PORT``; SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiohttp import web

CLIENT_MAX_SIZE = 1024 * 1024  # the ingest's default ingest.max_body_bytes
_OK = b'{"ok":true}'


async def hello(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=_OK, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=_OK, content_type="application/json")


def create_app() -> web.Application:
    app = web.Application(client_max_size=CLIENT_MAX_SIZE)
    app.router.add_post("/webhooks/pendo", hello)
    app.router.add_post("/data/track", hello)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(host: str, port: int) -> int:
    runner = web.AppRunner(create_app(), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stderr.write(f"hello server listening on http://{host}:{port}\n")
    await stop.wait()
    await runner.cleanup()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import uvloop

    return uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    sys.exit(main())
