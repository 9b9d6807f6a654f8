"""Model store: immutable versions, verified loads, an atomic pointer, promote and rollback."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from app.errors import (
    ArtifactIntegrityError,
    CurrentVersionChangedError,
    ModelSignatureError,
    ModelStoreError,
    VersionNotFoundError,
)
from app.ml import registry as registry_module
from app.ml.registry import METADATA, MODEL_ARTIFACT, POINTER, REFERENCE_ARTIFACT, SIGNATURE, ModelRegistry
from app.settings import Settings

KEY = b"a-signing-key-kept-outside-the-store"


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
    proba = model.model.predict_proba(["a warm, funny and moving film", "a dull, lifeless mess"])
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


def test_a_guarded_rollback_leaves_an_operators_change_alone_and_can_reject(
    store: ModelRegistry, versions: list[str]
) -> None:
    """rollback(expected_current=...) acts only while that version is current; reject=True retires it for good."""
    old, new = versions
    store.promote(new)
    with pytest.raises(CurrentVersionChangedError):
        store.rollback(expected_current=old)
    assert store.current_version() == new
    assert store.rollback(expected_current=new, reject=True) == old
    assert store.get(new).stage == "rejected" and store.get(old).stage == "production"
    with pytest.raises(ModelStoreError, match="rejected"):
        store.promote(new)


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


# -- tampering: loads read what they hashed -------------------------------------------------------------
def test_load_unpickles_the_bytes_it_hashed_not_the_file_again(
    store: ModelRegistry, versions: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = versions
    read_verified = registry_module._read_verified

    def swap_after_check(folder: Path, version: str, hashes: dict[str, Any], name: str) -> bytes:
        data = read_verified(folder, version, hashes, name)
        target = folder / name  # an attacker swaps the file right after its hash was checked
        target.chmod(0o644)
        shutil.copyfile(store.root / new / name, target)
        return data

    monkeypatch.setattr(registry_module, "_read_verified", swap_after_check)
    loaded = store.load(old)
    assert loaded.model.params_dict()["C"] == store.get(old).metadata["params"]["C"] != 2.0


def test_artifacts_read_after_load_are_verified_bytes(store: ModelRegistry, versions: list[str]) -> None:
    loaded = store.load(versions[0])
    assert loaded.read_json(REFERENCE_ARTIFACT)["texts"]
    reference = store.root / versions[0] / REFERENCE_ARTIFACT
    reference.chmod(0o644)
    reference.write_text(json.dumps({"texts": ["planted"], "labels": [1]}))
    with pytest.raises(ArtifactIntegrityError, match="sha256 mismatch"):
        loaded.read_json(REFERENCE_ARTIFACT)
    with pytest.raises(ArtifactIntegrityError, match="not a recorded artifact"):
        loaded.artifact_bytes("../CURRENT.json")


# -- the current pointer ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content",
    ["not json", "[]", '{"version": 5}', '{"version": "v-unknown"}', '{"version": "../etc"}', '{"history": "x"}'],
)
def test_a_corrupt_pointer_is_a_model_store_error(store: ModelRegistry, content: str) -> None:
    (store.root / POINTER).write_text(content)
    with pytest.raises(ModelStoreError, match=POINTER):
        store.current_version()


def test_promote_with_an_expected_current_refuses_when_another_is_current(
    store: ModelRegistry, versions: list[str]
) -> None:
    old, new = versions
    with pytest.raises(CurrentVersionChangedError, match=f"expected {new} to be current") as raised:
        store.promote(new, expected_current=new)
    assert raised.value.details["reason"] == "parent_not_current"
    assert store.current_version() == old and store.get(new).stage != "production"
    assert store.promote(new, expected_current=old) == old and store.current_version() == new


# -- signing ----------------------------------------------------------------------------------------------
def test_a_keyed_store_signs_what_it_registers_and_loads_it(store: ModelRegistry) -> None:
    keyed = ModelRegistry(store.root, KEY)
    entry = keyed.register({MODEL_ARTIFACT: _copy_of(store.versions()[0].path / MODEL_ARTIFACT)}, {"metrics": {}})
    assert entry.metadata[SIGNATURE]["algorithm"] == "hmac-sha256"
    assert keyed.load(entry.version).version == entry.version
    with pytest.raises(ModelSignatureError, match="does not verify"):
        ModelRegistry(store.root, b"another key").load(entry.version)


def test_a_keyed_store_refuses_unsigned_versions_until_signed(store: ModelRegistry, versions: list[str]) -> None:
    keyed = ModelRegistry(store.root, KEY)
    with capture_logs() as logs, pytest.raises(ModelSignatureError, match="not signed"):
        keyed.load(versions[0])
    assert logs[-1]["event"] == "model_signature_invalid" and logs[-1]["model_version"] == versions[0]
    with pytest.raises(ModelSignatureError):
        keyed.promote(versions[1])
    keyed.sign(versions[1])
    keyed.promote(versions[1])
    assert keyed.load(versions[1]).version == versions[1]


def test_rewriting_an_artifact_and_its_hash_does_not_pass_a_signature(
    store: ModelRegistry, versions: list[str]
) -> None:
    keyed = ModelRegistry(store.root, KEY)
    keyed.sign(versions[0])
    old, new = (store.root / v for v in versions)
    meta = json.loads((old / METADATA).read_text())
    (old / MODEL_ARTIFACT).chmod(0o644)
    shutil.copyfile(new / MODEL_ARTIFACT, old / MODEL_ARTIFACT)  # someone who can write the store, not read the key
    meta["artifacts"][MODEL_ARTIFACT] = json.loads((new / METADATA).read_text())["artifacts"][MODEL_ARTIFACT]
    (old / METADATA).write_text(json.dumps(meta))
    assert ModelRegistry(store.root).load(versions[0])  # hashes alone cannot tell
    with pytest.raises(ModelSignatureError, match="does not verify"):
        keyed.load(versions[0])


def test_a_signature_does_not_verify_in_another_version_folder(store: ModelRegistry, versions: list[str]) -> None:
    keyed = ModelRegistry(store.root, KEY)
    keyed.sign(versions[0])
    shutil.copytree(store.root / versions[0], store.root / "v-copied")
    with pytest.raises(ModelSignatureError):
        keyed.load("v-copied")


def test_signing_needs_a_key_and_skips_nothing_silently(store: ModelRegistry, versions: list[str]) -> None:
    with pytest.raises(ModelStoreError, match="no signing key"):
        store.sign(versions[0])
    _tamper(store.root / versions[1] / MODEL_ARTIFACT, b"xx")
    with pytest.raises(ArtifactIntegrityError):  # a tampered version is never blessed with a signature
        ModelRegistry(store.root, KEY).sign(versions[1])
    assert SIGNATURE not in store.get(versions[1]).metadata


def test_from_settings_reads_the_key_and_refuses_one_inside_the_store(store: ModelRegistry, tmp_path: Path) -> None:
    key_file = tmp_path / "signing.key"
    key_file.write_text(KEY.decode() + "\n")
    keyed = ModelRegistry.from_settings(Settings(model_store=store.root, model_signing_key_file=key_file))
    assert keyed.signing and keyed._signing_key == KEY
    assert not ModelRegistry.from_settings(Settings(model_store=store.root)).signing
    inside = store.root / "signing.key"
    inside.write_text(KEY.decode())
    with pytest.raises(ModelStoreError, match="outside the model store"):
        ModelRegistry.from_settings(Settings(model_store=store.root, model_signing_key_file=inside))
    blank = tmp_path / "blank.key"
    blank.write_text("\n")
    for configured in ({"model_signing_key": " "}, {"model_signing_key_file": blank}):
        with pytest.raises(ModelStoreError, match="blank"):
            ModelRegistry.from_settings(Settings(model_store=store.root, **configured))


def _copy_of(source: Path) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        shutil.copyfile(source, path)

    return write
