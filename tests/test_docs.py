"""The README documents every setting, and the corpora in data/ are the ones its README describes."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from app.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    documented = set(re.findall(r"`(SENTIMENT_[A-Z_]+)`", readme))
    declared = {f"SENTIMENT_{name.upper()}" for name in Settings.model_fields}
    assert declared - documented == set(), "settings missing from README"
    assert documented - declared == set(), "README documents settings that do not exist"


def test_corpora_match_their_recorded_sha256() -> None:
    listed = dict(re.findall(r"^- (\S+) `([0-9a-f]{64})`$", (REPO / "data" / "README.md").read_text(), re.M))
    assert len(listed) == 3
    for name, digest in listed.items():
        assert hashlib.sha256((REPO / "data" / name).read_bytes()).hexdigest() == digest, name
