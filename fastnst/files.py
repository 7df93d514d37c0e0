"""Output files: check a destination before any work, then write it atomically.

Every file fastnst writes goes through ``atomic_write``: the bytes go to a temporary file in the
destination's folder, are flushed to disk, and the file is renamed over the destination, so a
reader (or a crash) never sees half a file.  Errors are the caller's error type, one line.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import FastNSTError, ImageError


def folder_of(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def check_writable(path: str | os.PathLike, error: type[FastNSTError] = ImageError) -> Path:
    """Fail unless ``path`` could be written: its folder exists and takes a file, it is no folder."""
    path = Path(path)
    folder = folder_of(path)
    if not folder.is_dir():
        raise error(f"output folder '{folder}' does not exist")
    if path.is_dir():
        raise error(f"output '{path}' is a folder")
    try:  # a real write: os.access is wrong for root, ACLs and read-only mounts
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".fastnst-probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise error(f"cannot write to output folder '{folder}' ({exc.strerror or exc})") from None
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None],
                 error: type[FastNSTError] = ImageError) -> Path:
    """Call ``write(stream)`` on a temporary file next to ``path``, then rename it into place."""
    path = Path(path)
    try:
        handle, temp = tempfile.mkstemp(dir=folder_of(path), prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise error(f"cannot write '{path}' ({exc.strerror or exc})") from None
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(temp, path)
    except BaseException as exc:
        try:
            os.unlink(temp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise error(f"cannot write '{path}' ({exc.strerror or exc})") from None
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
