"""Predictions and their feedback labels: the rolling window the drift monitor reads and retraining learns from.

Each web worker appends its predictions (batched, off the request path, see
:class:`app.storage.recorder.PredictionRecorder`), the drift monitor reads the latest window, feedback labels
predictions, and retraining reads the labelled rows.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, delete, func, insert, select, update
from sqlalchemy.sql.expression import Executable, Update

from app.storage.database import INSERT_IGNORING_DUPLICATES, LABELLED, Database, Repository, predictions

LEGACY_SOURCE = "legacy"
"""The source name of labels recorded before labels carried one (``label_source`` NULL)."""


@dataclass(frozen=True)
class PredictionRow:
    """One stored prediction, with its feedback label once one was sent."""

    id: str
    created_at: float
    text: str
    text_length: int
    sentiment: str
    confidence: float
    p_positive: float
    model_version: str
    latency_ms: float
    label: str | None
    labelled_at: float | None
    label_source: str | None  # the name of the feedback token that sent the label


@dataclass(frozen=True)
class WindowRow:
    """A prediction as the drift tests and the drift reference read it."""

    text: str
    confidence: float
    p_positive: float
    sentiment: str
    created_at: float


@dataclass(frozen=True)
class LabelledRow:
    """A labelled prediction as retraining reads it."""

    id: str
    text: str
    label: str
    labelled_at: float
    source: str  # the name of the feedback token that sent the label, LEGACY_SOURCE before labels had one


@dataclass(frozen=True)
class LabelSource:
    """The labels one feedback token name sent that are still stored."""

    source: str
    labels: int
    first_labelled_at: float
    last_labelled_at: float


class LabelOutcome(enum.Enum):
    """What recording a feedback label did."""

    STORED = "stored"
    UNCHANGED = "unchanged"  # the same label was already recorded
    CONFLICT = "conflict"  # a different label was already recorded
    NOT_FOUND = "not_found"


@dataclass(frozen=True)
class LabelResult:
    outcome: LabelOutcome
    sentiment: str | None = None  # what the model predicted
    label: str | None = None  # the label on record after the call


LOG_COLUMNS = (
    "id",
    "created_at",
    "text",
    "text_length",
    "sentiment",
    "confidence",
    "p_positive",
    "model_version",
    "latency_ms",
)
"""The columns the service writes for each prediction, in the order of the tuples the predictor builds, the
recorder buffers and the spool holds (:meth:`PredictionRepository.insert_rows`). Tuples, not mappings: cheaper
to build on the request path, to spool and to hand to the driver (recording a model call of 14 requests: 13.5 us
per request with dicts, 4.1 with tuples; ``bench/request_profile.py``)."""

LogRow = tuple[Any, ...]
"""One prediction's values in the order of :data:`LOG_COLUMNS`."""

STATEMENT_ROWS = (500, 100, 20, 1)
"""Rows per driver insert, largest first: a flush of n rows is as many of each size as fit, in this order. Few
sizes, because the driver keeps each distinct statement prepared per connection (sqlite3 up to 128, about 0.5 MB
each at 500 rows: statements of every length from 1 to 499 grew each connection by 67 MB). At most 12 columns,
so at most 6,000 parameters (SQLite allows 32,766, PostgreSQL 65,535)."""


def statement_sizes(rows: int) -> list[int]:
    """How many rows each of the statements inserting ``rows`` rows carries (:data:`STATEMENT_ROWS`)."""
    sizes = []
    for size in STATEMENT_ROWS:
        count, rows = divmod(rows, size)
        sizes += [size] * count
    return sizes


DRIVER_PLACEHOLDERS = {"qmark": "?", "format": "%s", "pyformat": "%s"}
"""The positional parameter marker of a DB-API parameter style (sqlite3: qmark; psycopg: pyformat)."""


def purge_labels_statement(source: str) -> Update:
    """The update that forgets every label the feedback token named ``source`` sent: label, time and source
    become NULL, the predictions stay as unlabelled rows. ``legacy`` names the labels recorded before labels
    carried their source."""
    column = predictions.c.label_source
    sent_by = column.is_(None) if source == LEGACY_SOURCE else column == source
    return update(predictions).where(LABELLED, sent_by).values(label=None, labelled_at=None, label_source=None)


