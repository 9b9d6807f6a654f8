"""The predictions table: rows, windows, feedback labels and their sources, retention."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from sqlalchemy import event

from app.storage.predictions import LOG_COLUMNS, STATEMENT_ROWS, LabelOutcome, PredictionRepository, statement_sizes


def row(i: int, version: str = "v1", created_at: float | None = None, sentiment: str = "positive") -> dict[str, Any]:
    return {
        "id": f"p{i:05d}",
        "created_at": created_at if created_at is not None else 1000.0 + i,
        "text": f"text number {i}",
        "text_length": 14,
        "sentiment": sentiment,
        "confidence": 0.8,
        "p_positive": 0.8 if sentiment == "positive" else 0.2,
        "model_version": version,
        "latency_ms": 1.0,
    }


def log_row(i: int, **changes: Any) -> tuple[Any, ...]:
    """:func:`row` as the recorder takes it: a tuple of :data:`LOG_COLUMNS`, with ``changes``."""
    values = {**row(i), **changes}
    return tuple(values[c] for c in LOG_COLUMNS)


def test_a_versions_accuracy_and_window_can_be_bounded_in_time(predictions: PredictionRepository) -> None:
    """What the promotion watch reads: a version's labelled rows before or after the promotion, its window since."""
    predictions.insert_predictions([row(i) for i in range(10)] + [row(100 + i, "v2") for i in range(4)])
    for i, label in enumerate(["positive", "negative", "positive", "positive"]):
        predictions.set_label(f"p{i:05d}", label)  # made at 1000-1003
    predictions.set_label("p00008", "negative")  # made at 1008
    assert predictions.version_accuracy("v1") == (3, 5)
    assert predictions.version_accuracy("v1", before=1004.0) == (3, 4)
    assert predictions.version_accuracy("v1", since=1004.0) == (0, 1)
    assert predictions.version_accuracy("v1", 2) == (1, 2)  # the two latest made: 1008 (wrong), 1003 (right)
    assert predictions.version_accuracy("v2") == (0, 0)
    assert [r.created_at for r in predictions.window(10, "v1", since=1007.0)] == [1008.0, 1009.0]


def test_window_is_the_latest_rows_of_one_version_oldest_first(predictions: PredictionRepository) -> None:
    predictions.insert_predictions([row(i) for i in range(10)] + [row(100 + i, "v2") for i in range(3)])
    window = predictions.window(4, "v1")
    assert [r.text for r in window] == [f"text number {i}" for i in (6, 7, 8, 9)]
    assert predictions.count_predictions("v1") == 10 and predictions.count_predictions("v2") == 3
    assert predictions.count_predictions("v1", since=1007.0) == 2


def test_labels_are_idempotent_and_never_overwritten(predictions: PredictionRepository) -> None:
    predictions.insert_predictions([row(1)])
    assert predictions.set_label("p00001", "negative").outcome is LabelOutcome.STORED
    assert predictions.set_label("p00001", "negative").outcome is LabelOutcome.UNCHANGED
    conflict = predictions.set_label("p00001", "positive")
    assert conflict.outcome is LabelOutcome.CONFLICT and conflict.label == "negative"
    assert predictions.get_prediction("p00001").label == "negative"  # type: ignore[union-attr]
    assert predictions.set_label("nope", "positive").outcome is LabelOutcome.NOT_FOUND


def test_live_accuracy_covers_the_most_recently_labelled(predictions: PredictionRepository) -> None:
    predictions.insert_predictions([row(i) for i in range(6)])
    for i, label in enumerate(["positive", "positive", "negative", "negative"]):
        predictions.set_label(f"p{i:05d}", label, now=2000.0 + i)
    assert predictions.live_accuracy(last=10) == (0.5, 4)
    assert predictions.live_accuracy(last=2) == (0.0, 2)  # the two latest were wrong
    assert [r.label for r in predictions.labelled()] == ["positive", "positive", "negative", "negative"]


def plans(predictions: PredictionRepository, call: Callable[[], object]) -> dict[str, list[str]]:
    """SQLite's query plan (``EXPLAIN QUERY PLAN``) of each statement ``call`` runs, by statement."""
    statements: list[tuple[str, Any]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        statements.append((statement, parameters))

    engine = predictions.engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        call()
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    with engine.connect() as conn:
        return {
            statement: [step for *_, step in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)]
            for statement, parameters in statements
            if statement.lstrip().startswith(("SELECT", "DELETE", "UPDATE"))
        }


def test_queries_of_labelled_rows_read_the_labelled_rows_only(predictions: PredictionRepository) -> None:
    """The drift monitor asks for the latest labels every second and the log holds up to a million unlabelled
    predictions: each query of labelled rows finds them through the partial index of labelled rows, never by
    walking the table or an index over every prediction."""
    predictions.insert_predictions([row(i) for i in range(50)])
    predictions.set_label("p00001", "positive", source="web", now=2000.0)
    calls: dict[str, Callable[[], object]] = {
        "live accuracy": lambda: predictions.live_accuracy(500),
        "labelled rows": predictions.labelled,
        "labelled rows since": lambda: predictions.labelled(since=1500.0),
        "label sources": predictions.label_sources,
        "labelled retention": lambda: predictions.enforce_retention(
            10**6, 10**9, 3000.0, max_labelled_rows=1, max_labelled_age_seconds=10**9
        ),
        "purge": lambda: predictions.purge_labels("nobody"),
    }
    for name, call in calls.items():
        ran = plans(predictions, call)
        labelled = {s: plan for s, plan in ran.items() if re.search(r"label(led_at)? IS NOT NULL", s)}
        assert labelled, f"{name}: no query of labelled rows ran"
        for statement, plan in labelled.items():
            assert any(re.search(r"USING (COVERING )?INDEX ix_predictions_labelled_at\b", step) for step in plan), (
                name,
                statement,
                plan,
            )
            assert not any(step.startswith("SCAN predictions") for step in plan), (name, statement, plan)


