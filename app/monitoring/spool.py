"""Each worker's crash-safe copy of the predictions it has not written yet: files a SIGKILL cannot take.

The recorder (:class:`app.storage.recorder.PredictionRecorder`) appends every batch of rows it
buffers to its worker's current spool segment with unbuffered ``os.write`` calls, before the response
leaves: once the client sees a 2xx, the rows are in the kernel's page cache, which outlives the process
(an OS crash or power loss before writeback can still lose them). Each flush starts a new segment; a
segment is deleted once every row in it is written to the database or counted as dropped.

Any worker adopts the segments of a dead one: their rows join its own buffer and are written like its
own. Some may already be in the database (the dead worker may have committed them just before it was
killed); inserts are idempotent on the prediction id, so adopting twice is harmless too.

Layout of the folder: ``<owner>.lock``, held with ``flock`` by its live owner (a dead process's lock is
released by the kernel, whatever killed it), and ``<owner>.<n>.jsonl``, one line per append: a JSON
list of row objects (the prediction log's column names and values). A lock file
appears under its name already locked (created under a temporary name, then renamed), so a free lock
always means a dead owner.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

NOT_SPOOLED = -1
"""The segment of rows that are only in memory (no spool, or the write failed)."""

_SEGMENT_SUFFIX = ".jsonl"
_LOCK_SUFFIX = ".lock"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class PredictionSpool:
    """One worker's spool: append, rotate, release written rows, adopt dead workers' segments.

    Not thread-safe except :meth:`claim_orphans`, which touches only other owners' files and may run on a
    thread while the event loop appends.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.owner = uuid.uuid4().hex
        self._ids = itertools.count(1)
        self._segment = next(self._ids)  # where appends go
        self._fd: int | None = None  # the current segment, opened on its first append
        self._lock_fd: int | None = None
        self._outstanding: dict[int, int] = {}  # segment -> rows neither written nor dropped yet
        self._failing = False

    def _path(self, segment: int, owner: str | None = None) -> Path:
        return self.directory / f"{owner or self.owner}.{segment:08d}{_SEGMENT_SUFFIX}"

    def open(self) -> None:
        """Create the folder and take this owner's lock. Raises OSError when the folder is unusable."""
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self.directory / f".{self.owner}.tmp"
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            temporary.rename(self.directory / f"{self.owner}{_LOCK_SUFFIX}")
        except OSError:
            os.close(fd)
            temporary.unlink(missing_ok=True)
            raise
        self._lock_fd = fd

    @property
    def is_open(self) -> bool:
        return self._lock_fd is not None

    def append(self, rows: Sequence[dict[str, Any]]) -> int:
        """Write ``rows`` to the current segment and return its number, or NOT_SPOOLED when that failed.

        Never raises: a full disk or an unencodable value costs crash safety, never a prediction.
        """
        if self._lock_fd is None or not rows:
            return NOT_SPOOLED
        try:
            # One line per call; ensure_ascii (the default) escapes lone surrogates and any other code point.
            data = (json.dumps(rows) + "\n").encode("ascii")
            if self._fd is None:
                self._fd = os.open(
                    self._path(self._segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
                )
            _write_all(self._fd, data)
        except Exception as exc:  # OSError (disk full), ValueError/TypeError (a value JSON cannot hold)
            if not self._failing:
                log.error("prediction_spool_write_failed", reason=type(exc).__name__, directory=str(self.directory))
            self._failing = True
            self.rotate()  # a torn line stays in the old segment; reading skips it
            return NOT_SPOOLED
        if self._failing:
            log.info("prediction_spool_recovered")
            self._failing = False
        self._outstanding[self._segment] = self._outstanding.get(self._segment, 0) + len(rows)
        return self._segment

    def rotate(self) -> None:
        """Send later appends to a new segment: the rows appended so far are all in closed segments."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            closed = self._segment
            self._segment = next(self._ids)
            if not self._outstanding.get(closed):
                self._forget(closed)

    def release(self, segments: Iterable[int]) -> None:
        """One row of each listed segment was written or dropped; delete closed segments with none left."""
        for segment, rows in Counter(segments).items():
            if segment == NOT_SPOOLED or segment not in self._outstanding:
                continue
            self._outstanding[segment] -= rows
            if self._outstanding[segment] <= 0 and segment != self._segment:
                self._forget(segment)

    def _forget(self, segment: int) -> None:
        self._outstanding.pop(segment, None)
        with contextlib.suppress(FileNotFoundError):
            self._path(segment).unlink()

    def claim_orphans(self) -> list[tuple[int, list[dict[str, Any]]]]:
        """Move every dead owner's segments into this spool; return (segment, rows) for each.

        Register each with :meth:`adopted` on the event loop. Lines that do not parse (a write torn by
        a full disk) are skipped and logged.
        """
        if self._lock_fd is None:
            return []
        claimed: list[tuple[int, list[dict[str, Any]]]] = []
        for lock in self.directory.glob(f"*{_LOCK_SUFFIX}"):
            owner = lock.name.removesuffix(_LOCK_SUFFIX)
            if owner == self.owner:
                continue
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:  # another worker adopted it just now
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # its owner is alive
                    continue
                rows = 0
                for orphan in sorted(self.directory.glob(f"{owner}.*{_SEGMENT_SUFFIX}")):
                    segment = next(self._ids)
                    target = self._path(segment)
                    orphan.rename(target)  # ours from now on: if we die, the next survivor adopts it
                    claimed.append((segment, self._read(target)))
                    rows += len(claimed[-1][1])
                lock.unlink(missing_ok=True)
            finally:
                os.close(fd)
            log.info("prediction_spool_adopted", owner=owner, rows=rows)
        return claimed

    def adopted(self, segment: int, rows: int) -> None:
        """Account for a segment :meth:`claim_orphans` moved here, ``rows`` of which are being buffered."""
        self._outstanding[segment] = rows
        if not rows:
            self._forget(segment)

    @staticmethod
    def _read(path: Path) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        torn = 0
        for line in path.read_bytes().splitlines():
            try:
                batch = json.loads(line)
            except ValueError:
                torn += 1
                continue
            if isinstance(batch, list) and all(isinstance(row, dict) for row in batch):
                rows.extend(batch)
            else:
                torn += 1
        if torn:
            log.warning("prediction_spool_lines_skipped", lines=torn, segment=path.name)
        return rows

    def close(self) -> None:
        """Release the lock. Segments with rows left stay, with the lock file, for another worker to adopt."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is None:
            return
        if not self._outstanding.get(self._segment):
            self._forget(self._segment)
        # Not a glob-and-delete: a claim_orphans still running on a thread may have just moved segments here.
        if not any(self.directory.glob(f"{self.owner}.*{_SEGMENT_SUFFIX}")):
            (self.directory / f"{self.owner}{_LOCK_SUFFIX}").unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = None
