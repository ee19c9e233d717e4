"""The gateway's real /metrics passes `promtool check metrics`, and every metric the alert rules
use exists on a live gateway."""

from __future__ import annotations

import asyncio
import subprocess

from tests.deploy.livegw import DEPLOY, exported_names, exposition_under_traffic, promtool, queried_metrics


def test_metrics_under_traffic_pass_promtool_check_metrics() -> None:
    tool = promtool()
    text = asyncio.run(exposition_under_traffic())
    # The traffic reached the series the alerts watch.
    for series in ("corral_in_flight_requests", "corral_queue_rejections_total", "corral_cold_loads_total"):
        assert f"\n{series}{{" in text, series
    result = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    )


async def test_every_metric_the_alert_rules_use_exists_on_a_live_gateway() -> None:
    names = exported_names(await exposition_under_traffic())
    rules = (DEPLOY / "prometheus" / "rules.yml").read_text()
    used = queried_metrics(rules)
    assert len(used) >= 6
    assert used <= names, f"not exported by the gateway: {sorted(used - names)}"
