"""The command line: signing an existing store, choosing the kind of model to train, and feedback labels by token."""

from __future__ import annotations

from pathlib import Path

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


def test_feedback_sources_lists_names_revoke_refuses_one_and_purge_forgets_labels(
    store: ModelRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.migrations import upgrade
    from app.storage.database import Database
    from app.storage.feedback_sources import FeedbackSourceRepository
    from app.storage.predictions import PredictionRepository

    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    upgrade(url)
    log = PredictionRepository(Database(url))
    log.insert_predictions(
        [
            {
                "id": f"p{i}",
                "created_at": 1.0 + i,
                "text": f"text {i}",
                "text_length": 6,
                "sentiment": "positive",
                "confidence": 0.9,
                "p_positive": 0.9,
                "model_version": "v1",
                "latency_ms": 1.0,
            }
            for i in range(5)
        ]
    )
    for i, source in enumerate(["web", "leaked", "leaked", "leaked"]):
        log.set_label(f"p{i}", "negative", now=100.0 + i, source=source)
    monkeypatch.setenv("SENTIMENT_DATABASE_URL", url)
    assert main(["--store", str(store.root), "feedback", "sources"]) == 0
    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [["leaked", "3"], ["web", "1"]]
    assert main(["--store", str(store.root), "feedback", "revoke", "leaked"]) == 0
    printed = capsys.readouterr().out
    assert "revoked   'leaked': its token is refused (401)" in printed
    assert "purged    3 labels of 'leaked'" in printed
    assert [(r.id, r.source) for r in log.labelled()] == [("p0", "web")]
    assert log.get_prediction("p1") is not None  # the prediction stays
    assert FeedbackSourceRepository(log.database).revoked() == {"leaked"}
    assert main(["--store", str(store.root), "feedback", "purge", "web"]) == 0
    printed = capsys.readouterr().out
    assert "purged    1 labels of 'web'" in printed and "revoked" not in printed
    assert "token     still accepted" in printed
    assert FeedbackSourceRepository(log.database).revoked() == {"leaked"}  # a purge alone revokes nothing
    assert main(["--store", str(store.root), "feedback", "sources"]) == 0
    listed = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[:3] for r in listed] == [["leaked", "0", "-"], ["web", "0", "-"]]  # no labels left
    assert listed[0][3] != "-" and listed[0][4] != "-"  # leaked: purged and revoked
    assert listed[1][3] != "-" and listed[1][4] == "-"  # web: purged only


def test_feedback_purge_and_revoke_are_separate_commands() -> None:
    parser = _parser(Settings())
    assert parser.parse_args(["feedback", "purge", "web"]).feedback_command == "purge"
    assert parser.parse_args(["feedback", "revoke", "web"]).feedback_command == "revoke"


def test_promote_and_rollback_record_cli_events_and_show_prints_them(
    store: ModelRegistry,
    versions: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    from app.migrations import upgrade

    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    upgrade(url)
    monkeypatch.setenv("SENTIMENT_DATABASE_URL", url)
    cli = ["--store", str(store.root)]
    assert main([*cli, "promote", versions[1], "--watch"]) == 0
    assert "the drift monitor rolls it back on a drop" in capsys.readouterr().out
    assert main([*cli, "rollback"]) == 0
    capsys.readouterr()
    assert main([*cli, "show", versions[1]]) == 0
    out = capsys.readouterr().out
    metadata, events = out.split("\nevents    ")
    assert json.loads(metadata)["version"] == versions[1]  # the metadata is still whole JSON
    lines = events.splitlines()
    assert lines[0] == "2"
    assert lines[1].split()[1:4] == ["promoted", "cli", "(manual)"]
    assert json.loads(lines[1].split(None, 4)[4]) == {"previous": versions[0], "watch": True}
    assert lines[2].split()[1:4] == ["rolled_back", "cli", "(manual)"]
    assert json.loads(lines[2].split(None, 4)[4]) == {"reason": "manual", "restored": versions[0]}
    assert main([*cli, "show"]) == 0  # the current version: restored by the rollback
    assert "promoted     cli (rollback)" in capsys.readouterr().out


def test_without_a_database_promote_still_promotes_and_show_says_no_events(
    store: ModelRegistry,
    versions: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SENTIMENT_STATE_DIR", str(tmp_path / "var"))  # no predictions.db there
    assert main(["--store", str(store.root), "promote", versions[1]]) == 0
    assert store.current_version() == versions[1]
    assert "1 model event(s) not recorded" in capsys.readouterr().err
    assert main(["--store", str(store.root), "show"]) == 0
    assert capsys.readouterr().out.endswith("events    none recorded\n")
    assert not (tmp_path / "var" / "predictions.db").exists()  # show never creates a database
