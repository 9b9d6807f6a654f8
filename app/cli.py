"""Command line: ``python -m app.cli train|list|show|promote|rollback|sign`` (model store), ``feedback`` (labels),
``db upgrade|current|check|downgrade`` (the prediction database's schema), ``migrate`` (copy both elsewhere)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app import migrations
from app.errors import ModelStoreError, SentimentServiceError
from app.logs import configure_logging
from app.ml.data import CORPORA
from app.ml.model import DEFAULT_KIND, IMPLEMENTATIONS, MODEL_KINDS
from app.ml.registry import ModelRegistry
from app.settings import Settings
from app.storage.model_events import ModelEvent, ModelEventRepository

if TYPE_CHECKING:
    from typing import TypeAlias

    from app.storage.feedback_sources import FeedbackSourceRepository
    from app.storage.predictions import PredictionRepository

    Subcommands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]  # what add_subparsers() returns

ACTOR = "cli"
"""The actor of the model events the command line records."""


def _train(registry: ModelRegistry, settings: Settings, args: argparse.Namespace) -> int:
    from app.ml.train import train_and_register  # pulls in matplotlib and tqdm: only when training

    if args.if_empty:
        try:
            current = registry.current_version()
        except ModelStoreError as exc:  # the store is not empty: the pointer needs fixing, not a new model
            print(f"not training: {exc.message}; fix it or move it aside, then promote a version", file=sys.stderr)
            return 0
        if current:
            print(f"model store {registry.location} already serves {current}; not training")
            return 0
    corpus = CORPORA[args.corpus](settings.data_dir)
    result = train_and_register(
        registry,
        corpus,
        {} if args.C is None else {"C": args.C},
        kind=args.kind,
        holdout_fraction=args.holdout_fraction,
        cv_folds=args.cv_folds,
        promote=args.promote,
    )
    r = result.report
    version, parent = result.version.version, result.version.metadata.get("parent")
    scores = {k: r[k] for k in ("accuracy", "balanced_accuracy", "ece")}
    events = [ModelEvent(version, "registered", ACTOR, "train", {"parent": parent, "metrics": scores})]
    if result.promoted:
        events.append(ModelEvent(version, "promoted", ACTOR, "train", {"previous": parent, "watch": False}))
    _record(settings, events)
    print(f"version   {version}  ({'promoted to current' if result.promoted else 'not promoted'})")
    print(
        f"holdout   n={r['n']} accuracy={r['accuracy']:.4f} balanced_accuracy={r['balanced_accuracy']:.4f} "
        f"f1_macro={r['f1_macro']:.4f} roc_auc={r['roc_auc']:.4f} ece={r['ece']:.4f}"
    )
    if "cross_validation" in r:
        cv = r["cross_validation"]
        print(f"cv        {cv['folds']}-fold accuracy {cv['accuracy_mean']:.4f} +/- {cv['accuracy_std']:.4f}")
    print(f"seconds   {result.version.metadata['training_seconds']} (fit {result.version.metadata['fit_seconds']})")
    print(f"report    {result.version.location}/report")
    return 0


def _list(registry: ModelRegistry) -> int:
    current = registry.current_version()
    print(f"{'':2}{'version':28} {'stage':11} {'accuracy':>8} {'ece':>6}  created_at")
    for entry in registry.versions():
        metrics = entry.metadata.get("metrics", {})
        mark = "* " if entry.version == current else "  "
        print(
            f"{mark}{entry.version:28} {entry.stage:11} {metrics.get('accuracy', float('nan')):8.4f} "
            f"{metrics.get('ece', float('nan')):6.3f}  {entry.metadata.get('created_at', '')}"
        )
    return 0


def _sign(registry: ModelRegistry, versions: list[str]) -> int:
    """Sign ``versions`` (default: every version); a version whose artifacts fail their hashes is skipped."""
    failed = 0
    for version in versions or [v.version for v in registry.versions()]:
        try:
            registry.sign(version)
        except SentimentServiceError as exc:
            if not registry.signing:
                raise
            failed += 1
            print(f"not signed: {exc.message}", file=sys.stderr)
            continue
        print(f"signed    {version}")
    return 1 if failed else 0


def _feedback(registry: ModelRegistry, settings: Settings, args: argparse.Namespace) -> int:
    """``feedback sources``: labels, purges and revocations per feedback token name; ``feedback purge NAME``:
    forget its labels; ``feedback revoke NAME``: forget them and refuse its token."""
    from app.storage.database import Database
    from app.storage.feedback_sources import FeedbackSourceRepository
    from app.storage.predictions import PredictionRepository

    database = Database.from_settings(settings)
    try:
        migrations.require_current(database.engine, "cli")  # an older database: `db upgrade` adds the tables
        sources = FeedbackSourceRepository(database)
        if args.feedback_command == "sources":
            return _feedback_sources(PredictionRepository(database), sources)
        revoke = args.feedback_command == "revoke"
        purged = sources.purge(args.name, revoke=revoke)
    finally:
        database.dispose()
    if revoke:
        print(
            f"revoked   {args.name!r}: its token is refused (401) on every worker and instance within "
            f"{settings.feedback_revocation_refresh_seconds:g} s (SENTIMENT_FEEDBACK_REVOCATION_REFRESH_SECONDS)"
        )
    print(f"purged    {purged} labels of {args.name!r} (the predictions stay, unlabelled)")
    _print_fitted_on(registry, args.name)
    print("retrain   a retrain running now does not promote a model fitted on them (outcome superseded)")
    if revoke:
        print("token     remove it from SENTIMENT_FEEDBACK_TOKEN(_FILE); give its client a new token under a new name")
    else:
        print(f"token     still accepted: `python -m app.cli feedback revoke {args.name}` refuses it")
    return 0


def _feedback_sources(predictions: PredictionRepository, sources: FeedbackSourceRepository) -> int:
    """Per name that sent labels or was purged: labels still stored, the last one's time, the last purge and
    the revocation."""
    sent = {s.source: s for s in predictions.label_sources()}
    handled = {s.name: s for s in sources.sources()}
    print(f"{'source':24} {'labels':>8}  {'last_labelled_at':20}  {'purged_at':20}  revoked_at")
    for name in sorted(sent.keys() | handled.keys()):
        labels, source = sent.get(name), handled.get(name)
        print(
            f"{name:24} {labels.labels if labels else 0:8d}  "
            f"{_utc_text(labels.last_labelled_at if labels else None) or '-':20}  "
            f"{_utc_text(source.purged_at if source else None) or '-':20}  "
            f"{_utc_text(source.revoked_at if source else None) or '-'}"
        )
    return 0


def _print_fitted_on(registry: ModelRegistry, name: str) -> None:
    """The versions fitted on labels of the feedback token ``name``, if any."""
    fitted = [
        v.version
        for v in registry.versions()
        if name in v.metadata.get("data", {}).get("feedback", {}).get("sources", {})
    ]
    if fitted:
        print(f"fitted on {name!r}: {', '.join(fitted)} (promote or roll back to a version fitted without it)")


@contextlib.contextmanager
def _event_log(settings: Settings) -> Iterator[ModelEventRepository | None]:
    """The model events of the configured database, or None when it does not exist yet (a SQLite file that
    `db upgrade` has not created: opening it would create an empty one)."""
    from app.monitoring.log_copy import database_exists
    from app.storage.database import Database

    if not database_exists(settings.prediction_log_url):
        yield None
        return
    database = Database.from_settings(settings)
    try:
        yield ModelEventRepository(database)
    finally:
        database.dispose()


def _record(settings: Settings, events: list[ModelEvent]) -> None:
    """Record ``events`` in the audit trail; one that cannot be written is reported, and what it describes
    stays done."""
    with _event_log(settings) as log:
        unrecorded = len(events) if log is None else sum(log.record_safely(e) is None for e in events)
    if unrecorded:
        print(
            f"note      {unrecorded} model event(s) not recorded: run `python -m app.cli db upgrade`", file=sys.stderr
        )


def _show(registry: ModelRegistry, settings: Settings, version: str | None) -> int:
    """The version's metadata as JSON, then its events, oldest first."""
    version = version or registry.current_version()
    if version is None:
        print("no current version", file=sys.stderr)
        return 1
    print(json.dumps(registry.get(version).metadata, indent=2, sort_keys=True))
    try:
        with _event_log(settings) as log:
            events = [] if log is None else log.for_version(version)
    except Exception as exc:  # the metadata is shown; the trail is in a database that may be down
        print(f"events    unavailable: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 0
    print(f"events    {len(events) or 'none recorded'}")
    for event in events:
        trigger = f" ({event.trigger})" if event.trigger else ""
        details = json.dumps(event.details, sort_keys=True, separators=(",", ":"))
        print(f"  {_utc_text(event.occurred_at)}  {event.event:12} {event.actor}{trigger}  {details}")
    return 0


def _promote(registry: ModelRegistry, settings: Settings, version: str, watch: bool) -> int:
    at = time.time()  # before the pointer moves: the watch counts the version's predictions from here
    previous = registry.promote(version)
    if previous != version:
        details: dict[str, Any] = {"previous": previous, "watch": watch}
        _record(settings, [ModelEvent(version, "promoted", ACTOR, "manual", details, occurred_at=at)])
    print(f"current: {version} (was {previous})")
    if watch and previous != version:
        print(f"watch     for {settings.promotion_watch_seconds:g} s the drift monitor rolls it back on a drop")
    return 0


def _rollback(registry: ModelRegistry, settings: Settings) -> int:
    current = registry.current_version()
    target = registry.rollback(expected_current=current)
    if current is not None:
        _record(
            settings,
            [
                ModelEvent(current, "rolled_back", ACTOR, "manual", {"reason": "manual", "restored": target}),
                ModelEvent(target, "promoted", ACTOR, "rollback", {"previous": current, "watch": False}),
            ],
        )
    print(f"current: {target}")
    return 0


def _utc_text(timestamp: float | None) -> str:
    return "" if timestamp is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _db(settings: Settings, args: argparse.Namespace) -> int:
    """``db upgrade [REVISION]``, ``db downgrade REVISION``, ``db current``, ``db check`` (1 when behind)."""
    url = settings.prediction_log_url
    if args.db_command == "upgrade":
        state = migrations.upgrade(url, args.revision, echo=lambda line: print(f"db        {line}"))
    elif args.db_command == "downgrade":
        state = migrations.downgrade(url, args.revision, echo=lambda line: print(f"db        {line}"))
    else:
        state = migrations.current(url)
        legacy = " (tables from a release before migrations, no alembic_version)" if state.legacy else ""
        print(f"current   {state.current or 'none'}{legacy}")
        print(f"head      {state.head}")
    print(f"schema    {state.describe()}")
    return 1 if args.db_command == "check" and state.behind else 0


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    """``migrate``: copy the model store and the prediction database into others (a one-machine install into
    PostgreSQL and an object store); 1 if anything failed to copy or verify. Never writes to the source."""
    from app.ml.store_copy import copy_store
    from app.monitoring.log_copy import copy_rows, database_exists, open_database

    source_url = args.from_database or settings.prediction_log_url
    if not database_exists(source_url):
        print(f"error: no source database at {source_url}", file=sys.stderr)
        return 1
    # The source is read, never migrated: a failed copy leaves the old install exactly as it was.
    source_state = migrations.current(source_url)
    if not source_state.up_to_date:
        print(f"error: the source database is {source_state.describe()}; it must be at head", file=sys.stderr)
        return 1
    migrations.upgrade(args.to_database, echo=lambda line: print(f"target db {line}"))
    source = ModelRegistry.from_settings(
        _store_settings(settings.model_copy(update={"database_url": source_url}), args.from_store or args.store)
    )
    # A fresh download cache: verifying the target reads back what the object store holds, not a local copy.
    with tempfile.TemporaryDirectory(prefix="sentiment-migrate-") as cache:
        update = {"database_url": args.to_database, "model_cache_dir": Path(cache)}
        target = ModelRegistry.from_settings(_store_settings(settings.model_copy(update=update), args.to_store))
        try:
            print(f"versions  from {source.location} to {target.location}")
            copied = copy_store(source, target, echo=lambda line: print(f"  {line}"))
        finally:
            target.close()
            source.close()
    source_db, target_db = open_database(source_url), open_database(args.to_database)
    try:
        tables = copy_rows(source_db, target_db, args.batch_rows, echo=lambda line: print(f"  {line}"))
    finally:
        source_db.dispose()
        target_db.dispose()
    print(f"versions  {len(copied.copied)} copied, {len(copied.skipped)} already present, {len(copied.failed)} failed")
    print(f"pointer   {copied.pointer}")
    for table in tables:
        print(f"rows      {table.table}: {table.describe()}")
    if copied.ok and all(table.ok for table in tables):
        print("result    complete: switch the settings to the target and start the service")
        return 0
    for version, reason in copied.failed.items():
        print(f"error: {version} not copied: {reason}", file=sys.stderr)
    print("error: the copy is incomplete (see above); fix the cause and run migrate again", file=sys.stderr)
    return 1


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _parser(settings: Settings) -> argparse.ArgumentParser:
    for module in IMPLEMENTATIONS:  # registers the model kinds
        importlib.import_module(module)
    parser = argparse.ArgumentParser(prog="python -m app.cli", description=__doc__)
    parser.add_argument(
        "--store",
        metavar="URL",
        help="model store: a folder, file:///path or s3://bucket/prefix (versions' rows in SENTIMENT_DATABASE_URL); "
        "default: SENTIMENT_MODEL_STORE_URL, else SENTIMENT_MODEL_STORE or ./model_store",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_version_commands(sub)
    _add_feedback(sub)
    _add_db(sub)
    _add_migrate(sub)
    return parser


def _add_train(sub: Subcommands) -> None:
    train = sub.add_parser("train", help="train, evaluate and register a new version")
    train.add_argument("--corpus", choices=sorted(CORPORA), default="rotten_tomatoes")
    train.add_argument("--kind", choices=sorted(MODEL_KINDS), default=DEFAULT_KIND, help="model kind to train")
    train.add_argument("--cv-folds", type=int, default=0, help="also report k-fold CV accuracy (e.g. 10)")
    train.add_argument("--holdout-fraction", type=float, default=0.15)
    train.add_argument(
        "--promote",
        choices=["if-none", "always", "never"],
        default="if-none",
        help="make the new version current: only if none is (default), always, or never",
    )
    train.add_argument("--if-empty", action="store_true", help="do nothing if the store has a current version")
    train.add_argument(
        "--C", type=float, default=None, help="inverse regularisation strength (default: the model kind's own)"
    )


def _add_version_commands(sub: Subcommands) -> None:
    """``list``, ``show``, ``promote``, ``rollback`` and ``sign``."""
    sub.add_parser("list", help="list versions; * marks the current one")
    show = sub.add_parser("show", help="print a version's metadata, then its events (the audit trail)")
    show.add_argument("version", nargs="?", help="default: the current version")
    promote = sub.add_parser("promote", help="make a version current (every worker picks it up)")
    promote.add_argument("version")
    promote.add_argument(
        "--watch",
        action="store_true",
        help="let the drift monitor roll it back on a drop for SENTIMENT_PROMOTION_WATCH_SECONDS, as after a retrain",
    )
    sub.add_parser("rollback", help="make the previously current version current again")
    sign = sub.add_parser(
        "sign", help="(re-)sign versions with SENTIMENT_MODEL_SIGNING_KEY[_FILE], after checking their hashes"
    )
    sign.add_argument("versions", nargs="*", help="default: every version")


def _add_feedback(sub: Subcommands) -> None:
    feedback = sub.add_parser("feedback", help="feedback labels by the token (source) that sent them")
    feedback_sub = feedback.add_subparsers(dest="feedback_command", required=True)
    feedback_sub.add_parser(
        "sources", help="list the token names that sent labels or were purged: label counts, purges, revocations"
    )
    purge = feedback_sub.add_parser(
        "purge",
        help="forget every label a token name sent (the predictions stay); no retrain uses them again; "
        "the token stays valid",
    )
    purge.add_argument("name", help="the token's name (`legacy`: labels older than recorded sources)")
    revoke = feedback_sub.add_parser(
        "revoke",
        help="refuse a token name from now on (every worker and instance) and forget every label it sent",
    )
    revoke.add_argument("name", help="the token's name")


def _add_db(sub: Subcommands) -> None:
    db = sub.add_parser("db", help="the prediction database's schema (SENTIMENT_DATABASE_URL): Alembic migrations")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_sub.add_parser(
        "upgrade", help="migrate to the newest revision (creates the tables; adopts a database from before migrations)"
    )
    upgrade.add_argument("revision", nargs="?", default="head", help="default: head")
    downgrade = db_sub.add_parser("downgrade", help="migrate back (to roll a release back); dropped columns lose data")
    downgrade.add_argument("revision", help="a revision id, -1 (one step back) or base (no tables)")
    db_sub.add_parser("current", help="print the database's revision and this release's head")
    db_sub.add_parser("check", help="like current; exits 1 when the schema is behind (the service would refuse it)")


def _add_migrate(sub: Subcommands) -> None:
    migrate = sub.add_parser(
        "migrate",
        help="copy every model version (verified by sha256) and every prediction database row into another "
        "database and store, e.g. SQLite + a folder into PostgreSQL + s3://; safe to run again",
    )
    migrate.add_argument(
        "--from-database", metavar="URL", help="default: SENTIMENT_DATABASE_URL, else <state_dir>/predictions.db"
    )
    migrate.add_argument("--to-database", metavar="URL", required=True, help="migrated to head first")
    migrate.add_argument(
        "--from-store", metavar="URL", help="a folder or URL; default: --store, else the configured model store"
    )
    migrate.add_argument(
        "--to-store",
        metavar="URL",
        required=True,
        help="s3://bucket/prefix (versions' rows in --to-database) or a folder",
    )
    migrate.add_argument("--batch-rows", type=_positive, default=1000, help="rows per transaction (default: 1000)")


def _run(registry: ModelRegistry, settings: Settings, args: argparse.Namespace) -> int:
    if args.command == "train":
        return _train(registry, settings, args)
    if args.command == "list":
        return _list(registry)
    if args.command == "sign":
        return _sign(registry, args.versions)
    if args.command == "feedback":
        return _feedback(registry, settings, args)
    if args.command == "show":
        return _show(registry, settings, args.version)
    if args.command == "promote":
        return _promote(registry, settings, args.version, args.watch)
    return _rollback(registry, settings)


def _store_settings(settings: Settings, store: str | None) -> Settings:
    """``settings`` with ``--store``: a URL replaces ``SENTIMENT_MODEL_STORE_URL``, a folder is the store."""
    if store is None:
        return settings
    if "://" in store:  # checked by ModelRegistry.from_settings
        return settings.model_copy(update={"model_store_url": store})
    return settings.model_copy(update={"model_store": Path(store), "model_store_url": None})


def main(argv: list[str] | None = None) -> int:
    settings = Settings()
    args = _parser(settings).parse_args(argv)
    configure_logging(settings.log_level)
    try:
        if args.command == "db":  # the database alone: no model store needed
            return _db(settings, args)
        if args.command == "migrate":  # two stores and two databases, none of them the configured one alone
            return _migrate(settings, args)
        registry = ModelRegistry.from_settings(_store_settings(settings, args.store))
        try:
            return _run(registry, settings, args)
        finally:
            registry.close()
    except SentimentServiceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
