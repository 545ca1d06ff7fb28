"""A scripted fake HTTP destination that keeps a ledger of everything it received.

Faults are scripted per request (``script``: a list consumed in order, then ``default``), and per
event id (``poison``: ids rejected as a partial success). Each accepted item is appended to
``ledger`` as (idempotency key, event id, rule, attempt time).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web


@dataclass
class Fault:
    status: int = 200
    retry_after: str | None = None
    hang_s: float = 0.0  # sleep before answering (past the client's timeout = a timeout)
    reset: bool = False  # drop the connection without an answer
    body: bytes = b'{"ok":true}'


@dataclass
class Destination:
    script: list[Fault] = field(default_factory=list)
    default: Fault = field(default_factory=Fault)
    poison: set[str] = field(default_factory=set)
    ledger: list[tuple[str, str, str, float]] = field(default_factory=list)
    requests: list[tuple[float, int, int]] = field(default_factory=list)  # (time, status, items)
    authorizations: set[str] = field(default_factory=set)

    def delivered_keys(self) -> set[str]:
        return {entry[0] for entry in self.ledger}

    def delivered_event_ids(self) -> set[str]:
        return {entry[1] for entry in self.ledger}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        fault = self.script.pop(0) if self.script else self.default
        items: list[dict[str, Any]] = msgspec.json.decode(await request.read())
        self.authorizations.add(request.headers.get("Authorization", ""))
        if fault.hang_s:
            await asyncio.sleep(fault.hang_s)
        if fault.reset:
            assert request.transport is not None
            request.transport.abort()
            self.requests.append((time.monotonic(), 0, len(items)))
            return web.Response(status=500)
        self.requests.append((time.monotonic(), fault.status, len(items)))
        if fault.status != 200:
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            return web.Response(status=fault.status, body=fault.body, headers=headers)
        rejected = {
            str(i): f"event {item['event_id']} is poison"
            for i, item in enumerate(items)
            if item["event_id"] in self.poison
        }
        now = time.monotonic()
        for i, item in enumerate(items):
            if str(i) not in rejected:
                self.ledger.append((item["key"], item["event_id"], item["rule"], now))
        if rejected:
            return web.json_response({"rejected": rejected})
        return web.Response(status=200, body=fault.body, content_type="application/json")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/collect", self.handle)
        return app
