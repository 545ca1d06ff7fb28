"""``router dlq list|show|replay``: look at one sink's dead letters and send them back to it.

- ``list``: one line per dead letter (its place on the dead-letter topic, when it died, the reason,
  rule, event id, HTTP status and a short detail), then a count by reason; ``--json`` for JSON
  lines.
- ``show``: whole dead letters as indented JSON, all those selected or one (``--offset [P:]N``).
- ``replay``: produce each selected letter's original event to the sink's retry topic
  (``consumer.retry_topic``, ``router.retry.<sink>``), which only that sink's consumer group reads:
  the other sinks, which already delivered the event, never see it again. The event keeps its id,
  so its outputs keep their idempotency keys.

The dead-letter topic is read by a group-less consumer from the beginning up to the end offsets
taken when the command starts, so a command always ends, even while the sink keeps writing dead
letters; every wait on Kafka is bounded by ``--timeout``. Dead letters are redacted when written
(see :mod:`router.dlq`); nothing here adds to them, and no credential is ever read.

What replay does not do: the replayed event goes through the sink's *current* rules, all of
them, not only the rule whose output died, so outputs that were delivered the first time are sent
again with their old idempotency keys (destinations that deduplicate by key drop them; GA4 and
Slack do not deduplicate). Dead letters are not removed by a replay: one that fails again becomes
a new dead letter, and the old one stays until the topic's retention drops it, so select with
``--since`` to avoid replaying old letters twice.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Final, TextIO, TypeVar

import msgspec

from router import dlq
from router.events import datetime_ms, decode_event, now_ms
from router.settings import Settings

T = TypeVar("T")

DEFAULT_TIMEOUT_S: Final = 30.0
#: Replayed records awaiting Kafka's acknowledgement at once.
SEND_WINDOW: Final = 500
UNDECODABLE: Final = "undecodable"  # a record on the dead-letter topic that is not a DeadLetter

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION: Final = re.compile(r"(?:\d+[smhdw])+")
_DURATION_PART: Final = re.compile(r"(\d+)([smhdw])")

REPLAY_DESCRIPTION: Final = """\
Send the selected dead letters' original events to the sink's retry topic
(consumer.retry_topic, router.retry.<sink>). Only this sink's consumer group reads
that topic, so the other sinks, which already delivered the events, never see them
again. The events keep their ids, so their outputs keep their idempotency keys.

A replayed event goes through the sink's CURRENT rules, ALL of them, not only the
rule that failed: outputs delivered the first time are sent again with the same
idempotency keys (destinations that deduplicate by key drop them; GA4 and Slack do
not deduplicate). One event with several dead letters is sent once. Letters with
reason invalid_event are skipped unless --include-invalid (they would only die
again). Dead letters stay on the dead-letter topic after a replay: use --since to
avoid replaying old ones twice. Run with --dry-run first to see what would be sent.
"""


class DlqToolError(Exception):
    """A dead-letter command cannot go on: a missing topic, Kafka unreachable, a wait timed out."""


# ---- arguments -----------------------------------------------------------------------------


def parse_since(text: str, now: int | None = None) -> int:
    """``--since``: ms since the epoch, from an ISO 8601 date-time or a duration ago.

    A date-time without an offset is UTC (``2025-01-31``, ``2025-01-31T12:00``,
    ``2025-01-31T12:00:00+01:00``, ``...Z``); a duration is one or more of ``<n>s|m|h|d|w``
    (``30m``, ``2h``, ``7d``, ``1h30m``).
    """
    value = text.strip()
    if _DURATION.fullmatch(value):
        seconds = sum(int(n) * _UNITS[unit] for n, unit in _DURATION_PART.findall(value))
        return (now_ms() if now is None else now) - seconds * 1000
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an ISO 8601 date-time nor a duration like 30m, 2h or 7d"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return datetime_ms(moment)


def parse_reasons(values: Sequence[str]) -> frozenset[str]:
    """``--reason`` values (each may be comma-separated), checked against :data:`dlq.REASONS`."""
    reasons: set[str] = set()
    for value in values:
        for part in (p.strip() for p in value.split(",")):
            if not part:  # an unset $REASON in a script must not mean "every reason"
                raise ValueError(f"an empty reason in {value!r}; one of {', '.join(dlq.REASONS)}")
            if part not in dlq.REASONS:
                raise ValueError(f"unknown reason {part!r}; one of {', '.join(dlq.REASONS)}")
            reasons.add(part)
    return frozenset(reasons)


def parse_position(text: str) -> tuple[int | None, int]:
    """``--offset``: ``N`` (that offset in any partition) or ``P:N``."""
    partition, sep, offset = text.strip().rpartition(":")
    try:
        return (int(partition) if sep else None), int(offset)
    except ValueError:
        raise ValueError(f"{text!r} is not an offset (N) or partition:offset (P:N)") from None


def parse_timeout(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:  # NaN too
        raise ValueError(f"{text!r} is not a positive number of seconds")
    return seconds


def _arg_type(parse: Any, name: str) -> Any:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name  # argparse names the type in its messages
    return convert


# ---- reading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One record of the dead-letter topic: where it is, and the letter (None if undecodable)."""

    partition: int
    offset: int
    letter: dlq.DeadLetter | None
    error: str | None = None

    @property
    def position(self) -> str:
        return f"{self.partition}:{self.offset}"

    @property
    def reason(self) -> str:
        return self.letter.reason if self.letter is not None else UNDECODABLE


