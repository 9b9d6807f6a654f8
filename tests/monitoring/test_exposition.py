"""Compaction of dead processes' metric files, with real processes writing a real multiprocess directory.

Every test compares the parsed exposition with what ``/metrics`` served before compaction existed (a fresh
``MultiProcessCollector`` over every file, after ``mark_process_dead``): compaction, a crash at any step of
it, and compactions racing scrapes must leave every sample's value unchanged.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from app.monitoring import exposition, metrics
from app.monitoring.metrics import MULTIPROC_ENV

REPO = Path(__file__).resolve().parents[2]
MODES = ("all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent", "livemostrecent")
MERGED_TYPES = ("counter", "histogram", "gauge_min", "gauge_max", "gauge_sum", "gauge_mostrecent")

# A process declaring a labelled counter, two histograms and a gauge of every mode; it runs each line of its
# stdin as code (its first writes come from argv), answering "ok", until stdin closes or it is killed.
WRITER = f"""
import sys
from prometheus_client import Counter, Gauge, Histogram
EVENTS = Counter("t_events_total", "Events.", ["kind"])
LATENCY = Histogram("t_latency_seconds", "Latency.", ["route"], buckets=(0.25, 0.5, 1.0, 2.0))
PLAIN = Histogram("t_plain_seconds", "No labels.", buckets=(1.0, 4.0))
GAUGES = {{m: Gauge("t_gauge_" + m, m, ["shard"], multiprocess_mode=m) for m in {MODES!r}}}
i = int(sys.argv[1])
exec(sys.argv[2])
print("ok", flush=True)
for line in sys.stdin:
    exec(line)
    print("ok", flush=True)
"""
# Whole numbers and dyadic fractions: every sum is exact in any order, so values must be bit-identical.
WRITES = """
EVENTS.labels(kind="common").inc(i + 1)
EVENTS.labels(kind=f"only{i}").inc(0.5)
for value in (0.125, 0.5, 0.75 * i, 3.0):
    LATENCY.labels(route=f"r{i % 2}").observe(value)
PLAIN.observe(i)
for mode, gauge in GAUGES.items():
    gauge.labels(shard="shared").set(i * 1.5 - 3)
    gauge.labels(shard=f"p{i}").set(i)
"""

Samples = dict[tuple[str, str, str, str, tuple[tuple[str, str], ...]], float]


class Writer:
    def __init__(self, directory: Path, index: int, writes: str = WRITES) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(index), writes],
            cwd=REPO,
            env={**os.environ, MULTIPROC_ENV: str(directory)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.process.pid
        self._answer()

    def _answer(self) -> None:
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == "ok\n", "writer failed"

    def run(self, code: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(code.replace("\n", "; ") + "\n")
        self.process.stdin.flush()
        self._answer()

    def kill(self) -> None:
        self.process.kill()
        self.process.communicate()

    def exit(self) -> None:
        self.process.communicate(timeout=30)
        assert self.process.returncode == 0


def parse(text: bytes) -> Samples:
    return {
        (family.name, family.type, family.documentation, s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def value(samples: Samples, sample: str, **labels: str) -> float:
    (found,) = [v for k, v in samples.items() if k[3] == sample and k[4] == tuple(sorted(labels.items()))]
    return found


def stock(directory: Path) -> Samples:
    """What /metrics served before compaction existed: a fresh MultiProcessCollector over every file."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return parse(generate_latest(registry))


def served(directory: Path, *, auto_compact: bool = False) -> Samples:
    """What /metrics serves now (optionally without the scrape-time compaction)."""
    registry = CollectorRegistry()
    exposition.register_collector(registry, directory, auto_compact=auto_compact)
    return parse(generate_latest(registry))


def die(writers: list[Writer], directory: Path) -> list[int]:
    """Half killed, half exiting normally; then what gunicorn's child_exit did before compaction existed."""
    for n, writer in enumerate(writers):
        writer.kill() if n % 2 else writer.exit()
        mark_process_dead(writer.pid, str(directory))  # type: ignore[no-untyped-call]
    return [w.pid for w in writers]


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Writer]:
    writer = Writer(tmp_path, 100)
    yield writer
    writer.kill()


