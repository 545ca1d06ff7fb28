"""Safe reload of one sink's rules in a long-running consumer.

The consumer always evaluates ``LiveRules.current``: a compiled, immutable RuleSet. A new set
replaces it (one reference assignment, so a batch sees the old set or the new one, never a mix)
only when it passes ``router rules check`` and every one of its own tests. Otherwise the old set
keeps serving, and the reason is logged and counted. Reloads happen when the rule file or its test
files change on disk (polled) and on SIGHUP.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from router.rules.engine import RuleSet
from router.rules.loader import LoadedRules, load_rules, rule_test_files
from router.rules.testing import run_tests

log = logging.getLogger(__name__)


class RulesError(Exception):
    """A rule set that may not be used, with every reason."""


class RulesMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.reloads = Counter(
            "router_rules_reloads",
            "Rule reload attempts by sink and result (applied, refused)",
            ["sink", "result"],
            registry=registry,
        )
        self.info = Gauge(
            "router_rules_ruleset",
            "The rule set in use, by sink and content hash (value 1)",
            ["sink", "hash"],
            registry=registry,
        )


def _fingerprint(path: Path) -> tuple[tuple[str, int, int], ...]:
    files = [path, *rule_test_files(path)]
    marks: list[tuple[str, int, int]] = []
    for file in files:
        try:
            stat = file.stat()
        except OSError:
            marks.append((str(file), -1, -1))
        else:
            marks.append((str(file), stat.st_mtime_ns, stat.st_size))
    return tuple(marks)


def verify(loaded: LoadedRules) -> RuleSet:
    """The compiled set if it passes check and all its tests; RulesError with the reasons if not."""
    if loaded.ruleset is None:
        raise RulesError("; ".join(str(p) for p in loaded.problems) or "the rules do not load")
    failures = [
        f"{r.file} {r.where} {r.name!r}: {' | '.join(r.details)}"
        for r in run_tests(loaded.ruleset, loaded.tests)
        if not r.passed
    ]
    if failures:
        raise RulesError(f"{len(failures)} rule test(s) fail: " + "; ".join(failures))
    return loaded.ruleset


class LiveRules:
    """One sink's rules: the set in use, and the machinery to replace it safely."""

    def __init__(self, path: Path, metrics: RulesMetrics | None = None) -> None:
        self.path = path
        self.sink = path.stem
        self._metrics = metrics
        self._fingerprint = _fingerprint(path)
        self._requested = asyncio.Event()  # SIGHUP: reload now, whatever the files say
        ruleset = verify(load_rules(path))  # a consumer must not start on rules that fail
        self.current: RuleSet = ruleset
        self._publish_info(None, ruleset)

    def _publish_info(self, old: RuleSet | None, new: RuleSet) -> None:
        if self._metrics is None:
            return
        if old is not None and old.hash != new.hash:
            self._metrics.info.remove(self.sink, old.hash)
        self._metrics.info.labels(self.sink, new.hash).set(1)

    def reload(self) -> bool:
        """Try the files on disk now; True when a new set is in use."""
        self._fingerprint = _fingerprint(self.path)
        old = self.current
        try:
            new = verify(load_rules(self.path))
        except Exception as exc:
            # RulesError is the expected refusal; anything else is a bug in checking, which
            # must not take the serving set (or the watcher) down with it.
            if isinstance(exc, RulesError):
                log.error("rules for %s not reloaded, still using %s: %s", self.sink, old.hash, exc)
            else:
                log.exception("rules for %s not reloaded, still using %s", self.sink, old.hash)
            if self._metrics is not None:
                self._metrics.reloads.labels(self.sink, "refused").inc()
            return False
        self.current = new
        self._publish_info(old, new)
        if self._metrics is not None:
            self._metrics.reloads.labels(self.sink, "applied").inc()
        log.info("rules for %s reloaded: %s -> %s", self.sink, old.hash, new.hash)
        return True

    def changed(self) -> bool:
        return _fingerprint(self.path) != self._fingerprint

    async def watch(self, interval_s: float, stop: asyncio.Event) -> None:
        """Reload whenever the files change or a SIGHUP asks, until ``stop`` is set.

        The one place reloads run: loading runs the rule tests, so it happens off the event loop
        (consumers keep polling), and never twice at once.
        """
        while not stop.is_set():
            waits = {
                asyncio.ensure_future(stop.wait()),
                asyncio.ensure_future(self._requested.wait()),
            }
            await asyncio.wait(waits, timeout=interval_s, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()
            if stop.is_set():
                return
            if self._requested.is_set() or self.changed():
                self._requested.clear()
                await asyncio.to_thread(self.reload)

    def install_sighup(self, loop: asyncio.AbstractEventLoop) -> None:
        """SIGHUP asks :meth:`watch` for a reload (the handler itself must not run the tests)."""
        loop.add_signal_handler(signal.SIGHUP, self._requested.set)
