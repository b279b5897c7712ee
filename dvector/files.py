"""Files written safely and named printably: the one atomic-write helper, JSON, sha256, display names,
the lock that gives a folder one writer (:func:`one_writer`), and the outputs of commands (exports,
pictures, ``eval.json``, RTTMs): :func:`output_folder` checks a ``-o`` folder before the work,
:func:`output_file` and :func:`write_output` write atomically and turn any failure of the file system
into one :class:`OutputError` line naming the path and the reason; :func:`json_text` is strict JSON
(non-finite numbers as ``null``).

A file under its final name is always complete: it is written to a hidden temporary name beside
it (unique to the process), flushed to disk, then renamed over the final name. A write that fails
or is killed leaves at most a ``.NAME.tmp-PID`` file, never a half-written NAME.

Imports only :mod:`dvector.errors` from the rest of the package: every part may use it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import socket
import sys
import tempfile
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

    The lock is the file ``folder/.dvector.lock`` (by default), locked with ``flock`` (the kernel
    releases it when its process dies, however it dies) and holding its holder's host, PID and start
    time; it is removed when the block ends, error or not. A lock file that is there but not locked
    was left by a process that died: it is taken over with a note. Yields the lock file's path.
    """
    folder = Path(folder)
    path = folder / name
    folder.mkdir(parents=True, exist_ok=True)  # an OSError here (read-only, a file in the way) is the caller's
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise DvectorError(f"{display_path(folder)} is in use by another {what} ({holder}): wait for it to end, "
                               f"stop it, or choose another folder") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except OSError:
            same = False
        if same:
            break
        os.close(fd)  # locked a file its holder removed as it ended: lock the one under the name now
    try:
        left = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if left:
            say(f"note: taking over {display_path(path)}, left by a {what} that no longer runs ({left})")
        me = (f"host {socket.gethostname()}, pid {os.getpid()}, since "
              f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}: {' '.join(sys.argv[:2])}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (me + "\n").encode("utf-8", "backslashreplace"), 0)
        yield path
    finally:
        try:
            path.unlink()  # ended, not killed: nothing to take over (removed while still locked)
        except OSError:
            pass
        os.close(fd)  # releases the flock


# ---- outputs of commands: checked before the work, written atomically, failures in one line ------

class OutputError(DvectorError):
    """An output could not be written: ``path`` and the file system's ``reason`` ("No space left on device")."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"cannot write {display_path(path)}: {reason}")
        self.path, self.reason = Path(path), reason


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _make_folder(folder: Path, target: Path) -> None:
    """``folder`` made (with its parents); a file where a folder must be is named as the reason."""
    for above in (folder, *folder.parents):
        if os.path.lexists(above):
            if not above.is_dir():
                where = "it" if above == target else display_path(above)
                raise OutputError(target, f"{where} is a file, not a folder")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(target, _reason(exc)) from exc


def output_folder(path: str | os.PathLike[str]) -> Path:
    """``path`` as a folder to write outputs into: made if missing, and written to at once (a probe
    file, removed), so that a folder that cannot take them fails before the work, in one line."""
    folder = Path(path)
    _make_folder(folder, folder)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OutputError(folder, _reason(exc)) from exc
    return folder


@contextmanager
def output_file(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """``atomic_write(path, suffix)`` for an output: its folder made first; a failure of the file system
    (full, read-only, a file where a folder should be) is one :class:`OutputError`, and leaves neither
    ``path`` half-written nor the temporary file."""
    target = Path(path)
    _make_folder(target.parent, target)
    try:
        with atomic_write(target, suffix) as tmp:
            yield tmp
    except OSError as exc:
        raise OutputError(target, _reason(exc)) from exc


def write_output(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """``data`` (text is written as UTF-8) under ``path``, atomically (see :func:`output_file`).

    Writers in C++ (``torch.save``, ``torch.jit.save``) abort the process when a write fails: they
    write to memory (``io.BytesIO``) and hand the bytes to this."""
    with output_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


@contextmanager
def outputs_together(*paths: str | os.PathLike[str]) -> Iterator[None]:
    """Outputs that only make sense together (a model and its record): when the block fails, none of
    ``paths`` is left (neither this block's nor an earlier export's under the same names), so a folder
    never holds a model without its record or beside another model's."""
    try:
        yield
    except BaseException:
        for path in paths:
            try:
                Path(path).unlink()
            except OSError:
                pass
        raise


def finite_json(value: Any) -> Any:
    """``value`` with every NaN and infinity (at any depth) as None: what strict JSON can hold."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def json_text(data: Any, indent: int = 1) -> str:
    """Strict JSON of ``data`` (sorted keys, ASCII, a final newline): non-finite numbers as ``null``,
    never the ``NaN`` and ``Infinity`` that strict parsers refuse."""
    return json.dumps(finite_json(data), indent=indent, sort_keys=True, ensure_ascii=True, allow_nan=False) + "\n"
