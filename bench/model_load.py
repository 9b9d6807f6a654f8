"""What a hot swap costs a web worker: loading and preparing the default model, on the worker's loader thread.

The default Rotten Tomatoes model is trained once and saved as the service saves it (vectorizers that
store their vocabulary as one string, :class:`app.ml.pipeline.CompactTfidfVectorizer`) and, side by side,
with scikit-learn's own ``TfidfVectorizer`` (vocabulary dicts, which ``joblib.load`` unpickles with the
pure-Python ``Unpickler``). For each: ``joblib.load`` time, and how long an asyncio event loop in the same
process is kept waiting while a thread runs the worker's whole swap (``ModelManager.sync``: verify, load,
compile check). Medians of five warm loads.

Usage: ``.venv/bin/python -m bench.model_load``; writes ``bench/results/model_load.json``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import joblib
from sklearn.feature_extraction.text import TfidfVectorizer

from app.ml.data import load_rotten_tomatoes
from app.ml.registry import METADATA, MODEL_ARTIFACT, ModelRegistry, sha256_file
from app.ml.train import train_and_register
from app.serving.models import ModelManager
from bench.output import write_results

REPEATS = 5


def with_plain_vectorizers(pipeline: Any) -> Any:
    """The same fitted pipeline with scikit-learn's own TfidfVectorizer class (state unchanged)."""
    for _, vectorizer in pipeline.named_steps["features"].transformer_list:
        vectorizer.__class__ = TfidfVectorizer
    return pipeline


async def stalls_during(work: Any) -> list[float]:
    """Event-loop delays (ms) beyond a 1 ms sleep while ``work`` runs on a thread."""
    done = threading.Event()
    delays: list[float] = []

    def run() -> None:
        work()
        done.set()

    threading.Thread(target=run).start()
    while not done.is_set():
        started = time.perf_counter()
        await asyncio.sleep(0.001)
        delays.append(max(0.0, (time.perf_counter() - started) * 1000 - 1))
    return delays


def measure(registry: ModelRegistry, version: str) -> dict[str, float]:
    loads, worst, total = [], [], []
    for _ in range(REPEATS + 1):
        started = time.perf_counter()
        joblib.load(registry.root / version / MODEL_ARTIFACT)
        loads.append((time.perf_counter() - started) * 1000)
        manager = ModelManager(registry, reload_interval=1)
        delays = asyncio.run(stalls_during(manager.sync))
        worst.append(max(delays))
        total.append(sum(d for d in delays if d > 5))
    loads, worst, total = loads[1:], worst[1:], total[1:]  # the first load also imports modules
    return {
        "joblib_load_ms": statistics.median(loads),
        "swap_worst_loop_stall_ms": statistics.median(worst),
        "swap_loop_stalls_over_5ms_total_ms": statistics.median(total),
    }


def main() -> None:
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        compact_store = ModelRegistry(Path(tmp) / "compact")
        trained = train_and_register(compact_store, load_rotten_tomatoes(), progress=False)
        version = trained.version.version
        plain_store = ModelRegistry(Path(tmp) / "plain")
        shutil.copytree(compact_store.root / version, plain_store.root / version)
        plain_artifact = plain_store.root / version / MODEL_ARTIFACT
        plain_artifact.chmod(0o644)
        model = compact_store.load(version).model
        with_plain_vectorizers(model.pipeline)  # type: ignore[attr-defined]  # the default kind's pipeline
        model.save(plain_artifact)
        metadata_path = plain_store.root / version / METADATA
        metadata_path.chmod(0o644)
        metadata = json.loads(metadata_path.read_text())
        metadata["artifacts"][MODEL_ARTIFACT] = sha256_file(plain_artifact)
        metadata_path.write_text(json.dumps(metadata))
        plain_store.promote(version)
        results: dict[str, Any] = {
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "model_bytes": {
                "compact_vocabulary": (compact_store.root / version / MODEL_ARTIFACT).stat().st_size,
                "dict_vocabulary": plain_artifact.stat().st_size,
            },
            "compact_vocabulary": measure(compact_store, version),
            "dict_vocabulary": measure(plain_store, version),
        }
    compact, dicts = results["compact_vocabulary"], results["dict_vocabulary"]
    results["load_speedup"] = dicts["joblib_load_ms"] / compact["joblib_load_ms"]
    results["seconds"] = round(time.time() - started)
    for name in ("compact_vocabulary", "dict_vocabulary"):
        r = results[name]
        print(
            f"{name:18} joblib.load {r['joblib_load_ms']:6.0f} ms; swap: event loop waited at most "
            f"{r['swap_worst_loop_stall_ms']:5.1f} ms, {r['swap_loop_stalls_over_5ms_total_ms']:5.0f} ms stalled > 5 ms"
        )
    print(f"load speed-up {results['load_speedup']:.1f}x")
    write_results("model_load", results)
    print("wrote bench/results/model_load.json")


if __name__ == "__main__":
    main()
