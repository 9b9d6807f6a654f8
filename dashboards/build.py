"""Grafana dashboards as code: ``python -m dashboards.build`` writes ``dashboards/json/*.json``.

Plain dashboard JSON model (schemaVersion 39, Grafana 11/12), stable uids, every panel on the provisioned
Prometheus datasource (uid ``sentiment-prometheus``). tests/dashboards checks the committed files equal
this output and evaluates every query against a real Prometheus scraping the real service.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "json"
DATASOURCE = {"type": "prometheus", "uid": "sentiment-prometheus"}
SCHEMA_VERSION = 39


def target(expr: str, legend: str = "", ref: str = "A", fmt: str | None = None) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend or "__auto", "refId": ref}
    if fmt:
        t["format"] = fmt
    return t


def panel(
    title: str,
    targets: list[dict[str, Any]],
    kind: str = "timeseries",
    unit: str = "short",
    description: str = "",
    *,
    defaults: dict[str, Any] | None = None,
    overrides: list[dict[str, Any]] | None = None,
    **options: Any,
) -> dict[str, Any]:
    p: dict[str, Any] = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit, **(defaults or {})}, "overrides": overrides or []},
        "options": options,
    }
    return p


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "definition": query,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "refresh": 2,
        "sort": 1,
    }


def dashboard(
    uid: str,
    title: str,
    description: str,
    rows: list[list[dict[str, Any]]],
    variables: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    panels, y, next_id = [], 0, 1
    for row in rows:
        width = 24 // len(row)
        for i, p in enumerate(row):
            panels.append({**p, "id": next_id, "gridPos": {"h": 8, "w": width, "x": i * width, "y": y}})
            next_id += 1
        y += 8
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["sentiment"],
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "timezone": "browser",
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": variables or []},
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


RATE = "$__rate_interval"
ROUTE = 'route=~"$route"'
VERSION = 'model_version=~"$model_version"'
ESTIMATED = "sentiment_estimated_accuracy"


def quantiles(metric: str, selector: str) -> list[dict[str, Any]]:
    return [
        target(
            f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"p{int(q * 100)}",
            ref,
        )
        for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))
    ]


SERVICE = dashboard(
    "sentiment-service",
    "Sentiment / Service",
    "Traffic, errors and latency of the HTTP API.",
    [
        [
            panel(
                "Request rate by route and status",
                [
                    target(
                        f"sum by (route, status) (rate(sentiment_request_duration_seconds_count{{{ROUTE}}}[{RATE}]))",
                        "{{route}} {{status}}",
                    )
                ],
                unit="reqps",
            ),
            panel(
                "5xx error ratio",
                [
                    target(
                        f'(sum(rate(sentiment_request_duration_seconds_count{{status=~"5..", {ROUTE}}}[{RATE}]))'
                        " or vector(0))"
                        f" / sum(rate(sentiment_request_duration_seconds_count{{{ROUTE}}}[{RATE}]))",
                        "5xx share",
                    )
                ],
                unit="percentunit",
                description="Client errors (4xx) are the client's and not counted.",
            ),
        ],
        [
            panel("Latency p50 / p95 / p99", quantiles("sentiment_request_duration_seconds", ROUTE), unit="s"),
            panel(
                "Latency heatmap",
                [
                    target(
                        f"sum by (le) (increase(sentiment_request_duration_seconds_bucket{{{ROUTE}}}[{RATE}]))",
                        "{{le}}",
                        fmt="heatmap",
                    )
                ],
                kind="heatmap",
                unit="s",
                calculate=False,
                yAxis={"unit": "s"},
            ),
        ],
        [
            panel(
                "Inference latency (one model call) p50 / p95 / p99",
                quantiles("sentiment_inference_duration_seconds", ""),
                unit="s",
            ),
            panel(
                "In-flight work",
                [
                    target("sum(sentiment_requests_in_progress)", "requests in progress"),
                    target("max(sentiment_retrain_in_progress)", "retrain running", "B"),
                ],
                unit="short",
            ),
        ],
    ],
    [variable("route", "Route", "label_values(sentiment_request_duration_seconds_count, route)")],
)

MODEL = dashboard(
    "sentiment-model",
    "Sentiment / Model",
    "What the model predicts, how sure it is, and how right.",
    [
        [
            panel(
                "Confidence distribution",
                [
                    target(
                        f"sum by (le) (increase(sentiment_prediction_confidence_bucket{{{VERSION}}}[{RATE}]))",
                        "{{le}}",
                        fmt="heatmap",
                    )
                ],
                kind="heatmap",
                unit="percentunit",
                calculate=False,
            ),
            panel(
                "Mean confidence over the drift window",
                [target("max(sentiment_confidence_mean)", "mean confidence")],
                unit="percentunit",
            ),
        ],
        [
            panel(
                "Sentiment mix by model version",
                [
                    target(
                        f"sum by (model_version, sentiment) (rate(sentiment_predictions_total{{{VERSION}}}[{RATE}]))",
                        "{{model_version}} {{sentiment}}",
                    )
                ],
                unit="reqps",
            ),
            panel(
                "Current model version",
                [target("max by (version) (sentiment_model_info) == 1", "{{version}}")],
                kind="state-timeline",
                description="1 while live workers serve the version.",
            ),
        ],
        [
            panel(
                "Accuracy: realised on feedback, estimated from confidence (95 % band)",
                [
                    target("max(sentiment_live_accuracy)", "realised (feedback)"),
                    target(f"max by (model_version) ({ESTIMATED}{{{VERSION}}})", "{{model_version}} estimated", "B"),
                    target(
                        f"max by (model_version) ({ESTIMATED}_lower{{{VERSION}}})", "{{model_version}} band low", "C"
                    ),
                    target(
                        f"max by (model_version) ({ESTIMATED}_upper{{{VERSION}}})", "{{model_version}} band high", "D"
                    ),
                ],
                unit="percentunit",
                description="Realised: accuracy over the latest labelled predictions. Estimated: the drift window's "
                "mean confidence, the accuracy it has if the model's probabilities are calibrated on this traffic; "
                "the band is where the realised accuracy of the window should fall. A concept shift breaks "
                "calibration: the estimate then stays high while the realised accuracy falls.",
                overrides=[
                    {
                        "matcher": {"id": "byRegexp", "options": "/band/"},
                        "properties": [
                            {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [4, 4]}},
                            {"id": "custom.lineWidth", "value": 1},
                        ],
                    }
                ],
            ),
            panel(
                "Estimated accuracy below the version's reference (points)",
                [
                    target(
                        f"(max by (model_version) ({ESTIMATED}_reference{{{VERSION}}})"
                        f" - max by (model_version) ({ESTIMATED}{{{VERSION}}})) * 100",
                        "{{model_version}}",
                    )
                ],
                unit="none",
                description="The drift window's estimate against the same estimate on the version's held-out "
                "reference. SentimentEstimatedAccuracyDrop fires when its 10-minute average stays at 2.5 points or "
                "more for 15 minutes. Real drops measured up to 3 times larger (bench/estimated_accuracy.py).",
                defaults={
                    "custom": {"thresholdsStyle": {"mode": "line"}},
                    "thresholds": {
                        "mode": "absolute",
                        "steps": [{"color": "green", "value": None}, {"color": "red", "value": 2.5}],
                    },
                },
            ),
        ],
        [
            panel(
                "Feedback rate by true label",
                [target(f"sum by (sentiment) (rate(sentiment_feedback_total[{RATE}]))", "{{sentiment}}")],
                unit="reqps",
            ),
        ],
    ],
    [variable("model_version", "Model version", "label_values(sentiment_predictions_total, model_version)")],
)

DRIFT = dashboard(
    "sentiment-drift",
    "Sentiment / Drift",
    "The drift monitor: MMD and the univariate tests on the live window.",
    [
        [
            panel(
                "MMD score and threshold",
                [
                    target("max(sentiment_drift_score)", "MMD distance"),
                    target("max(sentiment_drift_threshold)", "rejects above", "B"),
                ],
            ),
            panel("MMD p-value", [target("min(sentiment_drift_p_value)", "p-value")], unit="none"),
        ],
        [
            panel(
                "Drift detected (combined verdict)",
                [target("max(sentiment_drift_detected)", "drift")],
                kind="state-timeline",
            ),
            panel(
                "Test p-values (mmd, length, length tail, confidence, label mix)",
                [target("min by (test) (sentiment_drift_test_p_value)", "{{test}}")],
                unit="none",
                description="The verdict is drift when any is below the corrected level (0.01 by default).",
            ),
        ],
        [
            panel("Window fill", [target("max(sentiment_drift_window_size)", "predictions in window")]),
            panel(
                "Drift checks by outcome and duration",
                [
                    target(f"sum by (outcome) (rate(sentiment_drift_checks_total[{RATE}]))", "{{outcome}}"),
                    target(
                        "histogram_quantile(0.9, sum by (le) "
                        f"(rate(sentiment_drift_check_duration_seconds_bucket[{RATE}])))",
                        "p90 check seconds",
                        "B",
                    ),
                ],
            ),
        ],
        [
            panel(
                "Time since the last completed drift check",
                [target("time() - max(sentiment_drift_last_check_timestamp_seconds)", "age")],
                kind="stat",
                unit="s",
                description="The drift gauges above keep their last value when the monitor stops; this does not. "
                "Decades mean no check since the service started. SentimentDriftChecksStale fires past 15 minutes "
                "while predictions arrive.",
            ),
            panel(
                "Monitor restarts and predictions the monitor never saw (1 h)",
                [
                    target(
                        'sum(increase(sentiment_supervised_restarts_total{process="monitor"}[1h]))', "monitor restarts"
                    ),
                    target(
                        "sum by (reason) (increase(sentiment_prediction_log_dropped_total[1h]))",
                        "dropped: {{reason}}",
                        "B",
                    ),
                ],
                description="Restarts by app.supervisor; predictions lost before the prediction log, by reason.",
            ),
        ],
        [
            panel(
                "Drift monitor CPU (seconds per minute)",
                [
                    target(
                        f"sum by (instance) (rate(sentiment_drift_monitor_cpu_seconds_total[{RATE}])) * 60",
                        "{{instance}}",
                    )
                ],
                description="CPU seconds the drift monitor processes (leading or waiting) used per minute: 60 is one "
                "core. Checks stay within SENTIMENT_DRIFT_MAX_CPU_SHARE of a core (30 at the default 0.5).",
            ),
            panel(
                "Least time between drift check starts",
                [target("max(sentiment_drift_check_min_interval_seconds)", "minimum gap")],
                unit="s",
                description="SENTIMENT_DRIFT_MIN_CHECK_INTERVAL_SECONDS, or the last check's CPU seconds over "
                "SENTIMENT_DRIFT_MAX_CPU_SHARE when longer (the budget is what spaces checks out). 0 before the first.",
            ),
        ],
    ],
)

RETRAINING = dashboard(
    "sentiment-retraining",
    "Sentiment / Retraining",
    "Guarded retrains: outcomes, durations, promotions.",
    [
        [
            panel(
                "Retrains by outcome (range)",
                [target("sum by (outcome) (increase(sentiment_retrain_total[$__range]))", "{{outcome}}")],
                kind="bargauge",
            ),
            panel("Retrain running", [target("max(sentiment_retrain_in_progress)", "running")], kind="state-timeline"),
        ],
        [
            panel(
                "Promotions, rejections and automatic rollbacks",
                [
                    target(
                        'sum(increase(sentiment_retrain_total{outcome="promoted"}[$__range])) or vector(0)', "promoted"
                    ),
                    target(
                        'sum(increase(sentiment_retrain_total{outcome="rejected"}[$__range])) or vector(0)',
                        "rejected",
                        "B",
                    ),
                    target(
                        "sum(increase(sentiment_model_rollbacks_total[$__range])) or vector(0)",
                        "rolled back by the watch",
                        "C",
                    ),
                ],
                kind="stat",
                description="Rejected: by the gate or the shadow. Rolled back: promotions the drift monitor's "
                "promotion watch undid (GET /v1/models/{version}/events says why).",
            ),
            panel(
                "Retrain duration",
                [
                    target(
                        f"sum(rate(sentiment_retrain_duration_seconds_sum[{RATE}])) / "
                        f"sum(rate(sentiment_retrain_duration_seconds_count[{RATE}]))",
                        "mean seconds",
                    ),
                    target(
                        "max(sentiment_retrain_duration_seconds_sum) / max(sentiment_retrain_duration_seconds_count)",
                        "mean since start",
                        "B",
                    ),
                ],
                unit="s",
            ),
        ],
    ],
)

DASHBOARDS = {"service": SERVICE, "model": MODEL, "drift": DRIFT, "retraining": RETRAINING}


def render() -> dict[str, str]:
    return {f"{name}.json": json.dumps(d, indent=2, sort_keys=True) + "\n" for name, d in DASHBOARDS.items()}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote dashboards/json/{name}")


if __name__ == "__main__":
    main()
