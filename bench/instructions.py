"""Instructions per request, monitoring on vs off, counted by valgrind: the monitoring code's own work, free of the
shared machine's noise.

Timing on this host moves by several percent from run to run and from one service instance to the next, more than
the monitoring code itself costs (``bench/monitoring.py``, part 5). Instructions executed do not: valgrind's
callgrind tool counts every user-space instruction of a process, all threads included. What it cannot see is the
kernel's share (system calls: the spool's and the database's writes) and how fast the instructions run (cache
misses, other tenants): the figure is the monitoring code's work, not its time.

The real app (``create_app`` and its lifespan: model, batcher, recorder, spool, database flushes on their thread)
runs in one process under callgrind and is driven through ASGI (``bench/request_profile.py``), ``CONCURRENCY``
requests at a time, start-up heap frozen as in a gunicorn worker. Each variant runs twice, with SHORT and LONG
measured requests after the same start-up and warm-up; the difference of the two totals over the difference of
requests is the cost of one request, start-up excluded. OpenBLAS runs one thread (its idle threads spin for
varying times and the model does not use it); every run has the same hash seed.

Variants: monitoring off, on, and on without one piece (removed by ``bench/ablation_site/sitecustomize.py``, as
``bench/monitoring_ablation.py`` does): a piece's count is "on" minus "on" without it. Off and on also by library
(the shared object each instruction belongs to).

Usage: ``.venv/bin/python -m bench.instructions``; needs a current model (``python -m app.cli train``) and
valgrind (Debian package ``valgrind``, installed by ``scripts/system-deps``); about 12 minutes on 2 cores. Writes
``bench/results/instructions.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.monitoring_ablation import ablation_env
from tests.integration.services import REPO

CONCURRENCY = 14
WARM_REQUESTS = 140
SHORT, LONG = 280, 1680
Variant = tuple[str, bool, str]
VARIANTS: list[Variant] = [
    # name, monitoring enabled, pieces removed (BENCH_ABLATE)
    ("off", False, ""),
    ("on", True, ""),
    ("on without the database write", True, "flush"),
    ("on without the spool", True, "spool"),
    ("on without the metric writes", True, "metrics"),
]
MODES = ("off", "on")  # by library
SLOWED_DOWN = {
    # Under callgrind the app runs about 50 times slower: work done per interval of time (the log flush's fixed
    # part, the drift status, model and revocation polls) would count 50 times over per request. These intervals
    # give a flush about as many rows as a saturated worker's 0.5 s (a metric write as many requests as its
    # 0.25 s) and leave the polls out.
    "SENTIMENT_PREDICTION_LOG_FLUSH_SECONDS": "25",
    "SENTIMENT_METRICS_WRITE_SECONDS": "12.5",
    "SENTIMENT_DRIFT_STATUS_REFRESH_SECONDS": "3600",
    "SENTIMENT_RELOAD_INTERVAL_SECONDS": "3600",
    "SENTIMENT_FEEDBACK_REVOCATION_REFRESH_SECONDS": "3600",
}
_TOTAL = re.compile(rb"^(?:summary|totals):\s+(\d+)", re.MULTILINE)
_FUNCTION_LINE = re.compile(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.*)$")


def child(monitoring: bool, requests: int, state: Path) -> None:
    """The measured process: the app with monitoring on or off, warmed, frozen, then ``requests`` requests."""
    import logging.config

    import uvloop

    from app import gunicorn_worker
    from app.logs import configure_structlog, dict_config
    from app.process_memory import skip_unused_optional_imports
    from bench.monitoring import current_model
    from bench.request_profile import monitored_app, send_requests

    skip_unused_optional_imports()
    configure_structlog()
    logging.config.dictConfig(dict_config("info"))
    _, _, texts = current_model()
    bodies = [json.dumps({"text": text}).encode() for text in texts]

    async def run() -> None:
        app = monitored_app(state, monitoring)
        async with app.router.lifespan_context(app):
            await send_requests(app, bodies, 0, WARM_REQUESTS, CONCURRENCY)
            gunicorn_worker.freeze_startup_heap()
            await send_requests(app, bodies, WARM_REQUESTS, requests, CONCURRENCY)
        # Leaving the lifespan writes the rows still buffered: every logged row is inserted within the count.

    asyncio.Runner(loop_factory=uvloop.new_event_loop).run(run())


def counted(variant: Variant, requests: int, tmp: Path) -> Path:
    """Run :func:`child` for ``variant`` under callgrind; the path of its output file."""
    _, monitoring, ablate = variant
    label = f"{VARIANTS.index(variant)}-{requests}"
    out = tmp / f"callgrind.{label}"
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-m",
            "bench.instructions",
            "--child",
            "on" if monitoring else "off",
            str(requests),
            str(tmp / f"state-{label}"),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={
            **os.environ,
            "OPENBLAS_NUM_THREADS": "1",
            # One hash seed for every run: the start-up's work depends on it by millions of instructions, which
            # would not cancel out between the two runs of a variant.
            "PYTHONHASHSEED": "0",
            **ablation_env(ablate),
            **SLOWED_DOWN,
        },
        cwd=REPO,
    )
    return out


def total(out: Path) -> int:
    """Instructions the process executed, from a callgrind output file."""
    found = _TOTAL.search(out.read_bytes())
    if found is None:
        raise RuntimeError(f"no instruction total in {out}")
    return int(found.group(1))


def by_library(out: Path) -> Counter[str]:
    """Instructions per shared object (``libpython3.11.so.1.0``, ``libsqlite3.so.0``...), by callgrind_annotate."""
    report = subprocess.run(
        ["callgrind_annotate", "--threshold=100", "--inclusive=no", str(out)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    libraries: Counter[str] = Counter()
    for line in report.splitlines():
        match = _FUNCTION_LINE.match(line)
        if match is None or match.group(2).strip() == "PROGRAM TOTALS":
            continue
        location = match.group(2)
        library = location.rsplit("[", 1)[1].rstrip("]").rsplit("/", 1)[-1] if location.endswith("]") else "other"
        libraries[library_name(library)] += int(match.group(1).replace(",", ""))
    return libraries


def per_request_by_library(short: Path, long: Path, extra: int) -> dict[str, float]:
    """Instructions per request of each library: the two runs' difference over ``extra`` requests."""
    counts = {name: by_library(out) for name, out in (("short", short), ("long", long))}
    return {name: (counts["long"][name] - counts["short"][name]) / extra for name in counts["long"] | counts["short"]}


