"""Atomic file writes: a temporary file next to the target, fsync, rename over the target.

A process killed at any moment leaves either the old file or the new one, never half of one; the
temporaries of killed writers (``.<name>.<random>.tmp``) are removed by
:func:`remove_stale_temporaries`. Used for every file the project writes (checkpoints, CSV, JSON,
YAML, TIFF, figures); kept free of torch so that data-preparation workers start fast.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

PathLike = str | os.PathLike[str]


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask can only be read by setting it


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends, rename it over ``path``.

    The temporary file exists (empty, with the usual file mode) when the block starts; write it
    by name. On success it is fsynced, renamed over ``path`` and the directory fsynced; when the
    block raises, it is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual mode
        yield temporary
        _fsync(temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # e.g. platforms without directory file descriptors
        _fsync(target.parent)


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write a text file (CSV, JSON, YAML) atomically (:func:`atomic_path`); returns its path."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def remove_stale_temporaries(directory: PathLike) -> list[Path]:
    """Delete temporary files left by writers that were killed mid-write; returns them."""
    folder = Path(directory)
    stale = sorted(folder.glob(".*.tmp")) if folder.exists() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
