"""The ``router`` command line.

- ``router serve``: the ingest service (HTTP -> Kafka).
- ``router events tail``: print events from the event topic, for operators and the README demo.
- ``router config check``: validate the configuration and print it with secrets masked.
- ``router dlq list|show|replay``: a sink's dead letters; replay sends them to that sink only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

import msgspec

from router.aio import unless_stopped
from router.settings import ConfigError, Settings, load_settings

log = logging.getLogger("router")


def _run(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency on Linux
        return asyncio.run(main)
    return uvloop.run(main)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLogger().level))
    for handler in logging.getLogger().handlers:
        handler.addFilter(_KafkaClientNoise())


class _KafkaClientNoise(logging.Filter):
    """Quiets aiokafka's ERROR lines for conditions it retries by itself.

    While a consumer group starts on a fresh broker, aiokafka logs "Group Coordinator Request
    failed: GroupCoordinatorNotAvailable" several times a second until the coordinator is up:
    normal, and dropped. While the broker is away it logs every failed reconnect; one line per
    address every 30 s keeps the outage visible without flooding (the router's own warnings and
    /readyz say what it means for events).
    """

    def __init__(self, interval_s: float = 30.0) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._last: dict[tuple[str, ...], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        # A filter runs inside the library's own logging call: if it raised, the error would
        # surface in aiokafka's retry loop and could end it. So it never raises.
        try:
            return self._keep(record)
        except Exception:
            return True

    def _keep(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("aiokafka"):
            return True
        if record.msg == "Group Coordinator Request failed: %s":
            return "GroupCoordinatorNotAvailable" not in record.getMessage()
        address_args = _RECONNECTS.get(str(record.msg))
        if address_args is not None:
            args = record.args if isinstance(record.args, tuple) else ()
            # The address only (as text: aiokafka passes lists of node ids too), not the error.
            key = (str(record.msg), *(str(arg) for arg in args[:address_args]))
            now = record.created
            if now - self._last.get(key, float("-inf")) < self._interval_s:
                return False
            if len(self._last) >= 1_000:  # bounded, whatever the addresses
                self._last.clear()
            self._last[key] = now
        return True


# aiokafka's log templates for a connection it retries (client.py, consumer/fetcher.py), and how
# many of their arguments name the address.
_RECONNECTS: dict[str, int] = {
    'Unable connect to "%s:%s": %s': 2,
    "Unable connect to node with id %s: %s": 1,
    "Unable to update metadata from %s": 1,
    # consumer/fetcher.py: ~10 a second per broker during an outage
    "Failed fetch messages from %s: %s": 1,
    "Failed fetch offsets from %s: %s": 1,
}


async def _serve(settings: Settings) -> int:
    from aiohttp import web

    from router.ingest import create_app

    app = create_app(settings)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=settings.ingest.shutdown_timeout_s,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Start-up (reaching Kafka, creating the topic) can take up to kafka.startup_timeout_s:
    # a SIGTERM meanwhile must stop it rather than wait for it.
    try:
        started = await unless_stopped(runner.setup(), stop)
    except Exception as exc:
        log.error("cannot start: %s", exc)
        with contextlib.suppress(Exception):
            await runner.cleanup()
        return 1
    if not started:
        log.info("stopped during start-up")
        with contextlib.suppress(Exception):
            await runner.cleanup()
        return 0
    site = web.TCPSite(runner, settings.ingest.host, settings.ingest.port, backlog=1024)
    try:
        await site.start()
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", settings.ingest.host, settings.ingest.port, exc)
        await runner.cleanup()
        return 1
    log.info("ingest listening on http://%s:%d", settings.ingest.host, settings.ingest.port)
    await stop.wait()
    log.info("stopping: no new connections, finishing in-flight requests, flushing the producer")
    # Stops the listener, waits for running handlers (up to shutdown_timeout), then runs the
    # cleanup context, which flushes and stops the producer.
    await runner.cleanup()
    log.info("stopped")
    return 0


async def _tail(settings: Settings, from_beginning: bool, count: int | None, idle_s: float) -> int:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        settings.kafka.topic,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest" if from_beginning else "latest",
    )
    seen = 0
    try:
        await asyncio.wait_for(consumer.start(), timeout=30)
        while count is None or seen < count:
            batch = await consumer.getmany(timeout_ms=int(idle_s * 1000))
            if not batch:
                if count is not None:
                    break
                continue
            records = [record for part in batch.values() for record in part]
            if count is not None:
                records = records[: count - seen]
            for record in records:
                # One compact line per event, whatever spacing and newlines `raw` came with.
                sys.stdout.write(msgspec.json.format(record.value, indent=-1).decode() + "\n")
            seen += len(records)
            sys.stdout.flush()
    finally:
        await asyncio.wait_for(consumer.stop(), timeout=10)
    return 0


def _masked(settings: Settings) -> Any:
    """The settings as ``config check`` prints them: every credential shown as ***.

    Ingest secrets are Secret objects already; sinks' settings are plain maps, so values named
    like credentials (key, secret, token, webhook...) are masked, and any other string that
    contains one. {env: NAME} and {file: PATH} references are shown: they hold no secret.
    """
    from router.dlq import SECRET_WORDS, Redactor, secret_values

    redact = Redactor(secret_values(settings.sinks))

    def mask(value: Any, name: str) -> Any:
        if isinstance(value, dict):
            return {key: mask(item, str(key)) for key, item in value.items()}
        if isinstance(value, list):
            return [mask(item, name) for item in value]
        if isinstance(value, str):
            return "***" if any(w in name.lower() for w in SECRET_WORDS) else redact(value)
        return value

    data: dict[str, Any] = msgspec.to_builtins(settings, enc_hook=repr)
    data["sinks"] = mask(data.get("sinks", {}), "sinks")
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="router", description=__doc__.splitlines()[0].replace("``", "")
    )
    parser.add_argument(
        "--config", help="YAML config file (default: $ROUTER_CONFIG, else built-in defaults)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the ingest service")
    sub.add_parser(
        "up", help="run the ingest and every sink consumer locally (one process each; make run)"
    )
    sink = sub.add_parser("sink", help="run one sink's consumer (Kafka -> rules -> destination)")
    sink.add_argument("name", help="the sink: segment, mixpanel, ga4, amplitude, slack, ...")
    events = sub.add_parser("events", help="inspect the event topic")
    events_sub = events.add_subparsers(dest="events_command", required=True)
    tail = events_sub.add_parser("tail", help="print events from the event topic as JSON lines")
    tail.add_argument("--from-beginning", action="store_true", help="start at the oldest event")
    tail.add_argument("-n", "--count", type=int, help="stop after this many events")
    tail.add_argument(
        "--idle-timeout",
        type=float,
        default=5.0,
        help="with -n, give up after this many idle seconds",
    )
    rules = sub.add_parser("rules", help="check and test rule files")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    rules_check = rules_sub.add_parser(
        "check", help="validate rule files; one line per problem (file:line: path: reason)"
    )
    rules_check.add_argument("paths", nargs="*", help="rule files or directories (rules.dir)")
    rules_test = rules_sub.add_parser("test", help="run the rule files' test cases")
    rules_test.add_argument("paths", nargs="*", help="rule files or directories (rules.dir)")
    rules_sub.add_parser("schema", help="print the JSON Schema of rule files")
    config = sub.add_parser("config", help="configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    config_sub.add_parser("check", help="validate the configuration and print it, secrets masked")
    from router import dlq_tools  # light at import: Kafka is imported when a command runs

    dlq_tools.add_parser(sub)
    return parser


def _sink_problems(settings: Settings) -> list[str]:
    """Build every configured sink as its consumer would; one line per sink that cannot start."""
    import sinks

    try:
        sinks.load_plugins(settings.plugins)
    except ValueError as exc:
        return [str(exc)]
    problems = []
    for name, config in settings.sinks.items():
        if name not in sinks.FACTORIES:
            if name not in sinks.OUTPUTS:  # a typo would otherwise leave the sink unconfigured
                known = ", ".join(sorted(sinks.FACTORIES))
                problems.append(f"sinks.{name}: no such sink (known: {known})")
            continue  # rules only, or a plugin's sink without a transport
        try:
            sinks.create(name, config)
        except (ValueError, KeyError, TypeError) as exc:
            message = str(exc)
            problems.append(
                message if message.startswith(f"sinks.{name}") else f"sinks.{name}: {message}"
            )
    return problems


class _StoppedEarly(Exception):
    """SIGTERM/SIGINT before a long-running command installed its own handling."""


@contextlib.contextmanager
def _early_signals() -> Any:
    """Until the command's event loop takes over SIGTERM/SIGINT, either one ends it quietly.

    Start-up (imports, rules, sinks) takes up to a second; a signal then killed the process
    with 143, or printed a KeyboardInterrupt traceback. The previous handlers come back after.
    """

    def stop(signum: int, frame: Any) -> None:
        raise _StoppedEarly

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("serve", "up", "sink"):
        try:
            with _early_signals():
                return _main(args)
        except _StoppedEarly:
            sys.stderr.write(f"router {args.command}: stopped during start-up\n")
            return 0
    return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        sys.stderr.write(f"router: {exc}\n")
        return 2
    _setup_logging(settings.log_level)
    if args.command == "serve":
        return _run(_serve(settings))
    if args.command == "up":
        from router.up import run_up  # keep `router --help` fast

        config_args = ["--config", args.config] if args.config else []
        return _run(run_up(settings, config_args))
    if args.command == "sink":
        from router.sink_runner import run_sink  # keep `router --help` fast

        return _run(run_sink(settings, args.name))
    if args.command == "events":
        from aiokafka.errors import KafkaError

        try:
            return _run(_tail(settings, args.from_beginning, args.count, args.idle_timeout))
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:
            # The reader went away (`| head`): done, as other Unix tools are. Point stdout at
            # /dev/null so the interpreter's last flush does not complain about it again.
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except (KafkaError, OSError, TimeoutError, ValueError) as exc:
            # Kafka unreachable, or a bootstrap_servers entry that does not parse.
            servers = settings.kafka.bootstrap_servers
            sys.stderr.write(f"router events: cannot read from Kafka at {servers}: {exc!r}\n")
            return 1
    if args.command == "rules":
        from router.rules import commands  # keep `router --help` fast

        if args.rules_command == "check":
            return commands.run_check(args.paths, settings.rules.dir)
        if args.rules_command == "test":
            return commands.run_tests(args.paths, settings.rules.dir)
        sys.stdout.buffer.write(commands.schema())
        return 0
    if args.command == "dlq":
        from router import dlq_tools

        try:
            return _run(dlq_tools.run(args, settings))
        except KeyboardInterrupt:
            return 130
    if args.command == "config":
        problems = _sink_problems(settings)
        if problems:
            sys.stderr.write("".join(f"router: {problem}\n" for problem in problems))
            return 2
        sys.stdout.write(msgspec.yaml.encode(_masked(settings)).decode())
        return 0
    raise AssertionError(args.command)  # argparse rejects unknown commands first


if __name__ == "__main__":
    sys.exit(main())
