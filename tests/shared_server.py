"""One external server (PostgreSQL, SeaweedFS) per test session, however many test modules use it.

A session-scoped fixture defined in a helper module and imported by several test modules is set up once per
importing module; :class:`SessionServer` makes them all share the first one's server and stops it when the
last module's fixture is torn down.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Generic, TypeVar

S = TypeVar("S")


class SessionServer(Generic[S]):
    """``start(root)`` builds and starts a server in a fresh temporary folder ``root``; ``stop(server)`` stops
    it. The folder is removed after the stop, and after a failed start."""

    def __init__(self, prefix: str, start: Callable[[Path], S], stop: Callable[[S], None]) -> None:
        self.prefix = prefix
        self.start = start
        self.stop = stop
        self.running: tuple[S, Path] | None = None  # the server and its folder
        self.holders = 0

    @contextmanager
    def held(self) -> Iterator[S]:
        if self.running is None:
            # Not under pytest's tmp_path: its parents are private to root, and PostgreSQL runs as postgres.
            root = Path(tempfile.mkdtemp(prefix=self.prefix))
            try:
                self.running = (self.start(root), root)
            except BaseException:
                shutil.rmtree(root, ignore_errors=True)
                raise
        server, root = self.running
        self.holders += 1
        try:
            yield server
        finally:
            self.holders -= 1
            if self.holders == 0:
                self.running = None
                try:
                    self.stop(server)
                finally:
                    shutil.rmtree(root, ignore_errors=True)
