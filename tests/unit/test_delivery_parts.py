"""The delivery layer's pure parts: retry table, backoff, rate limits, batching, offsets."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.consumer import _LogThrottle
from router.delivery.batching import Batcher
from router.delivery.offsets import PartitionOffsets
from router.delivery.ratelimit import RateLimiter, TokenBucket
from router.delivery.retry import RetryPolicy, Verdict, parse_retry_after, verdict_for_status
from router.delivery.sink import endpoint_url

# ---- retry table -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, Verdict.DELIVERED),
        (204, Verdict.DELIVERED),
        (408, Verdict.RETRY),
        (429, Verdict.RETRY),
        (500, Verdict.RETRY),
        (502, Verdict.RETRY),
        (503, Verdict.RETRY),
        (504, Verdict.RETRY),
        (501, Verdict.REJECT),
        (400, Verdict.REJECT),
        (404, Verdict.REJECT),
        (413, Verdict.REJECT),
        (422, Verdict.REJECT),
        (401, Verdict.PAUSE),
        (403, Verdict.PAUSE),
    ],
)
def test_status_table(status: int, verdict: Verdict) -> None:
    assert verdict_for_status(status) is verdict


def test_retry_after_seconds_and_http_dates() -> None:
    now = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("30", now) == 30
    assert parse_retry_after(" 1.5 ", now) == 1.5
    assert parse_retry_after("Sat, 28 Nov 2026 12:01:00 GMT", now) == 60
    assert parse_retry_after("Sat, 28 Nov 2026 11:00:00 GMT", now) == 0  # in the past
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("", now) is None
    assert parse_retry_after("soon", now) is None


def test_backoff_is_exponential_full_jitter_capped_and_honours_retry_after() -> None:
    policy = RetryPolicy(base_s=1, cap_s=60, max_retry_after_s=600)
    rng = random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(60, 2 ** (attempt - 1))
        delays = [policy.delay(attempt, rng=rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # full jitter spans the whole range
    assert all(policy.delay(1, retry_after=120, rng=rng) >= 120 for _ in range(50))
    assert policy.delay(1, retry_after=10**6, rng=rng) == 600  # absurd Retry-After is capped


def test_retries_are_exhausted_after_the_total_time() -> None:
    policy = RetryPolicy(max_total_s=4 * 3600)
    assert not policy.exhausted(first_attempt_at=100, now=100 + 4 * 3600 - 1)
    assert policy.exhausted(first_attempt_at=100, now=100 + 4 * 3600)


# ---- rate limits -----------------------------------------------------------------------------


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=1.0, burst=3.0, updated=0.0)
    for _ in range(3):
        assert bucket.wait_time(0.0) == 0
        bucket.take(0.0)
    assert bucket.wait_time(0.0) == pytest.approx(1.0)
    assert bucket.wait_time(0.5) == pytest.approx(0.5)
    assert bucket.wait_time(1.0) == 0


def test_per_key_limits_are_independent_and_bounded() -> None:
    limiter = RateLimiter(rate=100, per_key_rate=1, per_key_burst=1)
    limiter.take(0.0, "#a")
    assert limiter.wait_time(0.0, "#a") == pytest.approx(1.0)
    assert limiter.wait_time(0.0, "#b") == 0
    for i in range(10_100):
        limiter.take(1000.0 + i * 0.0001, f"#k{i}")
    limiter.take(2000.0, "#late")
    assert limiter.keys <= 10_002  # idle keys are forgotten


def test_a_hold_delays_only_its_key_then_the_rate_resumes() -> None:
    limiter = RateLimiter(rate=100, per_key_rate=1, per_key_burst=2)
    assert limiter.hold(0.0, "#a", 30.0)
    assert limiter.wait_time(0.0, "#a") == pytest.approx(30.0)
    assert limiter.wait_time(29.9, "#a") == pytest.approx(0.1)
    assert limiter.wait_time(0.0, "#b") == 0  # another channel is not held
    assert limiter.wait_time(30.0, "#a") == pytest.approx(0.0, abs=1e-6)
    limiter.take(30.0, "#a")
    assert limiter.wait_time(30.0, "#a") == pytest.approx(1.0)  # one per second again, no burst
    assert not RateLimiter(rate=10).hold(0.0, "#a", 5.0)  # no per-key buckets: nothing held


def test_global_rate_limit() -> None:
    limiter = RateLimiter(rate=10, burst=10)
    for _ in range(10):
        limiter.take(0.0)
    assert limiter.wait_time(0.0) == pytest.approx(0.1)


# ---- batching --------------------------------------------------------------------------------


def test_batches_close_on_count_bytes_and_linger() -> None:
    batcher: Batcher[str] = Batcher(max_events=3, max_bytes=100, linger_s=1.0, per_item_overhead=0)
    assert batcher.add("a", 10, None, 0.0) == []
    assert batcher.add("b", 10, None, 0.1) == []
    assert batcher.add("c", 10, None, 0.2) == [["a", "b", "c"]]
    assert batcher.add("d", 60, None, 0.3) == []
    assert batcher.add("e", 50, None, 0.4) == [["d"]]  # e would overflow 100 bytes
    assert batcher.due(1.3) == []
    assert batcher.next_deadline() == pytest.approx(1.4)
    assert batcher.due(1.4) == [["e"]]
    assert len(batcher) == 0


def test_batches_are_per_key_and_too_large_items_are_refused() -> None:
    batcher: Batcher[str] = Batcher(max_events=2, max_bytes=50, linger_s=5)
    batcher.add("a1", 5, "a", 0)
    batcher.add("b1", 5, "b", 0)
    assert batcher.add("a2", 5, "a", 0) == [["a1", "a2"]]
    assert batcher.drain() == [["b1"]]
    assert not batcher.fits_alone(50)
    with pytest.raises(ValueError, match="exceeds"):
        batcher.add("huge", 50, None, 0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 40), st.sampled_from([None, "x", "y"])), max_size=60),
    st.integers(1, 7),
    st.integers(41, 200),
)
def test_every_item_lands_in_exactly_one_batch_within_limits(
    items: list[tuple[int, str | None]], max_events: int, max_bytes: int
) -> None:
    batcher: Batcher[int] = Batcher(max_events, max_bytes, linger_s=10, per_item_overhead=1)
    sizes = {i: size for i, (size, _) in enumerate(items)}
    batches: list[list[int]] = []
    for i, (size, key) in enumerate(items):
        batches.extend(batcher.add(i, size, key, float(i)))
    batches.extend(batcher.drain())
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(items)))
    for batch in batches:
        assert 1 <= len(batch) <= max_events
        assert sum(sizes[i] + 1 for i in batch) <= max_bytes
        assert len({items[i][1] for i in batch}) == 1  # never mixes keys


# ---- offsets ---------------------------------------------------------------------------------


def test_commit_position_waits_for_the_lowest_pending_offset() -> None:
    offsets = PartitionOffsets()
    assert offsets.committable() is None
    for offset in (10, 11, 12, 13):
        offsets.start(offset)
    offsets.finish(11)
    offsets.finish(13)
    assert offsets.committable() == 10  # nothing past 10 may be committed yet
    offsets.finish(10)
    assert offsets.committable() == 12
    offsets.committed(12)
    assert offsets.committable() is None
    offsets.finish(12)
    assert offsets.committable() == 14  # offset + 1 of the last one
    offsets.committed(14)
    assert offsets.committable() is None
    assert offsets.pending == 0


def test_uncommitted_counts_what_the_next_owner_reads_again() -> None:
    offsets = PartitionOffsets()
    assert offsets.uncommitted == 0
    for offset in range(100, 200):
        offsets.start(offset)
    for offset in range(100, 200):
        if offset != 105:
            offsets.finish(offset)
    assert offsets.pending == 1
    assert offsets.uncommitted == 100  # nothing committed yet: all of them come back
    position = offsets.committable()
    assert position == 105
    offsets.committed(position)
    # 105 is unfinished, so 105..199 come back though 94 of them are done
    assert offsets.uncommitted == 95
    offsets.finish(105)
    offsets.committed(offsets.committable() or 0)
    assert offsets.uncommitted == 0


@settings(max_examples=200, deadline=None)
@given(st.permutations(list(range(30))), st.integers(0, 30))
def test_never_commits_past_an_unfinished_event(order: list[int], done: int) -> None:
    offsets = PartitionOffsets()
    for offset in range(30):
        offsets.start(offset)
    finished = set(order[:done])
    for offset in order[:done]:
        offsets.finish(offset)
    position = offsets.committable()
    unfinished = set(range(30)) - finished
    assert position == (min(unfinished) if unfinished else 30)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The consumer's monotonic clock, set by the test (clock[0] = seconds)."""
    from router import consumer

    now = [100.0]
    monkeypatch.setattr(consumer.time, "monotonic", lambda: now[0])
    return now


