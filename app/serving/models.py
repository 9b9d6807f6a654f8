"""The model a worker serves: loaded and verified at start, swapped when the store's pointer moves."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
from numpy.typing import NDArray

from app.errors import ModelNotReadyError, SentimentServiceError
from app.ml.inference import compile_pipeline
from app.ml.registry import REFERENCE_ARTIFACT, LoadedModel, ModelRegistry
from app.monitoring.metrics import MODEL_INFO

log = structlog.get_logger(__name__)

# Edge cases the compiled path must agree on besides real held-out texts: nothing known, emoji, noise.
_EDGE_PROBES = ["", "qzxv wkpj", "\U0001f600\U0001f44d", "NOT bad!!! :) @someone http://x.y/z", "a " * 400]
PROBE_COUNT = 200


@dataclass(frozen=True)
class ServedModel:
    """What a worker predicts with: a verified version and its fastest faithful ``predict_proba``."""

    version: str
    metadata: dict[str, Any]
    predict_proba: Callable[[Sequence[str]], NDArray[np.float64]]
    compiled: bool
    loaded: LoadedModel


def prepare(model: LoadedModel) -> ServedModel:
    """Serve ``model`` through :mod:`app.ml.inference` when that reproduces it on held-out probes."""
    try:
        probes = list(model.read_json(REFERENCE_ARTIFACT)["texts"][:PROBE_COUNT])
    except (OSError, ValueError, KeyError, TypeError):
        probes = []
    compiled = compile_pipeline(model.pipeline, probes + _EDGE_PROBES)
    predict = compiled.predict_proba if compiled is not None else model.pipeline.predict_proba
    return ServedModel(model.version, model.metadata, predict, compiled is not None, model)


class ModelManager:
    """Holds the current :class:`ServedModel` of one worker.

    A new version is loaded and verified completely before it replaces the old one, so a version that
    fails to load is never served and in-flight requests finish on the model they started with.
    """

    def __init__(self, registry: ModelRegistry, reload_interval: float, retry_failed_after: float = 60.0) -> None:
        self.registry = registry
        self.reload_interval = reload_interval
        self.retry_failed_after = retry_failed_after
        self._model: ServedModel | None = None
        self._failed: tuple[str, float] | None = None  # (version, monotonic time) of the last failed load

    @property
    def current(self) -> ServedModel:
        """The served model; :class:`ModelNotReadyError` if no verified model is loaded."""
        if self._model is None:
            raise ModelNotReadyError("no verified model is loaded; see /readyz and the service log")
        return self._model

    @property
    def ready(self) -> bool:
        return self._model is not None

    def sync(self) -> bool:
        """Load the store's current version if it differs from the served one; True if it swapped."""
        try:
            wanted = self.registry.current_version()
        except SentimentServiceError as exc:
            log.error("model_pointer_unreadable", reason=exc.message)
            return False
        served = self._model.version if self._model else None
        if wanted is None or wanted == served:
            return False
        if self._failed and self._failed[0] == wanted and time.monotonic() - self._failed[1] < self.retry_failed_after:
            return False
        try:
            model = prepare(self.registry.load(wanted))
        except Exception as exc:  # anything that stops a load keeps the old model serving
            self._failed = (wanted, time.monotonic())
            log.error("model_load_failed", model_version=wanted, served_version=served, reason=str(exc))
            return False
        self._model, self._failed = model, None
        if served:
            MODEL_INFO.labels(version=served).set(0)
        MODEL_INFO.labels(version=wanted).set(1)
        log.info("model_swapped", model_version=wanted, previous_version=served, compiled=model.compiled)
        return True

    async def watch(self) -> None:
        """Poll the pointer every ``reload_interval`` seconds; loads run on a thread, off the event loop."""
        while True:
            await asyncio.sleep(self.reload_interval)
            await asyncio.to_thread(self.sync)
