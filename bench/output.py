"""Where every benchmark writes its numbers: ``bench/results/<name>.json``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def write_results(name: str, results: Mapping[str, Any], *, ensure_ascii: bool = True) -> Path:
    """Write ``results`` to ``bench/results/<name>.json`` (indented, one trailing newline); return its path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(results, indent=2, ensure_ascii=ensure_ascii) + "\n")
    return path