def test_log_throttle_samples_one_line_per_interval_and_counts_the_rest(clock: list[float]) -> None:
    throttle = _LogThrottle(interval_s=10.0)
    assert throttle.allow("retry") == (True, "")
    assert throttle.allow("retry") == (False, "")
    assert throttle.allow("dead_letter:too_large") == (True, "")  # kinds are independent
    clock[0] = 105.0
    assert throttle.allow("retry") == (False, "")
    clock[0] = 112.0
    assert throttle.allow("retry") == (True, " (+2 similar in the last 12s)")
    clock[0] = 130.0
    assert throttle.allow("retry") == (True, "")  # nothing held back since


def test_held_back_lines_are_counted_even_when_no_later_line_comes(clock: list[float]) -> None:
    # 317 retries_exhausted letters logged one line and never the other 316.
    throttle = _LogThrottle(interval_s=10.0)
    assert throttle.allow("dead_letter:retries_exhausted")[0]
    for _ in range(316):
        assert not throttle.allow("dead_letter:retries_exhausted")[0]
    assert throttle.allow("retry")[0]
    assert not throttle.allow("retry")[0]
    clock[0] = 105.0
    assert throttle.overdue() == []  # the interval is not over: a next line may still count them
    clock[0] = 111.0
    assert throttle.overdue() == [
        ("dead_letter:retries_exhausted", 316, 11.0),
        ("retry", 1, 11.0),
    ]
    assert throttle.overdue() == []  # counted once
    assert throttle.allow("retry") == (True, "")  # and not again by the next line
    assert not throttle.allow("retry")[0]
    assert throttle.overdue(final=True) == [("retry", 1, 0.0)]  # at shutdown: whatever is held


