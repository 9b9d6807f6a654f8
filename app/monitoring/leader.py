"""The drift monitor's leader lock: of every monitor sharing one prediction database, exactly one checks.

Every instance may run a monitor. The one holding this lock checks drift and enforces retention; the others
follow, retrying the lock every few seconds (:data:`app.monitoring.monitor.FOLLOWER_RETRY_SECONDS`), so one
of them takes over within seconds of the leader's death. Which lock follows the prediction database's
dialect (:data:`LOCKS`):

- PostgreSQL (instances sharing one database): a session-level advisory lock (``pg_try_advisory_lock``) on a
  connection of its own, held for the leader's lifetime. The server frees it with the session: at once when
  the process dies (SIGKILL included: the kernel closes its socket), within about 11 s when its host vanishes
  (server-side TCP keepalives, :data:`HOLDER_OPTIONS`). The leader asks its session each cycle whether it
  still holds the lock; a failed connection makes it a follower, and with the default timeouts it notices a
  partition (``tcp_user_timeout``, 8 s) before the server frees the lock for another.
- Anything else (SQLite: one host): an exclusive ``flock`` on ``<state_dir>/drift-monitor.lock``, which the
  kernel frees when the process ends, however it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.pool import NullPool

from app.settings import Settings
from app.storage.database import CONNECT_ARGS

LOCK_FILE = "drift-monitor.lock"
ADVISORY_KEY = 0x44524946544D4F4E  # "DRIFTMON": the monitor's key (the retrain lock and the migrations use others)
# On the leader's session: the server notices a vanished leader host within 5 + 3 * 2 s and frees the lock,
# not after the kernel's default two hours.
HOLDER_OPTIONS = "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3"
_HOLDS = text(
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
    " AND pid = pg_backend_pid() AND CAST(classid AS bigint) = :high AND CAST(objid AS bigint) = :low)"
)


class LeaderLock(ABC):
    """Held by the leading monitor for as long as it leads; freed when it ends, however it ends."""

    kind: ClassVar[str]
    """The ``lock`` label of ``sentiment_drift_monitor_leader``."""

    @classmethod
    def for_settings(cls, settings: Settings) -> LeaderLock:
        """The leader lock of the settings' prediction database (:data:`LOCKS`)."""
        factory = LOCKS.get(make_url(settings.prediction_log_url).get_backend_name())
        return FileLeaderLock(settings.state_dir / LOCK_FILE) if factory is None else factory(settings)

    @abstractmethod
    def try_acquire(self) -> bool:
        """Take the lock without waiting: False while another monitor holds it. May raise (database down)."""

    @abstractmethod
    def held(self) -> bool:
        """Whether this process still holds the lock it acquired (False if it never did). May raise when the
        lock cannot be checked (its connection died): the caller then counts it lost and calls :meth:`release`."""

    @abstractmethod
    def release(self) -> None:
        """Let go of the lock, and of whatever held it; never raises. A later :meth:`try_acquire` starts afresh."""

    def dispose(self) -> None:
        """Release, and close whatever the lock keeps open (at exit)."""
        self.release()


class FileLeaderLock(LeaderLock):
    """An exclusive ``flock`` on a file of the state dir (monitors on one host)."""

    kind = "flock"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return self.held()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def held(self) -> bool:
        # The lock belongs to the open file: if someone deleted or replaced the path, another monitor can lock
        # the new file, so this one counts as lost.
        if self._fd is None:
            return False
        try:
            return self.path.stat().st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing drops the flock


class AdvisoryLeaderLock(LeaderLock):
    """A PostgreSQL session-level advisory lock on a connection of its own (monitors on any number of hosts)."""

    kind = "advisory"

    def __init__(
        self, url: str, *, connect_timeout: float = 3.0, statement_timeout: float = 5.0, key: int = ADVISORY_KEY
    ) -> None:
        args: dict[str, Any] = {**CONNECT_ARGS["postgresql"](connect_timeout, statement_timeout)}
        args["options"] = f"{args.get('options', '')} {HOLDER_OPTIONS}".strip()
        # Outside any pool: the lock lives exactly as long as this one session.
        self._engine = create_engine(url, connect_args=args, poolclass=NullPool)
        self.key = key
        self._connection: Connection | None = None
        self._held = False

    @classmethod
    def from_settings(cls, settings: Settings) -> AdvisoryLeaderLock:
        return cls(
            settings.prediction_log_url,
            connect_timeout=settings.database_connect_timeout_seconds,
            statement_timeout=settings.database_statement_timeout_seconds,
        )

    def try_acquire(self) -> bool:
        if self._held:
            return self.held()
        if self._connection is None:  # a follower keeps its session between attempts
            self._connection = self._engine.connect()
        try:
            got = bool(self._connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}).scalar())
            self._connection.commit()  # the session keeps the lock; no transaction stays open
        except BaseException:
            self.release()
            raise
        self._held = got
        return got

    def held(self) -> bool:
        if not self._held or self._connection is None:
            return False
        holds = bool(self._connection.execute(_HOLDS, {"high": self.key >> 32, "low": self.key & 0xFFFFFFFF}).scalar())
        self._connection.commit()
        return holds

    def release(self) -> None:
        connection, self._connection = self._connection, None
        held, self._held = self._held, False
        if connection is None:
            return
        with contextlib.suppress(Exception):  # a lost session has let go of the lock already
            if held:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
                connection.commit()
        with contextlib.suppress(Exception):
            connection.close()

    def dispose(self) -> None:
        self.release()
        self._engine.dispose()


LOCKS: dict[str, Callable[[Settings], LeaderLock]] = {"postgresql": AdvisoryLeaderLock.from_settings}
"""The leader lock by SQLAlchemy dialect name; any other database (SQLite) uses the state dir's flock."""
