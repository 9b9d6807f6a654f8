"""The loop, end to end, with the real thing: drift -> Prometheus alert -> Alertmanager -> webhook -> retrain
-> promotion -> every worker serves the new model -> the alert resolves, under load, with no failed request.

Prometheus and Alertmanager are Debian's, on free loopback ports with their own data folders. Intervals are
shortened (scrape and evaluation 1 s, the drift rule's ``for`` 15 s, drift window 200, Alertmanager's
repeat_interval 1 minute) so the test takes about two minutes instead of the production half hour, and the
gate may lose 3 points on the base holdout instead of 1 (see the service's settings below).
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from app.ml.data import load_tweets
from app.ml.labels import LABELS
from app.ml.registry import REFERENCE_ARTIFACT, ModelRegistry
from app.retrain.job import balanced
from tests.integration.services import (
    REPO,
    Daemon,
    Service,
    start_alertmanager,
    start_prometheus,
    start_service,
    wait_for,
)

pytestmark = pytest.mark.integration

TOKEN = "e2e-webhook-token"
ADMIN = "e2e-admin-token"
FEEDBACK_TOKEN = "e2e-feedback-token"


class Load:
    """Steady background traffic; after ``switch()``, tweets whose true labels come back as feedback."""

    def __init__(self, url: str, in_domain: list[str], tweets: list[tuple[str, int]], rate: float) -> None:
        self.url, self.in_domain, self.tweets, self.rate = url, in_domain, tweets, rate
        self.shifted = False
        self.stopping = threading.Event()
        self.requests = 0
        self.failures: list[str] = []
        self.labels_sent = 0
        self.versions: list[str] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        feedback_auth = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}
        with httpx.Client(base_url=self.url, timeout=30) as client:
            i = 0
            begin = time.monotonic()
            while not self.stopping.is_set():
                delay = begin + i / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                try:
                    if self.shifted:
                        text, label = self.tweets[i % len(self.tweets)]
                    else:
                        text, label = self.in_domain[i % len(self.in_domain)], None
                    response = client.post("/v1/predict", json={"text": text})
                    self.requests += 1
                    if response.status_code != 200:
                        self.failures.append(f"predict {response.status_code}: {response.text[:200]}")
                    else:
                        self.versions.append(response.json()["model_version"])
                        if label is not None:
                            feedback = client.post(
                                "/v1/feedback",
                                json={"prediction_id": response.json()["id"], "label": LABELS[label]},
                                headers=feedback_auth,
                            )
                            self.requests += 1
                            if feedback.status_code != 200:
                                self.failures.append(f"feedback {feedback.status_code}: {feedback.text[:200]}")
                            else:
                                self.labels_sent += 1
                except httpx.HTTPError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                i += 1


def firing(prometheus: Daemon, name: str) -> list[dict[str, Any]]:
    alerts = prometheus.get("/api/v1/alerts")["data"]["alerts"]  # type: ignore[index]
    return [a for a in alerts if a["labels"]["alertname"] == name and a["state"] == "firing"]


def configure(service: Service, tmp_path: Path, token_file: Path) -> tuple[Path, Path]:
    """The repository's Prometheus and Alertmanager files, pointed at this run's processes."""
    rules = yaml.safe_load((REPO / "prometheus" / "rules" / "sentiment.rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == "SentimentDriftDetected":
                rule["for"] = "15s"
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    alertmanager = yaml.safe_load((REPO / "prometheus" / "alertmanager.yml").read_text())
    alertmanager["route"].update(group_wait="1s", group_interval="2s", repeat_interval="1m")
    hook = alertmanager["receivers"][1]["webhook_configs"][0]
    hook["url"] = f"{service.url}/v1/webhooks/alertmanager"
    hook["http_config"]["authorization"]["credentials_file"] = str(token_file)
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(alertmanager))
    return tmp_path / "rules.yml", tmp_path / "alertmanager.yml"


def prometheus_config(tmp_path: Path, rules: Path, service: Service, alertmanager: Daemon) -> Path:
    config = yaml.safe_load((REPO / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(rules)]
    config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [alertmanager.url.removeprefix("http://")]
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [service.url.removeprefix("http://")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    return tmp_path / "prometheus.yml"


def test_drift_alert_retrains_promotes_and_resolves_without_a_failed_request(
    full_store: tuple[Path, str], tmp_path: Path
) -> None:
    root = tmp_path / "model_store"
    shutil.copytree(full_store[0], root)
    store = ModelRegistry(root)
    original = full_store[1]
    token_file = tmp_path / "webhook_token"
    token_file.write_text(TOKEN + "\n")
    feedback_tokens = tmp_path / "feedback_token"
    feedback_tokens.write_text(f"e2e-labeller:{FEEDBACK_TOKEN}\nunused:another-feedback-token\n")
    service = start_service(
        store,
        tmp_path / "service.log",
        supervised=True,
        SENTIMENT_WEBHOOK_TOKEN_FILE=str(token_file),
        SENTIMENT_ADMIN_TOKEN=ADMIN,
        SENTIMENT_FEEDBACK_TOKEN_FILE=str(feedback_tokens),
        SENTIMENT_DRIFT_WINDOW_SIZE="200",
        SENTIMENT_DRIFT_CHECK_EVERY_PREDICTIONS="50",
        SENTIMENT_DRIFT_CHECK_INTERVAL_SECONDS="2",
        SENTIMENT_DRIFT_STATUS_REFRESH_SECONDS="0.5",
        SENTIMENT_PREDICTION_LOG_FLUSH_SECONDS="0.2",
        SENTIMENT_RETRAIN_COOLDOWN_SECONDS="0",
        # The loop under test, not the margin: this test's model (3 calibration folds) loses 0.6-1.3 points
        # on the base holdout to tweet feedback, so at the default 1 point the gate rejected every retrain
        # of one CI run. docs/design.md "Known limits" has the figures.
        SENTIMENT_RETRAIN_PROMOTION_MARGIN="0.03",
    )
    daemons: list[Daemon] = []
    load: Load | None = None
    try:
        rules, am_config = configure(service, tmp_path, token_file)
        alertmanager = start_alertmanager(am_config, tmp_path)
        daemons.append(alertmanager)
        prometheus = start_prometheus(prometheus_config(tmp_path, rules, service, alertmanager), tmp_path)
        daemons.append(prometheus)

        model = store.load(original)
        in_domain = model.read_json(REFERENCE_ARTIFACT)["texts"]
        tweets = load_tweets()
        order = np.random.default_rng(0).permutation(len(tweets))
        traffic = [(tweets.texts[i], int(tweets.labels[i])) for i in order[:10000]]  # no tweet comes twice
        held_out = tweets.subset(order[10000:12000])

        # 1. Steady in-domain load: no alert.
        load = Load(service.url, in_domain, traffic, rate=30)
        load.thread.start()
        time.sleep(25)
        assert wait_for(lambda: prometheus.get("/api/v1/targets")["data"]["activeTargets"][0]["health"] == "up", 10)
        assert not firing(prometheus, "SentimentDriftDetected")
        drift = httpx.get(f"{service.url}/v1/drift").json()["current"]
        assert drift["status"] == "no_drift", drift

        # 2-3. Tweets with their true labels: drift -> alert -> webhook -> retrain -> promotion -> all workers.
        switched = time.monotonic()
        load.shifted = True
        assert wait_for(lambda: firing(prometheus, "SentimentDriftDetected"), 120), "drift alert never fired"
        fired_after = time.monotonic() - switched

        def new_version_everywhere() -> str | None:
            current = store.current_version()
            if current == original:
                return None
            recent = load.versions[-60:]
            swapped = {
                e["pid"]
                for e in service.logs()
                if e.get("event") == "model_swapped" and e.get("model_version") == current
            }
            return current if recent and set(recent) == {current} and len(swapped) == 2 else None

        promoted = wait_for(new_version_everywhere, 240)
        serving_after = time.monotonic() - switched
        jobs = httpx.get(f"{service.url}/v1/retrain/jobs", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        assert promoted, f"no promoted version served; jobs: {jobs}"
        assert [j["outcome"] for j in jobs if j["candidate_version"] == promoted] == ["promoted"]
        (promoting,) = [j for j in jobs if j["candidate_version"] == promoted]
        assert list(promoting["details"]["feedback"]["sources"]) == ["e2e-labeller"]  # labels carry their token
        assert jobs[-1]["trigger"] == "alertmanager"

        # 4. Better on held-out tweets; the alert resolves.
        before, after = (balanced(store.load(v).model, held_out) for v in (original, promoted))
        assert after > before + 0.05, (before, after)
        assert wait_for(lambda: not firing(prometheus, "SentimentDriftDetected"), 120), "drift alert never resolved"
        resolved_after = time.monotonic() - switched
        print(
            f"\nalert fired {fired_after:.0f} s after the switch; new version served by every worker after "
            f"{serving_after:.0f} s; alert resolved after {resolved_after:.0f} s; held-out tweets balanced accuracy "
            f"{before:.3f} -> {after:.3f}; {load.labels_sent} labels sent"
        )
        assert serving_after <= 240
    finally:
        if load is not None:
            load.stopping.set()
            load.thread.join(30)
        for daemon in daemons:
            daemon.stop()
        service.stop()
    # 5. Not one failed request in the background load during the whole flow.
    assert load is not None and load.requests > 1000
    assert load.failures == []
