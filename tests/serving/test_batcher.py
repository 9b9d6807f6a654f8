"""The batcher: concurrent calls share model calls, each caller gets its own rows, failures stay local."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from app.serving.batcher import InferenceBatcher
from app.serving.models import ServedModel


class RecordingModel:
    """A model whose P(positive) is len(text)/1000, recording the size of every call."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[int] = []
        self.fail_on = fail_on

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(len(texts))
        if self.fail_on in texts:
            raise ValueError("cannot score this")
        positive = np.array([len(t) / 1000 for t in texts])
        return np.column_stack([1 - positive, positive])


def served(model: Any, version: str = "v1") -> ServedModel:
    return ServedModel(version, {}, model, compiled=False)


async def _gather(batcher: InferenceBatcher, model: ServedModel, groups: list[list[str]]) -> list[Any]:
    return await asyncio.gather(*(batcher.predict_proba(model, g) for g in groups), return_exceptions=True)


def test_concurrent_requests_share_model_calls_and_get_their_own_rows() -> None:
    async def scenario() -> tuple[list[Any], list[int]]:
        model = RecordingModel()
        batcher = InferenceBatcher(max_batch=64)
        batcher.start()
        groups = [["x" * n] for n in range(1, 41)] + [["y" * 5, "y" * 6]]
        results = await _gather(batcher, served(model), groups)
        await batcher.stop()
        return results, model.calls

    results, calls = asyncio.run(scenario())
    assert sum(calls) == 42 and len(calls) < 42 / 4  # 42 texts, a handful of model calls
    for n, rows in enumerate(results[:40], start=1):
        assert rows.shape == (1, 2) and rows[0, 1] == pytest.approx(n / 1000)
    assert results[40][:, 1] == pytest.approx([0.005, 0.006])


def test_one_call_never_exceeds_max_batch_texts() -> None:
    async def scenario() -> tuple[np.ndarray, list[int]]:
        model = RecordingModel()
        batcher = InferenceBatcher(max_batch=16)
        batcher.start()
        (big,) = await _gather(batcher, served(model), [["z" * i for i in range(50)]])
        await batcher.stop()
        return big, model.calls

    big, calls = asyncio.run(scenario())
    assert max(calls) <= 16 and sum(calls) == 50
    assert big[:, 1] == pytest.approx([i / 1000 for i in range(50)])


def test_a_model_failure_fails_only_the_batch_it_was_in() -> None:
    async def scenario() -> tuple[list[Any], list[Any]]:
        model = RecordingModel(fail_on="boom")
        batcher = InferenceBatcher(max_batch=64)
        batcher.start()
        first = await _gather(batcher, served(model), [["boom"], ["fine"]])
        second = await _gather(batcher, served(model), [["later"]])
        await batcher.stop()
        return first, second

    first, second = asyncio.run(scenario())
    assert isinstance(first[0], ValueError)
    assert second[0][0, 1] == pytest.approx(0.005)


def test_requests_for_different_model_versions_are_never_mixed() -> None:
    async def scenario() -> tuple[list[Any], list[int], list[int]]:
        old, new = RecordingModel(), RecordingModel()
        batcher = InferenceBatcher(max_batch=64)
        batcher.start()
        a, b = served(old, "v1"), served(new, "v2")
        results = await asyncio.gather(
            batcher.predict_proba(a, ["aa"]), batcher.predict_proba(b, ["bbb"]), batcher.predict_proba(a, ["c"])
        )
        await batcher.stop()
        return list(results), old.calls, new.calls

    results, old_calls, new_calls = asyncio.run(scenario())
    assert sum(old_calls) == 2 and sum(new_calls) == 1
    assert [r[0, 1] for r in results] == pytest.approx([0.002, 0.003, 0.001])


def test_on_result_runs_for_every_caller_of_a_model_call_before_any_of_them_resumes() -> None:
    """Each caller's hook sees its own rows in the batch step; a hook that raises fails its caller only."""
    seen: list[tuple[str, float]] = []
    resumed_after: list[int] = []

    def hook(name: str) -> Callable[[np.ndarray], None]:
        def on_result(rows: np.ndarray) -> None:
            if name == "bad":
                raise RuntimeError("hook failed")
            seen.append((name, float(rows[0, 1])))

        return on_result

    async def one(batcher: InferenceBatcher, model: ServedModel, name: str) -> Any:
        rows = await batcher.predict_proba(model, ["x" * len(name)], hook(name))
        resumed_after.append(len(seen))
        return rows

    async def scenario() -> list[Any]:
        batcher = InferenceBatcher(max_batch=64)
        batcher.start()
        model = served(RecordingModel())
        names = ["a", "bb", "bad", "dddd"]
        results = await asyncio.gather(*(one(batcher, model, n) for n in names), return_exceptions=True)
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert seen == [("a", 0.001), ("bb", 0.002), ("dddd", 0.004)]
    assert resumed_after == [3, 3, 3]  # every hook had run before the first caller went on
    assert isinstance(results[2], RuntimeError) and results[3][0, 1] == pytest.approx(0.004)
