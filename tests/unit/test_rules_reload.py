"""Safe reload: a good change is applied whole, a bad one is refused and the old set keeps serving."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from router.events import Event
from router.rules.engine import Routed
from router.rules.live import LiveRules, RulesError, RulesMetrics

V1 = """\
sink: slack
rules:
  - id: nps
    when: {path: type, eq: nps.response}
    map:
      text: {template: "NPS {properties.score}"}
tests:
  - name: nps
    event: {type: nps.response, properties: {score: 3}}
    expect: {nps: {text: NPS 3}}
"""
V2 = V1.replace('"NPS {properties.score}"', '"Score {properties.score}"').replace(
    "text: NPS 3", "text: Score 3"
)
BROKEN = V1.replace("eq: nps.response", "eq: nps.response, ne: x")  # two tests: fails check
FAILS_ITS_TEST = V1.replace('"NPS {properties.score}"', '"Oops {properties.score}"')

EVENT = msgspec.convert(
    {
        "id": "e",
        "source": "webhook",
        "type": "nps.response",
        "name": "npsSubmitted",
        "properties": {"score": 3},
        "timestamp": 0,
        "received_at": 0,
    },
    Event,
)


def text_of(live: LiveRules) -> str:
    (out,) = live.current.evaluate(EVENT)
    assert isinstance(out, Routed)
    return str(out.payload["text"])


def write(path: Path, text: str) -> None:
    # A different size or a later mtime: both are what the watcher compares.
    path.write_text(text)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "slack.yaml"
    path.write_text(V1)
    return path


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_good_change_is_applied(rules_file: Path, registry: CollectorRegistry) -> None:
    live = LiveRules(rules_file, RulesMetrics(registry))
    old_hash = live.current.hash
    assert text_of(live) == "NPS 3"
    assert metric(registry, "router_rules_ruleset", sink="slack", hash=old_hash) == 1
    write(rules_file, V2)
    assert live.reload() is True
    assert text_of(live) == "Score 3"
    assert live.current.hash != old_hash
    assert metric(registry, "router_rules_reloads_total", sink="slack", result="applied") == 1
    assert metric(registry, "router_rules_ruleset", sink="slack", hash=live.current.hash) == 1
    assert metric(registry, "router_rules_ruleset", sink="slack", hash=old_hash) is None


@pytest.mark.parametrize("bad", [BROKEN, FAILS_ITS_TEST, "sink: slack\nrules: [\n", ""])
def test_bad_change_is_refused_and_the_old_set_keeps_serving(
    rules_file: Path, registry: CollectorRegistry, bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    live = LiveRules(rules_file, RulesMetrics(registry))
    before = live.current
    write(rules_file, bad)
    assert live.reload() is False
    assert live.current is before
    assert text_of(live) == "NPS 3"
    assert metric(registry, "router_rules_reloads_total", sink="slack", result="refused") == 1
    assert metric(registry, "router_rules_ruleset", sink="slack", hash=before.hash) == 1
    assert "not reloaded, still using" in caplog.text


def test_a_new_failing_test_file_is_refused(rules_file: Path) -> None:
    live = LiveRules(rules_file)
    before = live.current
    tests_dir = rules_file.parent / "tests"
    tests_dir.mkdir()
    (tests_dir / "slack-extra.yaml").write_text(
        "sink: slack\ntests:\n  - name: wrong\n    event: {type: nps.response, "
        "properties: {score: 1}}\n    expect: {nps: {text: NPS 2}}\n"
    )
    assert live.changed()
    assert live.reload() is False
    assert live.current is before


def test_a_consumer_does_not_start_on_bad_rules(tmp_path: Path) -> None:
    path = tmp_path / "slack.yaml"
    path.write_text(FAILS_ITS_TEST)
    with pytest.raises(RulesError, match="rule test"):
        LiveRules(path)
    path.write_text(BROKEN)
    with pytest.raises(RulesError, match="exactly one test"):
        LiveRules(path)


async def _wait_for(condition: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_watch_reloads_on_file_change(rules_file: Path) -> None:
    live = LiveRules(rules_file)
    stop = asyncio.Event()
    watcher = asyncio.create_task(live.watch(0.05, stop))
    try:
        write(rules_file, V2)
        await _wait_for(lambda: text_of(live) == "Score 3")
        write(rules_file, BROKEN)  # refused: the V2 set keeps serving
        await _wait_for(lambda: not live.changed())
        assert text_of(live) == "Score 3"
    finally:
        stop.set()
        await asyncio.wait_for(watcher, 5)


async def test_sighup_reloads(rules_file: Path) -> None:
    live = LiveRules(rules_file)
    loop = asyncio.get_running_loop()
    live.install_sighup(loop)
    stop = asyncio.Event()
    # An hour between looks at the files: only the signal can make this reload in time.
    watcher = asyncio.create_task(live.watch(3600, stop))
    try:
        write(rules_file, V2)
        os.kill(os.getpid(), signal.SIGHUP)
        await _wait_for(lambda: text_of(live) == "Score 3")
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        stop.set()
        await asyncio.wait_for(watcher, 5)


def test_an_unexpected_error_while_checking_keeps_the_old_set(
    rules_file: Path,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    live = LiveRules(rules_file, RulesMetrics(registry))
    before = live.current

    def broken_check(path: Path) -> None:
        raise OverflowError("a bug in checking")

    monkeypatch.setattr("router.rules.live.load_rules", broken_check)
    write(rules_file, V2)
    assert live.reload() is False
    assert live.current is before
    assert metric(registry, "router_rules_reloads_total", sink="slack", result="refused") == 1
    assert "OverflowError: a bug in checking" in caplog.text