@dataclass(frozen=True)
class Selection:
    """The filters; an empty Selection takes every record."""

    reasons: frozenset[str] = frozenset()
    since_ms: int | None = None
    rule_id: str | None = None
    event_id: str | None = None
    position: tuple[int | None, int] | None = None

    def matches(self, entry: Entry) -> bool:
        if self.position is not None:
            partition, offset = self.position
            if entry.offset != offset or partition not in (None, entry.partition):
                return False
        letter = entry.letter
        if letter is None:  # an undecodable record has none of the filtered fields
            return not (self.reasons or self.since_ms is not None or self.rule_id or self.event_id)
        return (
            (not self.reasons or letter.reason in self.reasons)
            and (self.since_ms is None or letter.dead_at >= self.since_ms)
            and (self.rule_id is None or letter.rule_id == self.rule_id)
            and (self.event_id is None or letter.event_id == self.event_id)
        )


async def _bounded(awaitable: Awaitable[T], timeout_s: float, what: str) -> T:
    """Await with a deadline; Kafka errors and timeouts become :class:`DlqToolError`."""
    from aiokafka.errors import KafkaError

    try:
        return await asyncio.wait_for(awaitable, timeout=timeout_s)
    except TimeoutError:
        raise DlqToolError(f"{what}: no answer from Kafka within {timeout_s:g}s") from None
    except (KafkaError, OSError) as exc:
        raise DlqToolError(f"{what}: {exc!r}") from exc


def _to_entry(record: Any) -> Entry:
    if record.value is None:
        return Entry(record.partition, record.offset, None, "empty record")
    try:
        letter = dlq.decode(record.value)
    except msgspec.DecodeError as exc:
        return Entry(record.partition, record.offset, None, f"not a dead letter: {exc}")
    except RecursionError:
        return Entry(record.partition, record.offset, None, "not a dead letter: nested too deeply")
    return Entry(record.partition, record.offset, letter)


