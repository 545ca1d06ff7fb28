"""The benchmark's ceiling: an aiohttp "hello world" POST server, run as its own process.

Same aiohttp stack and settings as ``router serve`` (uvloop, ``AppRunner(access_log=None)``,
``TCPSite(backlog=1024)``, the ingest's ``client_max_size``), but the handler only reads the
body and answers 200 with a tiny JSON body: no middleware, no signature, no JSON, no Kafka.
The CPU time it spends per request is the floor any aiohttp handler pays.

Usage: ``python bench/hello_server.py --port PORT``; SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import sys

from aiohttp import web
from common import add_healthz, serve_main

CLIENT_MAX_SIZE = 1024 * 1024  # the ingest's default ingest.max_body_bytes
_OK = b'{"ok":true}'


async def hello(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=_OK, content_type="application/json")


def create_app() -> web.Application:
    app = web.Application(client_max_size=CLIENT_MAX_SIZE)
    app.router.add_post("/webhooks/pendo", hello)
    app.router.add_post("/data/track", hello)
    add_healthz(app, _OK)
    return app


def main() -> int:
    return serve_main(
        __doc__.splitlines()[0], create_app, "hello server listening on http://{host}:{port}"
    )


if __name__ == "__main__":
    sys.exit(main())
