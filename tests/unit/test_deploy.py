"""The deploy manifests agree with the code: valid config, probes on real routes, entry point."""

from __future__ import annotations

import configparser
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.ingest import create_app
from router.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]


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
    # The grace period must cover the in-flight drain.
    assert pod["terminationGracePeriodSeconds"] > settings.ingest.shutdown_timeout_s
    (container,) = pod["containers"]
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
        assert pod["terminationGracePeriodSeconds"] > settings.consumer.shutdown_timeout_s
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
