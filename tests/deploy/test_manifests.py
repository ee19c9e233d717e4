"""What the deploy files say about Corral itself: their configs load with Corral's own strict
loader, the kustomization lists every manifest, probes use the routes that never load a model, and
the NetworkPolicy really selects the pods it is meant to protect."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from gateway.config import gateway_settings_from
from launcher.config import load_config
from launcher.facts.strictconf import load_toml
from tests.deploy.livegw import DEPLOY

K8S = DEPLOY / "k8s"


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_objects() -> list[dict[str, Any]]:
    return [d for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml" for d in documents(p)]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in k8s_objects() if d["kind"] == kind]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return list(spec["containers"])


def test_the_images_config_and_the_configmaps_load_with_corrals_loader(tmp_path: Path) -> None:
    cfg = load_config(DEPLOY / "docker" / "config.toml")
    assert cfg.gateway.state == "redis" and cfg.launcher.host == "0.0.0.0"
    (configmap,) = by_kind("ConfigMap")
    launcher_toml = tmp_path / "launcher.toml"
    # What the DaemonSet's start command does: the pod's IP in place of @POD_IP@.
    launcher_toml.write_text(configmap["data"]["launcher.toml"].replace("@POD_IP@", "10.244.1.7"))
    launcher = load_config(launcher_toml)
    assert launcher.launcher.host == "10.244.1.7" and launcher.gateway.state == "redis"
    gateway_toml = tmp_path / "gateway.toml"
    gateway_toml.write_text(configmap["data"]["gateway.toml"])
    gateway = gateway_settings_from(load_toml(gateway_toml))
    assert gateway.redis_url == launcher.gateway.redis_url


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_probes_use_routes_that_never_load_a_model() -> None:
    allowed = {"/", "/api/corral/ready"}
    seen = 0
    for workload in by_kind("Deployment") + by_kind("DaemonSet"):
        for container in containers(workload):
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                spec = container.get(probe)
                if spec is None:
                    continue
                seen += 1
                if "httpGet" in spec:
                    assert spec["httpGet"]["path"] in allowed, (workload["metadata"]["name"], probe)
                else:
                    command = " ".join(spec["exec"]["command"])
                    assert re.search(r"/api/corral/ready", command), (workload["metadata"]["name"], probe)
    assert seen >= 4
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert "HEALTHCHECK" in dockerfile and "/api/corral/ready" in dockerfile


def labels_match(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_backends_accept_only_gateway_pods() -> None:
    pods = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in by_kind("DaemonSet")}
    pods |= {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in by_kind("Deployment")}
    gateways = {n for n, labels in pods.items() if labels.get("app.kubernetes.io/component") == "gateway"}
    launchers = {n for n, labels in pods.items() if labels.get("app.kubernetes.io/component") == "launcher"}
    assert gateways and len(launchers) == 2
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind("NetworkPolicy")}
    backends = policies["corral-backends-from-gateways"]
    # The policy covers every launcher pod, and its only allowed peers are the gateway pods.
    assert {n for n in launchers if labels_match(backends["podSelector"], pods[n])} == launchers
    (rule,) = backends["ingress"]
    allowed = {n for n, labels in pods.items() for peer in rule["from"] if labels_match(peer["podSelector"], labels)}
    assert allowed == gateways
    (port,) = rule["ports"]
    cfg = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]["launcher.toml"]
    found = re.search(r"base_port = (\d+)", cfg)
    assert found is not None
    base_port = int(found.group(1))
    assert port["port"] == base_port and port["endPort"] >= base_port + 8  # room for one backend per GPU


def test_each_gpu_pool_requests_what_its_nodes_have_and_selects_them() -> None:
    for daemonset in by_kind("DaemonSet"):
        pool = daemonset["metadata"]["labels"]["corral.dev/gpu-pool"]
        spec = daemonset["spec"]["template"]["spec"]
        assert spec["nodeSelector"] == {"corral.dev/gpu-pool": pool}
        (container,) = containers(daemonset)
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus == container["resources"]["requests"]["nvidia.com/gpu"] and gpus >= 1
        # Longer than the drain plus the backends' stop timeout.
        assert spec["terminationGracePeriodSeconds"] > 30 + 10
