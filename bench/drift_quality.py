"""Drift-detection quality on real data: false alarms on in-domain windows, power on real shifts.

A model is trained on half of Rotten Tomatoes; 1,000 rows of the other half are its drift reference (as
training stores it), and the remaining held-out rows are the in-domain pool. Windows are drawn without
replacement (within a window) from pools the model never fitted on:

- false-positive rate: in-domain windows of 500 (goal <= 5 % for the combined verdict at p = 0.05);
- power: tweets (positive and negative) and clothing reviews at windows of 200 and 500 (goal >= 95 %);
- label-prior shift: in-domain windows of 1,000 with 10 % and 90 % negative reviews (goal >= 90 %);
- power curve: 5/10/25/50 % clothing reviews mixed into in-domain windows of 500 (goal >= 90 % at 5 %).

Each test is reported alone at p = 0.05 and as part of the verdict (Bonferroni over the tests of
:data:`app.monitoring.drift.TESTS`), once per MMD engine of :data:`app.monitoring.mmd.ENGINES`: every window
is tested by both, and the engines' MMD p-values and verdicts are compared window by window, next to the
builtin engine against itself with other permutations (the Monte Carlo error of any one engine). Each engine's
time per check (all tests of one window, one compute thread) and the drift monitor's memory with it (a
subprocess that builds the monitor's detector and runs checks, read from ``/proc/self/status``) are measured too.
Usage: ``.venv/bin/python -m bench.drift_quality [--windows 100]``; writes ``bench/results/drift_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from threadpoolctl import threadpool_limits

from app.ml.data import load_clothing, load_rotten_tomatoes, load_tweets
from app.ml.drift_reference import DriftReference, embed, load_reference
from app.ml.model import SentimentModel, confidence_of
from app.ml.registry import ModelRegistry
from app.ml.train import split_holdout, train_and_register
from app.monitoring.drift import DriftDetector, DriftResult, Window, family_names
from app.monitoring.mmd import DEFAULT_ENGINE, ENGINES
from bench.output import write_results

ALPHA = 0.05
PERMUTATIONS = 100
BASELINE = "builtin-seed-1"
"""The builtin engine with other permutations: how often one engine disagrees with itself (Monte Carlo error)."""
MEMORY_CHECKS = 10  # checks the memory subprocess runs (windows of 500: in-domain and clothing)


class Pool:
    """A corpus scored once: embeddings, lengths, confidence, P(positive), true labels."""

    def __init__(
        self, model: SentimentModel, reference: DriftReference, texts: list[str], labels: NDArray[np.int64]
    ) -> None:
        self.p_positive = model.p_positive(texts)
        self.embeddings = embed(model, reference.components, texts)
        self.lengths = np.array([len(t) for t in texts], dtype=np.float64)
        self.confidence = confidence_of(self.p_positive)
        self.labels = labels

    def take(self, index: NDArray[np.int64]) -> Window:
        return Window(self.embeddings[index], self.lengths[index], self.confidence[index], self.p_positive[index])


def concat(*parts: Window) -> Window:
    return Window(
        *(np.concatenate([getattr(w, f) for w in parts]) for f in ("embeddings", "lengths", "confidence", "p_positive"))
    )


@dataclass
class Tested:
    """Every engine's results on the same windows, and its seconds per check."""

    results: dict[str, list[DriftResult]]
    seconds: dict[str, list[float]]


def test_windows(detectors: dict[str, DriftDetector], windows: list[Window]) -> Tested:
    """Each window tested by every engine's detector, timed."""
    tested = Tested({e: [] for e in detectors}, {e: [] for e in detectors})
    for window in windows:
        for engine, detector in detectors.items():
            started = time.perf_counter()
            tested.results[engine].append(detector.test(window))
            tested.seconds[engine].append(time.perf_counter() - started)
    return tested


def rates(results: list[DriftResult]) -> dict[str, float]:
    """Share of windows flagged by each test alone (at ALPHA) and by the combined verdict."""
    flagged = dict.fromkeys((*family_names(), "combined"), 0)
    for result in results:
        for test, p in result.details["p_values"].items():
            flagged[test] += p < ALPHA
        flagged["combined"] += result.drift
    return {k: v / len(results) for k, v in flagged.items()}


