"""What watching itself costs the service, and how fast it notices a shift, in one run on this machine.

1. Overhead: wrk (-t2 -c32, one text per request) against the service with metrics, prediction log and
   drift monitor on (the supervised service, as ``scripts/serve`` runs it) and with all of it off
   (``SENTIMENT_MONITORING_ENABLED=false``, plain gunicorn), five rounds in the order off-on, on-off,
   off-on, ...; the median of the rounds' on/off ratios. Goal: on >= 95 % of off. From /proc, for each run:
   the drift monitor's CPU seconds a minute, the service's CPU per request (off/on per round, like part 5's)
   and the host's idle and stolen shares of CPU time (a saturated service leaves little idle; steal is
   another tenant's).
   Meanwhile the resident memory of every process of the service (supervisor, gunicorn master and workers,
   drift monitor) is sampled every 0.5 s (RSS; PSS every 2 s). Goal: the sum stays <= 1 GB.
2. p99 latency at a fixed moderate load (open loop, 100 req/s) while drift checks run back to back (every
   prediction, no minimum gap, no CPU budget) vs while the monitor is idle. Goal: <= 1.5x.
3. Detection delay: in-domain traffic at 50 req/s, then clothing reviews at 50 req/s; time from the
   switch until ``sentiment_drift_detected`` is 1 on /metrics (default settings: window 500). Goal: <= 60 s.
4. The naive baseline: the same model behind ``bench/naive_app.py`` (one uvicorn process, one
   ``predict_proba`` per request) under part 1's wrk load. Goal: the service with monitoring on >= 10x.
5. Part 1's question asked side by side in time: both services run at once on the same cores, each under its
   own wrk; five pairs of fresh services (which one starts first alternates), three runs of 20 s each. On/off
   of throughput per run and over all runs, and off/on of CPU per request (every process of each service, from
   /proc) per pair and over all runs. The machine's swings cancel within a run, each instance's own bias
   across pairs.

Usage: ``.venv/bin/python -m bench.monitoring [--seconds 15]``; writes ``bench/results/monitoring.json``.
``--parts 3`` runs the detection delay alone and only prints it (the results file keeps whole runs).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.ml.data import load_clothing
from app.ml.registry import REFERENCE_ARTIFACT, ModelRegistry
from app.settings import Settings
from bench.output import write_results
from bench.serving import CONNECTIONS, rss_mb, wrk
from tests.conftest import free_port
from tests.integration.services import REPO, Service, start_service, wait_for

THROUGHPUT_ROUNDS = 5
CONCURRENT_PAIRS = 5
CONCURRENT_ROUNDS = 3
CONCURRENT_SECONDS = 20
WARM_UP_SECONDS = 8


async def open_loop(
    url: str, texts: list[str], rate: float, seconds: float, sent_at: list[float] | None = None
) -> list[float]:
    """Send one request every 1/rate s regardless of responses; return each latency in ms.

    With ``sent_at``, the wall-clock send time of each request is appended to it, in the same order.
    """
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=64)) as client:

        async def one(text: str) -> None:
            wall, started = time.time(), time.perf_counter()
            response = await client.post("/v1/predict", json={"text": text})
            response.raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)
            if sent_at is not None:
                sent_at.append(wall)

        tasks = []
        begin = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = begin + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(texts[i % len(texts)])))
        await asyncio.gather(*tasks)
    return latencies


def wait_for_monitor(service: Service, timeout: float = 60) -> None:
    """Until the drift monitor has started and checked once."""
    checked = {"drift_checked", "drift_detected"}
    if not wait_for(lambda: any(e.get("event") in checked for e in service.logs()), timeout):
        raise RuntimeError("the drift monitor did not start")


def drift_flag(service: Service) -> float:
    for line in httpx.get(f"{service.url}/metrics", timeout=10).text.splitlines():
        if line.startswith("sentiment_drift_detected "):
            return float(line.split()[1])
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def process_tree(root: int) -> dict[int, str]:
    """``root`` and every process below it, pid -> command name (from /proc)."""
    parents: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        name_end = stat.rindex(")")
        names[int(entry.name)] = stat[stat.index("(") + 1 : name_end]
        parents.setdefault(int(stat[name_end + 2 :].split()[1]), []).append(int(entry.name))
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in names:
            found[pid] = names[pid]
            todo.extend(parents.get(pid, []))
    return found


def pss_mb(pid: int) -> float:
    """``pid``'s proportional set size: its private pages plus its share of each page it shares with other
    processes (the web workers' libraries, for one). Summed over processes, each page counts once, as the
    kernel (and a container's memory limit) counts it; summed RSS counts a shared page once per process."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return float("nan")


PSS_EVERY = 4
"""PSS is read at every 4th sample: ``smaps_rollup`` walks a process's page tables under its memory-map lock
(6-8 ms of kernel time for a web worker or the monitor, about 1 ms for the others), so reading it for
five processes every 0.5 s would take about 2 % of the machine from the service being measured, more
from the service with monitoring on (five processes) than off (three). ``VmRSS`` costs 0.03 ms."""


@contextmanager
def tree_memory(root: int, every: float = 0.5) -> Iterator[dict[str, Any]]:
    """Sample the resident memory of ``root``'s whole process tree every ``every`` seconds (PSS every
    :data:`PSS_EVERY` samples) while the block runs; yields a dict that holds, afterwards, the peak of the
    tree's total and each process's peak."""
    peaks: dict[str, Any] = {"tree_peak_rss_mb": 0.0, "tree_peak_pss_mb": 0.0, "process_peak_rss_mb": {}}
    stop = threading.Event()

    def sample() -> None:
        for number in itertools.count():
            if stop.wait(every):
                return
            sizes, shares = {}, {}
            for pid, name in process_tree(root).items():
                try:
                    sizes[f"{name}[{pid}]"] = rss_mb(pid)
                    if number % PSS_EVERY == 0:
                        shares[pid] = pss_mb(pid)
                except OSError:
                    continue
            peaks["tree_peak_rss_mb"] = max(peaks["tree_peak_rss_mb"], sum(sizes.values()))
            peaks["tree_peak_pss_mb"] = max(peaks["tree_peak_pss_mb"], sum(shares.values()))
            for key, mb in sizes.items():
                peaks["process_peak_rss_mb"][key] = max(peaks["process_peak_rss_mb"].get(key, 0.0), mb)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peaks
    finally:
        stop.set()
        sampler.join()


def paired_ratios(offs: list[dict[str, Any]], ons: list[dict[str, Any]]) -> list[float]:
    """On over off within each round (the two runs next to each other in time): the machine's drift over the
    whole run, which moves both medians, cancels within a round."""
    return [on["requests_per_s"] / off["requests_per_s"] for off, on in zip(offs, ons, strict=True)]


def monitor_cpu_seconds(supervisor: int) -> float:
    """CPU seconds (user + system) the drift monitor process under ``supervisor`` has used so far, from /proc:
    what ``sentiment_drift_monitor_cpu_seconds_total`` reports too, but that counter moves only between checks,
    and a check starved by nice 19 can outlast a whole run."""
    for child in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split():
        if b"app.monitoring.monitor" in Path(f"/proc/{child}/cmdline").read_bytes():
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    raise RuntimeError(f"no drift monitor under process {supervisor}")


def full_checks(service: Service) -> int:
    """Drift checks the service has logged on a full window (not ``insufficient_data``)."""
    checked = {"drift_checked", "drift_detected"}
    return sum(1 for e in service.logs() if e.get("event") in checked and e.get("status") != "insufficient_data")


def warm_up(service: Service, env: dict[str, str]) -> None:
    """Saturate the service for WARM_UP_SECONDS before a measured run, as a service that has been serving is.

    With the drift monitor, wait (after the load) for its first check of a full window: the check a new leader
    starts as soon as its window fills is a one-off that a short measured run would otherwise always contain,
    where a saturated service checks once per gap (the check's CPU seconds over the busy CPU share: 100-150 s).
    """
    full = full_checks(service)
    wrk(service.url, "bench/predict.lua", WARM_UP_SECONDS, CONNECTIONS, env)
    supervised = any("app.monitoring.monitor" in command for _, command in service.descendants().values())
    if supervised and not wait_for(lambda: full_checks(service) > full, 120):
        raise RuntimeError("the drift monitor did not check a full window")


def host_cpu_times() -> list[int]:
    """The host's CPU time so far (all cores, clock ticks) by state, from /proc/stat: user, nice, system, idle,
    iowait, irq, softirq, steal."""
    return [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


def accounted_wrk(service: Service, seconds: int, env: dict[str, str]) -> dict[str, Any]:
    """Part 1's wrk run, with the service's CPU per request (every process, from /proc) and the host's idle and
    stolen shares of CPU time (a virtual machine's steal is time its cores ran someone else) over the run."""
    host, cpu = host_cpu_times(), tree_cpu_seconds(service.process.pid)
    result = wrk(service.url, "bench/predict.lua", seconds, CONNECTIONS, env)
    spent = tree_cpu_seconds(service.process.pid) - cpu
    host = [after - before for before, after in zip(host, host_cpu_times(), strict=True)]
    result["cpu_us_per_request"] = spent / (result["requests_per_s"] * seconds) * 1e6
    result["host_idle_share"] = (host[3] + host[4]) / sum(host)
    result["host_steal_share"] = host[7] / sum(host)
    return result


def host_shares(runs: list[dict[str, Any]]) -> str:
    """The host's idle / stolen CPU shares of each run, for printing."""
    return ", ".join(f"{run['host_idle_share']:.0%}/{run['host_steal_share']:.0%}" for run in runs)


def throughput(store: ModelRegistry, tmp: Path, env: dict[str, str], seconds: int) -> dict[str, Any]:
    """Part 1: everything off vs everything on, THROUGHPUT_ROUNDS rounds in alternating order (the machine is
    shared and noisy: in one run, "off" went from 5,133 to 3,547 req/s over its three rounds)."""
    offs, ons, checks = [], [], 0

    def run_off() -> None:
        off = start_service(store, tmp / "off.log", SENTIMENT_MONITORING_ENABLED="false")
        try:
            warm_up(off, env)
            with tree_memory(off.process.pid) as memory:
                offs.append(accounted_wrk(off, seconds, env))
            offs[-1].update(memory)
        finally:
            off.stop()

    def run_on() -> None:
        nonlocal checks
        on = start_service(store, tmp / "on.log", supervised=True)
        try:
            wait_for_monitor(on)  # steady state: not the monitor's one-off torch import competing with wrk
            warm_up(on, env)
            cpu_before = monitor_cpu_seconds(on.process.pid)
            with tree_memory(on.process.pid) as memory:
                ons.append(accounted_wrk(on, seconds, env))
            ons[-1].update(memory)
            cpu = monitor_cpu_seconds(on.process.pid) - cpu_before
            ons[-1]["monitor_cpu_seconds_per_minute"] = cpu * 60 / seconds
            checks += sum(1 for e in on.logs() if e.get("event") in {"drift_checked", "drift_detected"})
        finally:
            on.stop()

    # off-on, on-off, off-on, ...: a machine that speeds up or slows down during the run favours neither.
    for round_number in range(THROUGHPUT_ROUNDS):
        for run in (run_off, run_on) if round_number % 2 == 0 else (run_on, run_off):
            run()
    off_rate = float(np.median([r["requests_per_s"] for r in offs]))
    on_rate = float(np.median([r["requests_per_s"] for r in ons]))
    ratios = paired_ratios(offs, ons)
    cpu_ratios = [off["cpu_us_per_request"] / on["cpu_us_per_request"] for off, on in zip(offs, ons, strict=True)]
    monitor_cpu = float(np.median([r["monitor_cpu_seconds_per_minute"] for r in ons]))
    tree_peak = max(r["tree_peak_rss_mb"] for r in ons)
    tree_pss = max(r["tree_peak_pss_mb"] for r in ons)
    print(
        f"throughput (medians of {THROUGHPUT_ROUNDS} rounds) off {off_rate:.0f} req/s, on {on_rate:.0f} req/s; on/off "
        f"per round {', '.join(f'{r:.1%}' for r in ratios)}, median {np.median(ratios):.1%} ({checks} drift checks "
        f"ran meanwhile, the monitor used {monitor_cpu:.1f} CPU s a minute); CPU per request off/on per round "
        f"{', '.join(f'{r:.1%}' for r in cpu_ratios)}, median {np.median(cpu_ratios):.1%}; host CPU idle / stolen "
        f"off {host_shares(offs)}, on {host_shares(ons)}; "
        f"every process of the service with monitoring on: peak {tree_pss:.0f} MB in all (PSS), "
        f"{tree_peak:.0f} MB summed RSS",
        flush=True,
    )
    return {
        "throughput_off": offs,
        "throughput_on": ons,
        "drift_checks_during_load": checks,
        "monitor_cpu_seconds_per_minute_median": monitor_cpu,
        "throughput_on_vs_off_per_round": ratios,
        "throughput_on_vs_off": float(np.median(ratios)),
        "throughput_on_vs_off_of_medians": on_rate / off_rate,
        "cpu_per_request_off_vs_on_per_round": cpu_ratios,
        "cpu_per_request_off_vs_on": float(np.median(cpu_ratios)),
        "service_tree_peak_rss_mb_on": tree_peak,
        "service_tree_peak_rss_mb_off": max(r["tree_peak_rss_mb"] for r in offs),
        "service_tree_peak_pss_mb_on": tree_pss,
        "service_tree_peak_pss_mb_off": max(r["tree_peak_pss_mb"] for r in offs),
    }


def tree_cpu_times(root: int) -> tuple[float, float]:
    """CPU seconds in user space and in the kernel (every thread) the processes of ``root``'s tree have used so
    far, from /proc, those of its children that exited and were reaped included (a worker gunicorn recycled, a
    finished retrain): each process's own time plus the time of the children it reaped."""
    user = system = 0
    for pid in process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        user += int(fields[11]) + int(fields[13])  # utime, cutime
        system += int(fields[12]) + int(fields[14])  # stime, cstime
    ticks = os.sysconf("SC_CLK_TCK")
    return user / ticks, system / ticks


def tree_cpu_seconds(root: int) -> float:
    """:func:`tree_cpu_times`, user and system together."""
    return sum(tree_cpu_times(root))


def side_by_side(off: Service, on: Service, rounds: int, seconds: int, env: dict[str, str]) -> list[dict[str, float]]:
    """``rounds`` runs of ``seconds`` with both services saturated at once, each by its own wrk (``-t2``, half of
    part 1's connections): per run, each one's requests per second and CPU per request (every process of its
    tree, from /proc; also split into user space and kernel), and the ratios on/off of throughput and off/on of
    CPU per request."""
    services = {"off": off, "on": on}
    runs = []
    with ThreadPoolExecutor(2) as pool:
        for _ in range(rounds):
            cpu = {name: tree_cpu_times(service.process.pid) for name, service in services.items()}
            loads = {
                name: pool.submit(wrk, service.url, "bench/predict.lua", seconds, CONNECTIONS // 2, env)
                for name, service in services.items()
            }
            rates = {name: float(load.result()["requests_per_s"]) for name, load in loads.items()}
            run: dict[str, float] = {**rates, "on_vs_off": rates["on"] / rates["off"]}
            for name, service in services.items():
                used = [
                    after - before for before, after in zip(cpu[name], tree_cpu_times(service.process.pid), strict=True)
                ]
                per_request = [spent / (rates[name] * seconds) * 1e6 for spent in used]
                run[f"cpu_us_per_request_{name}"] = sum(per_request)
                run[f"cpu_user_us_per_request_{name}"], run[f"cpu_system_us_per_request_{name}"] = per_request
            run["cpu_per_request_off_vs_on"] = run["cpu_us_per_request_off"] / run["cpu_us_per_request_on"]
            runs.append(run)
    return runs


@contextmanager
def concurrent_pair(store: ModelRegistry, folder: Path, *, on_first: bool) -> Iterator[tuple[Service, Service]]:
    """Part 5's pair, (off, on): an unmonitored service and the supervised one with everything on, started one
    after the other in the order asked (logs and state in ``folder``), both stopped on exit."""
    folder.mkdir()
    starts = {
        "off": lambda: start_service(store, folder / "off.log", SENTIMENT_MONITORING_ENABLED="false"),
        "on": lambda: start_service(store, folder / "on.log", supervised=True),
    }
    with ExitStack() as stack:
        started = {}
        for name in ("on", "off") if on_first else ("off", "on"):
            started[name] = starts[name]()
            stack.callback(started[name].stop)
        yield started["off"], started["on"]


def pooled_cpu_us(runs: list[dict[str, float]], kind: str = "") -> dict[str, float]:
    """Each service's CPU per request over ``runs`` together (their CPU over their requests), in microseconds;
    ``kind`` "user_" or "system_" for one side of it."""
    return {
        name: sum(run[f"cpu_{kind}us_per_request_{name}"] * run[name] for run in runs) / sum(run[name] for run in runs)
        for name in ("off", "on")
    }


def pooled_cpu_ratio(runs: list[dict[str, float]]) -> float:
    """CPU per request off/on over ``runs`` together."""
    cpu = pooled_cpu_us(runs)
    return cpu["off"] / cpu["on"]


def concurrent_throughput(store: ModelRegistry, tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    """Part 5: the service with everything on and the one with it off running at the same time on the same
    cores, each saturated by its own wrk (``-t2``, half of part 1's connections): CONCURRENT_PAIRS pairs of
    fresh services, CONCURRENT_ROUNDS runs of CONCURRENT_SECONDS each; on/off per run and over all runs.

    Both see the same moments of the shared machine, so its swings (which move part 1's sequential rounds by
    up to 37 points) cancel within a run. Two ratios per run:

    - throughput, on/off. The scheduler shares the cores between runnable threads, so the "on" service's
      recorder threads and drift monitor get CPU time besides its workers': this ratio can flatter "on" by the
      CPU they take.
    - CPU per request, off/on: every process of each service (all threads, user + system, from /proc) over the
      requests it answered. It does not depend on how the cores were shared; its inverse is the extra CPU a
      request costs with monitoring on.

    Fresh pairs, because two identical unmonitored services started side by side differ by 1-2 % in CPU per
    request for as long as they run (their own hash seeds and memory layouts): more runs of one pair do not
    average that out, more pairs do. Which of the two starts first alternates from pair to pair.
    """
    runs: list[dict[str, float]] = []
    monitor_cpu = 0.0
    for pair in range(CONCURRENT_PAIRS):
        with concurrent_pair(store, tmp / f"pair-{pair}", on_first=pair % 2 == 1) as (off, on):
            wait_for_monitor(on)
            warm_up(off, env)
            warm_up(on, env)
            before = monitor_cpu_seconds(on.process.pid)
            pair_runs = side_by_side(off, on, CONCURRENT_ROUNDS, CONCURRENT_SECONDS, env)
            monitor_cpu += monitor_cpu_seconds(on.process.pid) - before
        runs += [{**run, "pair": pair} for run in pair_runs]
    measured_seconds = CONCURRENT_PAIRS * CONCURRENT_ROUNDS * CONCURRENT_SECONDS
    per_pair = [pooled_cpu_ratio([run for run in runs if run["pair"] == pair]) for pair in range(CONCURRENT_PAIRS)]
    ratios = [run["on_vs_off"] for run in runs]
    requests = {name: sum(run[name] for run in runs) for name in ("off", "on")}
    # All runs pooled (CPU over requests): a drift check, which a saturated service starts once per gap of
    # 100-150 s, counts in proportion to the time it covers rather than in one run a median may leave out.
    pooled = pooled_cpu_ratio(runs)
    print(
        f"concurrent on and off ({CONCURRENT_PAIRS} pairs x {CONCURRENT_ROUNDS} runs of {CONCURRENT_SECONDS} s): "
        f"throughput on/off per run {', '.join(f'{r:.1%}' for r in ratios)}, "
        f"all runs {requests['on'] / requests['off']:.1%}; "
        f"CPU per request off/on per pair {', '.join(f'{r:.1%}' for r in per_pair)}, all runs pooled {pooled:.1%} "
        f"(off/on user {' / '.join(f'{v:.0f}' for v in pooled_cpu_us(runs, 'user_').values())} us, system "
        f"{' / '.join(f'{v:.0f}' for v in pooled_cpu_us(runs, 'system_').values())} us; "
        f"the drift monitor {monitor_cpu * 60 / measured_seconds:.2f} CPU s a minute)",
        flush=True,
    )
    return {
        "pairs": CONCURRENT_PAIRS,
        "seconds": CONCURRENT_SECONDS,
        "runs": runs,
        "on_vs_off": float(np.median(ratios)),
        "on_vs_off_all_runs": requests["on"] / requests["off"],
        "cpu_off_vs_on": float(np.median([run["cpu_per_request_off_vs_on"] for run in runs])),
        "cpu_off_vs_on_per_pair": per_pair,
        "cpu_off_vs_on_pooled": pooled,
        "cpu_us_per_request_pooled": pooled_cpu_us(runs),
        "cpu_user_us_per_request_pooled": pooled_cpu_us(runs, "user_"),
        "cpu_system_us_per_request_pooled": pooled_cpu_us(runs, "system_"),
        "monitor_cpu_seconds_per_minute": monitor_cpu * 60 / measured_seconds,
    }


def naive_baseline(store: ModelRegistry, tmp: Path, env: dict[str, str], seconds: int) -> dict[str, Any]:
    """Part 4: the same model behind a naive FastAPI server (``bench/naive_app.py``: one uvicorn process,
    one ``predict_proba`` per request), under the same wrk load."""
    port = free_port()
    with (tmp / "naive.log").open("wb") as log:
        command = ["uvicorn", "--factory", "bench.naive_app:create_app", "--host", "127.0.0.1", "--port", str(port)]
        process = subprocess.Popen(
            [sys.executable, "-m", *command, "--log-level", "warning"],
            cwd=REPO,
            env={**os.environ, "SENTIMENT_MODEL_STORE": str(store.root)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(f"{url}/healthz"), 60)
        result = wrk(url, "bench/predict.lua", seconds, CONNECTIONS, env)
    finally:
        process.terminate()
        process.wait(30)
    print(f"naive FastAPI server on the same model: {result['requests_per_s']:.0f} req/s", flush=True)
    return result


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def p99_during_checks(store: ModelRegistry, tmp: Path, in_domain: list[str], seconds: int) -> dict[str, Any]:
    """Part 2: p99 at 100 req/s, monitor idle vs checking back to back (no minimum gap, no CPU budget)."""
    p99: dict[str, Any] = {}
    for name, every, interval in (("idle", "1000000000", "1000000"), ("checking", "1", "0.1")):
        service = start_service(
            store,
            tmp / f"p99-{name}.log",
            supervised=True,
            SENTIMENT_DRIFT_CHECK_EVERY_PREDICTIONS=every,
            SENTIMENT_DRIFT_CHECK_INTERVAL_SECONDS=interval,
            SENTIMENT_DRIFT_MIN_CHECK_INTERVAL_SECONDS="0",
            SENTIMENT_DRIFT_MAX_CPU_SHARE="1",
        )
        try:
            wait_for_monitor(service)
            asyncio.run(open_loop(service.url, in_domain, 100, 6))  # fill the window: checks are full tests
            latencies = asyncio.run(open_loop(service.url, in_domain, 100, seconds))
            checks = [e for e in service.logs() if e.get("event") in {"drift_checked", "drift_detected"}]
        finally:
            service.stop()
        p99[name] = {
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "requests": len(latencies),
            "drift_checks": len(checks),
        }
    p99["ratio"] = p99["checking"]["p99_ms"] / p99["idle"]["p99_ms"]
    print(
        f"p99 at 100 req/s: idle {p99['idle']['p99_ms']:.1f} ms, during checks "
        f"{p99['checking']['p99_ms']:.1f} ms ({p99['checking']['drift_checks']} checks) = {p99['ratio']:.2f}x",
        flush=True,
    )
    return p99


def detection_delays(store: ModelRegistry, tmp: Path, in_domain: list[str], clothing: list[str]) -> list[float | None]:
    """Part 3: seconds from the switch to clothing reviews at 50 req/s until the flag is 1, default settings."""
    service = start_service(store, tmp / "delay.log", supervised=True)
    delays = []
    try:
        for run in range(3):
            asyncio.run(open_loop(service.url, in_domain[run * 700 :], 50, 14))
            deadline = time.monotonic() + 60
            while drift_flag(service) != 0.0 and time.monotonic() < deadline:
                asyncio.run(open_loop(service.url, in_domain, 50, 2))
            switched = time.monotonic()

            async def shifted(offset: int = run * 3000, switched: float = switched) -> float | None:
                sender = asyncio.create_task(open_loop(service.url, clothing[offset:], 50, 90))
                try:
                    while time.monotonic() - switched < 90:
                        await asyncio.sleep(0.5)
                        if await asyncio.to_thread(drift_flag, service) == 1.0:
                            return time.monotonic() - switched
                    return None
                finally:
                    sender.cancel()

            delay = asyncio.run(shifted())
            delays.append(delay)
            print(f"detection delay run {run + 1}: {delay if delay is None else round(delay, 1)} s", flush=True)
    finally:
        service.stop()
    return delays


def current_model() -> tuple[ModelRegistry, str, list[str]]:
    """The store, its current version, and that version's held-out reference texts (shuffled, one per line)."""
    store = ModelRegistry(Settings().model_store)
    model = store.load_current()
    if model is None:
        raise SystemExit("no current model: run `python -m app.cli train` first")
    texts = [t.replace("\n", " ") for t in model.read_json(REFERENCE_ARTIFACT)["texts"]]
    random.Random(0).shuffle(texts)
    return store, model.version, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=30, help="measured wrk run (part 1 and 4)")
    parser.add_argument("--parts", default="1,2,3,4,5", help="comma-separated parts to run (see the module doc)")
    args = parser.parse_args()
    parts = {int(part) for part in args.parts.split(",")}
    store, version, in_domain = current_model()
    clothing = load_clothing().texts
    random.Random(1).shuffle(clothing)
    results: dict[str, Any] = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model_version": version,
    }

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        text_file = tmp / "texts.txt"
        text_file.write_text("\n".join(in_domain) + "\n")
        env = {"BENCH_TEXTS": str(text_file), "PATH": "/usr/bin:/bin"}
        if 1 in parts:
            results.update(throughput(store, tmp, env, args.seconds))
        if 2 in parts:
            results["p99_during_drift_checks"] = p99_during_checks(store, tmp, in_domain, args.seconds)
        if 3 in parts:
            results["detection_delay_seconds"] = detection_delays(store, tmp, in_domain, clothing)
        if 4 in parts:
            results["naive"] = naive_baseline(store, tmp, env, args.seconds)
            if "throughput_on" in results:
                on_rate = float(np.median([r["requests_per_s"] for r in results["throughput_on"]]))
                results["on_vs_naive"] = on_rate / results["naive"]["requests_per_s"]
                print(f"service with monitoring on vs naive: {results['on_vs_naive']:.1f}x", flush=True)
        if 5 in parts:
            results["concurrent_throughput"] = concurrent_throughput(store, tmp, env)

    if parts != {1, 2, 3, 4, 5}:
        return
    write_results("monitoring", results)
    print("wrote bench/results/monitoring.json")


if __name__ == "__main__":
    main()
