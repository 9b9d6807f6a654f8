"""Drift-detection quality on real data: false alarms on in-domain windows, power on real shifts.

A model is trained on half of Rotten Tomatoes; 1,000 rows of the other half are its drift reference (as
training stores it), and the remaining held-out rows are the in-domain pool. Windows are drawn without
replacement (within a window) from pools the model never fitted on:

- false-positive rate: in-domain windows of 500 (goal <= 5 % for the combined verdict at p = 0.05);
- power: tweets (positive and negative) and clothing reviews at windows of 200 and 500 (goal >= 95 %);
- label-prior shift: in-domain windows of 1,000 with 10 % and 90 % negative reviews (goal >= 90 %);
- power curve: 5/10/25/50 % clothing reviews mixed into in-domain windows of 500 (goal >= 90 % at 5 %).

Each test is reported alone at p = 0.05 and as part of the verdict (Bonferroni over four tests).
Usage: ``.venv/bin/python -m bench.drift_quality [--windows 100]``; writes ``bench/results/drift_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.ml.data import load_clothing, load_rotten_tomatoes, load_tweets
from app.ml.drift_reference import DRIFT_ARTIFACT, embed
from app.ml.registry import ModelRegistry
from app.ml.train import split_holdout, train_and_register
from app.monitoring.drift import TESTS, DriftDetector

RESULTS = Path(__file__).resolve().parent / "results"
ALPHA = 0.05


class Pool:
    """A corpus scored once: embeddings, lengths, confidence, P(positive), true labels."""

    def __init__(self, pipeline: Any, reducer: Any, texts: list[str], labels: np.ndarray) -> None:
        proba = pipeline.predict_proba(texts)[:, 1]
        self.embeddings = embed(pipeline, reducer, texts)
        self.lengths = np.array([len(t) for t in texts], dtype=np.float64)
        self.p_positive = proba
        self.confidence = np.maximum(proba, 1 - proba)
        self.labels = labels

    def take(self, index: np.ndarray) -> tuple[np.ndarray, ...]:
        return self.embeddings[index], self.lengths[index], self.confidence[index], self.p_positive[index]


def concat(*parts: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    return tuple(np.concatenate(arrays) for arrays in zip(*parts, strict=True))


def rates(detector: DriftDetector, windows: list[tuple[np.ndarray, ...]]) -> dict[str, float]:
    """Share of windows flagged by each test alone (at ALPHA) and by the combined verdict."""
    flagged = dict.fromkeys((*TESTS, "combined"), 0)
    for window in windows:
        result = detector.test(*window)
        for test, p in result.details["p_values"].items():
            flagged[test] += p < ALPHA
        flagged["combined"] += result.drift
    return {k: v / len(windows) for k, v in flagged.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=100, help="windows per scenario")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    rng = np.random.default_rng(0)
    corpus = load_rotten_tomatoes()
    with tempfile.TemporaryDirectory() as tmp:
        registry = ModelRegistry(Path(tmp))
        trained = train_and_register(registry, corpus, holdout_fraction=0.5, progress=False)
        model = registry.load(trained.version.version)
        reference = __import__("joblib").load(model.path / DRIFT_ARTIFACT)
    # The reference is 1,000 holdout rows; the rest of the holdout is the in-domain pool.
    _, holdout = split_holdout(corpus, 0.5, seed=0)
    reference_rows = set(np.random.default_rng(0).permutation(len(holdout))[: reference.size].tolist())
    rest = [i for i in range(len(holdout)) if i not in reference_rows]
    detector = DriftDetector(model.version, model.pipeline, reference, p_value=ALPHA, permutations=100, window_size=0)
    pools = {
        "in_domain": Pool(model.pipeline, reference.reducer, [holdout.texts[i] for i in rest], holdout.labels[rest]),
    }
    for name, loader in (("tweets", load_tweets), ("clothing", load_clothing)):
        data = loader()
        pools[name] = Pool(model.pipeline, reference.reducer, data.texts, data.labels)
    print(
        f"model {model.version}: holdout {len(holdout)}, reference {reference.size}, in-domain pool {len(rest)}; "
        f"scored pools in {time.time() - started:.0f} s",
        flush=True,
    )

    def sample(pool: str, n: int, among: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        candidates = among if among is not None else np.arange(len(pools[pool].lengths))
        return pools[pool].take(rng.choice(candidates, n, replace=False))

    results: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "windows_per_scenario": args.windows,
        "alpha": ALPHA,
        "reference_size": reference.size,
        "in_domain_pool": len(rest),
    }
    n = args.windows
    results["false_positive_rate_500"] = rates(detector, [sample("in_domain", 500) for _ in range(n)])
    print("FPR (in-domain, 500)", results["false_positive_rate_500"], flush=True)
    for domain in ("tweets", "clothing"):
        for size in (200, 500):
            key = f"power_{domain}_{size}"
            results[key] = rates(detector, [sample(domain, size) for _ in range(n)])
            print(key, results[key], flush=True)
    negatives = np.flatnonzero(pools["in_domain"].labels == 0)
    positives = np.flatnonzero(pools["in_domain"].labels == 1)
    for share in (0.1, 0.9):
        key = f"power_label_prior_{int(share * 100)}pct_negative_1000"
        k = round(1000 * share)
        results[key] = rates(
            detector,
            [concat(sample("in_domain", k, negatives), sample("in_domain", 1000 - k, positives)) for _ in range(n)],
        )
        print(key, results[key], flush=True)
    for share in (0.05, 0.10, 0.25, 0.50):
        key = f"power_clothing_mix_{int(share * 100)}pct_500"
        k = round(500 * share)
        results[key] = rates(detector, [concat(sample("clothing", k), sample("in_domain", 500 - k)) for _ in range(n)])
        print(key, results[key], flush=True)
    results["seconds"] = round(time.time() - started)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "drift_quality.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"done in {results['seconds']} s; wrote bench/results/drift_quality.json")


if __name__ == "__main__":
    main()
