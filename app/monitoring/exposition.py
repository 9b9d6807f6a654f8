"""Serving the multiprocess metrics directory, and compacting the files of dead processes into aggregates.

prometheus_client's multiprocess mode gives every process its own files, ``{type}_{pid}.db`` (``counter``,
``histogram``, ``summary``, ``gauge_{mode}``), and ``MultiProcessCollector`` reads every ``*.db`` file on each
scrape. ``mark_process_dead`` removes only a dead process's ``gauge_live*`` files: its counters, histograms and
``min``/``max``/``sum``/``mostrecent`` gauges stay, because their values must outlive it. Every worker recycle,
retrain and monitor restart so adds files that every later scrape reads again (``bench/metrics_render.py``).

Compaction folds the files of dead processes into one aggregate file per file type, ``{type}_aggregate.db``,
written in the same format, so the collector merges it like any other process's file:

=======================  ================================================  =====================================
file type                aggregate value of one key (one sample)           why the exposition is unchanged
=======================  ================================================  =====================================
counter, histogram,      sum of the dead files' values (raw, per bucket)    the collector sums per sample too
summary, ``gauge_sum``
``gauge_min``/``_max``   min/max of the dead files' values                  min/max are associative
``gauge_mostrecent``     the value with the latest timestamp, timestamp     the collector picks the latest
                         kept                                               timestamp over all files
``gauge_live*``          deleted (what ``mark_process_dead`` does)          live modes drop dead processes
``gauge_all``            left alone: the ``pid`` label is read from the     —
                         file name, so folding would relabel the samples
=======================  ================================================  =====================================

Sums of whole numbers (every count, every bucket) are exact, so those samples are bit-identical; a float
``_sum`` may differ in its last bits, as it already does between scrapes (the collector sums in directory order).

A file is *dead* when its pid names no process (``os.kill(pid, 0)``: zombies and other users' processes count
as alive). All writers must share this pid namespace, as they do under ``app.supervisor``. A pid the kernel
reuses after its files were folded starts fresh files (without compaction it resumes the dead process's counts).
One race is left, as for any pid reuse in multiprocess mode: a new process given the dead pid (after the pid
space wrapped) that opens its metric files in the milliseconds between the liveness check and their deletion
would keep writing into the deleted files, and its counts would be lost (never double counted).

Crash safety, with three names in the directory: ``.compaction.lock`` (``flock``: compaction exclusive, each
scrape shared), ``.compaction.journal`` and ``.{type}_aggregate.db.tmp`` (neither matches ``*.db``).
A compaction, holding the exclusive lock:

1. recovers from an interrupted compaction (below);
2. writes each new aggregate (old aggregate + dead files) to its temporary name, fsyncs it and the directory;
3. writes the journal (temporary name, fsync, rename, fsync): for each type, its temporary name and the
   source files it merged;
4. renames each temporary file over its aggregate (fsync the directory);
5. deletes the merged source files, then the journal (fsync the directory after each).

The set of files a scrape reads is ``*.db`` minus the sources of every journal entry whose temporary file is
gone. Each step changes that set's total by nothing: writing a temporary file or the journal adds no ``*.db``
file; the rename of step 4 atomically adds the sources' values to the aggregate and, as the temporary name
disappears in the same ``rename``, removes the sources from the set; deleting a source removes a file already
outside the set. So a scrape between any two steps (after a crash, which releases the lock) counts every value
exactly once. Recovery keeps this: for each journal entry whose temporary file is gone (renamed: merged) it
deletes the sources; then it deletes the journal, and only then leftover temporary files (a temporary file
deleted first would make its unmerged sources look merged).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from prometheus_client.core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

log = structlog.get_logger("app.monitoring.exposition")

AGGREGATE = "aggregate"  # the "pid" of an aggregate file: no process writes under this name
LOCK_NAME = ".compaction.lock"
JOURNAL_NAME = ".compaction.journal"
TMP_SUFFIX = ".tmp"
# A scrape compacts first when at least this many files of dead processes are unmerged (a dead worker leaves
# about four). gunicorn's child_exit and the supervisor compact as soon as they reap a process; this catches
# processes nobody reported (a retrain reaped by its worker) and compactions that found the lock busy.
AUTO_COMPACT_DEAD_FILES = 16
SCRAPE_LOCK_TIMEOUT_SECONDS = 30.0

_FILE = re.compile(r"^(?P<prefix>counter|histogram|summary|gauge_(?P<mode>[a-z]+))_(?P<pid>\d+)\.db$")
_SUMMED = frozenset({"counter", "histogram", "summary", "gauge_sum"})
_MERGEABLE = _SUMMED | {"gauge_min", "gauge_max", "gauge_mostrecent"}
_LOCK_POLL_SECONDS = 0.01

Record = tuple[float, float]  # (value, timestamp) as stored in a file


def _crash_point(step: str) -> None:
    """Between two steps of a compaction; tests replace it to crash there (``step`` names the step just done)."""


@dataclass
class Compaction:
    """What one compaction did."""

    ran: bool = False  # False: another process held the lock until the timeout
    merged_files: int = 0
    dropped_live_files: int = 0
    pids: list[int] = field(default_factory=list)
    recovered: bool = False


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` names a process (a zombie, or another user's process, counts as alive; so does a number
    that cannot be a pid, whose files are then left alone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def aggregate_name(prefix: str) -> str:
    return f"{prefix}_{AGGREGATE}.db"


def _tmp_name(prefix: str) -> str:
    return f".{aggregate_name(prefix)}{TMP_SUFFIX}"


@dataclass(frozen=True)
class _DeadFile:
    name: str
    prefix: str
    pid: int


def _names(directory: str | Path) -> list[str]:
    return sorted(entry.name for entry in Path(directory).iterdir())


def dead_files(directory: str | Path, pids: Iterable[int] | None = None) -> list[_DeadFile]:
    """Mergeable and ``gauge_live*`` files of processes that no longer exist (of ``pids`` only, if given)."""
    wanted = None if pids is None else set(pids)
    alive: dict[int, bool] = {}
    found = []
    for name in _names(directory):
        match = _FILE.match(name)
        if match is None:
            continue
        prefix, pid = match["prefix"], int(match["pid"])
        if prefix not in _MERGEABLE and not prefix.startswith("gauge_live"):
            continue  # gauge_all: its pid label is the file's name
        if wanted is not None and pid not in wanted:
            continue
        if pid not in alive:
            alive[pid] = pid_alive(pid)
        if not alive[pid]:
            found.append(_DeadFile(name, prefix, pid))
    return found


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


@contextmanager
def _locked(directory: Path, *, exclusive: bool, timeout: float) -> Iterator[bool]:
    """Hold the directory's compaction lock (or not: yields False after ``timeout`` seconds of trying)."""
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        operation = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, operation)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(_LOCK_POLL_SECONDS)
        yield True  # closing the descriptor releases the lock
    finally:
        os.close(fd)


