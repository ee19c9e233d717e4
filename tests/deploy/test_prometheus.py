"""The gateway's real /metrics passes `promtool check metrics`, and every metric the alert rules
use exists on a live gateway."""

from __future__ import annotations

import asyncio
import re
import subprocess

from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.livegw import DEPLOY, exposition_under_traffic, promtool


def exported_names(text: str) -> set[str]:
    """Every name a PromQL query can select from this exposition: sample names, plus the names a
    family declares (a counter `x` is queried as `x_total`, a histogram as `x_bucket` ...)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def queried_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\bcorral_[a-z0-9_]+", expr))


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