def agreement(a: list[DriftResult], b: list[DriftResult]) -> dict[str, float | None]:
    """How two engines' results on the same windows compare: verdicts and MMD p-values side by side."""
    p_a, p_b = np.array([r.p_value for r in a]), np.array([r.p_value for r in b])
    d_a, d_b = np.array([r.score for r in a]), np.array([r.score for r in b])
    level = a[0].details["corrected_threshold"]
    varied = p_a.std() > 0 and p_b.std() > 0  # all-zero p-values (every shift window) have no correlation
    return {
        "windows": len(a),
        "verdict_agreement": float(np.mean([x.drift == y.drift for x, y in zip(a, b, strict=True)])),
        "mmd_verdict_agreement_at_corrected_level": float(np.mean((p_a < level) == (p_b < level))),
        "mmd_verdict_agreement_at_0.05": float(np.mean((p_a < ALPHA) == (p_b < ALPHA))),
        "mmd_p_value_correlation": float(np.corrcoef(p_a, p_b)[0, 1]) if varied else None,
        "mmd_p_value_max_abs_difference": float(np.abs(p_a - p_b).max()),
        "mmd_p_value_mean_abs_difference": float(np.abs(p_a - p_b).mean()),
        "mmd_distance_max_abs_difference": float(np.abs(d_a - d_b).max()),
    }


def monitor_memory(engine: str, store: Path, windows: Path) -> dict[str, Any]:
    """The drift monitor's memory with ``engine``: a fresh process builds its detector and runs checks."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.drift_quality", "--memory-child", engine, str(store), str(windows)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"the {engine} memory subprocess failed:\n{out.stderr[-3000:]}")
    found: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return found


def memory_child(engine: str, store: Path, windows_file: Path) -> None:
    """Build the monitor's detector for the store's current version with ``engine``, run checks, print memory."""
    from app.migrations import upgrade
    from app.monitoring.monitor import DriftMonitor
    from app.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(model_store=store, state_dir=Path(tmp), drift_backend=engine)
        upgrade(settings.prediction_log_url)  # the monitor refuses a log whose schema is behind
        monitor = DriftMonitor(settings)
        version = monitor.registry.current_version()
        assert version is not None
        detector = monitor.detector_for(version)
        arrays = np.load(windows_file)
        for i in range(MEMORY_CHECKS):
            detector.test(Window(*(arrays[f"{field}_{i}"] for field in Window.__dataclass_fields__)))
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        found = {
            "vm_hwm_mb": round(int(status["VmHWM"].split()[0]) / 1024, 1),
            "vm_rss_mb": round(int(status["VmRSS"].split()[0]) / 1024, 1),
            "torch_imported": "torch" in sys.modules,
            "alibi_detect_imported": "alibi_detect" in sys.modules,
            "checks": MEMORY_CHECKS,
        }
        monitor.database.dispose()
    print(json.dumps(found))


@dataclass
class Setup:
    """The trained model's detector per MMD engine and the scored pools windows are drawn from."""

    detectors: dict[str, DriftDetector]
    pools: dict[str, Pool]
    header: dict[str, Any]
    rng: np.random.Generator

    def sample(self, pool: str, n: int, among: NDArray[np.int64] | None = None) -> Window:
        candidates = among if among is not None else np.arange(len(self.pools[pool].lengths))
        return self.pools[pool].take(self.rng.choice(candidates, n, replace=False))

    def mix(self, *parts: tuple[str, int, NDArray[np.int64] | None]) -> Window:
        """One window of ``n`` rows from each (pool, n, among) part."""
        return concat(*(self.sample(*part) for part in parts))


def setup(store: Path) -> Setup:
    """Train on half of Rotten Tomatoes (into ``store``); score the in-domain pool (holdout minus reference)
    and the shifts."""
    started = time.time()
    corpus = load_rotten_tomatoes()
    registry = ModelRegistry(store)
    trained = train_and_register(registry, corpus, holdout_fraction=0.5, progress=False)
    loaded = registry.load(trained.version.version)
    reference = load_reference(loaded)
    # The reference is 1,000 holdout rows; the rest of the holdout is the in-domain pool.
    _, holdout = split_holdout(corpus, 0.5, seed=0)
    reference_rows = set(np.random.default_rng(0).permutation(len(holdout))[: reference.size].tolist())
    rest = [i for i in range(len(holdout)) if i not in reference_rows]
    model = loaded.model
    detectors = {
        engine: DriftDetector(
            loaded.version, model, reference, p_value=ALPHA, permutations=PERMUTATIONS, window_size=0, mmd_engine=engine
        )
        for engine in ENGINES
    }
    detectors[BASELINE] = DriftDetector(
        loaded.version,
        model,
        reference,
        p_value=ALPHA,
        permutations=PERMUTATIONS,
        window_size=0,
        mmd_engine="builtin",
        seed=1,
    )
    pools = {"in_domain": Pool(model, reference, [holdout.texts[i] for i in rest], holdout.labels[rest])}
    for name, loader in (("tweets", load_tweets), ("clothing", load_clothing)):
        data = loader()
        pools[name] = Pool(model, reference, data.texts, data.labels)
    print(
        f"model {loaded.version}: holdout {len(holdout)}, reference {reference.size}, in-domain pool {len(rest)}; "
        f"scored pools in {time.time() - started:.0f} s",
        flush=True,
    )
    header = {"reference_size": reference.size, "in_domain_pool": len(rest)}
    return Setup(detectors, pools, header, np.random.default_rng(0))


