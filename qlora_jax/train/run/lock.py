"""One training process per run directory: a lock file that names its holder.

`RunLock(directory)` takes `directory/.lock` with `flock` (the kernel drops it when its process dies, however it
dies) and writes the holder's pid, host and start time into it; while held, a thread touches the file every
`HEARTBEAT_S` seconds (its modification time is the holder's heartbeat). A second process is refused with those.
A lock file left by a process that is gone (killed: it never removed its file, but the kernel released its lock)
is taken over with one line saying so. A lock file written on another host cannot be checked from here (flock
may not reach across hosts on every network file system): it is taken over, with one line, once its heartbeat
has stopped for `STALE_AFTER_S` seconds, or at once with `break_lock=True` (`qlora-jax train --break-lock`), for
when that process is known to be gone.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

from qlora_jax.errors import QloraJaxError

__all__ = ["RunLock", "RunDirectoryLocked", "LOCK_FILE"]

LOCK_FILE = ".lock"
HEARTBEAT_S = 60.0  # how often the holder touches its lock file
STALE_AFTER_S = 600.0  # a lock of another host whose heartbeat stopped this long ago is taken over


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
    `break_lock`: take over a lock of another host even if its heartbeat is recent (its process is known gone).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        what: str = "train.output_dir",
        break_lock: bool = False,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
    ):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.what = what
        self.break_lock = break_lock
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.taken_over: str | None = None
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None

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
        why = "which is gone (killed?)"
        if holder and holder.get("host") != host:
            silent = time.time() - os.fstat(fd).st_mtime  # seconds since its last heartbeat
            if self.break_lock:
                why = f"on another host, broken as asked (--break-lock; last heartbeat {silent:.0f} s ago)"
            elif silent > self.stale_after_s:
                why = f"whose heartbeat stopped {silent / 60:.0f} minutes ago"
            else:
                os.close(fd)
                raise RunDirectoryLocked(
                    f"{self.what} {self.directory} is locked by {_describe(holder)} (last heartbeat {silent:.0f} s "
                    f"ago), which cannot be checked from host {host}; if no training runs there any more, run "
                    f"again with --break-lock (a lock whose heartbeat stops for {self.stale_after_s / 60:.0f} "
                    "minutes is taken over by itself)"
                )
        if holder:
            self.taken_over = _describe(holder)
            print(f"{self.path}: taking over the lock left by {self.taken_over}, {why}")
        record = {"pid": os.getpid(), "host": host, "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        self._stop.clear()
        self._beating = threading.Thread(target=self._heartbeat, name="qlora_jax lock heartbeat", daemon=True)
        self._beating.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            fd = self._fd
            if fd is None:
                return
            try:
                os.utime(fd)
            except OSError:  # released meanwhile, or a file system that refuses: the next beat tries again
                pass

    def release(self) -> None:
        """Removes the lock file, then lets go of the lock (so no one can lock the removed file and think it is
        the current one: `acquire` checks)."""
        if self._fd is None:
            return
        self._stop.set()
        if self._beating is not None:
            self._beating.join()
            self._beating = None
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