class DeadLetterReader:
    """Reads one sink's dead-letter topic from its beginning to the end offsets taken at open.

    Group-less (no offsets are committed, nothing is shared with the sink's consumers). ``total``
    is the number of records in that range; ``topics`` every topic the cluster has.
    """

    def __init__(self, settings: Settings, sink: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.settings = settings
        self.sink = sink
        self.topic = settings.consumer.dlq_topic_for(sink)
        self.timeout_s = timeout_s
        self.total = 0
        self.topics: set[str] = set()
        self._consumer: Any = None
        self._ranges: dict[Any, int] = {}  # partition -> end offset, for those with records

    async def __aenter__(self) -> DeadLetterReader:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        kafka = self.settings.kafka
        consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka.bootstrap_servers,
            client_id=f"{kafka.client_id}-dlq-{self.sink}",
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # A dead letter carries the event and its rendered payload: up to about twice the
            # event topic's record limit.
            max_partition_fetch_bytes=kafka.max_message_bytes * 2,
        )
        self._consumer = consumer
        try:
            await _bounded(consumer.start(), self.timeout_s, "connecting to Kafka")
            # consumer.topics() returns only names; its partitions_for_topic() sees only
            # topics the client already tracks. The client's full metadata has both.
            cluster = await _bounded(
                consumer._client.fetch_all_metadata(), self.timeout_s, "metadata"
            )
            self.topics = set(cluster.topics())
            if self.topic not in self.topics:
                raise DlqToolError(
                    f"topic {self.topic} does not exist: no dead letters for sink {self.sink!r} "
                    f"(has `router sink {self.sink}` run with this configuration?)"
                )
            partitions = sorted(cluster.partitions_for_topic(self.topic) or ())
            tps = [TopicPartition(self.topic, p) for p in partitions]
            consumer.assign(tps)
            begins = await _bounded(consumer.beginning_offsets(tps), self.timeout_s, "offsets")
            ends = await _bounded(consumer.end_offsets(tps), self.timeout_s, "offsets")
            for tp in tps:
                if ends[tp] > begins[tp]:
                    self._ranges[tp] = ends[tp]
                    self.total += ends[tp] - begins[tp]
                    consumer.seek(tp, begins[tp])
                else:
                    consumer.pause(tp)
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                await asyncio.wait_for(consumer.stop(), timeout=10)
            except Exception as exc:  # closing: report, never mask the command's own outcome
                sys.stderr.write(f"router dlq: consumer stop incomplete: {exc!r}\n")

    async def entries(self) -> AsyncIterator[Entry]:
        """Every record in the range, in offset order within each partition."""
        consumer = self._consumer
        assert consumer is not None, "use `async with DeadLetterReader(...)`"
        remaining = dict(self._ranges)
        loop = asyncio.get_running_loop()
        idle_until = loop.time() + self.timeout_s
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=500)
            progressed = False
            for tp, records in batch.items():
                end = remaining.get(tp)
                if end is None:
                    continue
                for record in records:
                    if record.offset >= end:  # written after the command started
                        break
                    progressed = True
                    yield _to_entry(record)
            for tp in list(remaining):
                position = await _bounded(consumer.position(tp), self.timeout_s, "position")
                if position >= remaining[tp]:
                    consumer.pause(tp)
                    del remaining[tp]
            if progressed:
                idle_until = loop.time() + self.timeout_s
            elif remaining and loop.time() > idle_until:
                left = ", ".join(f"{tp.partition} (up to {end})" for tp, end in remaining.items())
                raise DlqToolError(
                    f"reading {self.topic}: nothing received for {self.timeout_s:g}s; "
                    f"partitions not read to the end: {left}"
                )


# ---- output --------------------------------------------------------------------------------


def iso_ms(ms: int | None) -> str:
    """Ms since the epoch as ISO 8601 UTC (``2025-01-31T12:00:00.000Z``); ``-`` if unset."""
    if not ms:
        return "-"
    try:
        moment = _EPOCH + timedelta(milliseconds=ms)
    except OverflowError:  # a letter written by something else than the router
        return f"{ms} (not a time)"
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _short(text: str | None, limit: int = 80) -> str:
    if not text:
        return "-"
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


LIST_HEADER: Final = (
    f"{'DLQ':<8} {'DEAD AT':<24} {'REASON':<17} {'RULE':<24} {'EVENT':<40} {'STATUS':<6} DETAIL"
)


def list_line(entry: Entry) -> str:
    """The ``list`` line of one dead letter."""
    letter = entry.letter
    if letter is None:
        return (
            f"{entry.position:<8} {'-':<24} {UNDECODABLE:<17} {'-':<24} {'-':<40} {'-':<6} "
            f"{_short(entry.error)}"
        )
    status = str(letter.status) if letter.status is not None else "-"
    return (
        f"{entry.position:<8} {iso_ms(letter.dead_at):<24} {letter.reason:<17} "
        # Event ids are 40 characters (Pendo's uniqueId, or the router's own); a rule id longer
        # than its column is cut here (`--json` and `show` give it whole).
        f"{_short(letter.rule_id, 24):<24} {letter.event_id or '-':<40} {status:<6} "
        f"{_short(letter.detail)}"
    )