def _read_journal(directory: Path) -> dict[str, Any] | None:
    try:
        text = (directory / JOURNAL_NAME).read_text()
    except FileNotFoundError:
        return None
    journal: dict[str, Any] = json.loads(text)  # written whole by rename: never partial
    return journal


def merged_pending_deletion(directory: str | Path) -> set[str]:
    """Source files an interrupted compaction already folded into an aggregate but did not delete yet."""
    directory = Path(directory)
    journal = _read_journal(directory)
    if journal is None:
        return set()
    return {
        source
        for entry in journal["types"].values()
        if not (directory / entry["tmp"]).exists()  # renamed over the aggregate: the sources are in it
        for source in entry["sources"]
    }


def visible_files(directory: str | Path) -> list[str]:
    """The files a scrape must merge: ``*.db`` (as ``MultiProcessCollector`` globs) less already merged ones.

    Call it holding the lock (shared is enough), so no compaction changes the directory in between.
    """
    directory = Path(directory)
    skip = merged_pending_deletion(directory)
    return sorted(
        str(directory / name)
        for name in _names(directory)
        if name.endswith(".db") and not name.startswith(".") and name not in skip
    )


def _recover(directory: Path) -> bool:
    """Finish or undo an interrupted compaction (exclusive lock held). Whether there was anything to do."""
    did = False
    journal = _read_journal(directory)
    if journal is not None:
        for source in merged_pending_deletion(directory):
            _unlink(directory / source)
        _fsync_dir(directory)
        (directory / JOURNAL_NAME).unlink()
        _fsync_dir(directory)
        did = True
    # Only now, with no journal naming them: an unrenamed temporary file holds nothing a scrape counts.
    for name in _names(directory):
        if name.startswith(".") and name.endswith(TMP_SUFFIX):
            did = _unlink(directory / name) or did
    if did:
        _fsync_dir(directory)
    return did


