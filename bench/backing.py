"""The shared services of a scaled-out install, for benchmarks: a real PostgreSQL and a SeaweedFS S3 store.

Both come from the test helpers (``tests/postgres.py``, ``tests/s3.py``) and live in a temporary folder;
:func:`shared_services` starts them, seeds the S3 store with a folder store's current version (its rows and
pointer in PostgreSQL, as ``python -m app.cli migrate`` would) and removes everything afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from app.migrations import upgrade
from app.ml.registry import ModelRegistry
from app.settings import Settings
from tests.integration.services import register_copy
from tests.postgres import PostgresCluster, _bin_dir
from tests.s3 import OTHER_AWS_CREDENTIALS, SeaweedS3, _weed_binary


class DurablePostgres(PostgresCluster):
    """The test cluster with PostgreSQL's default durability (the tests turn fsync and synchronous commits
    off): a commit waits for its WAL flush, as on a production server."""

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.socket_dir}"
        self._run(
            "pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_path), "-o", options, "-w", "-t", "60"
        )


@dataclass
class SharedServices:
    """A running PostgreSQL (one database, at head) and S3 store holding one promoted version."""

    postgres: PostgresCluster
    s3: SeaweedS3
    database_url: str
    store_url: str

    def environ(self) -> dict[str, str]:
        """What an instance needs to use both (database, store URL and the S3 credentials)."""
        return {
            **self.s3.environ(),
            "SENTIMENT_DATABASE_URL": self.database_url,
            "SENTIMENT_MODEL_STORE_URL": self.store_url,
        }

    def postgres_pids(self) -> list[int]:
        """The postmaster and its children (one backend per client connection, and the server's own)."""
        postmaster = int((self.postgres.data_dir / "postmaster.pid").read_text().split()[0])
        children = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                        children.append(int(entry.name))
        return [postmaster, *children]

    def create_database(self) -> str:
        """Another empty database on the cluster, at head."""
        url = self.postgres.create_database(f"bench_{uuid.uuid4().hex[:12]}")
        upgrade(url)
        return url


def seed_s3(folder: ModelRegistry, version: str, settings: Settings) -> str:
    """Copy ``version`` of a folder store into the S3-backed registry of ``settings`` and promote it."""
    registry = ModelRegistry.from_settings(settings)
    try:
        seeded = register_copy(registry, folder.get(version))
        registry.promote(seeded)
    finally:
        registry.close()
    return seeded


@contextlib.contextmanager
def shared_services(folder: ModelRegistry, version: str) -> Iterator[SharedServices]:
    """PostgreSQL and SeaweedFS on free loopback ports, seeded with ``version``; the S3 variables are set in
    this process's environment meanwhile (the registry and the started instances read them)."""
    bin_dir, weed = _bin_dir(), _weed_binary()
    if bin_dir is None or weed is None:
        raise SystemExit("needs Debian's postgresql (scripts/system-deps) and weed (scripts/bootstrap --dev)")
    # Not under a root-only folder: the server runs as the postgres user.
    postgres = DurablePostgres(Path(tempfile.mkdtemp(prefix="bench-pg-")), bin_dir)
    s3 = SeaweedS3(Path(tempfile.mkdtemp(prefix="bench-s3-")), weed)
    saved = dict(os.environ)
    try:
        postgres.init()
        postgres.start()
        s3.start()
        os.environ.update(s3.environ())
        for name in OTHER_AWS_CREDENTIALS:
            os.environ.pop(name, None)
        database_url = postgres.create_database("bench")
        upgrade(database_url)
        store_url = f"s3://{s3.bucket}/bench-{uuid.uuid4().hex[:12]}"
        scratch = postgres.root.parent / f"bench-seed-{uuid.uuid4().hex[:8]}"
        settings = Settings(
            model_store=scratch / "unused-folder",
            model_store_url=store_url,
            database_url=database_url,
            state_dir=scratch / "var",
            model_cache_dir=scratch / "cache",
        )
        try:
            seed_s3(folder, version, settings)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        yield SharedServices(postgres, s3, database_url, store_url)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        s3.stop()
        if postgres.running:
            postgres.stop()
        shutil.rmtree(postgres.root, ignore_errors=True)
        shutil.rmtree(s3.root, ignore_errors=True)
