"""Rules-engine benchmark: CPU time per event through match and map (``RuleSet.evaluate``).

What it measures: one compiled rule file (default ``bench/rules/segment.yaml``, 20 rules written
like an analytics team's file) evaluated, in process, over a fixed mix of canonical events. No
Kafka, no HTTP, no sink: only what the sink consumer will do per event before delivery, i.e.
every rule's condition and, for each matching rule, its mapping, the field policy and the output
validation.

The events (default 10,000, seeded, so every run evaluates the same list) are built from the
shapes of the shared fixtures (``/work/shared/fixtures/pendo``) through the ingest's own
decoders, ``router.events.decode_track`` and ``decode_webhook``:

- ~60% Track-API events (``bench/payloads.py``: 12 event names, realistic varied properties and
  context, 1000 visitors, 120 accounts), decoded in arrays of 100;
- ~6% track events sent as webhooks (dotted ``track.event`` and URL ``trackEventReceived``);
- ~20% guide events of all four kinds (viewed, advanced, dismissed, completed), both shapes;
- ~4% poll responses and ~5% NPS responses (scores 0-10, with and without a comment), both shapes;
- ~2% other known kinds (page, feature, visitor and account events) and ~3% kinds the router does
  not know (typed ``unknown``).

Measurement: one warm-up pass, then ``--repeat`` passes over the whole list, each timed with
``time.process_time`` (CPU of this process, not wall clock); the report gives the best and the
median pass as µs per event and events per CPU-second, against the target of 5 µs per event
(200,000 events per CPU-second); PASS/FAIL is judged on the median pass. The garbage collector
stays on, as in the consumer (``--no-gc`` to compare). It also reports what the rules did
(events routed / filtered / failed, outputs per event, hits per rule) and the CPU per event for
each kind of event.

Usage::

    .venv/bin/python bench/rules_bench.py [--rules bench/rules/segment.yaml] [--events 10000]
        [--repeat 11] [--seed 3] [--no-gc] [--profile [N]] [--check]

Prints a markdown report on stdout (machine, versions, command, tables, PASS/FAIL) and progress
on stderr. ``--profile`` adds a cProfile pass (after the timed passes, so it does not skew
them) and its top N functions by own time; ``--check`` exits 1 when the target is missed.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import gc
import hashlib
import io
import json
import os
import pstats
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import payloads
from common import code_version, command_line, machine_line, run_header, software_line

from router.events import Event, decode_track, decode_webhook
from router.rules.engine import Failed, Routed, RuleSet
from router.rules.loader import load_rules

FIXTURES = Path("/work/shared/fixtures/pendo")
DEFAULT_RULES = Path(__file__).resolve().parent / "rules" / "segment.yaml"
TARGET_US = 5.0
TRACK_BATCH = 100

# ---- the event mix -----------------------------------------------------------------------------

# category -> share of the mix (the rest of the count goes to track-api).
MIX: dict[str, float] = {
    "track-api": 0.60,
    "track-webhook": 0.06,
    "guide": 0.20,
    "poll": 0.04,
    "nps": 0.05,
    "other-known": 0.02,
    "unknown": 0.03,
}
_GUIDES = [
    ("ABC123", "Onboarding Checklist", ["step_1", "step_2", "step_3", "step_4"]),
    ("FEAT-2024-03", "Feature Announcement", ["step_1"]),
    ("BILL-TOUR", "Billing tour", ["intro", "invoices", "payment-method"]),
    ("ONB-ADMIN", "Onboarding: admin setup", ["sso", "roles", "invite"]),
    ("RPT-TIPS", "Reporting tips", ["filters", "export"]),
]
# (dotted event_type, URL event, weight); Pendo's URL shape has no "completed": dotted only.
_GUIDE_KINDS = [
    ("guide.viewed", "guideDisplayed", 6.0),
    ("guide.advanced", "guideAdvanced", 4.0),
    ("guide.dismissed", "guideDismissed", 2.0),
    ("guide.completed", "", 1.5),
]
_POLL_ANSWERS = [
    "Very useful",
    "Somewhat useful",
    "Not useful",
    "I did not know it existed",
    "  Useful, but the PDF export is SLOW  ",
]
_NPS_COMMENTS = [
    "Exports keep timing out",
    "Love the new dashboards",
    "Too expensive for what we use",
    "SSO setup was painful; support was great though. " * 3,
    "",
]
_TRACK_WEBHOOK_NAMES = [
    ("plan_changed", lambda rng: payloads._plan_change(rng)),
    ("Account Upgraded", lambda rng: {"fromTier": "basic", "toTier": rng.choice(["pro", "team"])}),
    ("custom_feature_used", lambda rng: payloads._feature_used(rng)),
    ("error_shown", lambda rng: payloads._error(rng)),
]
_OTHER_KNOWN = [  # URL events with a canonical type other than guide/poll/nps/track
    ("pageLoaded", {"pageId": "dashboard", "url": "https://app.example.com/dashboard"}),
    ("featureClicked", {"featureId": "export-button", "featureName": "Export"}),
    ("visitorCreated", {"email": "someone@example.com", "language": "en-US"}),
    ("accountCreated", {"planLevel": "trial"}),  # an account event: no visitorId
]
_UNKNOWN_DOTTED = ["guide.timeout", "segment.changed", "guide.throttled"]
_UNKNOWN_URL = ["guideTimedOut", "badgeClicked", "resourceCenterOpened", "segmentChanged"]


def _fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _body(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class MixBuilder:
    """Builds raw Pendo payloads shaped like the fixtures, varied, and decodes them."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.n = 0
        self.dotted = {
            kind: _fixture(f"webhook-dotted/{kind}.json")
            for kind in (
                "guide.viewed",
                "guide.advanced",
                "guide.dismissed",
                "guide.completed",
                "poll.response",
                "nps.response",
                "track.event",
            )
        }
        self.url = {
            kind: _fixture(f"webhook-url/{kind}.json")
            for kind in ("guideDisplayed", "pollSubmitted", "npsSubmitted", "trackEventReceived")
        }

    # common fields ------------------------------------------------------------------------

    def _who(self) -> tuple[str, str]:
        visitor = self.rng.randrange(payloads.VISITORS)
        return f"visitor-{visitor:04d}", f"account-{visitor % payloads.ACCOUNTS:03d}"

    def _ms(self) -> int:
        self.n += 1
        return payloads.BASE_EPOCH_S * 1000 + self.n * 250 + self.rng.randrange(250)

    def _received(self, ms: int) -> int:
        return ms + self.rng.randrange(50, 5000)

    def _dotted(self, kind: str, event_type: str, data: dict[str, Any]) -> Event:
        hook = json.loads(json.dumps(self.dotted[kind]))
        ms = self._ms()
        visitor, account = self._who()
        hook["event_type"] = event_type
        hook["timestamp"] = _iso(ms)
        hook["data"].update(data, visitor_id=visitor, account_id=account)
        hook["data"] = {k: v for k, v in hook["data"].items() if v is not None}
        if "metadata" in hook["data"]:
            hook["data"]["metadata"]["browser"] = self.rng.choice(["Chrome", "Firefox", "Safari"])
        return decode_webhook(_body(hook), self._received(ms))

    def _url(
        self, kind: str, event: str, properties: dict[str, Any], visitor: bool = True
    ) -> Event:
        hook = json.loads(json.dumps(self.url[kind]))
        ms = self._ms()
        visitor_id, account = self._who()
        hook["event"] = event
        hook["timestamp"] = ms // 1000 if self.rng.random() < 0.7 else ms  # seconds or ms
        hook["accountId"] = account
        if visitor:
            hook["visitorId"] = visitor_id
        else:
            hook.pop("visitorId", None)
        hook["uniqueId"] = hashlib.sha256(f"rules-bench-{self.n}".encode()).hexdigest()[:40]
        hook["properties"] = properties
        hook["userAgent"] = self.rng.choice(payloads._USER_AGENTS)
        return decode_webhook(_body(hook), self._received(ms))

    # categories ---------------------------------------------------------------------------

    def track_api(self, count: int) -> list[Event]:
        events: list[Event] = []
        while len(events) < count:
            batch = [payloads.track_event(self.rng, self.n + i) for i in range(TRACK_BATCH)]
            self.n += TRACK_BATCH
            for item in batch:
                if self.rng.random() < 0.03:  # a few events name a user's email (policy test)
                    item["properties"]["email"] = f"{item['visitorId']}@example.com"
            received = batch[-1]["timestamp"] + self.rng.randrange(50, 5000)
            events.extend(decode_track(_body(batch), received, TRACK_BATCH))
        return events[:count]

    def track_webhook(self) -> Event:
        name, properties = self.rng.choice(_TRACK_WEBHOOK_NAMES)
        if self.rng.random() < 0.5:
            return self._dotted(
                "track.event", "track.event", {"event": name, "properties": properties(self.rng)}
            )
        return self._url(
            "trackEventReceived",
            "trackEventReceived",
            {"name": name, "eventProperties": properties(self.rng), "source": "web"},
        )

    def guide(self) -> Event:
        guide_id, guide_name, steps = self.rng.choice(_GUIDES)
        step_index = self.rng.randrange(len(steps))
        kind, url_event, _ = self.rng.choices(_GUIDE_KINDS, [k[2] for k in _GUIDE_KINDS])[0]
        if kind == "guide.completed" or self.rng.random() < 0.5:
            data: dict[str, Any] = {"guide_id": guide_id, "guide_name": guide_name}
            if kind in ("guide.advanced", "guide.dismissed"):
                data.update(step_id=steps[step_index], step_index=step_index)
            return self._dotted(kind, kind, data)
        return self._url(
            "guideDisplayed",
            url_event,
            {
                "guideId": guide_id,
                "guideStepId": steps[step_index],
                "language": self.rng.choice(["en-US", "de-DE", "fr-FR"]),
                "guideProperties": {"name": guide_name, "steps": [{"id": s} for s in steps]},
            },
        )

    def poll(self) -> Event:
        poll_id = f"p-{self.rng.randrange(900, 999)}"
        answer = self.rng.choice(_POLL_ANSWERS)
        if self.rng.random() < 0.5:
            return self._dotted(
                "poll.response",
                "poll.response",
                {
                    "guide_id": "POLL77",
                    "poll_id": poll_id,
                    "question": "How useful is advanced reporting?",
                    "response": answer,
                },
            )
        return self._url(
            "pollSubmitted",
            "pollSubmitted",
            {"guideId": "POLL77", "pollId": poll_id, "pollResponse": answer, "language": "en-US"},
        )

    def nps(self) -> Event:
        score = self.rng.choices(range(11), weights=[1, 1, 1, 2, 2, 3, 4, 8, 10, 12, 9], k=1)[0]
        comment = self.rng.choice(_NPS_COMMENTS) if self.rng.random() < 0.6 else None
        if self.rng.random() < 0.5:
            return self._dotted(
                "nps.response",
                "nps.response",
                {"guide_id": "NPS2024Q1", "poll_id": "nps-1", "score": score, "comment": comment},
            )
        properties: dict[str, Any] = {"guideId": "NPS2024Q1", "pollId": "nps-1", "score": score}
        if comment is not None:
            properties["reason"] = comment
        kind = self.rng.choice(["npsSubmitted", "NPSSubmitted"])
        return self._url("npsSubmitted", kind, properties)

    def other_known(self) -> Event:
        event, properties = self.rng.choice(_OTHER_KNOWN)
        has_visitor = event != "accountCreated"
        return self._url("guideDisplayed", event, dict(properties), visitor=has_visitor)

    def unknown(self) -> Event:
        if self.rng.random() < 0.4:
            kind = self.rng.choice(_UNKNOWN_DOTTED)
            return self._dotted("guide.viewed", kind, {"guide_id": "X-" + kind})
        return self._url("guideDisplayed", self.rng.choice(_UNKNOWN_URL), {"guideId": "BADGE-1"})