def _records(path: Path) -> list[tuple[str, float, float]]:
    values = MmapedDict.read_all_values_from_file(str(path))  # type: ignore[no-untyped-call]
    return [(key, value, timestamp) for key, value, timestamp, _ in values]


def _combine(prefix: str, files: list[Path]) -> dict[str, Record]:
    """Fold ``files`` (all of one type) into one record per key, as the collector would combine them."""
    if prefix in _SUMMED:
        addends: dict[str, list[float]] = {}
        for path in files:
            for key, value, _ in _records(path):
                addends.setdefault(key, []).append(value)
        # fsum: the exact sum of the addends, rounded once, whatever their order.
        return {key: (math.fsum(values), 0.0) for key, values in addends.items()}
    combined: dict[str, Record] = {}
    for path in files:
        for key, value, timestamp in _records(path):
            current = combined.get(key)
            if (
                current is None
                or (prefix == "gauge_min" and value < current[0])
                or (prefix == "gauge_max" and value > current[0])
                or (prefix == "gauge_mostrecent" and timestamp > current[1])
            ):
                combined[key] = (value, timestamp)
    return combined


def _write_aggregate(path: Path, records: dict[str, Record]) -> None:
    _unlink(path)  # MmapedDict appends to an existing file
    mmaped = MmapedDict(str(path))  # type: ignore[no-untyped-call]
    try:
        for key in sorted(records):
            value, timestamp = records[key]
            mmaped.write_value(key, value, timestamp)  # type: ignore[no-untyped-call]
    finally:
        mmaped.close()  # type: ignore[no-untyped-call]
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # flushes the pages written through the mapping
    finally:
        os.close(fd)