def test_retention_drops_old_and_excess_unlabelled_rows_but_keeps_labels(predictions: PredictionRepository) -> None:
    predictions.insert_predictions([row(i, created_at=float(i)) for i in range(100)])
    predictions.set_label("p00000", "positive")
    deleted = predictions.enforce_retention(max_rows=50, max_age_seconds=80, now=100.0)
    # Older than 80 s: rows 0-19 (row 0 is labelled and kept); beyond the newest 50 unlabelled: rows 20-49.
    assert deleted == 49
    assert predictions.count_predictions() == 51
    assert predictions.get_prediction("p00000") is not None and predictions.get_prediction("p00049") is None


def test_retention_bounds_labelled_rows_by_label_age_and_count(predictions: PredictionRepository) -> None:
    predictions.insert_predictions([row(i, created_at=float(i)) for i in range(10)])
    for i in range(8):
        predictions.set_label(f"p{i:05d}", "positive", now=1000.0 + i)
    # Labels older than 5.5 s at 1007: rows 0 and 1; beyond the newest 4 labels left: rows 2 and 3.
    deleted = predictions.enforce_retention(
        max_rows=100, max_age_seconds=1e9, now=1007.0, max_labelled_rows=4, max_labelled_age_seconds=5.5
    )
    assert deleted == 4
    assert [r.id for r in predictions.labelled()] == [f"p{i:05d}" for i in (4, 5, 6, 7)]
    assert predictions.count_predictions() == 6  # the unlabelled rows 8 and 9 are within their own bounds
    # Without labelled bounds, labelled rows are left alone.
    assert predictions.enforce_retention(max_rows=0, max_age_seconds=1e9, now=1e6) == 2
    assert predictions.count_predictions() == 4


def test_labels_record_their_source_and_a_purge_forgets_one_source_only(predictions: PredictionRepository) -> None:
    predictions.insert_predictions([row(i) for i in range(6)])
    for i, source in enumerate(["web", "web", "crowd", "crowd", "crowd"]):
        predictions.set_label(f"p{i:05d}", "positive", now=2000.0 + i, source=source)
    assert predictions.set_label("p00000", "positive", source="crowd").outcome is LabelOutcome.UNCHANGED  # first stays
    assert {r.id: r.source for r in predictions.labelled()}["p00000"] == "web"
    assert [(s.source, s.labels) for s in predictions.label_sources()] == [("crowd", 3), ("web", 2)]

    assert predictions.purge_labels("crowd") == 3
    assert predictions.purge_labels("crowd") == 0
    assert [(r.id, r.source) for r in predictions.labelled()] == [("p00000", "web"), ("p00001", "web")]
    purged = predictions.get_prediction("p00002")
    assert purged is not None  # the prediction stays, unlabelled
    assert (purged.label, purged.labelled_at, purged.label_source) == (None, None, None)
    assert predictions.set_label("p00002", "negative", source="web").outcome is LabelOutcome.STORED


def test_labels_without_a_recorded_source_count_as_legacy_and_can_be_purged(predictions: PredictionRepository) -> None:
    predictions.insert_predictions([row(i) for i in range(3)])
    predictions.set_label("p00000", "positive", source="web")
    predictions.set_label("p00001", "negative", source="web")
    with predictions.engine.begin() as conn:  # as labelled by a release before label_source
        conn.exec_driver_sql("UPDATE predictions SET label_source = NULL WHERE id = 'p00001'")
    assert [r.source for r in predictions.labelled()] == ["web", "legacy"]
    assert predictions.purge_labels("legacy") == 1
    assert [r.id for r in predictions.labelled()] == ["p00000"]


def test_writing_a_row_twice_keeps_one_and_raises_nothing(predictions: PredictionRepository) -> None:
    """A batch re-sent after a commit whose outcome was unknown (or a dead worker's spool) is harmless."""
    predictions.insert_predictions([row(1), row(2)])
    predictions.insert_predictions([row(2), row(3)])
    assert predictions.count_predictions() == 3


def test_a_flush_of_any_size_uses_four_statement_shapes_and_writes_every_row(predictions: PredictionRepository) -> None:
    """Rows go out in statements of the sizes in STATEMENT_ROWS only: the driver keeps each distinct statement
    prepared per connection, so lengths from 1 to 499 would each cost memory."""
    assert statement_sizes(2137) == [500] * 4 + [100] + [20] + [1] * 17
    assert statement_sizes(0) == []
    for n in (1, 19, 20, 499, 500, 501, 1234):
        assert sum(statement_sizes(n)) == n and set(statement_sizes(n)) <= set(STATEMENT_ROWS)
    written = 0
    for n in (1234, 501, 19, 1):
        predictions.insert_predictions([row(i) for i in range(written, written + n)])
        written += n
    assert predictions.count_predictions() == written
    assert {rows for _, rows in predictions._driver_inserts} <= set(STATEMENT_ROWS)
