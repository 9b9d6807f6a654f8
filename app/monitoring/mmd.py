"""The MMD permutation test's engines: alibi-detect's ``MMDDrift`` (PyTorch) or the project's own (numpy).

Both answer the same question the same way. The kernel is a Gaussian RBF whose bandwidth comes once from the
reference by the median heuristic; a window's statistic is the unbiased MMD² of reference against window on
the kernel matrix with its diagonal zeroed; the p-value is the share of random relabellings of the pooled
rows whose MMD² is at least the observed one; the threshold is the permuted MMD² at rank ``int(level *
permutations)`` from the top. alibi-detect 0.12+ is under the Business Source License 1.1 (production use
needs a commercial licence), so :class:`BuiltinMMD` reimplements that contract with numpy alone and never
imports torch: ``SENTIMENT_DRIFT_BACKEND=builtin`` selects it (see the README's licence section).

Adding an engine is one class with the :class:`MMDEngine` signature and one entry in :data:`ENGINES`.

Memory (the drift monitor's budget is 500 MB with either engine; ``python -m bench.memory`` measures it): the
alibi-detect engine imports only the modules of ``MMDDrift``'s PyTorch backend (:func:`import_mmd_drift`), and
both engines make glibc hand their large blocks back to the system when freed (:func:`bound_allocator`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import structlog
from numpy.typing import NDArray

from app.process_memory import glibc, release_free_memory

log = structlog.get_logger("app.monitoring.mmd")

DEFAULT_ENGINE = "alibi-detect"
MIN_SQUARED_DISTANCE = 1e-30  # alibi-detect clamps squared distances at this floor before the kernel
M_MMAP_THRESHOLD = -3  # <malloc.h>
MMAP_THRESHOLD_BYTES = 1 << 20
"""Blocks at least this large get their own mapping, unmapped when freed (a 500-row window's kernel matrix
is 9 MB)."""
ALIBI_MMD_MODULE = "alibi_detect.cd.mmd"
ALIBI_PACKAGES = ("alibi_detect", "alibi_detect.cd", "alibi_detect.cd.pytorch", "alibi_detect.utils")
"""The packages whose ``__init__`` :func:`import_mmd_drift` skips: between them they import every detector,
model and saving backend of alibi-detect (transformers, numba, ...), about 175 MB the MMD test never uses."""


def bound_allocator() -> None:
    """Make glibc serve blocks of :data:`MMAP_THRESHOLD_BYTES` or more from their own mappings, returned to
    the system as soon as they are freed, for the rest of the process (no-op elsewhere than glibc).

    By default glibc raises that threshold to the largest block freed so far (up to 32 MB), after which
    such blocks come from the heap, where small allocations made in between keep the freed space from being
    reused or returned: alibi-detect copies the (reference + window)² kernel matrix twice per permutation,
    and one check at a window of 500 could leave the monitor up to 700 MB larger (it varies from run to
    run) until ``malloc_trim``. A fixed threshold also turns that adaptation off. The price is page faults
    on fresh mappings (an alibi-detect check at a window of 500: 1.5 s instead of 1.0 s), which transparent
    huge pages take back: ``app.supervisor`` starts the monitor with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``.
    """
    libc = glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def import_mmd_drift() -> Any:
    """alibi-detect's ``MMDDrift`` class, importing only its module and what it imports.

    ``import alibi_detect.cd.mmd`` runs ``alibi_detect/__init__.py`` and ``alibi_detect/cd/__init__.py``
    first, which import every detector, transformers and numba (about 175 MB resident). So the packages of
    :data:`ALIBI_PACKAGES` are registered as empty packages (their folders, not their ``__init__``) while
    the module is imported, and removed afterwards: a later ``import alibi_detect`` runs them in full and
    reuses the modules already loaded. If alibi-detect is already imported, or its layout has changed, it
    is imported the ordinary way.
    """
    if ALIBI_MMD_MODULE in sys.modules or ALIBI_PACKAGES[0] in sys.modules:
        return importlib.import_module(ALIBI_MMD_MODULE).MMDDrift
    try:
        module = _import_without_package_inits(ALIBI_MMD_MODULE, ALIBI_PACKAGES)
    except ImportError as exc:
        log.warning("alibi_detect_imported_whole", reason=str(exc))
        module = importlib.import_module(ALIBI_MMD_MODULE)
    return module.MMDDrift


def _import_without_package_inits(name: str, packages: tuple[str, ...]) -> ModuleType:
    root = importlib.util.find_spec(packages[0])  # a top-level spec: found without running its __init__
    if root is None or not root.submodule_search_locations:
        raise ImportError(f"{packages[0]} is not an installed package")
    base = Path(next(iter(root.submodule_search_locations)))
    empty = {}
    for package in packages:
        spec = importlib.machinery.ModuleSpec(package, None, is_package=True)
        spec.submodule_search_locations = [str(base.joinpath(*package.split(".")[1:]))]
        empty[package] = importlib.util.module_from_spec(spec)
    sys.modules.update(empty)
    try:
        return importlib.import_module(name)
    finally:
        for package, module in empty.items():
            if sys.modules.get(package) is module:
                del sys.modules[package]


class MMDEngine(Protocol):
    """An MMD permutation test set up once against a reference sample."""

    def score(self, window: NDArray[np.float32]) -> tuple[float, float, float]:
        """``(p_value, mmd2, threshold)`` of ``window`` against the reference."""
        ...


class AlibiDetectMMD:
    """alibi-detect's ``MMDDrift`` with the PyTorch backend on CPU (imports torch: monitor process only)."""

    def __init__(self, reference: NDArray[np.float32], *, level: float, permutations: int, seed: int) -> None:
        import torch

        # The monitor computes on one thread (torch.set_num_threads(1) there); no inter-op pool either.
        with contextlib.suppress(RuntimeError):  # raised once inter-op work started: the pool is set already
            torch.set_num_interop_threads(1)
        mmd_drift = import_mmd_drift()
        # ``seed`` is not used: alibi-detect draws its permutations from torch's global generator.
        self.detector = mmd_drift(reference, backend="pytorch", p_val=level, n_permutations=permutations, device="cpu")

    def score(self, window: NDArray[np.float32]) -> tuple[float, float, float]:
        found = self.detector.predict(window)["data"]
        release_free_memory()  # the check's garbage: the monitor idles until the next one
        return float(found["p_val"]), float(found["distance"]), float(found["distance_threshold"])


