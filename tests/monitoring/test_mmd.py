"""MMD engines: the builtin one gives alibi-detect's answers, is seeded, is chosen by a setting, needs no torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
from numpy.typing import NDArray
from pydantic import ValidationError

from app.ml.drift_reference import DriftReference
from app.ml.registry import LoadedModel, ModelRegistry
from app.monitoring.drift import DriftDetector, Window
from app.monitoring.mmd import ENGINES, AlibiDetectMMD, BuiltinMMD, build_engine
from app.settings import Settings
from app.storage.predictions import WindowRow

REPO = Path(__file__).resolve().parents[2]
LEVEL = 0.01
PERMUTATIONS = 300


def sample(seed: int, rows: int, shift: float = 0.0) -> NDArray[np.float32]:
    return (np.random.default_rng(seed).normal(size=(rows, 8)) + shift).astype(np.float32)


@pytest.mark.parametrize(
    ("shift", "drift"),
    [(0.0, False), (0.35, True)],
    ids=["same-distribution", "shifted"],
)
def test_builtin_engine_matches_alibi_detect_on_a_fixed_window_pair(shift: float, drift: bool) -> None:
    """Same bandwidth and MMD² to float32 rounding; p-values within Monte Carlo error; the same verdict."""
    reference, window = sample(0, 300), sample(1, 100, shift)
    alibi = AlibiDetectMMD(reference, level=LEVEL, permutations=PERMUTATIONS, seed=0)
    builtin = BuiltinMMD(reference, level=LEVEL, permutations=PERMUTATIONS, seed=0)
    assert builtin.sigma == pytest.approx(float(alibi.detector._detector.kernel.sigma), rel=1e-5)
    p_alibi, mmd2_alibi, _ = alibi.score(window)
    p_builtin, mmd2_builtin, threshold = builtin.score(window)
    assert mmd2_builtin == pytest.approx(mmd2_alibi, rel=1e-4, abs=1e-7)
    assert abs(p_builtin - p_alibi) < 0.1  # two Monte Carlo estimates of 300 permutations each
    assert (p_builtin < LEVEL) == (p_alibi < LEVEL) == drift
    assert (mmd2_builtin > threshold) == drift


def test_builtin_engine_agrees_with_alibi_detect_on_real_windows(
    current: LoadedModel, reference: DriftReference, clothing_texts: list[str]
) -> None:
    """On the model's own features: clothing reviews flagged by both, the reference's own rows by neither."""
    detectors = {
        engine: DriftDetector(
            current.version, current.model, reference, p_value=0.05, permutations=100, window_size=0, mmd_engine=engine
        )
        for engine in ENGINES
    }
    texts = clothing_texts[:200]
    rows = [
        WindowRow(t, float(max(p, 1 - p)), float(p), "positive" if p >= 0.5 else "negative", 0.0)
        for t, p in zip(texts, current.model.predict_proba(texts)[:, 1], strict=True)
    ]
    checks = (
        ({engine: detector.check(rows) for engine, detector in detectors.items()}, True),
        ({engine: detector.test(reference_window(reference)) for engine, detector in detectors.items()}, False),
    )
    for found, drift in checks:
        alibi, builtin = found["alibi-detect"], found["builtin"]
        assert builtin.score == pytest.approx(alibi.score, rel=1e-3, abs=1e-6)
        assert alibi.p_value is not None and builtin.p_value is not None
        assert (alibi.p_value < alibi.details["corrected_threshold"]) == drift
        assert (builtin.p_value < builtin.details["corrected_threshold"]) == drift


def reference_window(reference: DriftReference) -> Window:
    """Half of the reference's own rows: drawn from the reference distribution by construction."""
    half = slice(0, reference.size // 2)
    return Window(
        embeddings=reference.embeddings[half],
        lengths=reference.lengths[half],
        confidence=reference.confidence[half],
        p_positive=np.where(np.arange(reference.size // 2) % 2 == 0, 0.9, 0.1),
    )


def test_the_builtin_engine_is_deterministic_for_a_seed() -> None:
    """Same seed, same sequence of p-values and thresholds; another seed draws other permutations."""
    reference, windows = sample(0, 300), [sample(i, 100, 0.1) for i in (1, 2, 3)]
    first, second = (BuiltinMMD(reference, level=LEVEL, permutations=100, seed=7) for _ in range(2))
    assert [first.score(w) for w in windows] == [second.score(w) for w in windows]
    other = BuiltinMMD(reference, level=LEVEL, permutations=100, seed=8)
    assert [other.score(w)[0] for w in windows] != [first.score(w)[0] for w in windows]


def test_the_setting_names_exactly_the_engines_and_refuses_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown SENTIMENT_DRIFT_BACKEND stops the process at start, before any check."""
    assert set(get_args(Settings.model_fields["drift_backend"].annotation)) == set(ENGINES)
    assert Settings().drift_backend == "alibi-detect"
    monkeypatch.setenv("SENTIMENT_DRIFT_BACKEND", "builtin")
    assert Settings().drift_backend == "builtin"
    monkeypatch.setenv("SENTIMENT_DRIFT_BACKEND", "frouros")
    with pytest.raises(ValidationError, match="drift_backend"):
        Settings()
    with pytest.raises(ValueError, match="unknown MMD engine 'frouros'"):
        build_engine("frouros", sample(0, 10), level=LEVEL, permutations=10)


PROBE = textwrap.dedent(
    """
    import json, sys, tempfile
    from pathlib import Path
    from app.monitoring.drift import Window
    from app.migrations import upgrade
    from app.monitoring.monitor import DriftMonitor
    from app.settings import Settings

    store, engine = Path(sys.argv[1]), sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(model_store=store, state_dir=Path(tmp), drift_backend=engine)
        upgrade(settings.prediction_log_url)
        monitor = DriftMonitor(settings)
        detector = monitor.detector_for(monitor.registry.current_version())
        ref, h = detector.reference, slice(0, 200)
        result = detector.test(Window(ref.embeddings[h], ref.lengths[h], ref.confidence[h], ref.confidence[h]))
        monitor.database.dispose()
    found = {
        "status": result.status,
        "torch": "torch" in sys.modules,
        "alibi": any(name.startswith("alibi_detect.") for name in sys.modules),
        "unused": [name for name in ("transformers", "numba") if name in sys.modules],
    }
    print(json.dumps(found))
    """
)


@pytest.mark.parametrize(("engine", "imports_torch"), [("builtin", False), ("alibi-detect", True)])
def test_the_monitor_imports_torch_only_for_the_alibi_detect_engine(
    store: ModelRegistry, engine: str, imports_torch: bool
) -> None:
    """A fresh process builds the monitor's detector and runs a check; torch and alibi-detect's MMD detector
    are loaded only for alibi-detect, alibi-detect's other detectors' dependencies (transformers, numba) never."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(store.root), engine],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        timeout=300,
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["status"] in {"drift", "no_drift"}
    assert found["torch"] is imports_torch and found["alibi"] is imports_torch
    assert found["unused"] == []


CHECKS_PROBE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    from app.monitoring.mmd import build_engine

    def resident():
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return {name: int(status[name].split()[0]) / 1024 for name in ("VmRSS", "VmHWM")}

    rng = np.random.default_rng(0)
    engine = build_engine(sys.argv[1], rng.normal(size=(1000, 32)).astype(np.float32), level=0.01, permutations=100)
    before = resident()
    for _ in range(3):
        engine.score(rng.normal(size=(500, 32)).astype(np.float32))
    after = resident()
    found = {"peak_growth_mb": after["VmHWM"] - before["VmRSS"], "growth_mb": after["VmRSS"] - before["VmRSS"]}
    if sys.argv[1] == "alibi-detect":  # a later full import still works, and finds the class already loaded
        from alibi_detect.cd import MMDDrift

        found["same_class"] = type(engine.detector) is MMDDrift
    print(json.dumps(found))
    """
)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_checks_at_the_default_window_hand_their_memory_back(engine: str) -> None:
    """Three checks of 500 rows against 1,000 (9 MB kernel matrices; alibi-detect copies its twice per
    permutation) peak under 100 MB above the engine's resident size and leave it no more than 20 MB larger.
    With glibc's adaptive mmap threshold the alibi-detect engine grew by 500 MB or more."""
    out = subprocess.run(
        [sys.executable, "-c", CHECKS_PROBE, engine],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        timeout=300,
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["peak_growth_mb"] < 100
    assert found["growth_mb"] < 20
    assert found.get("same_class", True) is True
