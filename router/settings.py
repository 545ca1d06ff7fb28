"""Router configuration: one YAML file, every value overridable from the environment.

Precedence, lowest first: defaults in the Structs below, the YAML file (``--config`` or
``ROUTER_CONFIG``), then ``ROUTER_<SECTION>__<KEY>`` environment variables
(``ROUTER_KAFKA__BOOTSTRAP_SERVERS=host:9092``). Environment values are read as YAML scalars,
so ``true``, ``5`` and ``[a, b]`` mean what they look like; list settings also take a
comma-separated string.

Secrets (webhook secrets, integration keys, later sink credentials) are :class:`Secret` values:
a literal string, ``{env: NAME}`` or ``{file: /path}``. A Secret never prints its value, so a
settings object can be logged or put in an error message safely.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from router import yamlfile
from router.errors import validation_error_parts

ENV_PREFIX = "ROUTER_"
ENV_CONFIG = "ROUTER_CONFIG"


class ConfigError(Exception):
    """The configuration is invalid; the message names the key and the reason."""


class Secret:
    """A secret string whose value never appears in repr, str, logs or error messages."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class KafkaSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    bootstrap_servers: str = "127.0.0.1:19092"
    topic: str = "router.events"
    # Topic shape used when the router creates the topic at start; an existing topic is left as is.
    partitions: int = 6
    replication_factor: int = 1
    retention_ms: int = 7 * 24 * 3600 * 1000
    client_id: str = "pendo-event-router"
    # Upper bound on the wait for Kafka's acknowledgement of one request's events; past it the
    # client gets 503 + Retry-After (aiokafka's idempotent producer would otherwise wait forever).
    produce_timeout_ms: int = 10_000
    # How long `router serve` and `router sink` keep trying to reach Kafka and create their topics
    # before giving up (exit 1).
    startup_timeout_s: float = 60.0
    # One produce request may carry a whole batch of 500 events; the broker's default
    # message.max.bytes is about 1 MiB.
    max_batch_bytes: int = 1_000_000
    # Topic max.message.bytes (set when the router creates the topic) and the producer's request
    # cap: a canonical event carries the raw payload plus its normalised fields, so about twice
    # the body size; the default leaves room for a body at the 1 MiB ingest limit.
    max_message_bytes: int = 4 * 1024 * 1024
    linger_ms: int = 0
    compression_type: str | None = None


class IngestSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8080
    webhook_secrets: list[Secret] = msgspec.field(default_factory=list)
    allow_unsigned: bool = False
    integration_keys: list[Secret] = msgspec.field(default_factory=list)
    # Applies to the decompressed body when the client sends Content-Encoding: gzip.
    max_body_bytes: int = 1024 * 1024
    max_batch_events: int = 500
    # Requests waiting on Kafka at once; past it new requests get 503 instead of queueing memory.
    max_inflight_requests: int = 1024
    retry_after_s: int = 5
    shutdown_timeout_s: float = 30.0


class RulesSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # The directory of rule files (<sink>.yaml) and their tests (tests/<sink>*.yaml).
    dir: str = "rules"
    # How often a long-running consumer looks for changed rule files (SIGHUP reloads at once).
    reload_interval_s: float = 2.0


class ConsumerSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The sink consumers (`router sink NAME`): one Kafka consumer group per sink."""

    group_prefix: str = "router-sink-"  # consumer group = prefix + sink name
    dlq_topic: str = "router.dlq.{sink}"
    retry_topic: str = "router.retry.{sink}"  # replays go here, read only by that sink
    dlq_retention_ms: int = 30 * 24 * 3600 * 1000
    dlq_timeout_ms: int = 10_000
    # Unfinished events per process; past it the consumer stops fetching (bounded memory).
    max_inflight_events: int = 10_000
    poll_timeout_ms: int = 200
    max_poll_records: int = 1_000
    # What the Kafka client prefetches: aiokafka's defaults (50 MB, 1 MB per partition) let a
    # backlog fill memory with records the consumer cannot use yet. Kafka still returns a single
    # record larger than these (KIP-74), so big events are not blocked.
    fetch_max_bytes: int = 4 * 1024 * 1024
    max_partition_fetch_bytes: int = 1024 * 1024
    commit_interval_s: float = 1.0
    session_timeout_ms: int = 10_000
    max_poll_interval_ms: int = 300_000
    rebalance_timeout_ms: int = 30_000
    # On revocation, how long to wait for the revoked partitions' in-flight events; must stay
    # below rebalance_timeout_ms.
    revoke_timeout_s: float = 15.0
    shutdown_timeout_s: float = 20.0
    retry_base_s: float = 1.0
    retry_cap_s: float = 300.0
    retry_max_total_s: float = 4 * 3600.0
    # While the destination refuses the credentials (401/403), probe this often.
    pause_probe_s: float = 30.0
    health_host: str = "127.0.0.1"
    health_port: int = 9100

    def group_for(self, sink: str) -> str:
        return f"{self.group_prefix}{sink}"

    def dlq_topic_for(self, sink: str) -> str:
        return self.dlq_topic.format(sink=sink)

    def retry_topic_for(self, sink: str) -> str:
        return self.retry_topic.format(sink=sink)


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    kafka: KafkaSettings = msgspec.field(default_factory=KafkaSettings)
    ingest: IngestSettings = msgspec.field(default_factory=IngestSettings)
    rules: RulesSettings = msgspec.field(default_factory=RulesSettings)
    consumer: ConsumerSettings = msgspec.field(default_factory=ConsumerSettings)
    # Per-sink settings (endpoint, credentials), validated by each sink.
    sinks: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    # Modules to import that register more sinks (sinks.register): custom destinations, tests.
    plugins: list[str] = msgspec.field(default_factory=list)
    log_level: str = "INFO"


_LIST_FIELDS = {
    ("ingest", "webhook_secrets"),
    ("ingest", "integration_keys"),
    ("plugins",),
}
_LOG_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def _secret_hook(environ: Mapping[str, str]) -> Any:
    def dec_hook(tp: type, obj: Any) -> Any:
        if tp is Secret:
            return _secret_from(obj, environ)
        raise TypeError(f"unsupported type {tp!r}")

    return dec_hook


def secret_from(obj: Any, environ: Mapping[str, str] | None = None) -> Secret:
    """A Secret from a config value: a string, ``{env: NAME}`` or ``{file: PATH}``.

    For sinks, whose settings (``sinks.<name>``) reach them as plain mappings. Raises ValueError
    with the reason (never the value).
    """
    return _secret_from(obj, os.environ if environ is None else environ)


def _secret_from(obj: Any, environ: Mapping[str, str]) -> Secret:
    if isinstance(obj, Secret):
        return obj
    if isinstance(obj, str):
        if not obj:
            raise ValueError("secret is empty")
        return Secret(obj)
    if isinstance(obj, Mapping) and len(obj) == 1:
        ((kind, ref),) = obj.items()
        if kind == "env":
            value = environ.get(str(ref))
            if not value:
                raise ValueError(f"environment variable {ref} is unset or empty")
            return Secret(value)
        if kind == "file":
            try:
                value = Path(str(ref)).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"cannot read secret file {ref}: {exc.strerror}") from None
            if not value:
                raise ValueError(f"secret file {ref} is empty")
            return Secret(value)
    raise ValueError("expected a string, {env: NAME} or {file: PATH}")


def _env_overrides(environ: Mapping[str, str]) -> list[tuple[tuple[str, ...], str, Any]]:
    out: list[tuple[tuple[str, ...], str, Any]] = []
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG:
            continue
        path = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
        if not all(path):
            continue
        try:
            value: Any = msgspec.yaml.decode(raw) if raw.strip() else ""
        except msgspec.DecodeError:
            value = raw
        if path in _LIST_FIELDS and isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        elif isinstance(value, (dict, list)) and path not in _LIST_FIELDS:
            value = raw
        out.append((path, name, value))
    return out


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings from defaults, an optional YAML file and the environment."""
    environ = os.environ if environ is None else environ
    if path is None:
        path = environ.get(ENV_CONFIG) or None
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
        try:
            document = yamlfile.read(text.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8: {exc}") from None
        if document.problems:  # a key given twice, runaway aliases, not YAML at all
            raise ConfigError(
                "\n".join(
                    f"{path}:{p.line}: {p.path}: {p.message}" if p.line else f"{path}: {p.message}"
                    for p in document.problems
                )
            )
        loaded = {} if document.data is None else document.data
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded

    env_names: dict[tuple[str, ...], str] = {}
    for key_path, env_name, value in _env_overrides(environ):
        node = data
        for part in key_path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[key_path[-1]] = value
        env_names[key_path] = env_name

    try:
        settings = msgspec.convert(data, Settings, strict=False, dec_hook=_secret_hook(environ))
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe(exc, source, env_names)) from None
    _check(settings)
    return settings


def _describe(
    exc: msgspec.ValidationError, source: str, env_names: Mapping[tuple[str, ...], str]
) -> str:
    message, path = validation_error_parts(exc)
    key = path.removeprefix("$.").removeprefix("$")
    dotted = key.split("[", 1)[0]
    parts = tuple(dotted.split(".")) if dotted else ()
    # The variable that set this key, or one below it (ROUTER_NOPE__X for an unknown "nope"),
    # or above it (ROUTER_KAFKA__TOPIC__NAME made kafka.topic a map).
    origin = next(
        (
            name
            for path, name in env_names.items()
            if parts and (path[: len(parts)] == parts or parts[: len(path)] == path)
        ),
        None,
    )
    origin_text = f" (from {origin})" if origin else f" (in {source})"
    if not key:
        return f"config: {message}{origin_text}"
    return f"config key {key}: {message}{origin_text}"