def build_mix(count: int, seed: int) -> list[tuple[str, Event]]:
    """``count`` (category, event) pairs in the shares of MIX, shuffled with the seed."""
    builder = MixBuilder(seed)
    counts = {name: round(count * share) for name, share in MIX.items()}
    counts["track-api"] += count - sum(counts.values())
    makers: dict[str, Callable[[], Event]] = {
        "track-webhook": builder.track_webhook,
        "guide": builder.guide,
        "poll": builder.poll,
        "nps": builder.nps,
        "other-known": builder.other_known,
        "unknown": builder.unknown,
    }
    mix = [("track-api", e) for e in builder.track_api(counts["track-api"])]
    for name, make in makers.items():
        mix.extend((name, make()) for _ in range(counts[name]))
    random.Random(seed + 1).shuffle(mix)
    return mix


# ---- measuring ---------------------------------------------------------------------------------


def time_passes(ruleset: RuleSet, events: list[Event], repeat: int) -> list[float]:
    """CPU seconds of each pass of ``ruleset.evaluate`` over ``events``."""
    evaluate = ruleset.evaluate
    process_time = time.process_time
    for event in events:  # warm-up: caches, specialisation, allocator
        evaluate(event)
    seconds: list[float] = []
    for _ in range(repeat):
        start = process_time()
        for event in events:
            evaluate(event)
        seconds.append(process_time() - start)
    return seconds