def _write_journal(directory: Path, types: dict[str, dict[str, Any]]) -> None:
    tmp = directory / f"{JOURNAL_NAME}{TMP_SUFFIX}"
    with tmp.open("w") as handle:
        json.dump({"version": 1, "types": types}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(directory / JOURNAL_NAME)
    _fsync_dir(directory)


def _merge(directory: Path, by_type: dict[str, list[_DeadFile]]) -> int:
    """Steps 2 to 5 of a compaction (exclusive lock held); how many source files were merged."""
    journal: dict[str, dict[str, Any]] = {}
    for prefix, sources in sorted(by_type.items()):
        aggregate = directory / aggregate_name(prefix)
        inputs = ([aggregate] if aggregate.exists() else []) + [directory / f.name for f in sources]
        _write_aggregate(directory / _tmp_name(prefix), _combine(prefix, inputs))
        journal[prefix] = {"tmp": _tmp_name(prefix), "sources": [f.name for f in sources]}
    _fsync_dir(directory)
    _crash_point("aggregates_written")
    _write_journal(directory, journal)
    _crash_point("journal_written")
    for prefix in journal:
        (directory / _tmp_name(prefix)).replace(directory / aggregate_name(prefix))
        _crash_point("aggregate_replaced")
    _fsync_dir(directory)
    for entry in journal.values():
        for source in entry["sources"]:
            _unlink(directory / source)
            _crash_point("source_deleted")
    _fsync_dir(directory)
    (directory / JOURNAL_NAME).unlink()
    _fsync_dir(directory)
    return sum(len(entry["sources"]) for entry in journal.values())


def compact(directory: str | Path, *, pids: Iterable[int] | None = None, timeout: float = 5.0) -> Compaction:
    """Fold the files of dead processes (of ``pids`` only, if given) into the aggregates; see the module doc.

    Waits up to ``timeout`` seconds for the lock (a scrape in progress, or another compaction); gives up after
    that (``ran`` False): a later compaction or scrape picks the files up.
    """
    directory = Path(directory)
    result = Compaction()
    with _locked(directory, exclusive=True, timeout=timeout) as acquired:
        if not acquired:
            return result
        result.ran = True
        result.recovered = _recover(directory)
        dead = dead_files(directory, pids)
        result.pids = sorted({f.pid for f in dead})
        for live in (f for f in dead if f.prefix.startswith("gauge_live")):  # as mark_process_dead does
            result.dropped_live_files += _unlink(directory / live.name)
        by_type: dict[str, list[_DeadFile]] = {}
        for f in dead:
            if f.prefix in _MERGEABLE:
                by_type.setdefault(f.prefix, []).append(f)
        if by_type:
            result.merged_files = _merge(directory, by_type)
    if result.merged_files or result.dropped_live_files or result.recovered:
        log.info(
            "metrics_compacted",
            merged_files=result.merged_files,
            dropped_live_files=result.dropped_live_files,
            dead_pids=len(result.pids),
            recovered=result.recovered,
        )
    return result


def compact_quietly(directory: str | Path, *, pids: Iterable[int] | None = None, timeout: float = 1.0) -> None:
    """:func:`compact` for hooks that must never fail (gunicorn's master, the supervisor): errors are logged."""
    try:
        compact(directory, pids=pids, timeout=timeout)
    except Exception:
        log.exception("metrics_compaction_failed", directory=str(directory))


def needs_compaction(directory: str | Path, threshold: int = AUTO_COMPACT_DEAD_FILES) -> bool:
    """At least ``threshold`` files of dead processes are unmerged, or a compaction was interrupted."""
    directory = Path(directory)
    return (directory / JOURNAL_NAME).exists() or len(dead_files(directory)) >= threshold


class MultiProcessFilesCollector(Collector):
    """``MultiProcessCollector`` over :func:`visible_files`, read under the shared lock: the documented
    multiprocess collector, but consistent with concurrent and interrupted compactions."""

    def __init__(self, directory: str | Path, registry: CollectorRegistry | None = None) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ValueError(f"metrics directory {self.directory} is not a directory")
        if registry is not None:
            registry.register(self)

    def collect(self) -> Iterable[Metric]:
        with _locked(self.directory, exclusive=False, timeout=SCRAPE_LOCK_TIMEOUT_SECONDS) as acquired:
            if not acquired:
                raise TimeoutError(f"metrics compaction lock in {self.directory} held too long")
            files = visible_files(self.directory)
            metrics: Iterable[Metric] = MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
            return metrics


def register_collector(registry: CollectorRegistry, directory: str | Path, *, auto_compact: bool = True) -> None:
    """What one scrape reads: compact first if dead files piled up (without waiting for a busy lock), then
    register a :class:`MultiProcessFilesCollector` on ``registry``."""
    if auto_compact:
        try:
            if needs_compaction(directory):
                compact(directory, timeout=0)
        except Exception:  # a scrape still answers; the collector meets the same files and reports any damage
            log.exception("metrics_compaction_failed", directory=str(directory))
    MultiProcessFilesCollector(directory, registry)
