"""Grafana dashboards and provisioning: the documented formats, and every query evaluated for real.

Grafana cannot run here. Instead the service runs supervised with a real Prometheus scraping it; after
traffic of every kind, each dashboard query and each Grafana alert-rule query is evaluated in that
Prometheus and must return data without error.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from app.ml.data import load_clothing
from app.ml.registry import ModelRegistry
from dashboards.build import DATASOURCE, render
from tests.conftest import ADMIN_TOKEN, WEBHOOK_TOKEN
from tests.integration.services import FEEDBACK, REPO, Daemon, Service, start_prometheus, start_service

DASHBOARDS = REPO / "dashboards"
PROVISIONING = DASHBOARDS / "provisioning"
UIDS = {"sentiment-service", "sentiment-model", "sentiment-drift", "sentiment-retraining"}


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted((DASHBOARDS / "json").glob("*.json"))}


def provisioning(path: str) -> dict[str, Any]:
    return yaml.safe_load((PROVISIONING / path).read_text())  # type: ignore[no-any-return]


def targets() -> list[tuple[str, str]]:
    return [
        (f"{d['uid']} / {p['title']}", t["expr"])
        for d in dashboards().values()
        for p in d["panels"]
        for t in p["targets"]
    ]


def test_committed_json_is_what_the_code_builds() -> None:
    assert {name: (DASHBOARDS / "json" / name).read_text() for name in render()} == render()


def test_dashboards_follow_the_json_model_with_stable_uids() -> None:
    boards = dashboards()
    assert {d["uid"] for d in boards.values()} == UIDS
    for board in boards.values():
        assert board["schemaVersion"] == 39 and board["title"].startswith("Sentiment / ")
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))
        for p in board["panels"]:
            assert p["type"] in {"timeseries", "heatmap", "state-timeline", "stat", "bargauge"}
            assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
            assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"])


def test_every_datasource_reference_is_the_provisioned_one() -> None:
    (source,) = provisioning("datasources/prometheus.yml")["datasources"]
    assert source["uid"] == DATASOURCE["uid"] and source["type"] == DATASOURCE["type"]
    for board in dashboards().values():
        refs = [p["datasource"] for p in board["panels"]]
        refs += [t["datasource"] for p in board["panels"] for t in p["targets"]]
        refs += [v["datasource"] for v in board["templating"]["list"]]
        assert all(r == DATASOURCE for r in refs), board["uid"]
    rules = provisioning("alerting/rules.yml")["groups"][0]["rules"]
    queries = [q for r in rules for q in r["data"] if q["datasourceUid"] != "__expr__"]
    assert queries and all(q["datasourceUid"] == DATASOURCE["uid"] for q in queries)


def test_provisioning_files_carry_the_fields_grafana_requires() -> None:
    for path in (
        "datasources/prometheus.yml",
        "dashboards/sentiment.yml",
        "alerting/rules.yml",
        "alerting/contact-points.yml",
        "alerting/policies.yml",
    ):
        assert provisioning(path)["apiVersion"] == 1, path
    (provider,) = provisioning("dashboards/sentiment.yml")["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"
    (group,) = provisioning("alerting/rules.yml")["groups"]
    (rule,) = group["rules"]
    assert {"orgId", "name", "folder", "interval"} <= group.keys()
    assert {"uid", "title", "condition", "data", "for", "noDataState", "execErrState"} <= rule.keys()
    assert rule["title"] == "SentimentDriftDetected" and rule["condition"] in {q["refId"] for q in rule["data"]}
    (contact,) = provisioning("alerting/contact-points.yml")["contactPoints"]
    (receiver,) = contact["receivers"]
    settings = receiver["settings"]
    assert receiver["type"] == "webhook" and settings["url"].endswith("/v1/webhooks/grafana")
    assert settings["authorization_scheme"] == "Bearer"
    # Secrets are environment references, never literals.
    assert settings["authorization_credentials"] == "$SENTIMENT_WEBHOOK_TOKEN"
    assert settings["hmacConfig"]["secret"] == "$SENTIMENT_GRAFANA_HMAC_SECRET"
    (policy,) = provisioning("alerting/policies.yml")["policies"]
    (route,) = policy["routes"]
    assert route["receiver"] == contact["name"]
    assert route["object_matchers"] == [["alertname", "=", "SentimentDriftDetected"]]


# -- every query against a real Prometheus scraping the real service ---------------------------------------


def substitute(expr: str) -> str:
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$__range", "10m")
        .replace("$route", ".*")
        .replace("$model_version", ".*")
    )


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, small_corpus: Any) -> Iterator[tuple[Service, Daemon]]:
    tmp = tmp_path_factory.mktemp("grafana_queries")
    from app.ml.train import train_and_register
    from tests.conftest import SMALL_PARAMS

    store = ModelRegistry(tmp / "model_store")
    train_and_register(store, small_corpus, SMALL_PARAMS, progress=False)
    service = start_service(
        store,
        tmp / "service.log",
        supervised=True,
        SENTIMENT_WEBHOOK_TOKEN=WEBHOOK_TOKEN,
        SENTIMENT_ADMIN_TOKEN=ADMIN_TOKEN,
        SENTIMENT_DRIFT_WINDOW_SIZE="100",
        SENTIMENT_DRIFT_CHECK_EVERY_PREDICTIONS="20",
        SENTIMENT_DRIFT_CHECK_INTERVAL_SECONDS="1",
        SENTIMENT_PREDICTION_LOG_FLUSH_SECONDS="0.2",
    )
    config = yaml.safe_load((REPO / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(REPO / "prometheus" / "rules" / "sentiment.rules.yml")]
    config.pop("alerting")
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [service.url.removeprefix("http://")]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = start_prometheus(tmp / "prometheus.yml", tmp)
    try:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            ids = [client.post("/v1/predict", json={"text": t}).json()["id"] for t in small_corpus.texts[:30]]
            for prediction_id in ids[:10]:
                client.post(
                    "/v1/feedback", json={"prediction_id": prediction_id, "label": "positive"}, headers=FEEDBACK
                )
            client.post("/v1/predict", json={"text": ""})  # a 422 among the statuses
            client.post("/v1/predict/batch", json={"texts": load_clothing().texts[:150]})
            client.post("/v1/retrain", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                jobs = client.get("/v1/retrain/jobs", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
                drift = client.get("/v1/drift").json()["current"]["status"]
                if jobs and jobs[0]["status"] != "running" and drift == "drift":
                    break
                time.sleep(0.5)
            for text in small_corpus.texts[30:60]:  # recent traffic for rate() windows
                client.post("/v1/predict", json={"text": text})
        prometheus.wait_for_scrapes(since=time.time(), count=3)
        yield service, prometheus
    finally:
        prometheus.stop()
        service.stop()


@pytest.mark.integration
@pytest.mark.parametrize(("where", "expr"), targets(), ids=[w for w, _ in targets()])
def test_every_dashboard_query_returns_data(live: tuple[Service, Daemon], where: str, expr: str) -> None:
    _, prometheus = live
    result = prometheus.get("/api/v1/query", query=substitute(expr))
    assert result["status"] == "success", result
    assert result["data"]["result"], f"{where}: no data for {expr}"  # type: ignore[index]


@pytest.mark.integration
def test_template_variables_have_values(live: tuple[Service, Daemon]) -> None:
    _, prometheus = live
    for board in dashboards().values():
        for var in board["templating"]["list"]:
            metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", var["definition"]).groups()  # type: ignore[union-attr]
            values = prometheus.get(f"/api/v1/label/{label}/values", **{"match[]": metric})["data"]
            assert values, var["name"]


@pytest.mark.integration
def test_grafana_alert_rule_queries_evaluate(live: tuple[Service, Daemon]) -> None:
    _, prometheus = live
    rules = provisioning("alerting/rules.yml")["groups"][0]["rules"]
    for query in [q for r in rules for q in r["data"] if q["datasourceUid"] != "__expr__"]:
        result = prometheus.get("/api/v1/query", query=query["model"]["expr"])
        assert result["status"] == "success" and result["data"]["result"], query  # type: ignore[index]
    # The traffic above was a drift: the rule's condition (A > 0) holds.
    (value,) = prometheus.get("/api/v1/query", query="max(sentiment_drift_detected)")["data"]["result"]  # type: ignore[index]
    assert float(value["value"][1]) == 1.0
