"""Files written safely and named printably: the one atomic-write helper, JSON, sha256, display names,
and the lock that gives a folder one writer (:func:`one_writer`).

A file under its final name is always complete: it is written to a hidden temporary name beside
it (unique to the process), flushed to disk, then renamed over the final name. A write that fails
or is killed leaves at most a ``.NAME.tmp-PID`` file, never a half-written NAME.

Imports only :mod:`dvector.errors` from the rest of the package: every part may use it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from dvector.errors import DvectorError


def temp_name(path: Path, suffix: str = "") -> Path:
    """Where ``path`` is written before its atomic rename: hidden, and unique to this process.

    ``suffix`` is appended for writers that insist on an extension (``np.savez`` adds ``.npz``).
    """
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


def stale_temps(folder: Path, name: str = "*") -> list[Path]:
    """Temporary files that writes of ``folder/name`` (a glob) left behind when they were killed."""
    return sorted(Path(folder).glob(f".{name}.tmp-*"))


def fsync_path(path: Path) -> None:
    """Flush a written file (or a folder's entries) to disk; folders that cannot be opened are skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike[str], suffix: str = "", sync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success it replaces ``path``.

    The temporary file is flushed to disk (``sync``) before the rename, and removed if the block
    raises. Usage: ``with atomic_write(target) as tmp: torch.save(obj, tmp)``.
    """
    final = Path(path)
    tmp = temp_name(final, suffix)
    try:
        yield tmp
        if sync:
            fsync_path(tmp)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """``data`` as ASCII JSON (sorted keys, one space indent) under ``path``, atomically."""
    with atomic_write(path) as tmp:
        with open(tmp, "w", encoding="ascii") as f:
            json.dump(data, f, indent=1, sort_keys=True, ensure_ascii=True)
            f.write("\n")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def display_path(text: str | os.PathLike[str]) -> str:
    """A printable form of a path that may hold undecodable bytes (non-UTF-8 file names)."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


LOCK_NAME = ".dvector.lock"


@contextmanager
def one_writer(folder: str | os.PathLike[str], what: str, say: Callable[[str], None] = print,
               name: str = LOCK_NAME) -> Iterator[Path]:
    """Hold ``folder``'s lock for the block: a second writer (``what``: "training run", "shard build")
    started into the same folder is refused at once with one line naming the holder's host and PID.
    Writers that may share a folder (the parts of a build) hold locks of other ``name`` s.

    The lock is ``folder/.dvector.lock`` (by default), locked with ``flock`` (the kernel releases it when its process
    dies, however it dies) and holding its holder's host, PID and start time (emptied when the block
    ends, error or not). A lock file that names a holder but is not locked was left by a process that
    died: it is taken over with a note. Yields the lock file's path.
    """
    folder = Path(folder)
    path = folder / name
    folder.mkdir(parents=True, exist_ok=True)  # an OSError here (read-only, a file in the way) is the caller's
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            raise DvectorError(f"{display_path(folder)} is in use by another {what} ({holder}): wait for it to end, "
                               f"stop it, or choose another folder") from None
        left = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if left:
            say(f"note: taking over {display_path(path)}, left by a {what} that no longer runs ({left})")
        me = (f"host {socket.gethostname()}, pid {os.getpid()}, since "
              f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}: {' '.join(sys.argv[:2])}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (me + "\n").encode("utf-8", "backslashreplace"), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # ended, not killed: nobody to name
    finally:
        os.close(fd)  # releases the flock