def loop_overhead(events: list[Event], repeat: int) -> float:
    """The harness's own cost per event: the same loop calling a no-op (best pass, seconds)."""

    def noop(event: Event) -> list[Any]:
        return []

    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for event in events:
            noop(event)
        best = min(best, time.process_time() - start)
    return best / len(events)


@dataclass
class Outcomes:
    routed: int = 0  # events with at least one output and no failure
    failed: int = 0  # events with at least one mapping failure
    filtered: int = 0  # events no rule matched
    outputs: int = 0
    failures: int = 0


def outcomes(
    ruleset: RuleSet, events: list[Event]
) -> tuple[Outcomes, collections.Counter[str], collections.Counter[str], collections.Counter[str]]:
    total = Outcomes()
    routed_by_rule: collections.Counter[str] = collections.Counter()
    failed_by_rule: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    for event in events:
        out = ruleset.evaluate(event)
        fails = [o for o in out if isinstance(o, Failed)]
        if not out:
            total.filtered += 1
        elif fails:
            total.failed += 1
        else:
            total.routed += 1
        for o in out:
            if isinstance(o, Routed):
                total.outputs += 1
                routed_by_rule[o.rule_id] += 1
            else:
                total.failures += 1
                failed_by_rule[o.rule_id] += 1
                reasons[f"{o.rule_id}: {o.field}: {o.reason}"] += 1
    return total, routed_by_rule, failed_by_rule, reasons


