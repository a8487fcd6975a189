"""One training process per run directory: a lock file that names its holder.

`RunLock(directory)` takes `directory/.lock` with `flock` (the kernel drops it when its process dies, however it
dies) and writes the holder's pid, host and start time into it. A second process is refused with those. A lock
file left by a process that is gone (killed: it never removed its file, but the kernel released its lock) is taken
over with one line saying so. A lock file written on another host is never taken over: flock may not reach across
hosts on every network filesystem, so whether that process lives cannot be told from here; the message says
which file to delete once it is known to be gone.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from qlora_jax.errors import QloraJaxError

__all__ = ["RunLock", "RunDirectoryLocked", "LOCK_FILE"]

LOCK_FILE = ".lock"


class RunDirectoryLocked(QloraJaxError, RuntimeError):
    """Another process holds (or may hold) the run directory."""


def _holder(text: str) -> dict:
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    since = f" since {holder['started']}" if holder.get("started") else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{since}"


class RunLock:
    """The lock of a run directory; `acquire()` (or `with RunLock(d):`) creates the directory if needed.

    `taken_over`: after `acquire`, a description of the dead holder whose stale lock was taken over, else None.
    """

    def __init__(self, directory: str | os.PathLike, *, what: str = "train.output_dir"):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.what = what
        self.taken_over: str | None = None
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Takes the lock or raises RunDirectoryLocked naming the holder; prints one line if it takes over a lock
        left by a killed process."""
        self.directory.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(os.read(fd, 4096).decode("utf-8", "replace"))
                os.close(fd)
                raise RunDirectoryLocked(
                    f"{self.what} {self.directory} is in use by another training ({_describe(holder)}); wait for it "
                    f"to finish, or use another {self.what}"
                ) from None
            # The file we locked may have been released (removed) by its holder since we opened it: lock the
            # file that is there now.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = _holder(os.read(fd, 4096).decode("utf-8", "replace"))
        if holder and holder.get("host") != host:
            os.close(fd)
            raise RunDirectoryLocked(
                f"{self.what} {self.directory} is locked by {_describe(holder)}, which cannot be checked from host "
                f"{host}; if no training runs there any more, delete {self.path}"
            )
        if holder:
            self.taken_over = _describe(holder)
            print(f"{self.path}: taking over the lock left by {self.taken_over}, which is gone (killed?)")
        record = {"pid": os.getpid(), "host": host, "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Removes the lock file, then lets go of the lock (so no one can lock the removed file and think it is
        the current one: `acquire` checks)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