def test_compaction_keeps_every_type_and_gauge_mode_identical(tmp_path: Path, live: Writer) -> None:
    dead = die([Writer(tmp_path, i) for i in range(4)], tmp_path)
    before = stock(tmp_path)
    families = {key[0] for key in before}
    assert {f"t_gauge_{m}" for m in MODES} <= families  # the live writer keeps every live mode present
    assert value(before, "t_events_total", kind="common") == 1 + 2 + 3 + 4 + 101

    result = exposition.compact(tmp_path)
    assert result.ran and result.merged_files == 4 * len(MERGED_TYPES) and result.pids == sorted(dead)
    assert served(tmp_path) == before
    assert stock(tmp_path) == before  # the aggregates are ordinary files to the stock collector
    left = names(tmp_path)
    assert {exposition.aggregate_name(t) for t in MERGED_TYPES} <= left
    assert not [n for n in left if any(n.endswith(f"_{pid}.db") and not n.startswith("gauge_all_") for pid in dead)]
    assert {f"gauge_all_{pid}.db" for pid in dead} <= left  # its pid label comes from the file name: kept
    assert len([n for n in left if n.endswith(f"_{live.pid}.db")]) == len(MODES) + 2  # the live one is untouched

    # A second generation folds into the existing aggregates; the live process keeps counting on top.
    more = die([Writer(tmp_path, i) for i in range(4, 7)], tmp_path)
    live.run('EVENTS.labels(kind="common").inc(1000)\nLATENCY.labels(route="r0").observe(1.5)')
    before = stock(tmp_path)
    assert exposition.compact(tmp_path).pids == sorted(more)
    assert served(tmp_path) == before
    assert value(before, "t_events_total", kind="common") == sum(range(1, 8)) + 101 + 1000
    for i in range(7):  # label values seen only in dead processes stay
        assert value(before, "t_events_total", kind=f"only{i}") == 0.5
    assert exposition.compact(tmp_path).merged_files == 0  # nothing dead left to fold


def test_service_metrics_of_killed_processes_after_retire_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service's own metrics, real-valued observations: counts exact, float sums to rounding."""
    code = (
        "import numpy as np\nfrom app.monitoring import metrics as m\nm.initialise_counters()\n"
        "rng = np.random.default_rng(i)\n"
        "for n in range(20):\n"
        "    v = 'v1' if n % 3 else 'v2'\n"
        "    c = float(rng.uniform(0.5, 1.0))\n"
        "    m.PREDICTIONS.labels(model_version=v, sentiment='positive' if n % 2 else 'negative').inc()\n"
        "    m.PREDICTION_CONFIDENCE.labels(model_version=v, sentiment='positive').observe(c)\n"
        "    m.REQUEST_DURATION.labels(method='POST', route='/v1/predict', status='200').observe(c / 100)\n"
        "    m.TEXT_LENGTH.observe(int(rng.integers(1, 3000)))\n"
        "m.MODEL_INFO.labels(version='v2').set(1)\nm.DRIFT_LAST_CHECK.set(1_700_000_000 + i)\n"
        "m.DRIFT_SCORE.set(i / 7)\nm.REQUESTS_IN_PROGRESS.inc()\n"
    )
    writers = [Writer(tmp_path, i, code) for i in range(5)]
    die(writers, tmp_path)
    before = stock(tmp_path)
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    metrics.retire_process(writers[0].pid)  # as gunicorn's child_exit and the supervisor call it
    assert exposition.aggregate_name("histogram") in names(tmp_path)
    after = parse(metrics.render()[0])
    assert after.keys() == before.keys()
    for key, value in before.items():
        if key[3].endswith("_sum"):
            assert math.isclose(after[key], value, rel_tol=1e-12), key
        else:
            assert after[key] == value, key
    assert sum(v for k, v in after.items() if k[3] == "sentiment_predictions_total") == 5 * 20


