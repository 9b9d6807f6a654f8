"""Model store: immutable versions, verified loads, an atomic pointer, promote and rollback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from app.errors import ArtifactIntegrityError, ModelStoreError, VersionNotFoundError
from app.ml.registry import METADATA, MODEL_ARTIFACT, POINTER, ModelRegistry


def _tamper(path: Path, data: bytes | None = None) -> None:
    path.chmod(0o644)
    with path.open("r+b") as handle:
        if data is None:
            handle.truncate(path.stat().st_size // 2)
        else:
            handle.seek(100)
            handle.write(data)


def test_current_version_loads_and_predicts(store: ModelRegistry, versions: list[str]) -> None:
    model = store.load_current()
    assert model is not None and model.version == versions[0]
    proba = model.pipeline.predict_proba(["a warm, funny and moving film", "a dull, lifeless mess"])
    assert proba[0, 1] > 0.5 > proba[1, 1]


def test_artifacts_are_read_only_after_registration(store: ModelRegistry, versions: list[str]) -> None:
    mode = (store.root / versions[0] / MODEL_ARTIFACT).stat().st_mode
    assert mode & 0o222 == 0


@pytest.mark.parametrize("damage", [b"\x00\x01tampered", None], ids=["bytes-changed", "truncated"])
def test_damaged_artifact_is_refused_before_unpickling(
    store: ModelRegistry, versions: list[str], damage: bytes | None
) -> None:
    _tamper(store.root / versions[0] / MODEL_ARTIFACT, damage)
    with capture_logs() as logs, pytest.raises(ArtifactIntegrityError, match="sha256 mismatch"):
        store.load(versions[0])
    assert logs[-1]["event"] == "model_integrity_failed" and logs[-1]["model_version"] == versions[0]


def test_missing_artifact_is_refused(store: ModelRegistry, versions: list[str]) -> None:
    (store.root / versions[0] / "reference.json").unlink()
    with pytest.raises(ArtifactIntegrityError, match=r"reference\.json unreadable"):
        store.load(versions[0])


def test_promote_replaces_pointer_atomically_and_updates_stages(store: ModelRegistry, versions: list[str]) -> None:
    old, new = versions
    inode_before = (store.root / POINTER).stat().st_ino
    assert store.promote(new) == old
    # os.replace puts a new file in place: readers see the old pointer or the new one, never a torn write.
    assert (store.root / POINTER).stat().st_ino != inode_before
    assert json.loads((store.root / POINTER).read_text()) == {"version": new, "history": [old]}
    assert store.get(new).stage == "production" and store.get(old).stage == "archived"
    assert not [p for p in store.root.iterdir() if p.name.endswith(".tmp")]


def test_promote_refuses_a_tampered_version(store: ModelRegistry, versions: list[str]) -> None:
    _tamper(store.root / versions[1] / MODEL_ARTIFACT, b"xx")
    with pytest.raises(ArtifactIntegrityError):
        store.promote(versions[1])
    assert store.current_version() == versions[0]


def test_rollback_returns_to_the_previous_version(store: ModelRegistry, versions: list[str]) -> None:
    old, new = versions
    store.promote(new)
    assert store.rollback() == old
    assert store.current_version() == old
    assert store.get(old).stage == "production" and store.get(new).stage == "archived"
    with pytest.raises(ModelStoreError, match="nothing to roll back to"):
        store.rollback()


def test_rejected_versions_cannot_be_promoted(store: ModelRegistry, versions: list[str]) -> None:
    meta_path = store.root / versions[1] / METADATA
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "stage": "rejected"}))
    with pytest.raises(ModelStoreError, match="rejected"):
        store.promote(versions[1])


@pytest.mark.parametrize("name", ["../etc", "", ".staging-x", "nope", "a/b"])
def test_unknown_or_unsafe_version_names_are_not_found(store: ModelRegistry, name: str) -> None:
    with pytest.raises(VersionNotFoundError):
        store.get(name)


def test_failed_registration_leaves_no_version_behind(store: ModelRegistry) -> None:
    before = sorted(store.root.iterdir())

    def crash(path: Path) -> None:
        path.write_bytes(b"half an artifact")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        store.register({MODEL_ARTIFACT: crash}, {"metrics": {}})
    assert sorted(store.root.iterdir()) == before


def test_versions_lists_registered_folders_only(store: ModelRegistry, versions: list[str]) -> None:
    (store.root / ".staging-leftover").mkdir()
    (store.root / "not-a-version").mkdir()
    assert [v.version for v in store.versions()] == sorted(versions)


def test_empty_store_has_no_current_version(empty_store: ModelRegistry) -> None:
    assert empty_store.current_version() is None and empty_store.load_current() is None


def test_staging_left_by_a_killed_writer_is_pruned_later(store: ModelRegistry) -> None:
    stale = store.root / ".staging-vX-abc"
    stale.mkdir()
    os.utime(stale, (0, 0))  # an hour and more ago
    fresh = store.root / ".staging-vY-def"
    fresh.mkdir()
    store.register({MODEL_ARTIFACT: lambda path: path.write_bytes(b"x")}, {"metrics": {}})
    assert not stale.exists() and fresh.exists()
