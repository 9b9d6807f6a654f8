"""The retrain lock: at most one retrain process runs at a time, across every worker and every instance.

Which lock guards a retrain follows the prediction database's dialect (:data:`LOCKS`):

- PostgreSQL (instances sharing one database): a session-level advisory lock (``pg_try_advisory_lock``)
  on the retrain process's own connection. The server drops it with the session, so it goes with the
  process however the process ends (SIGKILL included). A session cannot be handed to another process: the
  launcher only checks the lock (``pg_locks``, which takes nothing) and the retrain process takes it itself
  when it starts.
- Anything else (SQLite: one host): an exclusive ``flock`` on ``<model_store>/.retrain.lock``. The launcher
  takes it and the retrain process inherits the locked descriptor (:data:`LOCK_FD_ENV`); the kernel frees it
  when the last descriptor closes, however the process ends.

The lock keeps a second retrain process from running. Which request gets to start the one retrain is
decided by the database: at most one job row is ``running`` (a unique index, see
:meth:`app.storage.retrain_jobs.RetrainJobRepository.create_job`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from app.settings import Settings
from app.storage.database import CONNECT_ARGS

LOCK_FILE = ".retrain.lock"
LOCK_FD_ENV = "SENTIMENT_RETRAIN_LOCK_FD"
ADVISORY_KEY = 0x5245545241494E  # "RETRAIN": pg_advisory_lock key of the retrain (the migrations use another)
# On the holder's session: the server notices a vanished retrain host within about 25 s (tcp keepalives),
# not the kernel's default two hours, and frees the lock.
HOLDER_OPTIONS = "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3"
_HELD = text(
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND CAST(classid AS bigint) = :high AND CAST(objid AS bigint) = :low)"
)


class RetrainLock(ABC):
    """Held by the one running retrain process; released when it ends, however it ends."""

    hands_over: ClassVar[bool]
    """True: the launcher takes the lock and the retrain process inherits it (:meth:`child_env`). False: the
    launcher only checks it, and the retrain process takes it at start."""
    probe_seconds: ClassVar[float] = 0.0
    """How long ``sentiment_retrain_in_progress`` may reuse an answer of :meth:`held_elsewhere`."""

    @classmethod
    def for_settings(cls, settings: Settings, engine: Engine | None = None) -> RetrainLock:
        """The lock of the settings' prediction database (``engine``: an open one to probe with)."""
        return for_database(
            settings.prediction_log_url,
            settings.model_store,
            engine=engine,
            connect_timeout=settings.database_connect_timeout_seconds,
            statement_timeout=settings.database_statement_timeout_seconds,
        )

    @abstractmethod
    def fresh(self) -> RetrainLock:
        """A new, unheld handle on the same lock: one per attempt, as threads must not share a hold."""

    @abstractmethod
    def try_acquire(self) -> bool:
        """Take the lock without waiting: False while another process (or handle) holds it."""

    @abstractmethod
    def release(self) -> None:
        """Let go of this object's hold (a retrain process that inherited a flock keeps its own)."""

    @abstractmethod
    def held_elsewhere(self) -> bool:
        """True while some process holds the lock; takes nothing, so it never gets in a retrain's way."""

    def child_env(self) -> dict[str, str]:
        """What the retrain process's environment needs to inherit the lock held here."""
        return {}

    def child_fds(self) -> tuple[int, ...]:
        return ()


