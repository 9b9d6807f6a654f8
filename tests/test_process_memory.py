"""The service's processes import only what they use: measured memory depends on it (bench/memory.py,
bench/monitoring.py), so a new import that drags a large library into them fails here."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from app.process_memory import UNUSED_OPTIONAL_IMPORTS

PROBE = """
import json, sys
from app.process_memory import skip_unused_optional_imports
skip_unused_optional_imports()
for name in sys.argv[1:]:
    __import__(name)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules if sys.modules[m] is not None})))
"""


def imported_packages(*modules: str) -> set[str]:
    """Top-level packages a fresh interpreter has imported after the entry point's own first step and
    importing ``modules``."""
    out = subprocess.run([sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize(
    ("process", "modules", "present", "absent"),
    [
        (
            "supervisor",
            ["app.supervisor"],
            {"structlog", "pydantic_settings"},
            {"pandas", "rich", "sklearn", "fastapi", "sqlalchemy", "torch"},
        ),
        (
            "gunicorn master",
            ["gunicorn.app.wsgiapp", "app.gunicorn_conf"],
            {"gunicorn", "uvicorn", "structlog"},
            {"pandas", "rich", "fastapi", "sqlalchemy"},
        ),
        (
            "web worker",
            ["app.gunicorn_conf", "app.main", "app.ml.pipeline"],
            {"fastapi", "sqlalchemy", "sklearn", "nltk"},
            {"pandas", "rich", "alembic", "torch"},
        ),
        (
            "drift monitor",
            ["app.monitoring.monitor"],
            {"sqlalchemy", "sklearn", "scipy"},
            {"pandas", "rich", "alembic", "fastapi"},
        ),
    ],
)
def test_a_service_process_leaves_out_what_it_never_uses(
    process: str, modules: list[str], present: set[str], absent: set[str]
) -> None:
    imported = imported_packages(*modules)
    assert present <= imported, f"{process} lacks {sorted(present - imported)}"  # the probe loaded the process
    assert not imported & absent, f"{process} imports {sorted(imported & absent)}"


def test_the_skipped_packages_are_ones_the_libraries_import_optionally() -> None:
    """Each skipped package is installed (the project's environment has it) and scikit-learn, structlog and
    NLTK import fine without it: they take their fallbacks, nothing raises."""
    imported = imported_packages("sklearn.pipeline", "sklearn.calibration", "nltk", "structlog")
    assert {"sklearn", "nltk", "structlog"} <= imported
    assert not imported & set(UNUSED_OPTIONAL_IMPORTS)
    assert all(importlib.util.find_spec(name) is not None for name in UNUSED_OPTIONAL_IMPORTS)
