"""The Grafana dashboard queries only what a live gateway exports, in PromQL that Prometheus parses."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.livegw import DEPLOY, exported_names, exposition_under_traffic, promtool, queried_metrics

DASHBOARD = DEPLOY / "grafana" / "corral-dashboard.json"


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def expressions(board: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def test_every_metric_the_dashboard_queries_exists_on_a_live_gateway() -> None:
    board = dashboard()
    used = set().union(*(queried_metrics(e) for e in expressions(board)))
    # The panels cover what the issue asks to see.
    for needed in (
        "corral_backend_up",
        "corral_gpu_memory_used_bytes",
        "corral_time_to_first_token_seconds_bucket",
        "corral_decode_tokens_per_second_bucket",
        "corral_queue_depth",
        "corral_routing_decisions_total",
        "corral_cold_loads_total",
        "corral_failovers_total",
    ):
        assert needed in used, needed
    names = exported_names(asyncio.run(exposition_under_traffic()))
    assert used <= names, f"queried by the dashboard but not exported: {sorted(used - names)}"


def test_the_dashboards_queries_parse_as_promql(tmp_path: Path) -> None:
    tool = promtool()
    board = dashboard()
    exprs = [e for e in expressions(board) if not e.startswith("label_values(")]
    # Grafana's variables, as Grafana would substitute them.
    exprs = [e.replace("$__rate_interval", "5m").replace('"$model"', '".*"') for e in exprs]
    assert all("$" not in e for e in exprs), [e for e in exprs if "$" in e]
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(exprs)]}
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    result = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_panels_have_unique_ids_and_use_the_datasource_variable() -> None:
    board = dashboard()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for p in board["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
    if not board["uid"]:
        pytest.fail("the dashboard needs a fixed uid so links and provisioning find it")
