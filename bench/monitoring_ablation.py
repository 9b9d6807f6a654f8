"""Where monitoring's cost is, measured in place: the service with pieces of its monitoring removed, each
variant run at once beside an unmonitored service on the same cores (as part 5 of ``bench/monitoring.py``).

For each variant: a fresh unmonitored service (``SENTIMENT_MONITORING_ENABLED=false``) and the variant start,
warm up, and run ROUNDS runs of ``--seconds`` each under their own wrk (``-t2 -c16``) at the same time. The
figure is CPU per request off/on (every process of each service, all threads, user + system, from /proc): it
does not depend on how the scheduler shares the cores. The pieces are removed by
``bench/ablation_site/sitecustomize.py`` (``BENCH_ABLATE``), in the web workers only; the first variant is an
unmonitored twin, the measurement's own zero.

Usage: ``.venv/bin/python -m bench.monitoring_ablation [--seconds 20] [--rounds 4]``; writes
``bench/results/monitoring_ablation.json``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from app.ml.registry import ModelRegistry
from bench.monitoring import current_model, side_by_side, wait_for_monitor, warm_up
from bench.output import write_results
from tests.integration.services import REPO, start_service

Variant = tuple[str, bool, bool, str]

VARIANTS: list[Variant] = [
    # name, supervised (supervisor and drift monitor), monitoring enabled, pieces removed from the web workers
    ("unmonitored twin (zero)", False, False, ""),
    ("everything on (supervised: drift monitor too)", True, True, ""),
    ("web workers with monitoring, no drift monitor", False, True, ""),
    ("  without the database write", False, True, "flush"),
    ("  without the database write and the spool", False, True, "flush,spool"),
    ("  without the database write, the spool and the metric writes", False, True, "flush,spool,metrics"),
    ("  without recording and latency metrics", False, True, "record,measure"),
]


def ablation_env(ablate: str) -> dict[str, str]:
    """The environment that makes a Python process load ``bench/ablation_site`` and remove the pieces named in
    ``ablate`` (comma-separated, see its docstring; empty: none)."""
    return {"PYTHONPATH": os.pathsep.join([str(REPO / "bench" / "ablation_site"), str(REPO)]), "BENCH_ABLATE": ablate}


def variant_runs(
    store: ModelRegistry, tmp: Path, env: dict[str, str], variant: Variant, *, rounds: int, seconds: int
) -> list[dict[str, float]]:
    _, supervised, enabled, ablate = variant
    label = f"v{VARIANTS.index(variant)}"
    off = start_service(store, tmp / f"{label}-off.log", SENTIMENT_MONITORING_ENABLED="false")
    ablation = ablation_env(ablate)
    try:
        on = start_service(
            store,
            tmp / f"{label}-on.log",
            supervised=supervised,
            SENTIMENT_MONITORING_ENABLED=str(enabled).lower(),
            PYTHONPATH=ablation["PYTHONPATH"],
            BENCH_ABLATE=ablation["BENCH_ABLATE"],
        )
        try:
            if supervised:
                wait_for_monitor(on)
            warm_up(off, env)
            warm_up(on, env)
            runs = side_by_side(off, on, rounds, seconds, env)
        finally:
            on.stop()
    finally:
        off.stop()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=20, help="each concurrent run")
    parser.add_argument("--rounds", type=int, default=4, help="concurrent runs per variant")
    args = parser.parse_args()
    store, version, texts = current_model()
    results: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model_version": version,
        "load_average_start": os.getloadavg(),
        "variants": [],
    }
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        (tmp / "texts.txt").write_text("\n".join(texts) + "\n")
        env = {"BENCH_TEXTS": str(tmp / "texts.txt"), "PATH": "/usr/bin:/bin"}
        print(f"{'variant':64s} CPU per request off/on per run; median; cost", flush=True)
        for variant in VARIANTS:
            runs = variant_runs(store, tmp, env, variant, rounds=args.rounds, seconds=args.seconds)
            ratios = [run["cpu_per_request_off_vs_on"] for run in runs]
            median = float(np.median(ratios))
            print(
                f"{variant[0]:64s} {' '.join(f'{r:.1%}' for r in ratios)}; {median:.1%}; {1 / median - 1:+.1%}",
                flush=True,
            )
            results["variants"].append(
                {"name": variant[0].strip(), "ablate": variant[3], "runs": runs, "cpu_off_vs_on": median}
            )
    results["load_average_end"] = os.getloadavg()
    write_results("monitoring_ablation", results)
    print("wrote bench/results/monitoring_ablation.json")


if __name__ == "__main__":
    main()