def try_lock(store_root: Path) -> int | None:
    """The retrain flock, taken without waiting: its locked descriptor, or None while another process holds it.
    Read-only (``flock`` needs no more): only a store without its lock file yet is written, to create it."""
    store_root.mkdir(parents=True, exist_ok=True)
    fd = os.open(store_root / LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def retrain_running(store_root: Path) -> bool:
    """True while some process holds the retrain flock. Reads only: ``flock`` needs no write access, so a
    worker probing a read-only store (``sentiment_retrain_in_progress``) neither needs nor takes any."""
    path = store_root / LOCK_FILE
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own lock, if it got one
    return False


class FileRetrainLock(RetrainLock):
    """An exclusive ``flock`` on ``<model_store>/.retrain.lock``, handed to the retrain process."""

    hands_over = True

    def __init__(self, store_root: Path, fd: int | None = None) -> None:
        self.store_root = store_root
        self._fd = fd

    @classmethod
    def inherited(cls, store_root: Path) -> FileRetrainLock | None:
        """The lock the launcher handed this process (``LOCK_FD_ENV``), or None."""
        fd = os.environ.get(LOCK_FD_ENV)
        return None if fd is None else cls(store_root, int(fd))

    def fresh(self) -> FileRetrainLock:
        return FileRetrainLock(self.store_root)

    def try_acquire(self) -> bool:
        if self._fd is None:
            self._fd = try_lock(self.store_root)
        return self._fd is not None

    def release(self) -> None:
        # Close, never LOCK_UN: the lock belongs to the open file, which a retrain process may share.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def held_elsewhere(self) -> bool:
        return retrain_running(self.store_root)

    def child_env(self) -> dict[str, str]:
        return {} if self._fd is None else {LOCK_FD_ENV: str(self._fd)}

    def child_fds(self) -> tuple[int, ...]:
        return () if self._fd is None else (self._fd,)


class AdvisoryRetrainLock(RetrainLock):
    """A PostgreSQL session-level advisory lock, held on the retrain process's own connection."""

    hands_over = False
    probe_seconds = 1.0  # a scrape every few seconds from several workers: one query per worker per second

    def __init__(
        self,
        url: str,
        *,
        engine: Engine | None = None,
        connect_timeout: float = 3.0,
        statement_timeout: float = 5.0,
        key: int = ADVISORY_KEY,
    ) -> None:
        self.url = url
        self.key = key
        self._connect_args = CONNECT_ARGS["postgresql"](connect_timeout, statement_timeout)
        self._probe_engine = engine
        self._owns_probe_engine = engine is None
        self._holder: Connection | None = None
        self._timeouts = (connect_timeout, statement_timeout)

    def fresh(self) -> AdvisoryRetrainLock:
        connect, statement = self._timeouts
        return AdvisoryRetrainLock(
            self.url, engine=self._probe(), connect_timeout=connect, statement_timeout=statement, key=self.key
        )

    def _probe(self) -> Engine:
        if self._probe_engine is None:
            self._probe_engine = create_engine(
                self.url, connect_args=self._connect_args, pool_size=1, max_overflow=1, pool_pre_ping=True
            )
        return self._probe_engine

    def try_acquire(self) -> bool:
        if self._holder is not None:
            return True
        args: dict[str, Any] = {**self._connect_args}
        args["options"] = f"{args.get('options', '')} {HOLDER_OPTIONS}".strip()
        # Its own connection, outside any pool: the lock lives exactly as long as this session.
        holder = create_engine(self.url, connect_args=args, poolclass=NullPool).connect()
        try:
            got = bool(holder.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}).scalar())
            holder.commit()  # the session keeps the lock; no transaction stays open
        except BaseException:
            holder.close()
            raise
        if not got:
            holder.close()
            return False
        self._holder = holder
        return True

    def release(self) -> None:
        holder, self._holder = self._holder, None
        if holder is not None:
            with contextlib.suppress(SQLAlchemyError):  # a lost session has let go of the lock already
                holder.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
                holder.commit()
            holder.close()

    def held_elsewhere(self) -> bool:
        with self._probe().connect() as conn:
            return bool(conn.execute(_HELD, {"high": self.key >> 32, "low": self.key & 0xFFFFFFFF}).scalar())

    def dispose(self) -> None:
        self.release()
        if self._owns_probe_engine and self._probe_engine is not None:
            self._probe_engine.dispose()
            self._probe_engine = None


LockFactory = Callable[[str, Path, Engine | None, float, float], RetrainLock]


def _advisory(url: str, _store_root: Path, engine: Engine | None, connect: float, statement: float) -> RetrainLock:
    return AdvisoryRetrainLock(url, engine=engine, connect_timeout=connect, statement_timeout=statement)


LOCKS: dict[str, LockFactory] = {"postgresql": _advisory}
"""The retrain lock by SQLAlchemy dialect name; any other database (SQLite) uses the store's flock."""


def for_database(
    url: str,
    store_root: Path,
    *,
    engine: Engine | None = None,
    connect_timeout: float = 3.0,
    statement_timeout: float = 5.0,
) -> RetrainLock:
    """The retrain lock of the prediction database at ``url`` (:data:`LOCKS`)."""
    factory = LOCKS.get(make_url(url).get_backend_name())
    if factory is None:
        return FileRetrainLock(store_root)
    return factory(url, store_root, engine, connect_timeout, statement_timeout)


class CachedProbe:
    """``probe()``'s answer, reused for ``seconds`` (0: asked every time); safe from several threads."""

    def __init__(self, probe: Callable[[], bool], seconds: float) -> None:
        self.probe = probe
        self.seconds = seconds
        self._lock = threading.Lock()
        self._answer: tuple[float, bool] | None = None

    def __call__(self) -> bool:
        if self.seconds <= 0:
            return self.probe()
        with self._lock:
            now = time.monotonic()
            if self._answer is None or now - self._answer[0] >= self.seconds:
                self._answer = (now, self.probe())
            return self._answer[1]
