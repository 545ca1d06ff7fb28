"""The deploy manifests agree with the code: valid config, probes on real routes, entry point."""

from __future__ import annotations

import configparser
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.ingest import create_app
from router.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
# After its drain (shutdown_timeout_s), a process may still spend this long stopping:
# the ingest flushes and stops its producer (10 s each); a sink waits for its tasks (2 s), commits,
# leaves the group and stops its dead-letter producer (10 s each), then its rules watcher (5 s).
INGEST_AFTER_DRAIN_S = 20
SINK_AFTER_DRAIN_S = 37
# /readyz waits up to 2 s for Kafka's metadata answer; a probe giving up sooner fails a ready pod.
READYZ_WAIT_S = 2


def k8s_documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / "deploy/k8s/ingest.yaml").read_text()) if d]


def test_k8s_config_is_a_valid_router_config(tmp_path: Path) -> None:
    (config_map,) = [d for d in k8s_documents() if d["kind"] == "ConfigMap"]
    path = tmp_path / "router.yaml"
    path.write_text(config_map["data"]["router.yaml"])
    settings = load_settings(path, {"PENDO_WEBHOOK_SECRET": "s", "PENDO_INTEGRATION_KEY": "k"})
    assert settings.ingest.port == 8080
    (deployment,) = [d for d in k8s_documents() if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # The grace period must cover the wait for the endpoints, the drain and the producer's stop.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    stopping_s = int(pre_stop[1]) + settings.ingest.shutdown_timeout_s + INGEST_AFTER_DRAIN_S
    assert pod["terminationGracePeriodSeconds"] >= stopping_s
    assert container["readinessProbe"]["timeoutSeconds"] > READYZ_WAIT_S
    env_names = {e["name"] for e in container["env"]}
    assert {"ROUTER_CONFIG", "PENDO_WEBHOOK_SECRET", "PENDO_INTEGRATION_KEY"} <= env_names


def test_k8s_probes_hit_real_routes() -> None:
    (deployment,) = [d for d in k8s_documents() if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    routes = {
        r.resource.canonical
        for r in create_app(load_settings(None, {})).router.routes()
        if r.resource is not None
    }
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] in routes
    # The port opens once Kafka answers (kafka.startup_timeout_s): the startup probe must wait
    # that long, or a Kafka outage at deploy time becomes a restart loop.
    startup = container["startupProbe"]
    waits_s = startup["periodSeconds"] * startup["failureThreshold"]
    assert waits_s > load_settings(None, {}).kafka.startup_timeout_s


def test_systemd_unit_runs_the_console_script() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(ROOT / "deploy/systemd/router-ingest.service")
    assert unit["Service"]["ExecStart"].endswith("/bin/router serve")
    assert unit["Service"]["KillSignal"] == "SIGTERM"
    stopping_s = load_settings(None, {}).ingest.shutdown_timeout_s + INGEST_AFTER_DRAIN_S
    assert int(unit["Service"]["TimeoutStopSec"]) >= stopping_s
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'router = "router.cli:main"' in pyproject


def sink_documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / "deploy/k8s/sinks.yaml").read_text()) if d]


