"""Open-loop, fixed-rate load for the end-to-end benchmark (run as its own process).

Sends, for ``--duration`` seconds, to the ingest on ``127.0.0.1:PORT``:

- Track-API batches of ``--batch`` events at ``--track-rate`` events/s (``payloads.track_event``
  shapes and properties);
- signed guide webhooks (the dotted ``guide.*`` and URL ``guideDisplayed`` fixtures) at
  ``--webhook-rate`` requests/s, one event each;
- signed NPS webhooks (dotted ``nps.response`` and URL ``npsSubmitted``) at ``--nps-rate``/s.

Every event is built when it is sent, with the current time as its timestamp (GA4 accepts only
events of the last 72 h), and carries its sequence number as a tag ``bv-NNNNNNNNN``: in the
property ``bench_seq`` of a track event (properties reach Segment, Mixpanel, Amplitude and GA4
as they are) and as the ``guide_id`` of a webhook (which every rule for guide and NPS events
copies, the Slack message included; an NPS webhook's visitor id too), so each delivered
message maps back to the request that carried it. Other visitor ids stay realistic
(``visitor-NNNN``, 1,000 of them), as the sinks batch and throttle per visitor. Requests start
on a fixed schedule whatever the answers (open loop); at most ``--max-inflight`` are
outstanding, a request due beyond that is skipped and counted (the ingest is not keeping up).

Writes a msgpack file (``--out``): per request its kind, first sequence number, event count,
send time, answer time (``time.monotonic()``) and status; prints one JSON summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import payloads

from router.signature import sign

GUIDE_TEMPLATES = ["guide.viewed", "guide.advanced", "guide.dismissed", "guide.completed"]


def tag(seq: int) -> str:
    return f"bv-{seq:09d}"


def load_templates() -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    root = payloads.FIXTURES
    guides = [
        ("dotted", json.loads((root / "webhook-dotted" / f"{name}.json").read_text()))
        for name in GUIDE_TEMPLATES
    ]
    guides.append(("url", json.loads((root / "webhook-url" / "guideDisplayed.json").read_text())))
    nps = [
        ("dotted", json.loads((root / "webhook-dotted" / "nps.response.json").read_text())),
        ("url", json.loads((root / "webhook-url" / "npsSubmitted.json").read_text())),
    ]
    return guides, nps


def webhook_body(shape: str, template: Any, seq: int, rng: random.Random) -> bytes:
    hook = copy.deepcopy(template)
    now = time.time()
    if shape == "dotted":
        hook["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        hook["data"]["visitor_id"] = f"visitor-{rng.randrange(payloads.VISITORS):04d}"
        hook["data"]["guide_id"] = tag(seq)
        if "score" in hook["data"]:  # the Slack message of a promoter names only the visitor
            hook["data"]["visitor_id"] = tag(seq)
        if "score" in hook["data"]:
            hook["data"]["score"] = rng.randrange(11)
    else:
        hook["timestamp"] = int(now)
        hook["visitorId"] = f"visitor-{rng.randrange(payloads.VISITORS):04d}"
        hook["properties"]["guideId"] = tag(seq)
        if "score" in hook["properties"]:
            hook["visitorId"] = tag(seq)
        hook["uniqueId"] = f"{seq:040x}"
        if "score" in hook.get("properties", {}):
            hook["properties"]["score"] = rng.randrange(11)
    return json.dumps(hook, separators=(",", ":")).encode()


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(7)
        self.seq = 0
        self.guides, self.nps = load_templates()
        self.secret = args.webhook_secret.encode()
        self.url = f"http://127.0.0.1:{args.port}"
        self.records: list[tuple[str, int, int, float, float, int]] = []
        self.inflight = 0
        self.skipped = {"track": 0, "guide": 0, "nps": 0}
        self.errors: list[str] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def next_seqs(self, count: int) -> int:
        first = self.seq
        self.seq += count
        return first

    def build(self, kind: str, index: int) -> tuple[str, bytes, dict[str, str], int, int]:
        if kind == "track":
            count = self.args.batch
            first = self.next_seqs(count)
            now_ms = int(time.time() * 1000)
            events = []
            for i in range(count):
                event = payloads.track_event(self.rng, first + i)
                event["properties"]["bench_seq"] = tag(first + i)
                event["timestamp"] = now_ms
                events.append(event)
            body = json.dumps(events, separators=(",", ":")).encode()
            headers = {"x-pendo-integration-key": self.args.integration_key}
            return payloads.TRACK_PATH, body, headers, first, count
        templates = self.guides if kind == "guide" else self.nps
        shape, template = templates[index % len(templates)]
        first = self.next_seqs(1)
        body = webhook_body(shape, template, first, self.rng)
        return payloads.WEBHOOK_PATH, body, {"X-Pendo-Signature": sign(self.secret, body)}, first, 1

    async def send(self, session: aiohttp.ClientSession, kind: str, index: int) -> None:
        if self.inflight >= self.args.max_inflight:
            self.skipped[kind] += 1
            return
        path, body, headers, first, count = self.build(kind, index)
        headers["Content-Type"] = "application/json"
        self.inflight += 1
        sent = time.monotonic()
        status = 0
        try:
            async with session.post(self.url + path, data=body, headers=headers) as response:
                await response.read()
                status = response.status
        except Exception as exc:
            self.errors.append(repr(exc))
        finally:
            self.inflight -= 1
        self.records.append((kind, first, count, sent, time.monotonic(), status))

    async def stream(self, session: aiohttp.ClientSession, kind: str, per_s: float) -> None:
        """Requests of one kind at ``per_s`` requests/s, on a fixed schedule."""
        if per_s <= 0:
            return
        interval = 1.0 / per_s
        start = time.monotonic()
        end = start + self.args.duration
        index = 0
        while True:
            due = start + index * interval
            if due >= end:
                return
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self.send(session, kind, index))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            index += 1

    async def run(self) -> dict[str, Any]:
        args = self.args
        timeout = aiohttp.ClientTimeout(total=args.request_timeout)
        connector = aiohttp.TCPConnector(limit=args.max_inflight)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            started = time.monotonic()
            await asyncio.gather(
                self.stream(session, "track", args.track_rate / args.batch),
                self.stream(session, "guide", args.webhook_rate),
                self.stream(session, "nps", args.nps_rate),
            )
            if self.tasks:
                await asyncio.wait(self.tasks, timeout=args.request_timeout + 5)
            ended = time.monotonic()
        statuses: dict[str, int] = {}
        for record in self.records:
            statuses[str(record[5])] = statuses.get(str(record[5]), 0) + 1
        return {
            "started": started,
            "ended": ended,
            "requests": len(self.records),
            "events": self.seq,
            "statuses": statuses,
            "skipped": self.skipped,
            "errors": len(self.errors),
            "error_samples": sorted(set(self.errors))[:5],
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--duration", type=float, default=25.0)
    parser.add_argument("--track-rate", type=float, default=1000.0, help="track events/s")
    parser.add_argument("--batch", type=int, default=100, help="track events per request")
    parser.add_argument("--webhook-rate", type=float, default=100.0, help="guide webhooks/s")
    parser.add_argument("--nps-rate", type=float, default=0.5, help="NPS webhooks/s")
    parser.add_argument("--max-inflight", type=int, default=256)
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument("--webhook-secret", required=True)
    parser.add_argument("--integration-key", required=True)
    args = parser.parse_args()
    load = Load(args)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency of the project
        summary = asyncio.run(load.run())
    else:
        summary = uvloop.run(load.run())
    args.out.write_bytes(msgspec.msgpack.encode(load.records))
    sys.stdout.write(json.dumps(summary) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
