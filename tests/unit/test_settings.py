"""Configuration: file, environment overrides, secrets, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.settings import ConfigError, Secret, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_without_file_or_env() -> None:
    settings = load_settings(None, {})
    assert settings.kafka.bootstrap_servers == "127.0.0.1:19092"
    assert settings.ingest.allow_unsigned is False
    assert settings.ingest.max_body_bytes == 1024 * 1024
    assert settings.ingest.webhook_secrets == []


@pytest.mark.parametrize("name", ["router.example.yaml", "local.yaml"])
def test_shipped_configs_are_valid(name: str) -> None:
    env = {"PENDO_WEBHOOK_SECRET": "s1", "PENDO_INTEGRATION_KEY": "k1"}
    settings = load_settings(ROOT / "config" / name, env)
    assert settings.ingest.webhook_secrets


def test_env_overrides_file(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("kafka:\n  topic: from.file\ningest:\n  port: 9000\n")
    settings = load_settings(
        config,
        {
            "ROUTER_KAFKA__BOOTSTRAP_SERVERS": "k1:9092,k2:9092",
            "ROUTER_INGEST__PORT": "9100",
            "ROUTER_INGEST__ALLOW_UNSIGNED": "true",
            "ROUTER_INGEST__WEBHOOK_SECRETS": "a, b",
            "ROUTER_LOG_LEVEL": "debug",
        },
    )
    assert settings.kafka.topic == "from.file"
    assert settings.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert settings.ingest.port == 9100
    assert settings.ingest.allow_unsigned is True
    assert settings.ingest.webhook_secrets == [Secret("a"), Secret("b")]
    assert settings.log_level == "debug"


def test_config_path_from_env(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("kafka:\n  topic: via.env\n")
    assert load_settings(None, {"ROUTER_CONFIG": str(config)}).kafka.topic == "via.env"


def test_secrets_from_env_and_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\n")
    config = tmp_path / "c.yaml"
    config.write_text(
        "ingest:\n"
        "  webhook_secrets: [{env: HOOK_SECRET}, {file: " + str(secret_file) + "}, literal]\n"
    )
    settings = load_settings(config, {"HOOK_SECRET": "from-env"})
    assert [s.reveal() for s in settings.ingest.webhook_secrets] == [
        "from-env",
        "from-file",
        "literal",
    ]


def test_secrets_never_print_their_value() -> None:
    settings = load_settings(None, {"ROUTER_INGEST__WEBHOOK_SECRETS": "hunter2"})
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings.ingest.webhook_secrets[0])


@pytest.mark.parametrize(
    ("yaml_text", "env", "expected"),
    [
        ("ingest:\n  port: many\n", {}, "config key ingest.port: Expected int"),
        ("ingest:\n  prot: 1\n", {}, "config key ingest.prot: Object contains unknown field prot"),
        ("kafka: 5\n", {}, "config key kafka: Expected object"),
        ("", {"ROUTER_INGEST__PORT": "x"}, "(from ROUTER_INGEST__PORT)"),
        ("", {"ROUTER_INGEST__PORT": "70000"}, "config key ingest.port: must be 1..65535"),
        ("kafka:\n  topic: 'a b'\n", {}, "config key kafka.topic"),
        ("ingest:\n  webhook_secrets: [{env: NOPE}]\n", {}, "NOPE is unset"),
        ("ingest:\n  webhook_secrets: ['']\n", {}, "secret is empty"),
        (
            "ingest:\n  max_batch_events: 0\n",
            {},
            "config key ingest.max_batch_events: must be >= 1",
        ),
        ("- a list\n", {}, "top level must be a mapping"),
        # Found by fuzzing: each passed the check and broke a command later.
        ("consumer:\n  commit_interval_s: .nan\n", {}, "consumer.commit_interval_s: must be >="),
        ("", {"ROUTER_CONSUMER__COMMIT_INTERVAL_S": "0"}, "consumer.commit_interval_s"),
        ("", {"ROUTER_CONSUMER__REVOKE_TIMEOUT_S": ".nan"}, "consumer.revoke_timeout_s"),
        ("", {"ROUTER_CONSUMER__HEALTH_PORT": "-5"}, "consumer.health_port: must be 1..65535"),
        ("", {"ROUTER_CONSUMER__DLQ_TOPIC": "router.dlq"}, "consumer.dlq_topic: must contain"),
        ("", {"ROUTER_CONSUMER__RETRY_TOPIC": "r.{sink}.{nope}"}, "not a valid template"),
        ("", {"ROUTER_CONSUMER__RETRY_TOPIC": "r {sink}"}, "not a valid Kafka topic name"),
        ("", {"ROUTER_KAFKA__TOPIC": "t" * 250}, "config key kafka.topic"),
        ("", {"ROUTER_KAFKA__BOOTSTRAP_SERVERS": " "}, "kafka.bootstrap_servers"),
        ("", {"ROUTER_KAFKA__LINGER_MS": "-1"}, "kafka.linger_ms: must be >= 0"),
        ("a: [\n", {}, "not valid YAML"),
        ("kafka:\n  topic: a\nkafka:\n  partitions: 3\n", {}, "c.yaml:3: $.kafka: duplicate key"),
        ("a: &a [*a]\n", {}, "refers to a value that contains it"),
        ("", {"ROUTER_NOPE__X": "1"}, "unknown field nope (from ROUTER_NOPE__X)"),
        ("kafka: {}\n", {"ROUTER_KAFKA__TOPIC__NAME": "x"}, "(from ROUTER_KAFKA__TOPIC__NAME)"),
    ],
)
def test_errors_name_the_key(
    tmp_path: Path, yaml_text: str, env: dict[str, str], expected: str
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_settings(config, env)
    assert expected in str(info.value)


def test_secret_values_stay_out_of_error_messages(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("ingest:\n  webhook_secrets: sekrit-value\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, {})
    assert "sekrit-value" not in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "absent.yaml", {})


def test_example_config_builds_every_sink_with_credentials() -> None:
    import sinks

    env = {
        "PENDO_WEBHOOK_SECRET": "w",
        "PENDO_INTEGRATION_KEY": "i",
        "SEGMENT_WRITE_KEY": "seg-key",
        "MIXPANEL_SA_USERNAME": "user",
        "MIXPANEL_SA_SECRET": "mp-secret",
        "AMPLITUDE_API_KEY": "amp-key",
        "GA4_API_SECRET": "ga4-secret",
        "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T0/B0/XYZ",
    }
    settings = load_settings(ROOT / "config" / "router.example.yaml", env)
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, env):
        for name in sinks.BUILT_IN:
            sink = sinks.create(name, settings.sinks[name])
            assert getattr(sink, "dry_run", None) is False, name
            for secret in ("seg-key", "mp-secret", "amp-key", "ga4-secret", "XYZ"):
                assert secret not in repr(sink)


def test_config_check_builds_every_sink_and_names_what_cannot_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from router.cli import main

    good = tmp_path / "good.yaml"
    good.write_text("sinks:\n  ga4:\n    delivery: {max_events: 10, concurrency: 32}\n")
    assert main(["--config", str(good), "config", "check"]) == 0
    assert "concurrency: 32" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "sinks:\n  ga4:\n    delivery: {max_events: 99}\n"
        "  segment:\n    write_key: {env: ROUTER_TEST_UNSET_VARIABLE}\n"
    )
    assert main(["--config", str(bad), "config", "check"]) == 2
    err = capsys.readouterr().err
    assert "sinks.ga4.delivery.max_events: 99 must be between 1 and 25" in err
    assert "sinks.segment" in err
    assert "ROUTER_TEST_UNSET_VARIABLE" in err


def test_config_check_masks_sink_credentials_and_refuses_typos(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from router.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(
        "sinks:\n  segment:\n    write_key: SECRET-abc123\n"
        "  mixpanel:\n    project_id: '1'\n"
        "    service_account: {username: sa, secret: SECRET-def456}\n"
        "  slack:\n    webhook_url: {env: SLACK_URL}\n"
    )
    monkeypatch.setenv("SLACK_URL", "https://hooks.slack.com/services/T0/B0/SECRET-ghi789")
    monkeypatch.setenv("ROUTER_SINKS__GA4__API_SECRET", "SECRET-jkl012")
    monkeypatch.setenv("ROUTER_SINKS__GA4__MEASUREMENT_ID", "G-1")
    assert main(["--config", str(config), "config", "check"]) == 0
    out = capsys.readouterr().out
    assert "SECRET-" not in out
    assert "write_key: '***'" in out
    assert "env: SLACK_URL" in out  # a reference holds no secret
    typo = tmp_path / "typo.yaml"
    typo.write_text("sinks:\n  segmnet:\n    write_key: SECRET-abc123\n")
    assert main(["--config", str(typo), "config", "check"]) == 2
    captured = capsys.readouterr()
    assert "sinks.segmnet: no such sink" in captured.err
    assert "SECRET-" not in captured.out + captured.err


def test_a_plugin_that_cannot_be_imported_is_a_config_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from router.cli import main

    monkeypatch.setenv("ROUTER_PLUGINS", "no_such_plugin_module")
    assert main(["config", "check"]) == 2
    assert "plugins: cannot import 'no_such_plugin_module'" in capsys.readouterr().err


def test_delivery_tuning_refuses_nan() -> None:
    import sinks

    with pytest.raises(ValueError, match=r"^sinks\.segment\.delivery\.linger_s: nan"):
        sinks.create("segment", {"delivery": {"linger_s": float("nan")}})


async def test_a_health_port_that_cannot_be_opened_is_a_clear_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from router.sink_runner import run_sink

    env = {
        "ROUTER_CONSUMER__HEALTH_HOST": "no.such.host.invalid",
        "ROUTER_RULES__DIR": str(ROOT / "rules"),
    }
    assert await run_sink(load_settings(None, env), "segment") == 2  # was a traceback
    assert "health port no.such.host.invalid:9100" in caplog.text


def test_events_tail_without_kafka_is_one_line_not_a_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from router.cli import main

    monkeypatch.setenv("ROUTER_KAFKA__BOOTSTRAP_SERVERS", "a:b:c")  # passes the config check
    assert main(["events", "tail", "--count", "1"]) == 1
    assert "router events: cannot read from Kafka at a:b:c" in capsys.readouterr().err


def test_a_signal_during_start_up_ends_a_long_running_command_quietly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import signal

    from router import cli

    before = signal.getsignal(signal.SIGTERM)

    def starting(args: object) -> int:  # SIGTERM arrives while imports and rules load
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal should have ended start-up")

    monkeypatch.setattr(cli, "_main", starting)
    assert cli.main(["sink", "segment"]) == 0  # was killed with 143 (SIGINT: a traceback)
    assert "router sink: stopped during start-up" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # handed back


def test_the_example_config_names_every_setting() -> None:
    """config/router.example.yaml is where every key is described (README): none may be missing."""
    import msgspec
    import yaml

    from router.settings import Settings

    example = yaml.safe_load((ROOT / "config" / "router.example.yaml").read_text())
    defaults = msgspec.to_builtins(Settings())
    missing = [
        f"{section}.{key}"
        for section, values in defaults.items()
        if isinstance(values, dict) and section != "sinks"
        for key in values
        if key not in (example.get(section) or {})
    ]
    assert missing == []
