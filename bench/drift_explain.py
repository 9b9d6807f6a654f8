"""Drift explanations on real data: what one costs the drift monitor, and what it finds.

A model is trained on half of Rotten Tomatoes, as in ``bench/drift_quality.py``; 1,000 rows of the other half
are its drift reference, the rest of the holdout is the in-domain pool, and the reference's n-gram counts come
from the version's ``reference.json`` (its holdout), counted once (timed apart: a per-version cost). Windows of
the default ``SENTIMENT_DRIFT_WINDOW_SIZE`` are drawn from the in-domain pool, tweets and clothing reviews
(and, for the cost bound, windows of :data:`app.monitoring.explain.MAX_WINDOW_ROWS`, the most one explanation
looks at), each explained by :func:`app.monitoring.explain.explain` on one thread:

- wall time per explanation (median and worst), and the part of it that embeds the window (which a caller
  holding the check's embeddings can skip, ``window_embeddings``);
- the peak resident memory one explanation adds: in a fresh process that loads the version and runs a drift
  check as the monitor does, the peak (``VmHWM``) is reset (``/proc/self/clear_refs``) before each
  explanation and read after it, against ``VmRSS`` before it;
- the domain classifier's AUC, the number of listed terms, and one explanation of each kind as stored.

Usage: ``.venv/bin/python -m bench.drift_explain [--windows 20]``; writes ``bench/results/drift_explain.json``
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from app.ml.data import load_clothing, load_rotten_tomatoes, load_tweets
from app.ml.drift_reference import embed, load_reference
from app.ml.model import confidence_of
from app.ml.registry import REFERENCE_ARTIFACT, LoadedModel, ModelRegistry
from app.ml.train import split_holdout, train_and_register
from app.monitoring.explain import MAX_WINDOW_ROWS, TermCounts, count_terms, explain
from app.settings import Settings
from bench.output import write_results

WINDOW = int(Settings.model_fields["drift_window_size"].default)
LARGE_WINDOWS = 5  # windows of MAX_WINDOW_ROWS per pool, for the bound
MEMORY_WINDOWS = 3  # explanations per scenario in the memory subprocess
POOLS = ("in_domain", "tweets", "clothing")


def status_mb() -> dict[str, float]:
    """This process's current and peak resident memory, in MB."""
    found = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(found[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def reset_peak() -> None:
    """Make VmHWM the current VmRSS (Linux 4.0+), so the next peak is one explanation's."""
    Path("/proc/self/clear_refs").write_text("5")


def reference_terms(loaded: LoadedModel) -> TermCounts:
    return count_terms(loaded.read_json(REFERENCE_ARTIFACT)["texts"])


def memory_child(store: Path, windows_file: Path) -> None:
    """Load the store's current version as the monitor does, test a window, then explain each window."""
    from app.monitoring.drift import DriftDetector, Window

    threadpool_limits(1)
    registry = ModelRegistry(store)
    loaded = registry.load_current()
    assert loaded is not None
    reference = load_reference(loaded)
    terms = reference_terms(loaded)
    windows: dict[str, list[list[str]]] = json.loads(windows_file.read_text())
    model = loaded.model
    detector = DriftDetector(
        loaded.version, model, reference, p_value=0.05, permutations=100, window_size=WINDOW, mmd_engine="builtin"
    )
    first = windows[f"in_domain_{WINDOW}"][0]
    proba = model.p_positive(first)
    lengths = np.array([len(t) for t in first], dtype=np.float64)
    detector.test(Window(embed(model, reference.components, first), lengths, confidence_of(proba), proba))
    baseline = status_mb()
    found: dict[str, Any] = {"before_mb": {"rss": round(baseline["VmRSS"], 1), "peak": round(baseline["VmHWM"], 1)}}
    for name, texts_list in windows.items():
        added = []
        for texts in texts_list:
            reset_peak()
            before = status_mb()["VmRSS"]
            explain(model, reference, texts, reference_terms=terms)
            added.append(status_mb()["VmHWM"] - before)
        found[name] = {
            "peak_added_mb_max": round(max(added), 1),
            "peak_added_mb_median": round(statistics.median(added), 1),
        }
    after = status_mb()
    found["after_mb"] = {"rss": round(after["VmRSS"], 1)}
    print(json.dumps(found))


def monitor_memory(store: Path, windows: dict[str, list[list[str]]], tmp: Path) -> dict[str, Any]:
    windows_file = tmp / "windows.json"
    windows_file.write_text(json.dumps(windows))
    out = subprocess.run(
        [sys.executable, "-m", "bench.drift_explain", "--memory-child", str(store), str(windows_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"the memory subprocess failed:\n{out.stderr[-3000:]}")
    found: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return found


def summary(values: list[float], digits: int = 3) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=20, help=f"windows of {WINDOW} per pool")
    parser.add_argument("--memory-child", nargs=2, metavar=("STORE", "WINDOWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(Path(args.memory_child[0]), Path(args.memory_child[1]))
        return
    threadpool_limits(1)  # as in the drift monitor (app.monitoring.monitor._lower_priority)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        corpus = load_rotten_tomatoes()
        registry = ModelRegistry(store)
        trained = train_and_register(registry, corpus, holdout_fraction=0.5, progress=False)
        loaded = registry.load(trained.version.version)
        model, reference = loaded.model, load_reference(loaded)
        _, holdout = split_holdout(corpus, 0.5, seed=0)
        reference_rows = set(np.random.default_rng(0).permutation(len(holdout))[: reference.size].tolist())
        pools = {
            "in_domain": [t for i, t in enumerate(holdout.texts) if i not in reference_rows],
            "tweets": load_tweets().texts,
            "clothing": load_clothing().texts,
        }
        counted = time.perf_counter()
        terms = reference_terms(loaded)
        terms_seconds = time.perf_counter() - counted
        print(
            f"model {loaded.version} trained in {time.time() - started:.0f} s; reference {reference.size} rows, "
            f"term counts of {terms.texts} holdout texts ({len(terms.counts)} terms) in {terms_seconds:.2f} s",
            flush=True,
        )
        rng = np.random.default_rng(0)

        def draw(pool: str, size: int) -> list[str]:
            texts = pools[pool]
            return [texts[i] for i in rng.choice(len(texts), size, replace=False)]

        results: dict[str, Any] = {
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": f"python -m bench.drift_explain --windows {args.windows}",
            "window": WINDOW,
            "max_window_rows": MAX_WINDOW_ROWS,
            "windows_per_pool": args.windows,
            "cpus": os.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "reference_rows": reference.size,
            "reference_term_texts": terms.texts,
            "reference_terms": len(terms.counts),
            "reference_term_counts_seconds": round(terms_seconds, 3),
            "scenarios": {},
            "samples": {},
        }
        for size, windows in ((WINDOW, args.windows), (MAX_WINDOW_ROWS, LARGE_WINDOWS)):
            for pool in POOLS:
                seconds, embedding, aucs, listed = [], [], [], []
                for _ in range(windows):
                    texts = draw(pool, size)
                    began = time.perf_counter()
                    found = explain(model, reference, texts, reference_terms=terms)
                    seconds.append(time.perf_counter() - began)
                    began = time.perf_counter()
                    embed(model, reference.components, texts)
                    embedding.append(time.perf_counter() - began)
                    aucs.append(found.domain_auc)
                    listed.append(len(found.over_represented or ()) + len(found.under_represented or ()))
                    results["samples"].setdefault(pool, found.to_dict())
                key = f"{pool}_{size}"
                results["scenarios"][key] = {
                    "windows": windows,
                    "seconds": summary(seconds),
                    "embedding_seconds": summary(embedding),
                    "domain_auc": summary(aucs),
                    "terms_listed": summary([float(n) for n in listed], 1),
                }
                print(key, results["scenarios"][key], flush=True)
        memory_windows = {f"{pool}_{WINDOW}": [draw(pool, WINDOW) for _ in range(MEMORY_WINDOWS)] for pool in POOLS}
        memory_windows[f"clothing_{MAX_WINDOW_ROWS}"] = [draw("clothing", MAX_WINDOW_ROWS)]
        results["memory"] = monitor_memory(store, memory_windows, Path(tmp))
        print("memory", results["memory"], flush=True)
    results["seconds"] = round(time.time() - started)
    write_results("drift_explain", results, ensure_ascii=False)
    print_table(results)
    print(f"done in {results['seconds']} s; wrote bench/results/drift_explain.json")


def print_table(results: dict[str, Any]) -> None:
    columns = ("s median", "s max", "embed s", "AUC median", "AUC min", "AUC max", "terms", "peak +MB")
    print(f"{'scenario (window)':24}" + "".join(f"{c:>12}" for c in columns))
    for key, s in results["scenarios"].items():
        memory = results["memory"].get(key)
        cells = (
            f"{s['seconds']['median']:.3f}",
            f"{s['seconds']['max']:.3f}",
            f"{s['embedding_seconds']['median']:.3f}",
            f"{s['domain_auc']['median']:.3f}",
            f"{s['domain_auc']['min']:.3f}",
            f"{s['domain_auc']['max']:.3f}",
            f"{s['terms_listed']['median']:.0f}",
            f"{memory['peak_added_mb_max']:.1f}" if memory else "",
        )
        print(f"{key:24}" + "".join(f"{c:>12}" for c in cells))
    sample = results["samples"]["clothing"]
    print(f"sample (clothing, window {results['window']}): domain AUC {sample['domain_auc']:.3f}")
    print(
        "  over:  "
        + ", ".join(
            f"{t['term']} ({t['window_rate']:.2f} vs {t['reference_rate']:.3f})" for t in sample["over_represented"]
        )
    )
    print(
        "  under: "
        + ", ".join(
            f"{t['term']} ({t['window_rate']:.3f} vs {t['reference_rate']:.2f})" for t in sample["under_represented"]
        )
    )
    for example in sample["examples"]:
        print(f"  {example['score']:.3f}  {example['text'][:100]!r}")


if __name__ == "__main__":
    main()