def squared_distances(x: NDArray[np.float32], y: NDArray[np.float32]) -> NDArray[np.float32]:
    """Pairwise squared Euclidean distances ``(len(x), len(y))``, floored like alibi-detect's."""
    dist: NDArray[np.float32] = (x * x).sum(axis=1)[:, None] - 2 * (x @ y.T) + (y * y).sum(axis=1)[None, :]
    np.maximum(dist, MIN_SQUARED_DISTANCE, out=dist)
    return dist


def median_bandwidth(self_distances: NDArray[np.float32]) -> float:
    """alibi-detect's ``sigma_median`` of a sample against itself: sqrt(median off-diagonal distance² / 2).

    The ``n`` diagonal zeros are the smallest entries; the median is taken at the same rank alibi-detect
    sorts to, ``n + (n² - n) // 2 - 1``, with a partial sort (linear, not n² log n²).
    """
    n = len(self_distances)
    rank = n + (self_distances.size - n) // 2 - 1
    return float(np.sqrt(0.5 * np.partition(self_distances.ravel(), rank)[rank]))


class BuiltinMMD:
    """The MMD permutation test in numpy, vectorised over permutations, seeded.

    The pooled kernel matrix ``K`` (reference rows first) is built once per window. A split of the pooled
    rows into a reference-sized and a window-sized group is an indicator vector ``s`` of the window group;
    with row sums ``r = K 1`` and total ``T``, the three block sums are ``s'Ks`` (window-window),
    ``s'r - s'Ks`` (cross) and ``T - 2 s'r + s'Ks`` (reference-reference). One matrix product ``S K`` of all
    permutations' indicators gives every permuted MMD² at once; the observed split is row 0, so observed
    and permuted values share one arithmetic path.
    """

    def __init__(self, reference: NDArray[np.float32], *, level: float, permutations: int, seed: int) -> None:
        self.reference = np.ascontiguousarray(reference, dtype=np.float32)
        self.level = level
        self.permutations = permutations
        self.rng = np.random.default_rng(seed)  # successive checks draw successive permutations
        distances = squared_distances(self.reference, self.reference)
        self.sigma = median_bandwidth(distances)
        self.k_xx = self.kernel(distances)

    def kernel(self, distances: NDArray[np.float32]) -> NDArray[np.float32]:
        """Gaussian RBF ``exp(-d² / (2 sigma²))`` of squared distances, in place."""
        distances *= np.float32(-1.0 / (2.0 * self.sigma**2))
        return np.exp(distances, out=distances)

    def pooled_kernel(self, window: NDArray[np.float32]) -> NDArray[np.float32]:
        """``[[K_xx, K_xy], [K_yx, K_yy]]`` with a zero diagonal (float32: (n + m)² * 4 bytes)."""
        n, m = len(self.reference), len(window)
        pooled = np.empty((n + m, n + m), dtype=np.float32)
        pooled[:n, :n] = self.k_xx
        pooled[:n, n:] = self.kernel(squared_distances(self.reference, window))
        pooled[n:, :n] = pooled[:n, n:].T
        pooled[n:, n:] = self.kernel(squared_distances(window, window))
        np.fill_diagonal(pooled, 0.0)
        return pooled

    def mmd2(self, pooled: NDArray[np.float32], window_rows: NDArray[np.intp]) -> NDArray[np.float64]:
        """Unbiased MMD² of each split whose window group is a row of ``window_rows`` ``(splits, m)``."""
        total_rows, m = len(pooled), window_rows.shape[1]
        n = total_rows - m
        indicator = np.zeros((len(window_rows), total_rows), dtype=np.float32)
        np.put_along_axis(indicator, window_rows, 1.0, axis=1)
        row_sums = pooled.sum(axis=1, dtype=np.float64)
        total = row_sums.sum()
        across = indicator.astype(np.float64) @ row_sums  # s'r
        within = ((indicator @ pooled) * indicator).sum(axis=1, dtype=np.float64)  # s'Ks
        k_yy, k_xy, k_xx = within, across - within, total - 2 * across + within
        mmd2: NDArray[np.float64] = k_xx / (n * (n - 1)) + k_yy / (m * (m - 1)) - 2 * k_xy / (n * m)
        return mmd2

    def score(self, window: NDArray[np.float32]) -> tuple[float, float, float]:
        window = np.ascontiguousarray(window, dtype=np.float32)
        pooled = self.pooled_kernel(window)
        total_rows, m = len(pooled), len(window)
        # Row 0 is the observed split; each other row a uniformly random window-sized subset of the pool.
        shuffled = np.argpartition(self.rng.random((self.permutations, total_rows)), m, axis=1)[:, :m]
        splits = np.vstack([np.arange(total_rows - m, total_rows)[None, :], shuffled])
        observed, *permuted = self.mmd2(pooled, splits)
        null = np.sort(np.asarray(permuted))[::-1]
        p_value = float((null >= observed).mean())
        threshold = float(null[int(self.level * self.permutations)])
        release_free_memory()  # the check's garbage: the monitor idles until the next one
        return p_value, float(observed), threshold


EngineFactory = Callable[..., MMDEngine]
ENGINES: dict[str, EngineFactory] = {"alibi-detect": AlibiDetectMMD, "builtin": BuiltinMMD}
"""The MMD engines by ``SENTIMENT_DRIFT_BACKEND`` name; each is built with the reference and the keywords
``level``, ``permutations`` and ``seed``."""


def build_engine(
    name: str, reference: NDArray[np.float32], *, level: float, permutations: int, seed: int = 0
) -> MMDEngine:
    """The engine called ``name`` set up against ``reference``; :class:`ValueError` for an unknown name."""
    try:
        factory = ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown MMD engine {name!r}; known: {', '.join(ENGINES)}") from None
    bound_allocator()
    engine = factory(reference, level=level, permutations=permutations, seed=seed)
    release_free_memory()  # what loading the model and the reference left in the heap
    return engine
