"""Label-free accuracy estimation on real data: estimated against realised accuracy, window by window.

The project's default model (``train_and_register``: default kind and parameters, sigmoid calibration on
5 internal folds) is trained on half of Rotten Tomatoes, as in ``bench/drift_quality.py``: 1,000 rows of the
other half are its drift reference (as training stores it) and the remaining held-out rows are the in-domain
pool. Windows of 500 rows are drawn without replacement (within a window) from pools the model never fitted on:

- in-domain: the held-out pool (goal: mean absolute error <= 2 points);
- shifts: tweets (positive and negative), clothing reviews (ratings 1-2 vs 4-5), reported whatever they are;
- a label-prior shift: in-domain windows of 90 % negative reviews (calibration was fitted at the training prior).

Per window: the estimate and 95 % band of :func:`app.monitoring.performance.estimate_accuracy`, the realised
accuracy from the true labels, and the error (estimated minus realised). Per scenario: mean signed error, mean
and worst absolute error, band coverage (share of windows whose realised accuracy lies in the band), and the
drop below the reference estimate (:func:`~app.monitoring.performance.reference_estimate`), with how often it
crosses 2 to 5 points (in-domain: false triggers of "drift AND an estimated drop"). The same windows are
scored by two other probability sources to show what calibration buys: the same pipeline without calibration
(``calibration_folds=0``) and the default model with Platt scaling fitted on the 1,000 reference rows.

Usage: ``.venv/bin/python -m bench.estimated_accuracy [--windows 100]``; writes
``bench/results/estimated_accuracy.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from app.ml.data import load_clothing, load_rotten_tomatoes, load_tweets
from app.ml.drift_reference import load_reference
from app.ml.evaluate import expected_calibration_error
from app.ml.model import DEFAULT_KIND, build_model, decide
from app.ml.pipeline import ModelParams
from app.ml.registry import ModelRegistry
from app.ml.train import split_holdout, train_and_register
from app.monitoring.performance import AccuracyEstimate, estimate_accuracy, estimated_drop, reference_estimate
from bench.output import write_results

WINDOW = 500
HOLDOUT_FRACTION = 0.5
DROP_POINTS = (2, 2.5, 3, 4, 5)
GOAL_POINTS = 2.0


class Scored:
    """A pool of texts scored once by every probability source, with its true labels."""

    def __init__(self, labels: NDArray[np.int64], p_positive: dict[str, NDArray[np.float64]]) -> None:
        self.labels = labels
        self.p_positive = p_positive

    def __len__(self) -> int:
        return len(self.labels)


def platt(p_positive: NDArray[np.float64], labels: NDArray[np.int64]) -> Callable[[NDArray[np.float64]], Any]:
    """Platt scaling fitted on held-out rows: a logistic regression on the logit of the model's P(positive)."""

    def logit(p: NDArray[np.float64]) -> NDArray[np.float64]:
        q = np.clip(p, 1e-6, 1 - 1e-6)
        return np.log(q / (1 - q)).reshape(-1, 1)

    scaler = LogisticRegression(C=1e6).fit(logit(p_positive), labels)
    return lambda p: np.asarray(scaler.predict_proba(logit(p))[:, 1], dtype=np.float64)


def window_figures(p: NDArray[np.float64], labels: NDArray[np.int64]) -> tuple[AccuracyEstimate, float]:
    """The estimate of one window and its realised accuracy."""
    return estimate_accuracy(p), float((decide(p) == labels).mean())


