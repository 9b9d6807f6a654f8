"""Prometheus and Alertmanager configuration, checked by their own tools (promtool, amtool)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import app.monitoring.metrics  # noqa: F401  (registers every metric in the default registry)

PROMETHEUS = Path(__file__).resolve().parents[2] / "prometheus"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: scripts/test installs Debian's prometheus and prometheus-alertmanager")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, cwd=PROMETHEUS, check=False)


def test_prometheus_config_and_rules_are_valid() -> None:
    result = run(tool("promtool"), "check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "12 rules found" in result.stdout


def test_every_alert_rule_passes_its_unit_tests() -> None:
    result = run(tool("promtool"), "test", "rules", "rules/sentiment.rules.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_rule_has_a_unit_test() -> None:
    rules = yaml.safe_load((PROMETHEUS / "rules" / "sentiment.rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((PROMETHEUS / "rules" / "sentiment.rules.test.yml").read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    assert alerts == tested


def test_every_metric_a_rule_reads_is_declared_in_the_metrics_module() -> None:
    """A renamed or mistyped metric in a rule would make its alert silently never fire."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    declared = {"sentiment_retrain_in_progress"}  # RetrainLockCollector, registered per scrape
    for family in REGISTRY.collect():
        declared |= {family.name + suffix for suffix in suffixes.get(family.type, ())}
    rules = yaml.safe_load((PROMETHEUS / "rules" / "sentiment.rules.yml").read_text())
    read = {
        name
        for group in rules["groups"]
        for rule in group["rules"]
        for text in (rule["expr"], *rule.get("annotations", {}).values())
        for name in re.findall(r"\bsentiment_[a-z_]*[a-z]\b", text)  # not "sentiment_drift_*"
    }
    assert "sentiment_drift_last_check_timestamp_seconds" in read
    assert read <= declared, read - declared


def test_alertmanager_config_is_valid_and_routes_drift_to_the_webhook_with_a_bearer_file() -> None:
    result = run(tool("amtool"), "check-config", "alertmanager.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((PROMETHEUS / "alertmanager.yml").read_text())
    (route,) = config["route"]["routes"]
    assert route["matchers"] == ['alertname = "SentimentDriftDetected"']
    (receiver,) = [r for r in config["receivers"] if r["name"] == route["receiver"]]
    (hook,) = receiver["webhook_configs"]
    assert hook["url"].endswith("/v1/webhooks/alertmanager")
    assert hook["http_config"]["authorization"] == {
        "type": "Bearer",
        "credentials_file": "/run/secrets/webhook_token",
    }
