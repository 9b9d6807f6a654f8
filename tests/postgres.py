"""A real PostgreSQL for tests: a throwaway cluster on a free loopback port, which a test may stop and restart.

Import the fixtures into a test module (``from tests.postgres import postgres, postgres_url``). The cluster is
started once per session, shared by every module that imports the fixtures, and removed after the last one.
``postgres_url`` gives each test a fresh, empty database. Needs Debian's ``postgresql`` package
(``scripts/system-deps`` installs it); as root the server runs as the ``postgres`` user, which initdb requires.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from tests.conftest import free_port
from tests.shared_server import SessionServer

DATABASE_USER = "postgres"


def _bin_dir() -> Path | None:
    """The newest installed server's bin folder (``/usr/lib/postgresql/<major>/bin``)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


@dataclass
class PostgresCluster:
    """One initdb'ed cluster: TCP on ``127.0.0.1:port``, its unix socket and data inside ``root``."""

    root: Path
    bin_dir: Path
    port: int = field(default_factory=free_port)
    _owner: str | None = field(default=None, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database``, through the psycopg 3 driver over TCP."""
        return f"postgresql+psycopg://{DATABASE_USER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self._owner is not None:  # initdb and postgres refuse to run as root
            command = ["runuser", "-u", self._owner, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {done.stderr}{done.stdout}\n{log}")

    def init(self) -> None:
        if os.getuid() == 0:
            self._owner = "postgres"
            owner = pwd.getpwnam(self._owner)
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self.socket_dir.mkdir()
        if self._owner is not None:
            shutil.chown(self.socket_dir, self._owner, self._owner)
        # trust: only this machine's loopback and the private socket reach the cluster, for one test session.
        self._run("initdb", "-D", str(self.data_dir), "-U", DATABASE_USER, "--auth=trust", "-E", "UTF8", "--no-sync")

    @property
    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()

    def start(self) -> None:
        """Start the server and return once it accepts connections."""
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.socket_dir} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            "pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_path), "-o", options, "-w", "-t", "60"
        )

    def stop(self, mode: str = "fast") -> None:
        """Shut the server down: ``fast`` disconnects every client at once and refuses new connections,
        as a database failover or a restart by an operator does; ``immediate`` is a crash."""
        self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60")

    @contextlib.contextmanager
    def outage(self, mode: str = "fast") -> Iterator[None]:
        """The database is down inside the block and back when it ends (even if the block fails)."""
        self.stop(mode)
        try:
            yield
        finally:
            self.start()

    def create_database(self, name: str) -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        with psycopg.connect(host="127.0.0.1", port=self.port, user=DATABASE_USER, dbname="postgres") as conn:
            conn.autocommit = True
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(host="127.0.0.1", port=self.port, user=DATABASE_USER, dbname="postgres") as conn:
            conn.autocommit = True
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _start_cluster(root: Path) -> PostgresCluster:
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.fail("PostgreSQL is not installed: run scripts/system-deps")
    cluster = PostgresCluster(root, bin_dir)
    cluster.init()
    cluster.start()
    return cluster


def _stop_cluster(cluster: PostgresCluster) -> None:
    if cluster.running:
        cluster.stop()


_cluster = SessionServer("sentiment-pg-", _start_cluster, _stop_cluster)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A running PostgreSQL cluster, shared by the whole session (started on first use)."""
    with _cluster.held() as cluster:
        yield cluster


@pytest.fixture
def postgres_url(postgres: PostgresCluster) -> Iterator[str]:
    """The SQLAlchemy URL of a fresh, empty database on the session's cluster (dropped afterwards)."""
    if not postgres.running:  # a test that stopped the cluster failed before starting it again
        postgres.start()
    name = f"test_{uuid.uuid4().hex[:12]}"
    url = postgres.create_database(name)
    yield url
    if not postgres.running:
        postgres.start()
    postgres.drop_database(name)