def _check(settings: Settings) -> None:
    problems: list[str] = []
    k, i, c = settings.kafka, settings.ingest, settings.consumer
    for name, value, low in (
        ("kafka.retention_ms", k.retention_ms, -1),  # -1: kept forever (Kafka's own meaning)
        ("kafka.linger_ms", k.linger_ms, 0),
        ("kafka.startup_timeout_s", k.startup_timeout_s, 0),
        ("ingest.shutdown_timeout_s", i.shutdown_timeout_s, 0),
        ("rules.reload_interval_s", settings.rules.reload_interval_s, 0.01),
        ("consumer.dlq_retention_ms", c.dlq_retention_ms, -1),
        ("consumer.dlq_timeout_ms", c.dlq_timeout_ms, 1),
        ("consumer.poll_timeout_ms", c.poll_timeout_ms, 1),
        ("consumer.max_poll_records", c.max_poll_records, 1),
        ("consumer.fetch_max_bytes", c.fetch_max_bytes, 1),
        ("consumer.max_partition_fetch_bytes", c.max_partition_fetch_bytes, 1),
        ("consumer.commit_interval_s", c.commit_interval_s, 0.01),
        ("consumer.session_timeout_ms", c.session_timeout_ms, 1),
        ("consumer.max_poll_interval_ms", c.max_poll_interval_ms, 1),
        ("consumer.rebalance_timeout_ms", c.rebalance_timeout_ms, 1),
        ("consumer.revoke_timeout_s", c.revoke_timeout_s, 0),
        ("consumer.shutdown_timeout_s", c.shutdown_timeout_s, 0),
        ("consumer.retry_base_s", c.retry_base_s, 0.001),
        ("consumer.retry_cap_s", c.retry_cap_s, 0.001),
        ("consumer.retry_max_total_s", c.retry_max_total_s, 0),
        ("consumer.pause_probe_s", c.pause_probe_s, 0.01),
        ("kafka.partitions", k.partitions, 1),
        ("kafka.replication_factor", k.replication_factor, 1),
        ("kafka.produce_timeout_ms", k.produce_timeout_ms, 1),
        ("kafka.max_batch_bytes", k.max_batch_bytes, 1024),
        ("kafka.max_message_bytes", k.max_message_bytes, 1024),
        ("ingest.max_body_bytes", i.max_body_bytes, 1),
        ("ingest.max_batch_events", i.max_batch_events, 1),
        ("ingest.max_inflight_requests", i.max_inflight_requests, 1),
        ("ingest.retry_after_s", i.retry_after_s, 1),
        ("consumer.max_inflight_events", c.max_inflight_events, 1),
    ):
        # "not >=": a NaN (YAML .nan) fails too; "<" let it through.
        if not (value >= low and math.isfinite(value)):
            problems.append(f"config key {name}: must be >= {low}, got {value}")
    for name, port in (("ingest.port", i.port), ("consumer.health_port", c.health_port)):
        if not 0 < port < 65536:
            problems.append(f"config key {name}: must be 1..65535, got {port}")
    if not k.bootstrap_servers.strip():
        problems.append("config key kafka.bootstrap_servers: must name at least one host:port")
    problems.extend(_topic_problem("kafka.topic", k.topic))
    for name, template in (
        ("consumer.dlq_topic", c.dlq_topic),
        ("consumer.retry_topic", c.retry_topic),
    ):
        # One topic per sink: a shared retry topic would replay one sink's events to all.
        if "{sink}" not in template:
            problems.append(f"config key {name}: must contain {{sink}} (one topic per sink)")
            continue
        try:
            example = template.format(sink="segment")
        except (KeyError, IndexError, ValueError) as exc:
            problems.append(f"config key {name}: {template!r} is not a valid template: {exc!r}")
            continue
        problems.extend(_topic_problem(name, example))
    if k.compression_type not in (None, "gzip", "snappy", "lz4", "zstd"):
        problems.append(
            "config key kafka.compression_type: must be one of gzip, snappy, lz4, zstd or null"
        )
    if settings.log_level.upper() not in _LOG_LEVELS:
        problems.append(f"config key log_level: must be one of {', '.join(sorted(_LOG_LEVELS))}")
    if c.revoke_timeout_s * 1000 >= c.rebalance_timeout_ms:
        problems.append(
            "config key consumer.revoke_timeout_s: must be below consumer.rebalance_timeout_ms"
        )
    if problems:
        raise ConfigError("\n".join(problems))


_TOPIC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _topic_problem(name: str, topic: str) -> list[str]:
    if topic and len(topic) <= 249 and all(c in _TOPIC_CHARS for c in topic):
        return []
    shown = topic if len(topic) <= 60 else topic[:60] + "..."
    return [
        f"config key {name}: {shown!r} is not a valid Kafka topic name "
        "(1-249 letters, digits, '.', '_', '-')"
    ]