def record(entry: Entry) -> dict[str, Any]:
    """The JSON object for ``list --json`` and ``show``: the letter, with its place on the topic."""
    out: dict[str, Any] = {"dlq_partition": entry.partition, "dlq_offset": entry.offset}
    if entry.letter is None:
        out["error"] = entry.error
    else:
        out.update(msgspec.json.decode(dlq.encode(entry.letter)))
    return out


def summary(counts: Counter[str], total: int, topic: str) -> str:
    """``3 dead letter(s) (of 12 in router.dlq.fake): rejected_by_api 2, mapping_error 1``."""
    order = [*dlq.REASONS, *sorted(set(counts) - set(dlq.REASONS))]
    parts = ", ".join(f"{reason} {counts[reason]}" for reason in order if counts[reason])
    line = f"{counts.total()} dead letter(s) (of {total} in {topic})"
    return f"{line}: {parts}" if parts else line


class ProgressBar:
    """A one-line text bar, redrawn in place (carriage return) at most ten times a second."""

    def __init__(self, stream: TextIO, total: int, *, enabled: bool, label: str = "replay"):
        self.stream = stream
        self.total = total
        self.enabled = enabled and total > 0
        self.label = label
        self.done = 0
        self.status = ""
        self._width = 30
        self._shown = 0  # length of the line on screen
        self._drawn_at = 0.0
        self._drawn: tuple[int, str] = (0, "")  # what the last draw showed

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._draw()

    def note(self, text: str, stream: TextIO | None = None) -> None:
        """Print a line (to ``stream``, default the bar's) without garbling the bar."""
        self._clear()
        target = stream or self.stream
        target.write(text + "\n")
        target.flush()
        if self.done:
            self._draw(force=True)

    def close(self) -> None:
        if self.enabled and self.done:
            if self._drawn != (self.done, self.status):
                self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
            self._shown = 0

    def _clear(self) -> None:
        if self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()
            self._shown = 0

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._drawn_at < 0.1 and self.done < self.total:
            return
        self._drawn_at = now
        self._drawn = (self.done, self.status)
        done = min(self.done, self.total)
        filled = self._width * done // self.total
        line = (
            f"{self.label} [{'#' * filled}{'.' * (self._width - filled)}] "
            f"{done:>{len(str(self.total))}}/{self.total} {100 * done // self.total:3d}%"
        )
        if self.status:
            line += f" {self.status}"
        self.stream.write("\r" + line.ljust(self._shown))
        self.stream.flush()
        self._shown = len(line)


# ---- commands ------------------------------------------------------------------------------