@pytest.mark.parametrize(
    ("step", "nth"),
    [
        ("aggregates_written", 1),
        ("journal_written", 1),
        ("aggregate_replaced", 1),  # one aggregate holds its sources, which are still there
        ("aggregate_replaced", len(MERGED_TYPES)),
        ("source_deleted", 1),
        ("source_deleted", 7),
    ],
)
def test_a_compaction_killed_at_any_step_never_double_counts_or_loses_counts(
    tmp_path: Path, live: Writer, step: str, nth: int
) -> None:
    die([Writer(tmp_path, i) for i in range(2)], tmp_path)
    exposition.compact(tmp_path)  # the crash happens on top of existing aggregates
    die([Writer(tmp_path, i) for i in range(2, 5)], tmp_path)
    before = stock(tmp_path)
    crash = (
        "import os, signal, sys\nfrom app.monitoring import exposition\n"
        "seen = []\n"
        "def crash_point(name):\n"
        "    seen.append(name)\n"
        "    if seen.count(sys.argv[2]) == int(sys.argv[3]):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "exposition._crash_point = crash_point\n"
        "exposition.compact(sys.argv[1])\n"
    )
    killed = subprocess.run([sys.executable, "-c", crash, str(tmp_path), step, str(nth)], cwd=REPO, check=False)
    assert killed.returncode == -signal.SIGKILL
    renamed = step in ("aggregate_replaced", "source_deleted")
    assert (exposition.JOURNAL_NAME in names(tmp_path)) == (step != "aggregates_written")
    if renamed:  # the reason for the journal: the plain glob now counts some dead process twice
        assert stock(tmp_path) != before

    assert served(tmp_path) == before  # a scrape right after the crash, before anyone recovers
    result = exposition.compact(tmp_path)  # the next compaction (or a scrape's) recovers, then compacts
    assert result.recovered
    assert served(tmp_path) == before
    assert stock(tmp_path) == before
    left = names(tmp_path)
    assert exposition.JOURNAL_NAME not in left and not [n for n in left if n.endswith(exposition.TMP_SUFFIX)]
    assert exposition.dead_files(tmp_path) == []


def test_scrapes_racing_concurrent_compactions_always_see_the_same_values(tmp_path: Path, live: Writer) -> None:
    die([Writer(tmp_path, i) for i in range(10)], tmp_path)
    before = stock(tmp_path)
    seen: list[Samples] = []
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            seen.append(served(tmp_path))

    scrapers = [threading.Thread(target=scrape) for _ in range(2)]
    for thread in scrapers:
        thread.start()
    compact = (
        "import sys; from app.monitoring import exposition\n"
        "print(exposition.compact(sys.argv[1], timeout=30).merged_files)"
    )
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", compact, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
            )
            for _ in range(4)
        ]
        merged = [int(p.communicate(timeout=60)[0].split()[-1]) for p in procs]  # the last line (logs go first)
    finally:
        stop.set()
        for thread in scrapers:
            thread.join()
    assert sorted(merged) == [0, 0, 0, 10 * len(MERGED_TYPES)]  # one did it all; the others found nothing
    assert seen and all(s == before for s in seen)
    assert served(tmp_path) == before


def test_a_busy_lock_makes_a_compaction_give_up_and_a_scrape_wait(
    tmp_path: Path, live: Writer, monkeypatch: pytest.MonkeyPatch
) -> None:
    die([Writer(tmp_path, 0)], tmp_path)
    with exposition._locked(tmp_path, exclusive=True, timeout=0) as held:
        assert held
        files = names(tmp_path)
        assert not exposition.compact(tmp_path, timeout=0.05).ran
        assert names(tmp_path) == files
        monkeypatch.setattr(exposition, "SCRAPE_LOCK_TIMEOUT_SECONDS", 0.05)
        with pytest.raises(TimeoutError):
            served(tmp_path)
    assert exposition.compact(tmp_path, timeout=0).ran


def test_a_scrape_compacts_once_dead_files_pile_up(tmp_path: Path, live: Writer) -> None:
    die([Writer(tmp_path, i) for i in range(2)], tmp_path)
    assert len(exposition.dead_files(tmp_path)) == 2 * len(MERGED_TYPES) < exposition.AUTO_COMPACT_DEAD_FILES
    before = stock(tmp_path)
    assert served(tmp_path, auto_compact=True) == before
    assert exposition.aggregate_name("counter") not in names(tmp_path)  # below the threshold: left alone

    die([Writer(tmp_path, i) for i in range(2, 4)], tmp_path)
    assert exposition.needs_compaction(tmp_path)
    before = stock(tmp_path)
    assert served(tmp_path, auto_compact=True) == before
    assert exposition.dead_files(tmp_path) == []


