"""One guarded retrain, in its own process: ``python -m app.retrain.job JOB_ID --trigger TRIGGER``.

Data: the base corpus's fit split plus every labelled feedback row outside the feedback holdout. Feedback
carries ``SENTIMENT_RETRAIN_FEEDBACK_WEIGHT`` of the total weight. Within it, each feedback token (the
"source" a label records) weighs its share of the feedback rows, but at most
``SENTIMENT_RETRAIN_MAX_SOURCE_SHARE`` when several sent labels (:func:`source_shares`), so one token
cannot outvote the others by sending more. Within each source both labels weigh the same: feedback from
a new domain is rarely balanced (clothing reviews are 88 % positive) and would otherwise teach the
majority label. The labels of a purged token (``python -m app.cli feedback purge|revoke NAME``) are gone
from the log, so no retrain sees them; labels a revoked token sent before every worker refused it are left
out, and a token purged or revoked while a retrain runs stops the promotion of a candidate fitted on it
(:class:`PurgeCheck`: outcome ``superseded``, reason ``labels_purged``).

Gate: the candidate and the current model are scored on the same held-out data, the base corpus's
holdout and the feedback holdout (a fixed hash of the prediction id puts a row there for good), by
balanced accuracy. The candidate is promoted only if it is better on the feedback holdout and loses at
most ``SENTIMENT_RETRAIN_PROMOTION_MARGIN`` on the base holdout; otherwise it is registered as
``rejected``, and the next retrain waits for ``SENTIMENT_RETRAIN_MIN_LABELS`` labels newer than the ones
it tried. Its drift reference is recent traffic it was not fitted on, so once it is promoted the
monitor compares live traffic with the traffic the new model was made for.

Shadow: a candidate the gate passes first scores the current version's latest live window beside it
(:mod:`app.retrain.shadow`: agreement, estimated accuracy of both, their confidences); figures that break
``SENTIMENT_RETRAIN_SHADOW_*`` reject it too (reason ``shadow``). Gate and shadow figures go into the card,
and every step is an event of the version (:mod:`app.storage.model_events`, actor ``retrain:<job id>``). A
promoted version is watched by the drift monitor (:mod:`app.monitoring.watch`), which rolls it back on a
significant drop.

The candidate is a model of the current one's kind and parameters, fitted through the model contract
(:class:`app.ml.model.SentimentModel`); its version card is built by :mod:`app.ml.model_card`, as a
trained version's is.

Operators stay in control: a candidate is promoted only if the version it improved on is still current
(an operator's promote or rollback meanwhile wins: outcome ``superseded``), and a retrain that runs past
``SENTIMENT_RETRAIN_MAX_SECONDS`` records its job as failed (reason ``timeout``) and exits, which frees
the retrain lock.

The retrain lock (:mod:`app.retrain.lock`): a flock the launcher hands over, or else (PostgreSQL's advisory
lock, or a retrain started by hand) taken here at start. A process that cannot take it records its job as
failed (reason ``lock_held``) and exits 3 without retraining.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from numpy.typing import NDArray
from sklearn.metrics import balanced_accuracy_score

from app.errors import CurrentVersionChangedError
from app.migrations import require_current
from app.ml.data import CORPORA, Corpus, fingerprint_rows
from app.ml.drift_reference import DriftReference, build_reference
from app.ml.labels import LABELS
from app.ml.model import SentimentModel, build_model
from app.ml.model_card import RegisteredVersion, register_version
from app.ml.registry import LoadedModel, ModelRegistry
from app.ml.train import split_holdout
from app.monitoring import metrics
from app.retrain.lock import FileRetrainLock, RetrainLock
from app.retrain.shadow import ShadowRules, shadow_candidate
from app.settings import Settings
from app.storage.database import Database
from app.storage.feedback_sources import FeedbackSourceRepository
from app.storage.model_events import ModelEvent, ModelEventRepository
from app.storage.predictions import LabelledRow, PredictionRepository
from app.storage.retrain_jobs import RetrainJobRepository

log = structlog.get_logger("app.retrain.job")

TIMEOUT_EXIT_CODE = 124
"""Exit status of a retrain process its watchdog ended (as ``timeout(1)``'s)."""
REFERENCE_ROWS = 1000
MIN_TRAFFIC_REFERENCE = 200
FEEDBACK_SUFFIX = "+feedback"
"""A retrained version's ``data.corpus`` is its base corpus's name and this suffix."""


@dataclass(frozen=True)
class Outcome:
    outcome: str  # promoted, rejected, superseded, skipped_no_new_labels, skipped_too_few_labels
    details: dict[str, Any]
    candidate_version: str | None = None


def in_feedback_holdout(prediction_id: str, fraction: float) -> bool:
    """A fixed, id-derived split: a feedback row is held out in every retrain or in none."""
    return int(hashlib.sha256(prediction_id.encode()).hexdigest()[:8], 16) % 10_000 < fraction * 10_000


def corpus_of(name: str, rows: list[LabelledRow]) -> Corpus:
    texts = [r.text for r in rows]
    labels = np.array([LABELS.index(r.label) for r in rows], dtype=np.int64)
    return Corpus(name, texts, labels, fingerprint_rows(texts, labels))


def joined(name: str, first: Corpus, second: Corpus) -> Corpus:
    """The rows of ``first`` then ``second`` as one corpus."""
    texts = first.texts + second.texts
    labels = np.concatenate([first.labels, second.labels])
    return Corpus(name, texts, labels, fingerprint_rows(texts, labels))


def group_weights(groups: list[tuple[NDArray[np.int64], float]]) -> NDArray[np.float64]:
    """Sample weights: each source gets its ``share`` of the total weight, split evenly between labels.

    ``groups`` holds (labels of one source, its share); shares add up to 1. The total weight equals
    the number of rows, so the regularisation strength keeps its meaning.
    """
    total = sum(len(labels) for labels, _ in groups)
    weights = []
    for labels, share in groups:
        present = [k for k in (0, 1) if (labels == k).any()]
        per_label = {k: total * share / len(present) / (labels == k).sum() for k in present}
        weights.append(np.array([per_label[int(y)] for y in labels], dtype=np.float64))
    return np.concatenate(weights)


def source_shares(rows: Mapping[str, int], cap: float) -> dict[str, float]:
    """Each source's share of the feedback weight, from its number of ``rows``: a lone source gets it all;
    among several, each gets its share of the rows but at most ``cap``.

    What a capped source gives up goes to the others in proportion to their rows, and a source lifted past
    ``cap`` by that is capped in turn (water-filling), so shares always add up to 1 and a capped source
    gets exactly ``cap``: with two sources sending 900 and 100 rows and cap 0.5, both get 0.5 (not 0.83
    and 0.17, which capping and then renormalising would give). When every source would pass ``cap``
    (fewer than ``1 / cap`` of them), they share equally.
    """
    sending = {name: n for name, n in rows.items() if n > 0}
    if len(sending) <= 1:
        return dict.fromkeys(sending, 1.0)
    capped: set[str] = set()
    while True:
        free = [name for name in sending if name not in capped]
        if not free:
            return dict.fromkeys(sending, 1 / len(sending))
        left = 1 - cap * len(capped)  # stays > 0: sources pass the cap only while the free ones hold > cap
        free_rows = sum(sending[name] for name in free)
        shares = {name: left * sending[name] / free_rows for name in free}
        over = {name for name, share in shares.items() if share > cap * (1 + 1e-9)}
        if not over:
            return {**dict.fromkeys(capped, cap), **shares}
        capped |= over


def training_weights(
    base_labels: NDArray[np.int64], feedback: Feedback, share: float, cap: float
) -> NDArray[np.float64]:
    """Sample weights of the base fit rows then the feedback fit rows (grouped by source, as
    :func:`collect_feedback` orders them): feedback carries ``share`` of the weight, split between sources
    by :func:`source_shares`, and within each source evenly between labels."""
    sources = np.array(feedback.fit_sources, dtype=object)
    names = sorted(set(feedback.fit_sources))
    shares = source_shares({name: int((sources == name).sum()) for name in names}, cap)
    groups = [(base_labels, 1 - share)]
    groups += [(feedback.fit.labels[sources == name], share * shares[name]) for name in names]
    return group_weights(groups)


def source_report(feedback: Feedback, weights: NDArray[np.float64], cap: float) -> dict[str, Any]:
    """Per feedback source: its labelled rows, fit and holdout rows, and the share of the whole training
    weight its rows carry (and of the feedback weight); for the job record and the version card."""
    fed = weights[len(weights) - len(feedback.fit_sources) :]
    sources = np.array(feedback.fit_sources, dtype=object)
    total = float(weights.sum())
    report: dict[str, Any] = {}
    for name in sorted({r.source for r in feedback.rows}):
        weight = float(fed[sources == name].sum()) if len(sources) else 0.0
        report[name] = {
            "rows": sum(r.source == name for r in feedback.rows),
            "fit_rows": feedback.fit_sources.count(name),
            "holdout_rows": feedback.holdout_sources.count(name),
            "weight_share": round(weight / total, 6),
            "feedback_weight_share": round(weight / float(fed.sum()), 6) if fed.sum() else 0.0,
        }
    return {"max_source_share": cap, "sources": report}


def balanced(model: SentimentModel, corpus: Corpus) -> float:
    return float(balanced_accuracy_score(corpus.labels, model.predict(corpus.texts)))


def promotes(gate: dict[str, Any], margin: float) -> bool:
    """The gate's rule: better on the feedback holdout, and at most ``margin`` worse on the base holdout."""
    return bool(
        gate["candidate"]["feedback"] > gate["current"]["feedback"]
        and gate["candidate"]["base"] >= gate["current"]["base"] - margin
    )


def labels_tried(registry: ModelRegistry, current: LoadedModel) -> tuple[float, str]:
    """Up to when feedback labels were already tried, and by which version: the current model's own
    training data, or a candidate fitted since on top of it and rejected. A retry needs labels newer
    than that, so a drift alert that keeps firing never refits the same data twice."""

    def through_of(metadata: dict[str, Any]) -> float:
        return float(metadata.get("data", {}).get("feedback", {}).get("through", 0.0))

    tried = [(through_of(current.metadata), current.version)]
    tried += [
        (through_of(v.metadata), v.version)
        for v in registry.versions()
        if v.stage == "rejected" and v.metadata.get("parent") == current.version
    ]
    return max(tried)


@dataclass(frozen=True)
class Feedback:
    """The labelled feedback of one retrain, split by :func:`in_feedback_holdout`."""

    rows: list[LabelledRow]  # every labelled prediction
    new_rows: int  # labelled since the labels last tried
    fit: Corpus  # rows grouped by source (sorted by name), oldest label first within each
    holdout: Corpus
    fit_sources: tuple[str, ...]  # the source of each fit row
    holdout_sources: tuple[str, ...]

    def description(self, sources: dict[str, Any] | None = None) -> dict[str, Any]:
        """The card's ``data.feedback`` block (``through``: the newest label this retrain tried; ``sources``:
        :func:`source_report`, which shows which feedback tokens a version was fitted on)."""
        return {
            **(sources or {}),
            "rows": len(self.rows),
            "new_rows": self.new_rows,
            "fit_rows": len(self.fit),
            "holdout_rows": len(self.holdout),
            "through": max(r.labelled_at for r in self.rows),
            "positive_share": float(np.mean([r.label == "positive" for r in self.rows])),
        }


def collect_feedback(
    registry: ModelRegistry, current: LoadedModel, labelled: list[LabelledRow], settings: Settings
) -> Feedback | Outcome:
    """The feedback to retrain on, or the skip outcome when too few labels are newer than the last try."""
    through, tried_by = labels_tried(registry, current)
    new = sum(r.labelled_at > through for r in labelled)
    if not new:
        return Outcome(
            "skipped_no_new_labels", {"labelled_rows": len(labelled), "through": through, "tried_by": tried_by}
        )
    if new < settings.retrain_min_labels:
        return Outcome(
            "skipped_too_few_labels", {"new_labels": new, "needed": settings.retrain_min_labels, "tried_by": tried_by}
        )
    held = [in_feedback_holdout(r.id, settings.retrain_feedback_holdout_fraction) for r in labelled]
    fit = sorted((r for r, h in zip(labelled, held, strict=True) if not h), key=lambda r: str(r.source))
    holdout = [r for r, h in zip(labelled, held, strict=True) if h]
    return Feedback(
        labelled,
        new,
        corpus_of("feedback:fit", fit),
        corpus_of("feedback:holdout", holdout),
        tuple(r.source for r in fit),
        tuple(r.source for r in holdout),
    )


@dataclass(frozen=True)
class BaseData:
    """The base corpus of the current model's line, split the way it was first trained."""

    name: str  # its name in CORPORA
    fit: Corpus
    holdout: Corpus
    holdout_fraction: float
    seed: int


def base_corpus_name(data: dict[str, Any]) -> str:
    """The :data:`CORPORA` name of the corpus a version's line of models was first trained on."""
    # Versions registered before ``base_corpus`` was recorded name it in ``corpus``, a retrained one as
    # "<name>+feedback".
    name = data.get("base_corpus") or str(data.get("corpus", "rotten_tomatoes")).removesuffix(FEEDBACK_SUFFIX)
    if name not in CORPORA:
        raise RuntimeError(f"the base corpus {name!r} is not one of {sorted(CORPORA)}: nothing to retrain on")
    return str(name)


def base_data(metadata: dict[str, Any], data_dir: Path) -> BaseData:
    """The current version's base corpus, reloaded and split with its recorded fraction and seed."""
    data = metadata.get("data", {})
    name = base_corpus_name(data)
    fraction = float(data.get("holdout_fraction", 0.15))
    seed = int(data.get("holdout_seed", metadata.get("params", {}).get("random_state", 0)))
    fit, holdout = split_holdout(CORPORA[name](data_dir), fraction, seed)
    return BaseData(name, fit, holdout, fraction, seed)


def fit_candidate(current: SentimentModel, fit: Corpus, weights: NDArray[np.float64]) -> tuple[SentimentModel, float]:
    """A model of the current one's kind and parameters fitted on the weighted rows, and its fit seconds."""
    started = time.perf_counter()
    candidate = build_model(current.kind, current.params_dict()).fit(fit.texts, fit.labels, sample_weight=weights)
    return candidate, time.perf_counter() - started


def run_gate(
    candidate: SentimentModel, current: SentimentModel, base_holdout: Corpus, feedback_holdout: Corpus, margin: float
) -> dict[str, Any]:
    """Both models scored on both holdouts, and the gate's decision (``promote`` or ``reject``)."""
    gate: dict[str, Any] = {
        "base_holdout_rows": len(base_holdout),
        "feedback_holdout_rows": len(feedback_holdout),
        "candidate": {"base": balanced(candidate, base_holdout), "feedback": balanced(candidate, feedback_holdout)},
        "current": {"base": balanced(current, base_holdout), "feedback": balanced(current, feedback_holdout)},
        "margin": margin,
        "metric": "balanced_accuracy",
    }
    gate["decision"] = "promote" if promotes(gate, margin) else "reject"
    return gate


def drift_reference_of(
    candidate: SentimentModel, fit: Corpus, holdout: Corpus, traffic: list[str], seed: int
) -> tuple[DriftReference, str]:
    """The candidate's drift reference and its source: recent ``traffic`` it was not fitted on if there
    is enough of it (the traffic the candidate is made for), else the holdout."""
    if len(traffic) >= MIN_TRAFFIC_REFERENCE:
        texts, source = traffic[-REFERENCE_ROWS:], "recent_traffic"
    else:
        texts, source = holdout.texts, "holdout"
    return build_reference(candidate, fit.texts, texts, candidate.p_positive(texts), seed=seed), source


def card_data(
    base: BaseData, fit: Corpus, holdout: Corpus, feedback: Feedback, reference_source: str, *, sources: dict[str, Any]
) -> dict[str, Any]:
    """The ``data`` block of a retrained version's card."""
    return {
        "corpus": f"{base.name}{FEEDBACK_SUFFIX}",
        "base_corpus": base.name,
        "fingerprint": fit.fingerprint,
        "rows": len(fit) + len(holdout),
        "holdout_fraction": base.holdout_fraction,
        "holdout_seed": base.seed,
        "drift_reference_source": reference_source,
        "feedback": feedback.description(sources),
    }


@dataclass(frozen=True)
class PurgeCheck:
    """The feedback token names purged or revoked (``python -m app.cli feedback purge|revoke NAME``) as the
    retrain reads its labels: a name the candidate was fitted on that is purged again before the promotion
    stops it (:func:`promote_candidate`)."""

    repository: FeedbackSourceRepository
    purge_times: dict[str, float]  # name -> its latest purge, read before the labels
    revoked: frozenset[str]

    @classmethod
    def start(cls, repository: FeedbackSourceRepository) -> PurgeCheck:
        """Read before the labels: a purge committed after this is seen by :meth:`purged_since`."""
        sources = repository.sources()
        revoked = frozenset(s.name for s in sources if s.revoked_at is not None)
        return cls(repository, {s.name: s.purged_at for s in sources}, revoked)

    def usable(self, rows: list[LabelledRow]) -> list[LabelledRow]:
        """``rows`` without labels of revoked names: those a token sent after its purge, before every worker
        refused it (``SENTIMENT_FEEDBACK_REVOCATION_REFRESH_SECONDS``)."""
        return [r for r in rows if r.source not in self.revoked]

    def purged_since(self, names: Iterable[str]) -> list[str]:
        """The ``names`` purged or revoked since :meth:`start`, by name."""
        now = self.repository.purge_times()
        return sorted(n for n in names if now.get(n) != self.purge_times.get(n))


class _LabelsPurgedError(Exception):
    def __init__(self, sources: list[str]) -> None:
        super().__init__(", ".join(sources))
        self.sources = sources


def promote_candidate(
    registry: ModelRegistry,
    version: str,
    parent: str,
    gate: dict[str, Any],
    purged: Callable[[], list[str]] = list,
) -> Outcome:
    """Promote ``version`` unless an operator acted while the retrain ran; their choice stays, the outcome is
    ``superseded`` and the candidate stays in stage ``candidate``. Both are checked under the store's lock:
    ``purged()`` names the feedback sources the candidate was fitted on that were purged or revoked meanwhile
    (reason ``labels_purged``), and ``parent`` must still be current (reason ``parent_not_current``)."""
    details: dict[str, Any] = {"gate": gate, "parent": parent}

    def no_purge() -> None:
        sources = purged()
        if sources:
            raise _LabelsPurgedError(sources)

    try:
        registry.promote(version, expected_current=parent, precondition=no_purge)
    except _LabelsPurgedError as exc:
        log.warning("retrain_superseded", candidate_version=version, reason="labels_purged", purged_sources=exc.sources)
        details |= {"reason": "labels_purged", "current_version": parent, "purged_sources": exc.sources}
        return Outcome("superseded", details, version)
    except CurrentVersionChangedError as exc:
        current = exc.details["current"]
        log.warning("retrain_superseded", candidate_version=version, parent=parent, current_version=current)
        return Outcome("superseded", details | {"reason": "parent_not_current", "current_version": current}, version)
    return Outcome("promoted", {"gate": gate}, version)


@dataclass(frozen=True)
class Trained:
    """A candidate fitted on the base corpus and the feedback, and its gate figures."""

    model: SentimentModel
    base: BaseData
    feedback: Feedback
    fit: Corpus  # the base fit rows, then the feedback fit rows
    holdout: Corpus  # the base holdout, then the feedback holdout
    sources: dict[str, Any]  # source_report(): the feedback tokens it was fitted on
    gate: dict[str, Any]
    fit_seconds: float


def train_candidate(current: LoadedModel, feedback: Feedback, settings: Settings) -> Trained:
    """Fit a candidate of the current model's kind on its base corpus and the weighted feedback, then gate it."""
    base = base_data(current.metadata, settings.data_dir)
    fit = joined(f"{base.name}{FEEDBACK_SUFFIX}:fit", base.fit, feedback.fit)
    cap = settings.retrain_max_source_share
    weights = training_weights(base.fit.labels, feedback, settings.retrain_feedback_weight, cap)
    candidate, fit_seconds = fit_candidate(current.model, fit, weights)
    gate = run_gate(candidate, current.model, base.holdout, feedback.holdout, settings.retrain_promotion_margin)
    holdout = joined(f"{base.name}{FEEDBACK_SUFFIX} holdout", base.holdout, feedback.holdout)
    return Trained(candidate, base, feedback, fit, holdout, source_report(feedback, weights, cap), gate, fit_seconds)


@dataclass(frozen=True)
class Job:
    """The retrain job being run: its settings, id and trigger."""

    settings: Settings
    job_id: str
    trigger: str


def register_trained(
    registry: ModelRegistry, predictions: PredictionRepository, current: LoadedModel, trained: Trained, job: Job
) -> tuple[RegisteredVersion, dict[str, Any] | None, str | None]:
    """Register the candidate with its drift reference and (if the gate passed it) its shadow figures:
    the version, the shadow figures and what rejected it (``gate``, ``shadow`` or None)."""
    fitted = set(trained.feedback.fit.texts)
    traffic = [r.text for r in predictions.window(REFERENCE_ROWS * 2, current.version) if r.text not in fitted]
    reference, reference_source = drift_reference_of(
        trained.model, trained.fit, trained.holdout, traffic, trained.base.seed
    )
    shadow = None
    if trained.gate["decision"] == "promote":  # off the request path: the retrain process scores the live window
        live = predictions.window(job.settings.drift_window_size, current.version)
        shadow = shadow_candidate(trained.model, live, ShadowRules.from_settings(job.settings), exclude=fitted)
    rejected_by = "gate" if trained.gate["decision"] != "promote" else "shadow" if shadow_blocks(shadow) else None
    data = card_data(
        trained.base, trained.fit, trained.holdout, trained.feedback, reference_source, sources=trained.sources
    )
    registered = register_version(
        registry,
        trained.model,
        fit=trained.fit,
        holdout=trained.holdout,
        reference=reference,
        data=data,
        parent=current.version,
        extra={
            "gate": trained.gate,
            **({"shadow": shadow} if shadow is not None else {}),
            "retrain": {"job_id": job.job_id, "trigger": job.trigger},
            "fit_seconds": round(trained.fit_seconds, 2),
        },
        stage="rejected" if rejected_by else "candidate",
    )
    return registered, shadow, rejected_by


def retrain(settings: Settings, job_id: str, trigger: str, *, settle: Callable[[], None] = lambda: None) -> Outcome:
    """One guarded retrain of the current model on its base corpus plus labelled feedback (module doc).

    ``settle`` is called once the candidate is registered, before it may be promoted (the watchdog's
    :meth:`Watchdog.claim`: from then on the outcome is this function's).
    """
    registry = ModelRegistry.from_settings(settings)
    predictions = PredictionRepository(Database.from_settings(settings))
    require_current(predictions.engine, "retrain")  # an old schema: fail (logged), as the service would
    current = registry.load_current()
    if current is None:
        raise RuntimeError("no current model to improve on")
    purges = PurgeCheck.start(FeedbackSourceRepository(predictions.database))  # before the labels are read
    feedback = collect_feedback(registry, current, purges.usable(predictions.labelled()), settings)
    if isinstance(feedback, Outcome):
        return feedback
    trained = train_candidate(current, feedback, settings)
    job = Job(settings, job_id, trigger)
    registered, shadow, rejected_by = register_trained(registry, predictions, current, trained, job)
    version = registered.version.version
    events = CandidateEvents(ModelEventRepository(predictions.database), version, job_id, trigger)
    events.scored(registered.report, current.version, trained.gate, shadow)
    settle()
    if rejected_by:
        events.record("rejected", {"reason": rejected_by, "reasons": (shadow or {}).get("reasons", [])})
        figures = {"gate": trained.gate, **({"shadow": shadow} if shadow is not None else {})}
        return Outcome("rejected", {**figures, "reason": rejected_by, "feedback": trained.sources}, version)
    promoting_at = time.time()  # the watch counts the new version's predictions from before the pointer moved
    purged = functools.partial(purges.purged_since, trained.sources["sources"])
    result = promote_candidate(registry, version, current.version, trained.gate, purged)
    events.ended(result, current.version, promoting_at)
    return replace(result, details={**result.details, "shadow": shadow, "feedback": trained.sources})


def shadow_blocks(shadow: dict[str, Any] | None) -> bool:
    """Whether the shadow figures refuse the promotion (a skipped shadow does not)."""
    return shadow is not None and shadow["decision"] == "reject"


@dataclass(frozen=True)
class CandidateEvents:
    """Writes a retrain candidate's lifecycle events (:mod:`app.storage.model_events`), as ``retrain:<job id>``
    with the job's trigger. A write that fails is logged and skipped: it never changes the retrain's outcome."""

    events: ModelEventRepository
    version: str
    job_id: str
    trigger: str

    def record(self, event: str, details: dict[str, Any], at: float | None = None) -> None:
        actor = f"retrain:{self.job_id}"
        self.events.record_safely(
            ModelEvent(self.version, event, actor, self.trigger, details, occurred_at=at or time.time())
        )

    def scored(self, report: dict[str, Any], parent: str, gate: dict[str, Any], shadow: dict[str, Any] | None) -> None:
        """``registered``, ``gated`` and (if it ran) ``shadowed``."""
        scores = {k: report[k] for k in ("accuracy", "balanced_accuracy", "ece") if k in report}
        self.record("registered", {"parent": parent, "metrics": scores})
        self.record("gated", gate)
        if shadow is not None:
            self.record("shadowed", shadow)

    def ended(self, result: Outcome, parent: str, at: float) -> None:
        """``promoted`` at ``at`` (the promotion watch follows it) or ``superseded`` (with its reason)."""
        if result.outcome == "promoted":
            self.record("promoted", {"previous": parent, "watch": True}, at)
        else:
            kept = ("reason", "parent", "current_version", "purged_sources")
            self.record("superseded", {k: result.details[k] for k in kept if k in result.details})


def lower_priority() -> None:
    """Run only on CPU time the web workers leave idle (SCHED_IDLE), falling back to the lowest nice.

    Measured with nice 10 alone: p99 at 100 req/s rose from 4.7 ms to 48.5 ms during a retrain.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


LOCK_HELD_EXIT_CODE = 3
"""Exit status of a retrain process that found the retrain lock held by another."""


def _hold_lock(settings: Settings) -> RetrainLock | None:
    """The flock the launcher handed over; otherwise (PostgreSQL, or run by hand) the lock taken here, on this
    process's own database session. None: another retrain holds it."""
    inherited = FileRetrainLock.inherited(settings.model_store)
    if inherited is not None:
        return inherited
    lock = RetrainLock.for_settings(settings)
    return lock if lock.try_acquire() else None


class Watchdog:
    """Ends a retrain that runs past ``max_seconds``: calls ``on_timeout`` (which records the job as
    failed), then exits the process at once with :data:`TIMEOUT_EXIT_CODE`; the kernel frees the retrain
    lock with the process.

    The job's outcome is recorded by one side only. The main thread :meth:`claim` s it before promoting
    and before recording; past that the watchdog waits up to ``grace_seconds`` for the process to end,
    then exits without recording (the launcher marks a job that never reported as failed).
    """

    def __init__(self, max_seconds: float, on_timeout: Callable[[], None], grace_seconds: float = 60.0) -> None:
        self.max_seconds = max_seconds
        self._on_timeout = on_timeout
        self._grace_seconds = grace_seconds
        self._outcome = threading.Lock()
        self._claimed = False
        self._timer = threading.Timer(max_seconds, self._expire)
        self._timer.daemon = True

    def start(self) -> Watchdog:
        self._timer.start()
        return self

    def claim(self) -> None:
        """From now on the main thread records the outcome; blocks for good if the watchdog already
        does (the process is about to exit). Main thread only."""
        if not self._claimed:
            self._outcome.acquire()
            self._claimed = True

    def stop(self) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        try:
            if self._outcome.acquire(timeout=self._grace_seconds):
                self._on_timeout()
        except Exception:
            log.exception("retrain_timeout_unrecorded")
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(TIMEOUT_EXIT_CODE)


@dataclass(frozen=True)
class JobReport:
    """Records how one retrain job ended: metrics, the log line and the job's row."""

    jobs: RetrainJobRepository
    job_id: str
    trigger: str
    started: float  # time.perf_counter() at the start

    def still_running(self) -> bool:
        """False once the job's row says it ended (the launcher gave up on a process that took too long to
        start); True for a job without a row (run by hand)."""
        job = self.jobs.get(self.job_id)
        return job is None or job.status == "running"

    def failed(self, error: str, **extra: Any) -> None:
        metrics.RETRAIN_TOTAL.labels(trigger=self.trigger, outcome="failed").inc()
        metrics.RETRAIN_DURATION.observe(time.perf_counter() - self.started)
        self.jobs.finish_job(self.job_id, "failed", "failed", {"error": error, **extra})

    def timed_out(self, max_seconds: float) -> None:
        # Runs on the watchdog's thread, which does not see the main thread's bound job_id.
        log.error("retrain_failed", job_id=self.job_id, reason="timeout", max_seconds=max_seconds)
        self.failed(f"the retrain ran past SENTIMENT_RETRAIN_MAX_SECONDS ({max_seconds:g} s)", reason="timeout")

    def finished(self, result: Outcome) -> None:
        seconds = time.perf_counter() - self.started
        metrics.RETRAIN_TOTAL.labels(trigger=self.trigger, outcome=result.outcome).inc()
        metrics.RETRAIN_DURATION.observe(seconds)
        details = {**result.details, "seconds": round(seconds, 1)}
        self.jobs.finish_job(
            self.job_id, "succeeded", result.outcome, details, candidate_version=result.candidate_version
        )
        log.info(
            "retrain_finished",
            outcome=result.outcome,
            candidate_version=result.candidate_version,
            seconds=round(seconds, 1),
            gate=result.details.get("gate"),
            shadow=result.details.get("shadow"),
            reason=result.details.get("reason"),
        )


def main(argv: list[str] | None = None) -> int:
    from app.logs import configure_logging

    parser = argparse.ArgumentParser(prog="python -m app.retrain.job", description=__doc__.splitlines()[0])
    parser.add_argument("job_id")
    parser.add_argument("--trigger", default="manual")
    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_level)
    lower_priority()
    structlog.contextvars.bind_contextvars(job_id=args.job_id)
    jobs = RetrainJobRepository(Database.from_settings(settings))
    report = JobReport(jobs, args.job_id, args.trigger, time.perf_counter())
    lock = _hold_lock(settings)
    if lock is None or not report.still_running():
        # Lost the race to a retrain that still runs (its job ended, as far as the table knows), or this
        # job was already given up on: either way another retrain may be running, so this one does not.
        if lock is None and report.still_running():
            log.error("retrain_failed", reason="lock_held")
            report.failed("another retrain process holds the retrain lock", reason="lock_held")
        if lock is not None:
            lock.release()
        print("another retrain is running or this job already ended", file=sys.stderr)
        return LOCK_HELD_EXIT_CODE
    max_seconds = settings.retrain_max_seconds
    watchdog = Watchdog(max_seconds, lambda: report.timed_out(max_seconds)).start()
    log.info("retrain_running", trigger=args.trigger, max_seconds=max_seconds)
    try:
        result = retrain(settings, args.job_id, args.trigger, settle=watchdog.claim)
    except Exception as exc:
        watchdog.claim()
        log.exception("retrain_failed", reason=str(exc))
        report.failed(str(exc))
        lock.release()  # only after the outcome is recorded: the next retrain sees a finished job
        return 1
    watchdog.claim()
    report.finished(result)
    watchdog.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
