"""The model-store command line: signing an existing store, and choosing the kind of model to train."""

from __future__ import annotations

import pytest

from app.cli import _parser, main
from app.ml.model import DEFAULT_KIND, MODEL_KINDS
from app.ml.registry import POINTER, SIGNATURE, ModelRegistry
from app.settings import Settings

KEY = "a-signing-key-kept-outside-the-store"


def test_sign_adopts_signing_on_an_existing_store(
    store: ModelRegistry, versions: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--store", str(store.root), "sign"]) == 1  # no key configured
    assert "no signing key" in capsys.readouterr().err
    monkeypatch.setenv("SENTIMENT_MODEL_SIGNING_KEY", KEY)
    keyed = ModelRegistry(store.root, KEY.encode())
    with pytest.raises(Exception, match="not signed"):
        keyed.load(versions[0])
    assert main(["--store", str(store.root), "sign"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[1] for line in printed if line.startswith("signed ")) == sorted(versions)
    assert all(SIGNATURE in store.get(v).metadata for v in versions)
    assert keyed.load(versions[0]).version == versions[0]


def test_train_takes_a_kind_from_the_registered_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    parser = _parser(Settings())
    assert parser.parse_args(["train"]).kind == DEFAULT_KIND
    for kind in MODEL_KINDS:
        assert parser.parse_args(["train", "--kind", kind]).kind == kind
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--kind", "no_such_kind"])
    assert "invalid choice" in capsys.readouterr().err


def test_train_if_empty_on_a_corrupt_pointer_neither_trains_nor_fails(
    store: ModelRegistry, versions: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    (store.root / POINTER).write_text("[]")  # scripts/serve runs this before gunicorn: it must not stop there
    assert main(["--store", str(store.root), "train", "--if-empty"]) == 0
    assert "not training" in capsys.readouterr().err
    assert [v.version for v in store.versions()] == versions