def scenarios(bench: Setup) -> dict[str, Callable[[], Window]]:
    """Every scenario's name and how to draw one of its windows."""
    found: dict[str, Callable[[], Window]] = {"false_positive_rate_500": partial(bench.sample, "in_domain", 500)}
    for domain in ("tweets", "clothing"):
        for size in (200, 500):
            found[f"power_{domain}_{size}"] = partial(bench.sample, domain, size)
    labels = bench.pools["in_domain"].labels
    negatives, positives = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    for share in (0.1, 0.9):
        k = round(1000 * share)
        found[f"power_label_prior_{int(share * 100)}pct_negative_1000"] = partial(
            bench.mix, ("in_domain", k, negatives), ("in_domain", 1000 - k, positives)
        )
    for share in (0.05, 0.10, 0.25, 0.50):
        k = round(500 * share)
        found[f"power_clothing_mix_{int(share * 100)}pct_500"] = partial(
            bench.mix, ("clothing", k, None), ("in_domain", 500 - k, None)
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=100, help="windows per scenario")
    parser.add_argument("--memory-child", nargs=3, metavar=("ENGINE", "STORE", "WINDOWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        engine, store, windows_file = args.memory_child
        memory_child(engine, Path(store), Path(windows_file))
        return
    # One compute thread, as in the drift monitor (app.monitoring.monitor._lower_priority). torch is imported
    # here, not at the top: the memory subprocess of the builtin engine runs this module and must not load it.
    import torch

    torch.set_num_threads(1)
    threadpool_limits(1)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        bench = setup(Path(tmp) / "store")
        results: dict[str, Any] = {
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "windows_per_scenario": args.windows,
            "alpha": ALPHA,
            "permutations": PERMUTATIONS,
            "engines": list(ENGINES),
            "default_engine": DEFAULT_ENGINE,
            **bench.header,
        }
        windows_file = Path(tmp) / "windows.npz"
        memory_windows = [bench.sample("in_domain", 500) for _ in range(MEMORY_CHECKS // 2)]
        memory_windows += [bench.sample("clothing", 500) for _ in range(MEMORY_CHECKS - len(memory_windows))]
        np.savez(
            windows_file,
            **{f"{f}_{i}": getattr(w, f) for i, w in enumerate(memory_windows) for f in Window.__dataclass_fields__},
        )
        results["monitor_memory"] = {
            engine: monitor_memory(engine, Path(tmp) / "store", windows_file) for engine in ENGINES
        }
        print("memory", results["monitor_memory"], flush=True)
        everything: dict[str, list[DriftResult]] = {engine: [] for engine in bench.detectors}
        seconds: dict[str, dict[int, list[float]]] = {engine: {} for engine in ENGINES}
        per_scenario: dict[str, dict[str, float | None]] = {}
        baseline: dict[str, dict[str, float | None]] = {}
        for key, draw in scenarios(bench).items():
            tested = test_windows(bench.detectors, [draw() for _ in range(args.windows)])
            results[key] = {engine: rates(found) for engine, found in tested.results.items()}
            for engine, found in tested.results.items():
                everything[engine] += found
                if engine in seconds:
                    seconds[engine].setdefault(found[0].window_size, []).extend(tested.seconds[engine])
            per_scenario[key] = agreement(*(tested.results[e] for e in ENGINES))
            baseline[key] = agreement(tested.results["builtin"], tested.results[BASELINE])
            print(key, results[key], per_scenario[key], flush=True)
        results["engine_agreement"] = {
            **agreement(*(everything[e] for e in ENGINES)),
            "per_scenario": per_scenario,
        }
        results["monte_carlo_baseline"] = {
            "compares": f"builtin (seed 0) against {BASELINE}: the same test with other permutations",
            **agreement(everything["builtin"], everything[BASELINE]),
            "per_scenario": baseline,
        }
        results["seconds_per_check"] = {
            engine: {f"window_{size}": round(statistics.median(times), 4) for size, times in sorted(by_size.items())}
            for engine, by_size in seconds.items()
        }
        print("agreement", results["engine_agreement"], results["monte_carlo_baseline"], flush=True)
        print("seconds per check", results["seconds_per_check"], flush=True)
    results["seconds"] = round(time.time() - started)
    write_results("drift_quality", results)
    print(f"done in {results['seconds']} s; wrote bench/results/drift_quality.json")


if __name__ == "__main__":
    main()