def library_name(file_name: str) -> str:
    """A shared object's name without its version and build suffixes: ``libsqlite3.so.0.8.6`` -> ``libsqlite3``,
    ``_multiarray_umath.cpython-311-x86_64-linux-gnu.so`` -> ``_multiarray_umath``."""
    return file_name.split(".", 1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("MODE", "REQUESTS", "STATE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, requests, state = args.child
        child(mode == "on", int(requests), Path(state))
        return
    from bench.monitoring import current_model
    from bench.output import write_results

    _, version, _ = current_model()
    extra = LONG - SHORT
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        runs = [(variant, requests) for variant in VARIANTS for requests in (SHORT, LONG)]
        with ThreadPoolExecutor(2) as pool:
            outs = dict(zip(runs, pool.map(lambda run: counted(run[0], run[1], tmp), runs), strict=True))
        per_request = {
            variant[0]: (total(outs[variant, LONG]) - total(outs[variant, SHORT])) / extra for variant in VARIANTS
        }
        libraries = {
            variant[0]: per_request_by_library(outs[variant, SHORT], outs[variant, LONG], extra)
            for variant in VARIANTS
            if variant[0] in MODES
        }
    names = sorted(
        {name for mode in MODES for name in libraries[mode]},
        key=lambda name: -max(abs(libraries[mode].get(name, 0.0)) for mode in MODES),
    )
    # Libraries under 1,000 instructions a request in both modes are left out.
    table = [
        (name, libraries["off"].get(name, 0.0), libraries["on"].get(name, 0.0))
        for name in names
        if max(abs(libraries[mode].get(name, 0.0)) for mode in MODES) >= 1000
    ]
    results: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model_version": version,
        "requests": {"short": SHORT, "long": LONG, "concurrency": CONCURRENCY},
        "instructions_per_request": per_request,
        "on_vs_off": per_request["on"] / per_request["off"],
        "pieces": {ablate: per_request["on"] - per_request[name] for name, monitoring, ablate in VARIANTS if ablate},
        "by_library": [{"library": name, "off": off, "on": on} for name, off, on in table],
    }
    for name, _, _ in VARIANTS:
        print(f"{name:<32} {per_request[name]:>12,.0f} instructions per request")
    print(f"on/off {results['on_vs_off']:.2%}; pieces (on minus on without): {results['pieces']}")
    print(f"{'library':<24} {'off':>12} {'on':>12} {'on - off':>12}")
    for name, off, on in table:
        print(f"{name:<24} {off:>12,.0f} {on:>12,.0f} {on - off:>12,.0f}")
    write_results("instructions", results)
    print("wrote bench/results/instructions.json")


if __name__ == "__main__":
    main()