async def list_letters(
    settings: Settings,
    sink: str,
    selection: Selection,
    *,
    out: TextIO,
    err: TextIO,
    as_json: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Counter[str]:
    """Print the selected letters (text lines or JSON lines) and a count by reason."""
    counts: Counter[str] = Counter()
    async with DeadLetterReader(settings, sink, timeout_s) as reader:
        if not as_json:
            out.write(LIST_HEADER + "\n")
        async for entry in reader.entries():
            if not selection.matches(entry):
                continue
            counts[entry.reason] += 1
            if as_json:
                out.write(msgspec.json.encode(record(entry)).decode() + "\n")
            else:
                out.write(list_line(entry) + "\n")
        line = summary(counts, reader.total, reader.topic)
    # With --json stdout stays pure JSON lines.
    (err if as_json else out).write(line + "\n")
    out.flush()
    return counts


async def show_letters(
    settings: Settings,
    sink: str,
    selection: Selection,
    *,
    out: TextIO,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> int:
    """Print the selected letters whole, as indented JSON; return how many."""
    shown = 0
    async with DeadLetterReader(settings, sink, timeout_s) as reader:
        async for entry in reader.entries():
            if selection.matches(entry):
                text = msgspec.json.format(msgspec.json.encode(record(entry)), indent=2)
                out.write(text.decode() + "\n")
                shown += 1
    out.flush()
    return shown


@dataclass
class ReplayResult:
    topic: str
    dry_run: bool = False
    replayed: int = 0  # acknowledged by Kafka (dry run: would be sent)
    skipped: int = 0
    failed: int = 0
    sent: list[tuple[str, str | None]] = field(default_factory=list)  # (dlq position, event id)
    interrupted: bool = False

    def summary(self) -> str:
        stop = "; interrupted (Ctrl-C): run it again to go on, keys are reused" * self.interrupted
        if self.dry_run:
            return (
                f"dry run: would replay {self.replayed} event(s) to {self.topic}; "
                f"skipped {self.skipped}{stop}"
            )
        line = f"replayed {self.replayed} event(s) to {self.topic}; skipped {self.skipped}"
        return line + (f"; failed {self.failed}" if self.failed else "") + stop


class Interruption:
    """Ctrl-C during a replay: stop after the send in progress, wait for Kafka's acks, report.

    A flag rather than KeyboardInterrupt or task cancellation: Python 3.11's wait_for drops a
    cancellation that arrives as its awaitable completes, which lost most Ctrl-Cs mid-replay.
    A second Ctrl-C falls back to Python's default (KeyboardInterrupt).
    """

    def __init__(self) -> None:
        self.requested = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Take SIGINT over, if this loop can (False otherwise).

        Not outside the main thread, nor on a loop without signal support: Ctrl-C then stays
        Python's KeyboardInterrupt.
        """

        def on_sigint() -> None:
            self.requested = True
            loop.remove_signal_handler(signal.SIGINT)

        try:
            loop.add_signal_handler(signal.SIGINT, on_sigint)
        except (NotImplementedError, RuntimeError, ValueError):
            return False
        self._loop = loop
        return True

    def uninstall(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGINT)  # False if on_sigint already did
            self._loop = None


@dataclass(frozen=True)
class _Send:
    entry: Entry
    letter: dlq.DeadLetter
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]
    event_id: str | None


def _plan(entry: Entry, sink: str, include_invalid: bool, seen: dict[str, str]) -> _Send | str:
    """What to send for one letter, or why it is skipped."""
    letter = entry.letter
    if letter is None:
        return f"not a dead letter ({entry.error})"
    if letter.sink != sink:  # only that sink's letters go to its retry topic
        return f"a dead letter of sink {letter.sink!r}, not {sink!r}"
    invalid = "not a canonical event, it would only die again (--include-invalid)"
    if letter.reason == dlq.INVALID_EVENT and not include_invalid:
        return f"invalid_event: {invalid}"
    try:
        value = dlq.original_value(letter)
    except ValueError:  # binascii.Error: event_b64 that is not base64
        return "its event_b64 is not base64"
    if value is None:
        return "the dead letter holds no original event"
    event_id = letter.event_id
    key: bytes | None = None
    try:
        event = decode_event(value)
    except Exception:  # msgspec errors, or anything a garbage value provokes
        if not include_invalid:
            return invalid
        key = event_id.encode() if event_id else None
    else:
        event_id = event_id or event.id
        key = event.partition_key()  # the key the ingest gave it on the event topic
    # One event with dead letters from several rules is sent once: a replay runs all the rules.
    identity = event_id or f"{letter.topic}:{letter.partition}:{letter.offset}"
    first = seen.get(identity)
    if first is not None:
        return f"event {identity} is already replayed from dlq {first} (all rules run again)"
    seen[identity] = entry.position
    headers = [("replay_of", entry.position.encode())]
    if event_id:
        headers.insert(0, ("event_id", event_id.encode()))
    return _Send(entry, letter, value, key, headers, event_id)


def _describe(send: _Send, target: str) -> str:
    letter = send.letter
    return (
        f"would send event {send.event_id or '-'} (rule {letter.rule_id or '-'}, {letter.reason}, "
        f"dlq {send.entry.position}) to {target}"
    )


class _Producer:
    """The replay producer: idempotent, acks=all, a bounded window of unacknowledged sends."""

    def __init__(self, settings: Settings, target: str, result: ReplayResult, bar: ProgressBar):
        self.settings = settings
        self.target = target
        self.result = result
        self.bar = bar
        self.timeout_s = DEFAULT_TIMEOUT_S
        self._producer: Any = None
        self._pending: list[tuple[_Send, asyncio.Future[Any]]] = []

    async def start(self, existing_topics: set[str], timeout_s: float) -> None:
        from aiokafka import AIOKafkaProducer

        from router.bus import ensure_topics, event_topic_spec

        self.timeout_s = timeout_s
        kafka = self.settings.kafka
        if self.target not in existing_topics:
            # The sink's consumer creates it at start; this is for a sink not started since.
            spec = event_topic_spec(kafka, self.target)
            await _bounded(ensure_topics(kafka, [spec]), timeout_s, f"creating {self.target}")
        self._producer = AIOKafkaProducer(
            bootstrap_servers=kafka.bootstrap_servers,
            client_id=f"{kafka.client_id}-dlq-replay",
            enable_idempotence=True,
            acks="all",
            max_request_size=kafka.max_message_bytes,
            request_timeout_ms=max(5_000, kafka.produce_timeout_ms),
        )
        try:
            await _bounded(self._producer.start(), timeout_s, "starting the producer")
        except BaseException:
            await self.close()
            raise

    async def send(self, send: _Send) -> None:
        from aiokafka.errors import KafkaError, KafkaTimeoutError

        try:
            future = await asyncio.wait_for(
                self._producer.send(
                    self.target, value=send.value, key=send.key, headers=send.headers
                ),
                timeout=self.timeout_s,
            )
        except (TimeoutError, KafkaTimeoutError):
            raise DlqToolError(self._stopped_at(send, "Kafka did not take the record")) from None
        except KafkaError as exc:  # this record only (e.g. larger than the producer allows)
            self._failed(send, exc)
            return
        self._pending.append((send, future))
        if len(self._pending) >= SEND_WINDOW:
            await self.flush()

    async def flush(self) -> None:
        from aiokafka.errors import KafkaError

        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(f for _, f in pending), return_exceptions=True),
                timeout=self.timeout_s,
            )
        except TimeoutError:
            raise DlqToolError(
                self._stopped_at(pending[0][0], "Kafka did not acknowledge")
            ) from None
        for (send, _), outcome in zip(pending, results, strict=True):
            if isinstance(outcome, KafkaError):
                self._failed(send, outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                self.result.replayed += 1
                self.result.sent.append((send.entry.position, send.event_id))
        self.bar.status = f"{self.result.replayed} sent"

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await asyncio.wait_for(producer.stop(), timeout=10)
            except Exception as exc:  # closing: report, never mask the command's own outcome
                sys.stderr.write(f"router dlq: producer stop incomplete: {exc!r}\n")

    def _failed(self, send: _Send, exc: BaseException) -> None:
        self.result.failed += 1
        self.bar.note(f"failed dlq {send.entry.position} (event {send.event_id or '-'}): {exc!r}")

    def _stopped_at(self, send: _Send, what: str) -> str:
        return (
            f"{what} within {self.timeout_s:g}s (at dlq {send.entry.position}); "
            f"{self.result.replayed} event(s) were acknowledged before. Replaying again is safe: "
            "the events keep their idempotency keys"
        )


async def replay_letters(
    settings: Settings,
    sink: str,
    selection: Selection,
    *,
    out: TextIO,
    err: TextIO,
    dry_run: bool = False,
    include_invalid: bool = False,
    progress: bool | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    interruption: Interruption | None = None,
) -> ReplayResult:
    """Send the selected letters' original events to the sink's retry topic (see the module doc).

    ``progress``: draw the bar (None: only when ``err`` is a terminal). Skips and failures are
    reported on ``err``, dry-run lines on ``out``; the summary line is the caller's to print.
    """
    target = settings.consumer.retry_topic_for(sink)
    result = ReplayResult(target, dry_run=dry_run)
    async with DeadLetterReader(settings, sink, timeout_s) as reader:
        enabled = progress if progress is not None else err.isatty()
        bar = ProgressBar(err, reader.total, enabled=enabled, label="dead letters read")
        producer = None if dry_run else _Producer(settings, target, result, bar)
        try:
            if producer is not None:
                await producer.start(reader.topics, timeout_s)
            seen: dict[str, str] = {}
            async for entry in reader.entries():
                bar.advance()
                if not selection.matches(entry):
                    continue
                if interruption is not None and interruption.requested:
                    result.interrupted = True
                    break
                plan = _plan(entry, sink, include_invalid, seen)
                if isinstance(plan, str):
                    result.skipped += 1
                    bar.note(f"skipped dlq {entry.position}: {plan}")
                elif producer is None:
                    result.replayed += 1
                    result.sent.append((entry.position, plan.event_id))
                    bar.note(_describe(plan, target), out)
                else:
                    await producer.send(plan)
            if producer is not None:
                await producer.flush()
        finally:
            if producer is not None:
                await producer.close()
            bar.close()
    return result


# ---- command line --------------------------------------------------------------------------


def add_parser(commands: Any) -> None:
    """Add ``dlq list|show|replay`` to the ``router`` subcommands (``commands``)."""
    reasons = ", ".join(dlq.REASONS)
    group = commands.add_parser(
        "dlq",
        help="list, show and replay a sink's dead letters",
        description="Inspect one sink's dead letters (consumer.dlq_topic) and replay them to "
        "that sink only, through its retry topic (consumer.retry_topic).",
    )
    sub = group.add_subparsers(dest="dlq_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--sink", required=True, metavar="NAME", help="the sink (required)")
    common.add_argument(
        "--reason",
        action="append",
        default=[],
        type=_arg_type(lambda s: parse_reasons([s]), "reason"),
        metavar="R",
        help=f"only these reasons; repeat or comma-separate ({reasons})",
    )
    common.add_argument(
        "--since",
        type=_arg_type(parse_since, "since"),
        metavar="T",
        help="only letters dead since T: an ISO 8601 date-time (UTC unless it has an offset) "
        "or a duration ago (30m, 2h, 7d, 1h30m)",
    )
    common.add_argument("--rule", metavar="ID", help="only this rule's letters")
    common.add_argument("--event-id", metavar="ID", help="only this event's letters")
    common.add_argument(
        "--timeout",
        type=_arg_type(parse_timeout, "timeout"),
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="the longest wait on Kafka for any one step (default %(default)g)",
    )
    listing = sub.add_parser(
        "list",
        parents=[common],
        help="one line per dead letter, then a count by reason",
        description="One line per dead letter (DLQ partition:offset, when it died, reason, rule, "
        "event id, HTTP status, detail), then a count by reason.",
    )
    listing.add_argument(
        "--json", action="store_true", help="JSON lines (the whole letters); the count on stderr"
    )
    show = sub.add_parser("show", parents=[common], help="whole dead letters as indented JSON")
    show.add_argument(
        "--offset",
        type=_arg_type(parse_position, "offset"),
        metavar="[P:]N",
        help="only the letter at this offset (of partition P) of the dead-letter topic",
    )
    replay = sub.add_parser(
        "replay",
        parents=[common],
        help="send dead letters' events again, to this sink only",
        description=REPLAY_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument(
        "--dry-run", action="store_true", help="print what would be sent; send nothing"
    )
    replay.add_argument(
        "--include-invalid",
        action="store_true",
        help="also send invalid_event letters' bytes (skipped by default)",
    )
    replay.add_argument(
        "--progress",
        action="store_true",
        help="draw the progress bar on stderr even when it is not a terminal",
    )


def selection_from(args: argparse.Namespace) -> Selection:
    reasons: frozenset[str] = frozenset().union(*args.reason) if args.reason else frozenset()
    return Selection(
        reasons=reasons,
        since_ms=args.since,
        rule_id=args.rule,
        event_id=args.event_id,
        position=getattr(args, "offset", None),
    )


async def run(
    args: argparse.Namespace,
    settings: Settings,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run a parsed ``router dlq ...`` command; the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    selection = selection_from(args)
    try:
        if args.dlq_command == "list":
            await list_letters(
                settings,
                args.sink,
                selection,
                out=out,
                err=err,
                as_json=args.json,
                timeout_s=args.timeout,
            )
            return 0
        if args.dlq_command == "show":
            if not await show_letters(
                settings, args.sink, selection, out=out, timeout_s=args.timeout
            ):
                err.write("router dlq: no dead letter matches\n")
                return 1
            return 0
        interruption = Interruption()
        interruption.install(asyncio.get_running_loop())
        try:
            result = await replay_letters(
                settings,
                args.sink,
                selection,
                out=out,
                err=err,
                dry_run=args.dry_run,
                include_invalid=args.include_invalid,
                progress=True if args.progress else None,
                timeout_s=args.timeout,
                interruption=interruption,
            )
        finally:
            interruption.uninstall()
        out.write(result.summary() + "\n")
        out.flush()
        if result.interrupted:
            return 130
        return 1 if result.failed else 0
    except DlqToolError as exc:
        err.write(f"router dlq: {exc}\n")
        return 1
