"""The deploy manifests agree with the code: valid config, probes on real routes, entry point."""

from __future__ import annotations

import configparser
from pathlib import Path
from typing import Any

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
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] in routes


def test_systemd_unit_runs_the_console_script() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(ROOT / "deploy/systemd/router-ingest.service")
    assert unit["Service"]["ExecStart"].endswith("/bin/router serve")
    assert unit["Service"]["KillSignal"] == "SIGTERM"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'router = "router.cli:main"' in pyproject
