"""Shadow figures of real retrains: what a good candidate and a poisoned one look like on the live window.

The project's default model (default kind and parameters) is trained on the whole of Rotten Tomatoes. For each new
domain (tweets, clothing reviews), 1,500 of its rows are logged as the model's predictions and labelled, then 500
more are logged unlabelled (the live window the shadow reads), and the service's retrain runs
(:func:`app.retrain.job.retrain`) twice: with the true labels, and with every label flipped (a feedback token that
lies consistently, which the feedback holdout cannot see: it lies there too). The gate margin is lifted so that
both candidates reach the shadow; the gate's own verdict at the default margin is reported beside it.

Per run: the gate's balanced accuracies, the shadow's agreement, estimated accuracy of both models, the candidate's
estimated drop, the KS distance between their confidences, and the shadow's decision at the default settings. Per
domain, the same live window also shadows a model of the default kind fitted on 150 Rotten Tomatoes rows (a
candidate much less sure than the current model).

Usage: ``.venv/bin/python -m bench.shadow``; writes ``bench/results/shadow.json``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from app.migrations import upgrade
from app.ml.data import load_clothing, load_rotten_tomatoes, load_tweets
from app.ml.model import DEFAULT_KIND, build_model
from app.ml.registry import ModelRegistry
from app.ml.train import train_and_register
from app.retrain.job import promotes, retrain
from app.retrain.shadow import ShadowRules, shadow_candidate
from app.settings import Settings
from app.storage.database import Database
from app.storage.predictions import PredictionRepository
from bench.output import RESULTS
from tests.traffic import log_predictions

FEEDBACK, LIVE = 1500, 500
SMALL_ROWS = 150


def run(base: Path, tmp: Path, name: str, corpus: Any, *, flipped: bool, small: Any) -> dict[str, Any]:
    settings = Settings(model_store=tmp / "store", state_dir=tmp / "var", retrain_promotion_margin=1.0)
    shutil.copytree(base, settings.model_store)
    upgrade(settings.prediction_log_url)
    log = PredictionRepository(Database(settings.prediction_log_url))
    current = ModelRegistry(settings.model_store).load_current()
    assert current is not None
    labels = 1 - corpus.labels if flipped else corpus.labels
    log_predictions(log, current.model, current.version, corpus.texts[:FEEDBACK], labels[:FEEDBACK])
    live = corpus.texts[FEEDBACK : FEEDBACK + LIVE]
    log_predictions(log, current.model, current.version, live, start=time.time() + 1)
    window = log.window(settings.drift_window_size, current.version)
    less_sure = shadow_candidate(small, window[-LIVE:], ShadowRules.from_settings(settings))
    outcome = retrain(settings, f"bench-{tmp.name}", "bench")
    gate, shadow = outcome.details["gate"], outcome.details.get("shadow") or {}
    default_margin = Settings.model_fields["retrain_promotion_margin"].default
    return {
        "domain": name,
        "labels": "flipped" if flipped else "true",
        "gate": {"candidate": gate["candidate"], "current": gate["current"]},
        "gate_promotes_at_default_margin": promotes(gate, default_margin),
        "shadow": {
            key: shadow.get(key)
            for key in ("rows", "agreement", "estimated_drop", "confidence_ks", "decision", "reasons")
        },
        "estimated_accuracy": {
            side: shadow.get(side, {}).get("estimated_accuracy", {}).get("estimate")
            for side in ("candidate", "current")
        },
        "outcome": outcome.outcome,
        "small_candidate": {key: less_sure.get(key) for key in ("agreement", "estimated_drop", "decision", "reasons")},
    }


def main() -> None:
    started = time.time()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-shadow-") as folder:
        tmp = Path(folder)
        base = tmp / "base"
        films = load_rotten_tomatoes()
        trained = train_and_register(ModelRegistry(base), films, progress=False)
        rows = rng.permutation(len(films))[:SMALL_ROWS]
        small = build_model(DEFAULT_KIND, trained.version.metadata["params"]).fit(
            [films.texts[i] for i in rows], films.labels[rows]
        )
        runs = []
        for name, loader in (("tweets", load_tweets), ("clothing", load_clothing)):
            corpus = loader()
            corpus = corpus.subset(rng.permutation(len(corpus))[: FEEDBACK + LIVE], name)
            for flipped in (False, True):
                runs.append(run(base, tmp / f"{name}-{flipped}", name, corpus, flipped=flipped, small=small))
                print(json.dumps(runs[-1]))
    RESULTS.mkdir(exist_ok=True)
    defaults = {
        name: Settings.model_fields[name].default
        for name in ("retrain_shadow_min_rows", "retrain_shadow_min_agreement", "retrain_shadow_max_estimated_drop")
    }
    result = {
        "date": datetime.now(UTC).date().isoformat(),
        "command": ".venv/bin/python -m bench.shadow",
        "settings": defaults,
        "runs": runs,
        "seconds": round(time.time() - started, 1),
    }
    (RESULTS / "shadow.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
