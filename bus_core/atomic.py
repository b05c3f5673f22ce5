"""Files that appear whole or not at all: every write of a file that someone may read while it
is written (or that a killed process may leave half-written) goes through here.

A write goes to a temporary file `.<name>.<random>.tmp` beside the target, is flushed to disk
(fsync) and then renamed over the target, which is atomic on POSIX and Windows file systems.
If the write fails the temporary file is removed; if the process is killed, it stays behind
and `remove_partial_writes` (called when a run starts again, and when the case store opens)
removes it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

TEMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write `path` through: on leaving the block without an error the
    file is synced and renamed to `path`; on an error it is removed. The folder must exist."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    temp = Path(tmp)
    try:
        yield temp
        with open(temp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes the file private (0600): give it the mode the file had, or 0644
        os.chmod(temp, stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o644)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    with atomic_path(path) as temp:
        temp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically; returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def remove_partial_writes(folder: str | Path, *, older_than_s: float = 0) -> list[Path]:
    """Remove the temporary files that killed writes left in `folder`, those last changed more
    than `older_than_s` seconds ago; returns them. With the default 0, call it only where no
    other process is writing (e.g. when a run in that folder starts)."""
    removed = []
    root = Path(folder)
    cutoff = time.time() - older_than_s
    if root.is_dir():
        for path in root.glob(f".*{TEMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):  # another process removed it
                if path.is_file() and path.stat().st_mtime <= cutoff:
                    path.unlink()
                    removed.append(path)
    return removed
