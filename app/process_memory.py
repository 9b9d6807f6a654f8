"""What the service's long-lived processes do to stay small: skip optional imports they never use, and hand
the heap's free pages back to the system after a large, short-lived allocation.

Imports nothing beyond the standard library, so an entry point can call :func:`skip_unused_optional_imports`
before anything else is imported.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import sys

UNUSED_OPTIONAL_IMPORTS = {
    "pandas": "scikit-learn imports it when installed, only to recognise DataFrames (about 65 MB per process)",
    "rich": "structlog imports it when installed, only for its console renderer (about 5 MB per process)",
}
"""Packages other libraries import only if they are installed, for features the service never uses (it
predicts on lists of strings and logs JSON). pandas is installed for alibi-detect and training, rich for
schemathesis (tests)."""


def skip_unused_optional_imports() -> None:
    """Mark each of :data:`UNUSED_OPTIONAL_IMPORTS` absent, unless already imported: the libraries' own
    ``try: import ... except ImportError`` then take their fallback. For a service process's entry point only
    (supervisor, gunicorn master and its workers, drift monitor), before the libraries that import them;
    training, the CLI and the tests import them normally."""
    for name in UNUSED_OPTIONAL_IMPORTS:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def release_free_memory() -> None:
    """Return the free pages of every malloc arena to the system (glibc ``malloc_trim``; no-op elsewhere)."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library, if it is glibc (None elsewhere: musl, macOS)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(None)
