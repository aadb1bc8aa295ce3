"""Atomic outputs: every file mmfuse writes goes to a temporary name in the same folder and is
renamed into place only when complete, so a crash, a kill or a full disk never leaves a partial
file under the final name, and a reader that has the old file open or memory-mapped keeps it."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import OutputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it onto `path`; on any
    error remove it, keep the old `path`, and turn OS errors (ENOSPC, EACCES, ...) into OutputError."""
    final = Path(path)
    folder = final.parent if str(final.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise OutputError(f"{final}: cannot write here: {e.strerror or e}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        mode = 0o666 & ~_umask()
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, final)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise OutputError(f"{final}: write failed ({e.strerror or e}); the previous file, if any, is unchanged") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator:
    """`open(path, mode)` that writes atomically (see `atomic_path`); text or binary write modes."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes only, got mode {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f


@functools.lru_cache(maxsize=None)
def _umask() -> int:
    """The process umask, read once (reading it means setting it, which is not thread-safe)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    """`obj` as a JSON file, atomically (see `atomic_path`)."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")