def summarise(
    estimates: list[AccuracyEstimate], realised: list[float], reference: AccuracyEstimate, holdout_realised: float
) -> dict[str, Any]:
    """Error, coverage and drop figures of one scenario's windows (accuracies as shares, errors in points).

    The estimated drop is below the reference estimate (what the monitor compares with); the realised drop is
    below the realised accuracy on the whole holdout (the reference's 1,000 rows alone are a noisy sample).
    """
    est = np.array([e.estimate for e in estimates])
    real = np.array(realised)
    error = (est - real) * 100
    covered = [e.low <= r <= e.high for e, r in zip(estimates, realised, strict=True)]
    drop = np.array([estimated_drop(e, reference) for e in estimates]) * 100
    realised_drop = (holdout_realised - real) * 100
    return {
        "windows": len(estimates),
        "estimated_mean": round(float(est.mean()), 4),
        "estimated_std_points": round(float(est.std()) * 100, 2),
        "realised_mean": round(float(real.mean()), 4),
        "error_mean_points": round(float(error.mean()), 2),
        "abs_error_mean_points": round(float(np.abs(error).mean()), 2),
        "abs_error_worst_points": round(float(np.abs(error).max()), 2),
        "band_coverage": round(float(np.mean(covered)), 3),
        "band_half_width_mean_points": round(float(np.mean([(e.high - e.low) / 2 for e in estimates])) * 100, 2),
        "estimated_drop_mean_points": round(float(drop.mean()), 2),
        "estimated_drop_worst_points": round(float(drop.max()), 2),
        "realised_drop_mean_points": round(float(realised_drop.mean()), 2),
        "estimated_drop_at_least": {f"{k}_points": round(float(np.mean(drop >= k)), 3) for k in DROP_POINTS},
        "realised_drop_at_least": {f"{k}_points": round(float(np.mean(realised_drop >= k)), 3) for k in DROP_POINTS},
    }