def test_k8s_runs_one_deployment_per_built_in_sink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sinks
    from router.sink_runner import health_app

    (config_map,) = [d for d in sink_documents() if d["kind"] == "ConfigMap"]
    path = tmp_path / "router.yaml"
    path.write_text(config_map["data"]["router.yaml"])
    deployments = [d for d in sink_documents() if d["kind"] == "Deployment"]
    env = {
        e["name"]: (
            "https://hooks.slack.com/services/T0/B0/XXXX"
            if e["name"].endswith("_URL")
            else "set-by-the-secret"
        )
        for d in deployments
        for e in d["spec"]["template"]["spec"]["containers"][0]["env"]
        if "valueFrom" in e
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(path, env)
    assert settings.consumer.health_host == "0.0.0.0"  # noqa: S104 (probes come from outside)
    by_sink = {d["spec"]["template"]["spec"]["containers"][0]["args"][1]: d for d in deployments}
    assert set(by_sink) == set(sinks.BUILT_IN)
    health_routes = {
        r.resource.canonical
        for r in health_app(object(), None).router.routes()  # type: ignore[arg-type]
        if r.resource is not None
    }
    for name, deployment in by_sink.items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"] == ["sink", name]
        stopping_s = settings.consumer.shutdown_timeout_s + SINK_AFTER_DRAIN_S
        assert pod["terminationGracePeriodSeconds"] >= stopping_s
        assert container["readinessProbe"]["timeoutSeconds"] > READYZ_WAIT_S
        assert container["ports"][0]["containerPort"] == settings.consumer.health_port
        for probe in ("livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["path"] in health_routes
        # Every credential the sink's config names comes from the Secret, in its own pod.
        named = {e["name"] for e in container["env"] if "valueFrom" in e}
        config_text = yaml.safe_dump(settings.sinks[name])
        assert named == {var for var in env if var in config_text}
        # The rule files and their tests, where the loader looks for them.
        (volume,) = [v for v in pod["volumes"] if v["name"] == "rules"]
        sources = volume["projected"]["sources"]
        test_paths = {item["path"] for item in sources[1]["configMap"]["items"]}
        assert test_paths == {f"tests/{p.name}" for p in (ROOT / "rules/tests").glob("*.yaml")}
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "rules"]
        assert mount["mountPath"] == settings.rules.dir
        sink = sinks.create(name, settings.sinks[name])  # with its credentials: not a dry run
        assert not getattr(sink, "dry_run", False)


def test_systemd_sink_template_runs_one_sink_per_instance() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(ROOT / "deploy/systemd/router-sink@.service")
    assert unit["Service"]["ExecStart"].endswith("/bin/router sink %i")
    assert unit["Service"]["EnvironmentFile"].endswith("sink-%i.env")
    assert unit["Service"]["ExecReload"] == "/bin/kill -HUP $MAINPID"
    stopping_s = load_settings(None, {}).consumer.shutdown_timeout_s + SINK_AFTER_DRAIN_S
    assert int(unit["Service"]["TimeoutStopSec"]) >= stopping_s


def test_the_image_the_manifests_name_is_built_with_router_as_entry_point() -> None:
    """deploy/Dockerfile (not built here: no Docker engine) matches what the manifests assume."""
    lines = [
        line.strip()
        for line in (ROOT / "deploy/Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    # The Deployments give args only, so the entry point must be the console script.
    assert 'ENTRYPOINT ["router"]' in lines
    copied = {line.split()[1] for line in lines if line.startswith("COPY")}
    # What `pip install .` builds from (readme is part of the metadata), and the default rules.
    assert {"pyproject.toml", "router", "sinks", "rules"} <= copied
    assert any(line.startswith("COPY pyproject.toml README.md") for line in lines)
    assert "RUN pip install . && rm -rf build *.egg-info" in lines
    ports = {int(p) for line in lines if line.startswith("EXPOSE") for p in line.split()[1:]}
    images = {
        c["image"]
        for d in [*k8s_documents(), *sink_documents()]
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    version = _project_version()
    assert images == {f"pendo-event-router:{version}"}
    assert ports == {8080, 9100}


def _project_version() -> str:
    for line in (ROOT / "pyproject.toml").read_text().splitlines():
        if line.startswith("version = "):
            return line.split('"')[1]
    raise AssertionError("no version in pyproject.toml")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"KAFKA_PORT": "19892"}, "ROUTER_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:19892 "),
        ({}, ""),  # config/local.yaml's own 19092
        # an explicit bootstrap wins over the port
        ({"KAFKA_PORT": "19892", "ROUTER_KAFKA__BOOTSTRAP_SERVERS": "kafka:9092"}, ""),
    ],
)
def test_make_run_looks_for_kafka_where_kafka_start_put_it(
    env: dict[str, str], expected: str
) -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("KAFKA_PORT", "MAKEFLAGS")}
    base.pop("ROUTER_KAFKA__BOOTSTRAP_SERVERS", None)
    shown = subprocess.run(
        ["make", "-s", "-n", "-o", ".venv/.installed", "run"],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert shown[-1] == f"{expected}.venv/bin/router --config config/local.yaml up"
