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
released by the kernel, whatever killed it), and ``<owner>.<n>.spool``, one record per append: a 4-byte
little-endian length, then the ``marshal`` serialisation of ``(columns, rows)``, the column names and one tuple
of values per row. ``marshal`` is read back only from this folder (mode 0600, the service's own), and a record
that does not decode to that shape is skipped; a one-row append, write included, takes 2.7 us where JSON lines
took 7.7 (``bench/request_profile.py``). Segments of the earlier JSON-lines format (``<owner>.<n>.jsonl``, a
JSON list of row objects per line) are still adopted. A lock file appears under its name already locked
(created under a temporary name, then renamed), so a free lock always means a dead owner.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import marshal
import os
import struct
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

NOT_SPOOLED = -1
"""The segment of rows that are only in memory (no spool, or the write failed)."""

_SEGMENT_SUFFIX = ".spool"
_JSON_SEGMENT_SUFFIX = ".jsonl"  # the earlier format: read, never written
_LOCK_SUFFIX = ".lock"
_LENGTH = struct.Struct("<I")
_MARSHAL_VERSION = 4  # readable by every Python 3.4 and later

Row = tuple[Any, ...]


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
        self._json_segments: set[int] = set()  # adopted segments in the earlier format

    def _path(self, segment: int) -> Path:
        suffix = _JSON_SEGMENT_SUFFIX if segment in self._json_segments else _SEGMENT_SUFFIX
        return self.directory / f"{self.owner}.{segment:08d}{suffix}"

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

    def append(self, columns: tuple[str, ...], rows: Sequence[Row]) -> int:
        """Write ``rows`` (tuples of values in the order of ``columns``) to the current segment and return its
        number, or NOT_SPOOLED when that failed.

        Never raises: a full disk or an unencodable value costs crash safety, never a prediction.
        """
        if self._lock_fd is None or not rows:
            return NOT_SPOOLED
        try:
            # One record per call. marshal keeps any str, lone surrogates included; it refuses (ValueError) a
            # value that is not a plain built-in.
            payload = marshal.dumps((columns, list(rows)), _MARSHAL_VERSION)
            data = _LENGTH.pack(len(payload)) + payload
            if self._fd is None:
                self._fd = os.open(
                    self._path(self._segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
                )
            _write_all(self._fd, data)
        except Exception as exc:  # OSError (disk full), ValueError (a value marshal cannot hold)
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
        self._json_segments.discard(segment)

    def claim_orphans(self, columns: tuple[str, ...]) -> list[tuple[int, list[Row]]]:
        """Move every dead owner's segments into this spool; return (segment, rows) for each, each row a tuple
        of values in the order of ``columns`` (None for a column its record did not have).

        Register each with :meth:`adopted` on the event loop. Records that do not decode (a write torn by
        a full disk) are skipped and logged.
        """
        if self._lock_fd is None:
            return []
        claimed: list[tuple[int, list[Row]]] = []
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
                for orphan in sorted(self._segments(owner)):
                    segment = next(self._ids)
                    if orphan.suffix == _JSON_SEGMENT_SUFFIX:
                        self._json_segments.add(segment)
                    target = self._path(segment)
                    orphan.rename(target)  # ours from now on: if we die, the next survivor adopts it
                    claimed.append((segment, self._read(target, columns)))
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

    def _segments(self, owner: str) -> Iterator[Path]:
        """``owner``'s segment files, in both formats."""
        for suffix in (_SEGMENT_SUFFIX, _JSON_SEGMENT_SUFFIX):
            yield from self.directory.glob(f"{owner}.*{suffix}")

    @staticmethod
    def _read(path: Path, columns: tuple[str, ...]) -> list[Row]:
        data = path.read_bytes()
        batches = _json_records(data) if path.suffix == _JSON_SEGMENT_SUFFIX else _records(data)
        rows: list[Row] = []
        skipped = 0
        for batch in batches:
            if batch is None:
                skipped += 1
                continue
            written, values = batch
            if written == columns:
                rows.extend(values)
            else:  # another column order or set: by name
                positions = [written.index(c) if c in written else None for c in columns]
                rows.extend(tuple(None if i is None else row[i] for i in positions) for row in values)
        if skipped:
            log.warning("prediction_spool_records_skipped", records=skipped, segment=path.name)
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
        if not any(self._segments(self.owner)):
            (self.directory / f"{self.owner}{_LOCK_SUFFIX}").unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = None


_Batch = tuple[tuple[str, ...], list[Row]] | None  # (columns, rows) of one record; None for one that did not decode


def _records(data: bytes) -> Iterator[_Batch]:
    """The records of a segment. After a torn or damaged length the rest cannot be framed: one None for it."""
    offset = 0
    while offset < len(data):
        if offset + _LENGTH.size > len(data):
            yield None
            return
        (length,) = _LENGTH.unpack_from(data, offset)
        start, offset = offset + _LENGTH.size, offset + _LENGTH.size + length
        if offset > len(data):
            yield None
            return
        try:
            # The service's own files (mode 0600): marshal builds values, it never runs code; _checked the shape.
            decoded = marshal.loads(data[start:offset])  # noqa: S302
        except Exception:  # ValueError, EOFError, TypeError: whatever a damaged record decodes to
            yield None
            continue
        yield _checked(decoded)


def _checked(decoded: Any) -> _Batch:
    """``decoded`` if it has the shape of a record: a tuple of column names and a list of tuples as long."""
    if not (isinstance(decoded, tuple) and len(decoded) == 2):
        return None
    columns, rows = decoded
    if not (isinstance(columns, tuple) and all(isinstance(c, str) for c in columns) and isinstance(rows, list)):
        return None
    if not all(isinstance(row, tuple) and len(row) == len(columns) for row in rows):
        return None
    return columns, rows


def _json_records(data: bytes) -> Iterator[_Batch]:
    """The records of a segment in the earlier format: per line, a JSON list of row objects."""
    for line in data.splitlines():
        try:
            batch = json.loads(line)
        except ValueError:
            yield None
            continue
        if not (isinstance(batch, list) and all(isinstance(row, dict) for row in batch)):
            yield None
            continue
        for row in batch:  # a record per row: rows of one line need not share their keys
            yield tuple(row), [tuple(row.values())]