def pool_figures(pool: Scored, source: str) -> dict[str, float]:
    """The whole pool at once: estimate, realised accuracy and ECE (no window sampling noise)."""
    p = pool.p_positive[source]
    estimate, realised = window_figures(p, pool.labels)
    return {
        "rows": len(pool),
        "estimated": round(estimate.estimate, 4),
        "realised": round(realised, 4),
        "error_points": round((estimate.estimate - realised) * 100, 2),
        "ece": round(expected_calibration_error(pool.labels, p), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=100, help="windows per scenario")
    args = parser.parse_args()
    threadpool_limits(1)  # one compute thread, as in the drift monitor
    started = time.time()
    corpus = load_rotten_tomatoes()
    with tempfile.TemporaryDirectory() as tmp:
        registry = ModelRegistry(Path(tmp) / "store")
        trained = train_and_register(registry, corpus, holdout_fraction=HOLDOUT_FRACTION, progress=False)
        loaded = registry.load(trained.version.version)
        reference = load_reference(loaded)
    model = loaded.model
    fit, holdout = split_holdout(corpus, HOLDOUT_FRACTION, seed=0)
    # The drift reference is these holdout rows (app.ml.train.holdout_reference); the rest is the in-domain pool.
    reference_rows = np.random.default_rng(0).permutation(len(holdout))[: reference.size]
    rest = np.setdiff1d(np.arange(len(holdout)), reference_rows)
    reference_texts = [holdout.texts[i] for i in reference_rows]
    reference_labels = holdout.labels[reference_rows]
    reference_p = model.p_positive(reference_texts)
    assert np.allclose(np.maximum(reference_p, 1 - reference_p), reference.confidence), "reference rows differ"
    print(f"model {loaded.version} trained in {time.time() - started:.0f} s; scoring pools", flush=True)

    uncalibrated = build_model(DEFAULT_KIND, ModelParams(calibration_folds=0).to_dict()).fit(fit.texts, fit.labels)
    rescale = platt(reference_p, reference_labels)

    def score(texts: list[str]) -> dict[str, NDArray[np.float64]]:
        p = model.p_positive(texts)
        return {"default": p, "uncalibrated": uncalibrated.p_positive(texts), "platt_on_holdout": rescale(p)}

    tweets, clothing = load_tweets(), load_clothing()
    pools = {
        name: Scored(labels, score(texts))
        for name, (texts, labels) in {
            "in_domain": ([holdout.texts[i] for i in rest], holdout.labels[rest]),
            "tweets": (tweets.texts, tweets.labels),
            "clothing": (clothing.texts, clothing.labels),
            "reference": (reference_texts, reference_labels),
        }.items()
    }
    sources = tuple(pools["reference"].p_positive)
    print(f"scored {', '.join(f'{k} {len(v)}' for k, v in pools.items())} in {time.time() - started:.0f} s")

    rng = np.random.default_rng(0)
    in_domain = pools["in_domain"]
    negatives, positives = np.flatnonzero(in_domain.labels == 0), np.flatnonzero(in_domain.labels == 1)

    def negative_heavy() -> tuple[str, NDArray[np.int64]]:
        k = WINDOW * 9 // 10
        picked = [rng.choice(negatives, k, replace=False), rng.choice(positives, WINDOW - k, replace=False)]
        return "in_domain", np.concatenate(picked)

    draws: dict[str, Callable[[], tuple[str, NDArray[np.int64]]]] = {
        "in_domain": lambda: ("in_domain", rng.choice(len(in_domain), WINDOW, replace=False)),
        "tweets": lambda: ("tweets", rng.choice(len(pools["tweets"]), WINDOW, replace=False)),
        "clothing": lambda: ("clothing", rng.choice(len(pools["clothing"]), WINDOW, replace=False)),
        "label_prior_90pct_negative": negative_heavy,
    }
    windows = {scenario: [draw() for _ in range(args.windows)] for scenario, draw in draws.items()}

    results: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "windows_per_scenario": args.windows,
        "window_size": WINDOW,
        "goal_abs_error_mean_points": GOAL_POINTS,
        "model": {
            "version": loaded.version,
            "kind": loaded.metadata["model"]["kind"],
            "calibration": f"sigmoid, {ModelParams().calibration_folds} internal folds",
            "fit_rows": len(fit),
            "holdout_rows": len(holdout),
            "holdout_accuracy": round(trained.report["accuracy"], 4),
            "holdout_ece": round(trained.report["ece"], 4),
        },
        "reference_size": reference.size,
        "in_domain_pool": len(rest),
        "sources": {},
    }
    for source in sources:
        ref_p = pools["reference"].p_positive[source]
        # The stored reference is the default model's; the other sources are estimated on the same rows.
        ref_estimate = reference_estimate(reference) if source == "default" else estimate_accuracy(ref_p)
        ref_realised = float((decide(ref_p) == reference_labels).mean())
        holdout_labels = np.concatenate([pools["reference"].labels, pools["in_domain"].labels])
        holdout_p = np.concatenate([ref_p, pools["in_domain"].p_positive[source]])
        holdout_realised = float((decide(holdout_p) == holdout_labels).mean())
        per_scenario = {}
        for scenario, drawn in windows.items():
            figures = [
                window_figures(pools[pool].p_positive[source][index], pools[pool].labels[index])
                for pool, index in drawn
            ]
            per_scenario[scenario] = summarise(
                [e for e, _ in figures], [r for _, r in figures], ref_estimate, holdout_realised
            )
        results["sources"][source] = {
            "reference": {"estimated": round(ref_estimate.estimate, 4), "realised": round(ref_realised, 4)},
            "holdout_realised": round(holdout_realised, 4),
            "pools": {name: pool_figures(pool, source) for name, pool in pools.items()},
            "windows": per_scenario,
        }
    # The estimate's own cost: one window of WINDOW predictions (it runs once per drift check).
    p = pools["in_domain"].p_positive["default"][:WINDOW]
    timer = time.perf_counter()
    for _ in range(1000):
        estimate_accuracy(p)
    results["seconds_per_estimate"] = round((time.perf_counter() - timer) / 1000, 7)
    default = results["sources"]["default"]["windows"]["in_domain"]
    results["goal_met"] = default["abs_error_mean_points"] <= GOAL_POINTS
    results["seconds"] = round(time.time() - started)
    write_results("estimated_accuracy", results)
    print_table(results)
    print(f"done in {results['seconds']} s; wrote bench/results/estimated_accuracy.json")


def print_table(results: dict[str, Any]) -> None:
    columns = ("estimated", "realised", "err mean", "|err| mean", "|err| worst", "in band", "drop mean", "drop max")
    print(f"{'source / scenario (errors and drops in points)':50}" + "".join(f"{c:>12}" for c in columns))
    for source, found in results["sources"].items():
        for scenario, s in found["windows"].items():
            cells = (
                f"{s['estimated_mean']:.3f}",
                f"{s['realised_mean']:.3f}",
                f"{s['error_mean_points']:+.2f}",
                f"{s['abs_error_mean_points']:.2f}",
                f"{s['abs_error_worst_points']:.2f}",
                f"{s['band_coverage']:.0%}",
                f"{s['estimated_drop_mean_points']:+.2f}",
                f"{s['estimated_drop_worst_points']:+.2f}",
            )
            print(f"{source + ' / ' + scenario:50}" + "".join(f"{c:>12}" for c in cells))


if __name__ == "__main__":
    main()
