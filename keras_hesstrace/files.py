"""Files the package writes: whole or not at all, strict JSON, one writer at a time.

* :func:`atomic_write_text` / :func:`atomic_write_json`: a temporary file in the same
  folder (``<name>.tmp<pid>``), fsynced and renamed into place, so a killed process
  never leaves a half-written file; :func:`remove_stale_temporaries` deletes the
  temporaries a killed process left behind.
* :func:`strict_json`: JSON as RFC 8259 defines it, NaN and infinities written as
  ``null`` (Python's ``json`` writes a bare ``NaN`` that other readers refuse).
* :func:`read_json`: a JSON file, with its path in every error.
* :class:`FolderLock`: an exclusive lock on a folder or file, held by one process.
  It is an advisory ``fcntl.flock`` on a ``.lock`` file: the kernel releases it
  when the holding process dies, so a lock left by a killed process is taken over
  by the next one with nothing to clean up. The lock file records the holder's pid
  and host for the message another process gets.

>>> strict_json({"h": float("nan"), "n": [1.5, float("inf")]}, indent=None)
'{"h": null, "n": [1.5, null]}'
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
from collections.abc import Callable
from typing import IO, Any

try:  # POSIX; elsewhere the lock is a no-op (see FolderLock)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_TEMPORARY = re.compile(r".+\.tmp(\d+)$")


def _finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (recursively)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy arrays and scalars
        return _finite_or_none(obj.tolist())
    return obj


def strict_json(obj: Any, indent: int | None = 1) -> str:
    """``obj`` as strict JSON text: NaN and +-inf become ``null``, numpy arrays lists."""
    return json.dumps(_finite_or_none(obj), indent=indent, allow_nan=False)


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False,
                 what: str = "") -> None:
    """Write ``path`` whole or not at all: ``write(f)`` fills a temporary file, fsynced,
    renamed into place (``<path>.tmp<pid>``, the name :func:`remove_stale_temporaries`
    recognises). ``what`` names the file in an error (e.g. ``"the checkpoint "``).

    Raises:
        PermissionError / OSError: with ``path`` named, when the folder cannot be written
            (the temporary file is removed).
    """
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8", newline="") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise type(e)(e.errno, f"cannot write {what}{os.fspath(path)!r}: {e.strerror}") from e


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write the str ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented strict JSON (:func:`strict_json`), written atomically."""
    atomic_write_text(path, strict_json(obj) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``; ``ValueError`` naming the file when it is not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{os.fspath(path)!r} is not a readable JSON file ({e}).") from e


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete ``*.tmp<pid>`` files under ``folder`` whose process is gone; return their paths.

    Such a file is what :func:`atomic_write_text` (or a checkpoint writer using the same
    naming) was writing when its process was killed: never read, only disk wasted.
    """
    removed = []
    for root, _, names in os.walk(folder):
        for name in names:
            m = _TEMPORARY.fullmatch(name)
            if m and not _alive(int(m.group(1))):
                path = os.path.join(root, name)
                try:
                    os.remove(path)
                except FileNotFoundError:
                    continue
                removed.append(path)
    return removed


class LockedError(RuntimeError):
    """Another process holds a :class:`FolderLock`."""


class FolderLock:
    """An exclusive, non-blocking lock on ``target`` (a folder or a file) for one process.

    The lock file is ``<target>/.keras-hesstrace.lock`` for a folder and
    ``<target>.lock`` for a file. ``acquire`` raises :class:`LockedError` naming the
    holder's pid and host when another process holds it; a lock whose holder died is
    free again (the kernel drops a ``flock`` with its process). Re-entrant within one
    object; use as a context manager or call ``acquire``/``release``.

    Args:
        target: the folder or file to protect.
        what: how the message names the user's thing (e.g. ``"--out"``, ``"csv_path"``).
            Defaults to ``"the folder"``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d, FolderLock(d) as lock:
        ...     lock.held
        True
    """

    def __init__(self, target: str | os.PathLike, what: str = "the folder") -> None:
        self.target = os.fspath(target)
        self.what = what
        self.path = (os.path.join(self.target, ".keras-hesstrace.lock")
                     if os.path.isdir(self.target) else self.target + ".lock")
        self._handle = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._handle is not None

    def acquire(self) -> FolderLock:
        if self._handle is not None or fcntl is None:
            return self
        try:
            handle = open(self.path, "a+", encoding="utf-8")
        except OSError as e:
            raise type(e)(e.errno, f"cannot create the lock file {self.path!r} for {self.what} "
                                   f"{self.target!r}: {e.strerror}") from e
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise LockedError(
                f"{self.what} {self.target!r} is in use by {holder} (lock file {self.path!r}). "
                "Wait for it to finish, or use another path; a lock of a process that died "
                "is released by the system and taken over automatically."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        """Release the lock (idempotent). The lock file stays, empty of meaning."""
        if self._handle is None:
            return
        fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> bool:
        self.release()
        return False