def profile_pass(ruleset: RuleSet, events: list[Event], top: int) -> str:
    """One pass under cProfile; the top functions by own time, per event."""
    profiler = cProfile.Profile()
    evaluate = ruleset.evaluate
    profiler.enable()
    for event in events:
        evaluate(event)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in raw.values())
    rows = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[:top]
    n = len(events)
    lines = [
        f"cProfile, one pass over {n:,} events: {total / n * 1e6:.2f} µs/event under the profiler "
        "(its overhead inflates small calls; read the shares, not the absolute figures).",
        "",
        "| function | calls/event | own µs/event | own share | cumulative µs/event |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for (file, line, name), (_cc, calls, tottime, cumtime, _callers) in rows:
        where = f"{Path(file).name}:{line} {name}" if line else name
        lines.append(
            f"| `{where}` | {calls / n:.2f} | {tottime / n * 1e6:.3f} | "
            f"{tottime / total:.1%} | {cumtime / n * 1e6:.3f} |"
        )
    return "\n".join(lines)


# ---- report ------------------------------------------------------------------------------------


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except (OSError, IndexError):
        return "n/a"


def us(seconds: float, n: int) -> float:
    return seconds / n * 1e6


def per_category(
    ruleset: RuleSet, mix: list[tuple[str, Event]], repeat: int
) -> dict[str, tuple[int, float, float]]:
    """Category -> (events, best µs/event, outputs/event), each category timed on its own."""
    groups: dict[str, list[Event]] = collections.defaultdict(list)
    for name, event in mix:
        groups[name].append(event)
    result: dict[str, tuple[int, float, float]] = {}
    for name in MIX:
        events = groups.get(name, [])
        if not events:
            continue
        best = min(time_passes(ruleset, events, repeat))
        outputs = sum(len(ruleset.evaluate(e)) for e in events)
        result[name] = (len(events), us(best, len(events)), outputs / len(events))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", type=Path, default=DEFAULT_RULES)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=11)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--no-gc", action="store_true", help="disable the GC while timing")
    parser.add_argument("--profile", type=int, nargs="?", const=25, default=0, metavar="N")
    parser.add_argument("--check", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args(argv)

    loaded = load_rules(args.rules)
    if loaded.ruleset is None:
        for problem in loaded.problems:
            print(problem, file=sys.stderr)
        return 2
    ruleset = loaded.ruleset
    print(f"building {args.events:,} events (seed {args.seed})...", file=sys.stderr)
    mix = build_mix(args.events, args.seed)
    events = [event for _, event in mix]
    n = len(events)

    load_before = load_average()
    if args.no_gc:
        gc.disable()
    print(f"timing {args.repeat} passes...", file=sys.stderr)
    passes = time_passes(ruleset, events, args.repeat)
    overhead = loop_overhead(events, args.repeat)
    print("per category...", file=sys.stderr)
    categories = per_category(ruleset, mix, max(3, args.repeat // 2))
    gc.enable()
    load_after = load_average()
    total, routed_by_rule, failed_by_rule, reasons = outcomes(ruleset, events)

    best, median, worst = min(passes), statistics.median(passes), max(passes)
    best_us, median_us = us(best, n), us(median, n)
    passed = median_us <= TARGET_US

    out: list[str] = []
    w = out.append
    # No Kafka or router process here: the command line is the command alone.
    out += run_header(f"{datetime.now(UTC):%Y-%m-%d %H:%M}", command_line((), ()))
    w(
        machine_line(
            f"load average {load_before} before the timing, {load_after} after (1 min; other "
            "work on the cores shows up as spread between passes)."
        )
    )
    w(software_line(("msgspec", "PyYAML"), "."))
    w(f"- Code: {code_version(subject=False)}.")
    w(
        f"- Rules: `{os.path.relpath(args.rules, Path.cwd())}`, sink {ruleset.sink}, "
        f"{len(ruleset.rules)} rules, mode {ruleset.mode}, ruleset {ruleset.hash}."
    )
    w(
        f"- Events: {n:,} canonical events (seed {args.seed}) built with decode_track / "
        "decode_webhook from the fixture shapes; one warm-up pass, then "
        f"{args.repeat} timed passes of `RuleSet.evaluate` over all of them, "
        f"time.process_time per pass; GC {'off' if args.no_gc else 'on'}."
    )
    w("")
    w("| event mix | events | share | CPU µs/event (best, alone) | outputs/event |")
    w("| --- | ---: | ---: | ---: | ---: |")
    for name, (count, cat_us, per_event) in categories.items():
        w(f"| {name} | {count:,} | {count / n:.0%} | {cat_us:.2f} | {per_event:.2f} |")
    w("")
    w("| measure | value |")
    w("| --- | ---: |")
    w(f"| CPU µs/event, best of {args.repeat} | **{best_us:.2f}** |")
    w(f"| CPU µs/event, median | **{median_us:.2f}** |")
    w(f"| CPU µs/event, worst | {us(worst, n):.2f} |")
    w(f"| events per CPU-second (best / median) | {n / best:,.0f} / {n / median:,.0f} |")
    w(f"| harness loop overhead, µs/event (included above) | {overhead * 1e6:.3f} |")
    w(f"| events routed (≥1 output, no failure) | {total.routed / n:.1%} |")
    w(f"| events filtered (no rule matched) | {total.filtered / n:.1%} |")
    w(f"| events with a mapping failure | {total.failed / n:.1%} |")
    w(f"| outputs per event | {total.outputs / n:.2f} |")
    w(f"| mapping failures per event | {total.failures / n:.3f} |")
    w("")
    w("| rule | outputs | share of events | failures |")
    w("| --- | ---: | ---: | ---: |")
    for rule in ruleset.rules:
        hits = routed_by_rule[rule.id]
        w(f"| {rule.id} | {hits:,} | {hits / n:.1%} | {failed_by_rule[rule.id]:,} |")
    if reasons:
        w("")
        w("Mapping failures: " + "; ".join(f"{r} (x{c})" for r, c in reasons.most_common(5)))
    w("")
    verdict = "PASS" if passed else "FAIL"
    w(
        f"Target: **{verdict}** median {median_us:.2f} µs <= {TARGET_US:.1f} µs CPU per event "
        f"({n / median:,.0f} events per CPU-second; target {1e6 / TARGET_US:,.0f}); "
        f"best {best_us:.2f} µs."
    )
    if args.profile:
        print("profiling...", file=sys.stderr)
        w("")
        w(profile_pass(ruleset, events, args.profile))
    print("\n".join(out))
    return 1 if args.check and not passed else 0


if __name__ == "__main__":
    sys.exit(main())