class PredictionRepository(Repository):
    """The ``predictions`` table; every method is blocking and safe to call from several processes.

    Rows are written as tuples of :data:`LOG_COLUMNS` (:meth:`insert_rows`, the recorder's path) or as mappings of
    the table's columns (:meth:`insert_predictions`).
    """

    def __init__(self, database: Database) -> None:
        super().__init__(database)
        self._driver_inserts: dict[tuple[tuple[str, ...], int], str | None] = {}  # (columns, rows) -> statement

    def insert_predictions(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """:meth:`insert_rows` for rows given as mappings: the columns are the first row's; a row without one of
        them stores NULL there."""
        if rows:
            columns = tuple(rows[0])
            self.insert_rows(columns, [tuple(row.get(c) for c in columns) for row in rows])

    def insert_rows(self, columns: Sequence[str], rows: Sequence[LogRow]) -> None:
        """Insert rows (tuples of values in the order of ``columns``), skipping any whose id is already there:
        writing a batch twice (after a commit whose outcome was unknown, or a dead worker's spool) is harmless.

        On SQLite and PostgreSQL the rows go to the driver as multi-row ``INSERT ... VALUES (...), (...)``
        statements of up to 500 rows (:data:`STATEMENT_ROWS`), one transaction. The driver releases the GIL around
        each statement it runs, and a web worker's flush thread then waits for the event loop to hand it back
        (up to the 5 ms switch interval under load): one statement per row (``executemany``) capped a
        saturated worker's flush below the rate it answered, so its buffer filled and dropped rows
        (``docs/design.md``, write-behind prediction log; ``bench/flush_contention.py`` measures both shapes).
        """
        if not rows:
            return
        columns = tuple(columns)
        if self._driver_insert(columns, 1) is None:
            with self.engine.begin() as conn:
                conn.execute(self._insert_new_predictions(), [dict(zip(columns, row, strict=True)) for row in rows])
            return
        start = 0
        with self.engine.begin() as conn:
            for size in statement_sizes(len(rows)):
                chunk, start = rows[start : start + size], start + size
                values = tuple(itertools.chain.from_iterable(chunk))
                if len(values) != size * len(columns):
                    raise ValueError(f"rows of {len(columns)} values expected ({', '.join(columns)})")
                conn.exec_driver_sql(self._driver_insert(columns, size), values)  # type: ignore[arg-type]

    def _driver_insert(self, columns: tuple[str, ...], rows: int) -> str | None:
        """``INSERT ... VALUES`` of ``rows`` rows of ``columns`` ``ON CONFLICT (id) DO NOTHING`` in the driver's
        parameter style, or None where that does not apply (another database or parameter style, or a key that
        is not a column)."""
        statement = self._driver_inserts.get((columns, rows))
        if statement is not None or (columns, rows) in self._driver_inserts:
            return statement
        dialect = self.engine.dialect
        placeholder = DRIVER_PLACEHOLDERS.get(dialect.paramstyle)
        usable = placeholder is not None and dialect.name in INSERT_IGNORING_DUPLICATES
        if usable and set(columns) <= set(predictions.c.keys()) and "id" in columns:
            names = ", ".join(f'"{c}"' for c in columns)
            row = "(" + ", ".join([placeholder] * len(columns)) + ")"  # type: ignore[list-item]
            statement = (
                f'INSERT INTO predictions ({names}) VALUES {", ".join([row] * rows)} ON CONFLICT ("id") DO NOTHING'  # noqa: S608  checked names
            )
        self._driver_inserts[columns, rows] = statement
        return statement

    def _insert_new_predictions(self) -> Executable:
        dialect = INSERT_IGNORING_DUPLICATES.get(self.engine.dialect.name)
        if dialect is None:  # another database: plain inserts, a duplicate fails its row alone
            return insert(predictions)
        return dialect(predictions).on_conflict_do_nothing(index_elements=[predictions.c.id])

    def get_prediction(self, prediction_id: str) -> PredictionRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(predictions).where(predictions.c.id == prediction_id)).mappings().first()
        return PredictionRow(**row) if row else None

    def set_label(
        self, prediction_id: str, label: str, now: float | None = None, *, source: str = "default"
    ) -> LabelResult:
        """Record the true label of a prediction, sent by the feedback token named ``source``: idempotent
        for the same label (the first sender stays on record), refused for another."""
        with self.engine.begin() as conn:
            row = conn.execute(
                select(predictions.c.sentiment, predictions.c.label).where(predictions.c.id == prediction_id)
            ).first()
            if row is None:
                return LabelResult(LabelOutcome.NOT_FOUND)
            if row.label is not None:
                outcome = LabelOutcome.UNCHANGED if row.label == label else LabelOutcome.CONFLICT
                return LabelResult(outcome, row.sentiment, row.label)
            # The WHERE on label IS NULL makes a concurrent second labelling a no-op, never an overwrite.
            done = conn.execute(
                update(predictions)
                .where(predictions.c.id == prediction_id, predictions.c.label.is_(None))
                .values(label=label, labelled_at=now or time.time(), label_source=source)
            )
            if done.rowcount == 0:
                current = conn.execute(select(predictions.c.label).where(predictions.c.id == prediction_id)).scalar()
                outcome = LabelOutcome.UNCHANGED if current == label else LabelOutcome.CONFLICT
                return LabelResult(outcome, row.sentiment, current)
        return LabelResult(LabelOutcome.STORED, row.sentiment, label)

    def live_accuracy(self, last: int) -> tuple[float | None, int]:
        """Accuracy over the ``last`` most recently labelled predictions, and how many there were."""
        recent = (
            select(predictions.c.sentiment, predictions.c.label)
            .where(LABELLED)
            .order_by(predictions.c.labelled_at.desc())
            .limit(last)
            .subquery()
        )
        with self.engine.connect() as conn:
            total, correct = conn.execute(
                select(func.count(), func.sum((recent.c.sentiment == recent.c.label).cast(Integer)))
            ).one()
        return (correct / total if total else None), int(total)

    def window(self, size: int, model_version: str, since: float | None = None) -> list[WindowRow]:
        """The latest ``size`` predictions of ``model_version`` (made after ``since``, if given), oldest first."""
        query = (
            select(
                predictions.c.text,
                predictions.c.confidence,
                predictions.c.p_positive,
                predictions.c.sentiment,
                predictions.c.created_at,
            )
            .where(predictions.c.model_version == model_version)
            .order_by(predictions.c.created_at.desc())
            .limit(size)
        )
        if since is not None:
            query = query.where(predictions.c.created_at > since)
        with self.engine.connect() as conn:
            rows = [WindowRow(**r) for r in conn.execute(query).mappings()]
        rows.reverse()
        return rows

    def version_accuracy(
        self, model_version: str, last: int | None = None, *, since: float | None = None, before: float | None = None
    ) -> tuple[int, int]:
        """(right, labelled) over the labelled predictions of ``model_version`` made after ``since`` and before
        ``before`` when given, the ``last`` most recent of them if given: its realised accuracy on feedback."""
        query = select(predictions.c.sentiment, predictions.c.label).where(
            predictions.c.model_version == model_version, LABELLED
        )
        if since is not None:
            query = query.where(predictions.c.created_at > since)
        if before is not None:
            query = query.where(predictions.c.created_at < before)
        recent = query.order_by(predictions.c.created_at.desc()).limit(last).subquery()
        with self.engine.connect() as conn:
            total, right = conn.execute(
                select(func.count(), func.sum((recent.c.sentiment == recent.c.label).cast(Integer)))
            ).one()
        return int(right or 0), int(total)

    def count_predictions(self, model_version: str | None = None, since: float | None = None) -> int:
        query = select(func.count()).select_from(predictions)
        if model_version is not None:
            query = query.where(predictions.c.model_version == model_version)
        if since is not None:
            query = query.where(predictions.c.created_at > since)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def labelled(self, since: float | None = None) -> list[LabelledRow]:
        """Every labelled prediction (id, text, label, labelled_at, source: the name of the feedback token
        that sent the label, :data:`LEGACY_SOURCE` for labels older than that record), oldest label first."""
        source = func.coalesce(predictions.c.label_source, LEGACY_SOURCE).label("source")
        query = select(
            predictions.c.id, predictions.c.text, predictions.c.label, predictions.c.labelled_at, source
        ).where(LABELLED)
        if since is not None:
            query = query.where(predictions.c.labelled_at > since)
        with self.engine.connect() as conn:
            return [LabelledRow(**r) for r in conn.execute(query.order_by(predictions.c.labelled_at)).mappings()]

    def label_sources(self) -> list[LabelSource]:
        """Per feedback token name: how many labels it sent that the log holds, and the first and last time."""
        source = func.coalesce(predictions.c.label_source, LEGACY_SOURCE)
        query = (
            select(
                source.label("source"),
                func.count().label("labels"),
                func.min(predictions.c.labelled_at).label("first_labelled_at"),
                func.max(predictions.c.labelled_at).label("last_labelled_at"),
            )
            .where(LABELLED)
            .group_by(source)
            .order_by(source)
        )
        with self.engine.connect() as conn:
            return [LabelSource(**r) for r in conn.execute(query).mappings()]

    def purge_labels(self, source: str) -> int:
        """Forget every label the feedback token named ``source`` sent (:func:`purge_labels_statement`) and
        return how many. :meth:`app.storage.feedback_sources.FeedbackSourceRepository.purge` also records the
        purge, which is what the command line runs."""
        with self.engine.begin() as conn:
            done = conn.execute(purge_labels_statement(source))
        return int(done.rowcount)

    def enforce_retention(
        self,
        max_rows: int,
        max_age_seconds: float,
        now: float | None = None,
        *,
        max_labelled_rows: int | None = None,
        max_labelled_age_seconds: float | None = None,
    ) -> int:
        """Delete unlabelled predictions older than the age limit or beyond the newest ``max_rows``, and
        labelled ones (the next retrain's training data, so bounded apart and more generously) whose label is
        older than ``max_labelled_age_seconds`` or beyond the newest ``max_labelled_rows`` labels; ``None``:
        no such bound. Returns how many rows went.
        """
        now = now or time.time()
        unlabelled = ~LABELLED
        deleted = self._enforce_labelled_retention(max_labelled_rows, max_labelled_age_seconds, now)
        with self.engine.begin() as conn:
            deleted += conn.execute(
                delete(predictions).where(unlabelled, predictions.c.created_at < now - max_age_seconds)
            ).rowcount
            cutoff = conn.execute(
                select(predictions.c.created_at)
                .where(unlabelled)
                .order_by(predictions.c.created_at.desc())
                .offset(max_rows)
                .limit(1)
            ).scalar()
            if cutoff is not None:
                deleted += conn.execute(
                    delete(predictions).where(unlabelled, predictions.c.created_at <= cutoff)
                ).rowcount
        return int(deleted)

    def _enforce_labelled_retention(self, max_rows: int | None, max_age_seconds: float | None, now: float) -> int:
        deleted = 0
        with self.engine.begin() as conn:
            if max_age_seconds is not None:
                deleted += conn.execute(
                    delete(predictions).where(LABELLED, predictions.c.labelled_at < now - max_age_seconds)
                ).rowcount
            if max_rows is not None:
                cutoff = conn.execute(
                    select(predictions.c.labelled_at)
                    .where(LABELLED)
                    .order_by(predictions.c.labelled_at.desc())
                    .offset(max_rows)
                    .limit(1)
                ).scalar()
                if cutoff is not None:
                    deleted += conn.execute(
                        delete(predictions).where(LABELLED, predictions.c.labelled_at <= cutoff)
                    ).rowcount
        return int(deleted)