# ---- operator tuning (sinks.<name>.delivery) -------------------------------------------------


def test_delivery_settings_tune_a_sinks_limits_within_the_api() -> None:
    import sinks

    sink = sinks.create(
        "segment",
        {"delivery": {"max_events": 50, "linger_s": 0.2, "concurrency": 8, "timeout_s": 5}},
    )
    assert (sink.limits.max_events, sink.limits.linger_s) == (50, 0.2)
    assert (sink.limits.concurrency, sink.limits.timeout_s) == (8, 5)
    untouched = sinks.create("segment", {})
    assert sink.limits.max_bytes == untouched.limits.max_bytes
    assert sinks.create("ga4", {}).limits.concurrency == 16


@pytest.mark.parametrize(
    ("delivery", "message"),
    [
        ({"max_events": 26}, "sinks.ga4.delivery.max_events: 26 must be between 1 and 25"),
        ({"concurrency": 0}, "sinks.ga4.delivery.concurrency: 0 must be between 1 and 256"),
        ({"linger_s": -1}, "sinks.ga4.delivery.linger_s: -1 must be at least 0"),
        ({"batch_size": 10}, "sinks.ga4.delivery: Object contains unknown field `batch_size`"),
        ({"max_bytes": "big"}, "sinks.ga4.delivery: Expected `int | null`, got `str`"),
    ],
)
def test_delivery_settings_beyond_the_api_are_refused_by_name(
    delivery: dict[str, object], message: str
) -> None:
    import sinks

    with pytest.raises(ValueError, match=r"^sinks\.ga4\.delivery") as caught:
        sinks.create("ga4", {"delivery": delivery})
    assert str(caught.value).startswith(message), str(caught.value)


def test_a_smaller_max_bytes_also_bounds_one_event() -> None:
    from router.delivery.sink import SinkLimits, tuned_limits

    limits = SinkLimits(max_events=10, max_bytes=1000, max_event_bytes=900, rate_per_s=5.0)
    tuned = tuned_limits(limits, {"max_bytes": 500}, "sinks.x.delivery")
    assert (tuned.max_bytes, tuned.max_event_bytes) == (500, 500)
    with pytest.raises(ValueError, match=r"rate_per_s: 6 must be between 0.001 and 5"):
        tuned_limits(limits, {"rate_per_s": 6}, "sinks.x.delivery")


# ---- found by property tests: each raised or misbehaved before its fix -------------------------


@pytest.mark.parametrize("attempt", [1_025, 5_000, 10**6])
def test_backoff_after_very_many_attempts_stays_within_the_cap(attempt: int) -> None:
    # A poison request re-sent after every success reaches 1,025 attempts in minutes; 2 ** 1024
    # is past a float, and the OverflowError stranded the item.
    policy = RetryPolicy(base_s=1.0, cap_s=300.0)
    assert 0.0 <= policy.delay(attempt, rng=random.Random(1)) <= 300.0
    assert RetryPolicy(cap_s=1.0).delay(attempt) <= 1.0


def test_a_held_key_is_not_forgotten_with_the_idle_ones() -> None:
    limiter = RateLimiter(None, per_key_rate=1.0, per_key_burst=2.0)  # Slack: per channel
    limiter.hold(0.0, "C-busy", 3600.0)
    assert limiter.wait_time(1.0, "C-busy") == pytest.approx(3599.0)
    for n in range(10_001):  # keys idle from t=1 on, past the forgetting threshold
        limiter.wait_time(1.0, f"C{n}")
    limiter.wait_time(400.0, "C-new")  # forgets the idle ones
    assert limiter.keys == 2  # C-busy and C-new
    assert limiter.wait_time(401.0, "C-busy") == pytest.approx(3199.0)


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://api.segment.io?",
        "https://api.segment.io#",
        "https://api.segment.io:abc",
        "https://api.segment.io:0",
        "http://:80",
        "https://",
    ],
)
def test_endpoints_that_would_misroute_every_request_are_refused(endpoint: str) -> None:
    with pytest.raises(ValueError, match=r"^sinks\.segment\.endpoint: "):
        endpoint_url(endpoint, "sinks.segment.endpoint", "/v1/batch", "US: https://api.segment.io")


@pytest.mark.parametrize(
    ("endpoint", "base"),
    [
        ("https://api.segment.io/", "https://api.segment.io"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("https://[::1]:9000", "https://[::1]:9000"),
        ("https://proxy.example/segment", "https://proxy.example/segment"),
    ],
)
def test_endpoints_that_are_fine(endpoint: str, base: str) -> None:
    assert endpoint_url(endpoint, "k", "/v1/batch", "") == base