def test_only_dead_pids_are_folded_and_a_reused_pid_counts_afresh(tmp_path: Path, live: Writer) -> None:
    dead = die([Writer(tmp_path, 1)], tmp_path)
    exposition.compact(tmp_path, pids=[live.pid])  # named, but alive: nothing happens
    assert exposition.aggregate_name("counter") not in names(tmp_path)
    exposition.compact(tmp_path, pids=dead)
    before = stock(tmp_path)
    # The kernel hands the dead pid to a new process, which starts a fresh file under the old name.
    reused = MmapedDict(str(tmp_path / f"counter_{dead[0]}.db"))  # type: ignore[no-untyped-call]
    key = mmap_key("t_events", "t_events_total", ["kind"], ["common"], "Events.")
    reused.write_value(key, 7.0, 0.0)  # type: ignore[no-untyped-call]
    reused.close()  # type: ignore[no-untyped-call]
    assert (
        value(served(tmp_path), "t_events_total", kind="common") == value(before, "t_events_total", kind="common") + 7
    )


def test_mostrecent_survives_repeated_compaction_with_its_timestamp(tmp_path: Path) -> None:
    """The aggregate keeps the winning timestamp, so a later, older-stamped dead value does not replace it."""
    newest = Writer(tmp_path, 1, 'GAUGES["mostrecent"].labels(shard="x").set(42)')
    die([newest], tmp_path)
    exposition.compact(tmp_path)
    older = Writer(tmp_path, 2, 'GAUGES["mostrecent"].labels(shard="x")._value.set(7.0, timestamp=1.0)')
    die([older], tmp_path)
    before = stock(tmp_path)
    exposition.compact(tmp_path)
    assert (
        value(before, "t_gauge_mostrecent", shard="x") == value(served(tmp_path), "t_gauge_mostrecent", shard="x") == 42
    )


def test_float_sums_of_aggregates_match_to_rounding(tmp_path: Path) -> None:
    """Non-dyadic observations: the aggregate's exact (fsum) total differs from a glob-order sum by rounding only."""
    values = np.random.default_rng(0).uniform(0, 1, 10).tolist()
    die([Writer(tmp_path, i, f"LATENCY.labels(route='x').observe({v!r})") for i, v in enumerate(values)], tmp_path)
    before = stock(tmp_path)
    exposition.compact(tmp_path)
    total = value(before, "t_latency_seconds_sum", route="x")
    assert math.isclose(value(served(tmp_path), "t_latency_seconds_sum", route="x"), total, rel_tol=1e-14)
    assert math.isclose(total, math.fsum(values), rel_tol=1e-14)


def test_gunicorn_child_exit_retires_the_worker(tmp_path: Path) -> None:
    """gunicorn's hook (in a fresh interpreter: importing its config changes process state) drops the dead
    worker's live gauges, as before, and folds its other files: the exposition is what the old hook left."""
    metrics_dir, old_hook = tmp_path / "metrics", tmp_path / "old"
    metrics_dir.mkdir()
    live = Writer(metrics_dir, 100)
    try:
        worker = Writer(metrics_dir, 5)
        worker.kill()
        shutil.copytree(metrics_dir, old_hook)
        mark_process_dead(worker.pid, str(old_hook))  # type: ignore[no-untyped-call]
        hook = (
            "import sys, types\nimport app.gunicorn_conf as conf\n"
            "conf.child_exit(None, types.SimpleNamespace(pid=int(sys.argv[1])))\n"
        )
        env = {**os.environ, MULTIPROC_ENV: str(metrics_dir)}
        subprocess.run(
            [sys.executable, "-c", hook, str(worker.pid)], cwd=REPO, env=env, check=True, capture_output=True
        )
        left = names(metrics_dir)
        assert exposition.aggregate_name("counter") in left
        assert [n for n in left if n.endswith(f"_{worker.pid}.db")] == [f"gauge_all_{worker.pid}.db"]
        # (the hook's own process wrote the service's metrics, at 0: only the test metrics are compared)
        after = {k: v for k, v in served(metrics_dir).items() if k[0].startswith("t_")}
        assert after == stock(old_hook)
        assert value(after, "t_gauge_max", shard="p5") == 5 and value(after, "t_events_total", kind="only5") == 0.5
    finally:
        live.kill()
