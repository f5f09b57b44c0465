"""The store's file-system layer: private folders, atomic multi-file commits, a shared lock.

Every file is staged in a temp file of its final mode, fsync'd, renamed into place, and the
folder fsync'd, so a reader sees the old file or the new one, never a half-written one. Plain
blocking file I/O: call it from a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

TEMP_SUFFIX = ".tmp"
FOLDER_MODE = 0o700
_LOCK_MODE = 0o600


def private_folder(path: Path) -> None:
    """Make ``path`` a folder only its owner can enter, tightening wider permissions."""
    if stat.S_IMODE(path.stat().st_mode) != FOLDER_MODE:
        os.chmod(path, FOLDER_MODE)


def commit(folder: Path, files: Sequence[tuple[str, bytes, int]]) -> None:
    """Put ``files`` (name, data, mode) in place in order; on failure, put the old ones back.

    Everything is staged and fsync'd before the first rename, so a failure while staging
    changes nothing, and the renames that did happen are undone on error (best effort: a
    hard crash can still leave a mix, which the hashes in the last file expose).
    """
    staged: list[tuple[str, Path, int]] = []
    done: list[tuple[str, bytes | None, int]] = []
    try:
        for name, data, mode in files:
            staged.append((name, _stage(folder, name, data, mode), mode))
        for name, temp, mode in staged:
            try:
                old: bytes | None = (folder / name).read_bytes()
            except FileNotFoundError:
                old = None
            os.replace(temp, folder / name)
            done.append((name, old, mode))
            fsync_folder(folder)
    except BaseException:
        for _, temp, _ in staged:
            temp.unlink(missing_ok=True)
        for name, old, mode in reversed(done):
            with contextlib.suppress(OSError):
                if old is None:
                    (folder / name).unlink(missing_ok=True)
                else:
                    os.replace(_stage(folder, name, old, mode), folder / name)
        with contextlib.suppress(OSError):
            fsync_folder(folder)
        raise


def _stage(folder: Path, name: str, data: bytes, mode: int) -> Path:
    """Write ``data`` to a fresh temp file next to ``name``, born with ``mode``, fsync'd."""
    temp = folder / f".{name}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(temp, flags | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; the mode is never wider than this
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return temp


def fsync_folder(folder: Path) -> None:
    """Make the renames and removals in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        # Some file systems cannot fsync a folder; the renames are still atomic there.
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


if sys.platform == "win32":  # pragma: no cover - no flock: serialise this process only
    import threading

    _PROCESS_LOCK = threading.RLock()

    @contextlib.contextmanager
    def file_lock(path: Path, exclusive: bool) -> Iterator[None]:
        with _PROCESS_LOCK:
            yield

else:
    import fcntl
    import threading

    # POSIX record locks (lockf), not flock: a forked worker process does not inherit them, so
    # a fork while a thread of the parent holds the lock cannot leave it held for good. They
    # do not exclude threads of one process from each other: the thread lock does that.
    _THREADS = threading.Lock()

    def _fresh_lock_in_child() -> None:
        global _THREADS
        _THREADS = threading.Lock()  # the thread that held the parent's copy is not here

    os.register_at_fork(after_in_child=_fresh_lock_in_child)

    @contextlib.contextmanager
    def file_lock(path: Path, exclusive: bool) -> Iterator[None]:
        """Lock ``path`` against other processes (shared for readers, exclusive for writers)
        and against the other threads of this one."""
        with _THREADS:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _LOCK_MODE)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                yield
            finally:
                os.close(fd)
