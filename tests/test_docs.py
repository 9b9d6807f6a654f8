"""docs/configuration.md is generated from the settings, and the corpora in data/ are the ones its README describes."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from app.settings import REFERENCE_COMMAND, Settings, settings_reference_markdown

REPO = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_generated_from_the_settings() -> None:
    """docs/configuration.md is exactly what the Settings field descriptions render, on any machine."""
    generated = settings_reference_markdown()
    assert str(REPO) not in generated, "a default renders as an absolute path of this checkout"
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == generated, f"docs/configuration.md is stale: run scripts/docs ({REFERENCE_COMMAND})"


def test_every_setting_has_a_description_in_the_reference() -> None:
    """Each setting appears in the reference with a description, so the generated table is complete."""
    generated = settings_reference_markdown()
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} has no description="
        assert f"| `SENTIMENT_{name.upper()}` |" in generated, name


def test_corpora_match_their_recorded_sha256() -> None:
    listed = dict(re.findall(r"^- (\S+) `([0-9a-f]{64})`$", (REPO / "data" / "README.md").read_text(), re.M))
    assert len(listed) == 3
    for name, digest in listed.items():
        assert hashlib.sha256((REPO / "data" / name).read_bytes()).hexdigest() == digest, name
