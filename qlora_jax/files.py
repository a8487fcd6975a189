"""Writing outputs so that no reader (and no crash) ever sees half of one.

A file is written beside its final name and moved over it with `os.replace` (`write_text`, `write_bytes`). A
directory is written whole in a staging directory beside it (`staged_directory`) and published in one atomic
step: renamed to its final name if there is none, else exchanged with the existing directory in one
`renameat2(RENAME_EXCHANGE)` (Linux), after the files of the old directory that the new one does not replace have
been linked into it. So at every moment the final path names the old directory whole or the new one whole, never
a mix; a crash leaves one of them. Where the kernel cannot exchange, the old directory is renamed aside and the new
one into place (a crash between the two renames leaves no directory at the final path, which the next publish or
`clean_partials` puts back: still never a mix).

Temporaries are named `.<name>.<host>-<pid>-<random>.partial` beside their output: a temporary whose process is
gone (same host) is a leftover of a crash, removed by the next write of that output (`clean_partials`).
`check_output_directory` / `check_output_file` refuse an output path of the wrong kind before any work is done,
`check_writable` one that cannot be written.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from qlora_jax.errors import InputError, OutputError

__all__ = [
    "write_text",
    "write_bytes",
    "staged_directory",
    "publish_directory",
    "clean_partials",
    "check_output_directory",
    "check_output_file",
    "check_writable",
    "output_error",
    "PARTIAL",
]

PARTIAL = ".partial"  # the suffix of every temporary this module creates


def _host() -> str:
    return socket.gethostname().replace("/", "_")


def _temporary_prefix(path: Path) -> str:
    """`.<name>.<host>-<pid>-`: whose temporary it is (`clean_partials` removes those of dead processes)."""
    return f".{path.name}.{_host()}-{os.getpid()}-"


def _is_leftover(temporary: Path, final: Path) -> bool:
    """Whether `temporary` (beside `final`) is one of ours whose process is gone (on this host)."""
    name = temporary.name
    prefix = f".{final.name}.{_host()}-"
    if not (name.startswith(prefix) and name.endswith(PARTIAL)):
        return False
    pid = name[len(prefix) :].split("-", 1)[0]
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def clean_partials(final: str | os.PathLike) -> list[Path]:
    """Removes the temporaries that crashed writes of `final` left beside it (those of processes that are gone,
    on this host), and puts back a directory that a crash left renamed aside (`publish_directory`'s fallback).
    Returns what was removed."""
    final = Path(final)
    parent = final.parent
    if not parent.is_dir():
        return []
    removed = []
    for temporary in sorted(parent.glob(f".{final.name}.*{PARTIAL}")):
        if not _is_leftover(temporary, final):
            continue
        if temporary.name.endswith(f"-old{PARTIAL}") and not final.exists() and temporary.is_dir():
            os.rename(temporary, final)  # the old directory, renamed aside by a publish that crashed midway
            continue
        if temporary.is_dir() and not temporary.is_symlink():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)
        removed.append(temporary)
    return removed


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` atomically (a temporary file beside it, flushed, then `os.replace`)."""
    path = Path(path)
    clean_partials(path)
    fd, temp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=PARTIAL, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException as e:
        Path(temp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise output_error(e, path, "the file") from e
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes `text` (UTF-8) to `path` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def _parents_are_directories(path: Path) -> Path:
    """`path`, after checking that its nearest existing ancestor is a directory (InputError otherwise)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{path}: {parent} is a file, not a directory")
            break
    return path


def check_output_directory(path: str | os.PathLike, what: str = "the output") -> Path:
    """`path` as a directory to write: refused (InputError) if it exists and is not a directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: {what} is an existing file, not a directory; give a directory")
    return _parents_are_directories(path)


def check_output_file(path: str | os.PathLike, what: str = "the output") -> Path:
    """`path` as a file to write: refused (InputError) if it is an existing directory."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: {what} is an existing directory; give a file name")
    return _parents_are_directories(path)


def check_writable(path: str | os.PathLike, what: str = "the output") -> Path:
    """`path` (a file or directory to write) after checking that a file can be created where it goes: in the
    directory itself if it exists, else in its nearest existing ancestor. InputError naming `what` otherwise
    (read-only file system, no permission): run it before any slow work."""
    path = Path(path)
    where = path if path.is_dir() else next((p for p in path.parents if p.exists()), Path("."))
    try:
        fd, probe = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=PARTIAL, dir=where)
    except OSError as e:
        raise InputError(f"{path}: {what} cannot be written ({where}: {e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)
    return path


_OS_WORDS = tuple(
    os.strerror(e) for e in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG, errno.EIO)
)


def output_error(error: BaseException, path: str | os.PathLike, what: str = "the output") -> OutputError:
    """One line for a failed write of `path` whatever raised it: an OSError (its errno's words), safetensors'
    writer (`SafetensorError`, which wraps the OS error in Rust's debug format), numpy's `tofile` (an OSError
    without errno: "N requested and M written"). A disk that is full (or nearly) is said so."""
    text = str(error)
    reason = getattr(error, "strerror", None)
    if reason is None:  # the OS's words inside a library's message (safetensors: IoError(Os { .. message: ".." }))
        reason = next((words for words in _OS_WORDS if words.lower() in text.lower()), None)
    if reason is None:
        reason = text.strip().splitlines()[0][:200] if text.strip() else type(error).__name__
    path = Path(path)
    where = next((p for p in [path, *path.parents] if p.is_dir()), None)
    if where is not None and os.strerror(errno.ENOSPC) not in reason:
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            free = None
        if free is not None and free < 64 * 2**20:  # numpy's "N requested and M written": the disk filled up
            reason = f"{os.strerror(errno.ENOSPC)}: {free // 2**20} MiB free in {where}; {reason}"
    return OutputError(f"{path}: cannot write {what} ({reason}); what was there before is unchanged")


# -------------------------------------------------------------------------------------------- publishing


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swaps the directories `a` and `b` in one atomic step (Linux renameat2 with RENAME_EXCHANGE). False where
    the kernel, the C library or the file system cannot; OSError for other failures."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without it (glibc < 2.28, musl < 1.2.3?)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(b))


def _carry_over(old: Path, new: Path, replaces: Iterable[str]) -> None:
    """Links (or copies) into `new` the files of `old` that `new` does not have and `replaces` does not name:
    the published directory keeps what it held beside this output (a user's README, another output's files)."""
    replaced = {p.relative_to(old) for name in replaces for p in old.glob(name)}
    for path in sorted(old.rglob("*")):
        relative = path.relative_to(old)
        target = new / relative
        if path.is_dir() and not path.is_symlink() or target.exists() or target.is_symlink() or relative in replaced:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            os.symlink(os.readlink(path), target)
            continue
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def publish_directory(staging: str | os.PathLike, final: str | os.PathLike, *, replaces: Iterable[str] = ()) -> Path:
    """Makes the complete directory `staging` (beside `final`) the directory `final`, in one atomic step (module
    docstring). Files of an existing `final` that `staging` lacks are kept, unless named by a glob in
    `replaces` (another layout of the same output). `staging` is left holding the old directory (or nothing):
    the caller removes it."""
    staging, final = Path(staging), Path(final)
    for path in [staging, *staging.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
    try:
        os.rename(staging, final)  # no `final` yet (or an empty one): one rename
        return final
    except OSError:
        if not final.is_dir():
            raise
    _carry_over(final, staging, replaces)
    if _exchange(staging, final):
        return final
    aside = final.with_name(f"{_temporary_prefix(final)}{uuid.uuid4().hex[:8]}-old{PARTIAL}")
    os.rename(final, aside)
    os.rename(staging, final)
    os.rename(aside, staging)  # where the caller removes it
    return final


@contextlib.contextmanager
def staged_directory(final: str | os.PathLike, *, replaces: Iterable[str] = ()) -> Iterator[Path]:
    """A fresh staging directory to write the output `final` into; when the block ends without an error it is
    published (`publish_directory`: the old directory whole or the new one whole, at every moment). On an error
    the staging directory is removed and `final` is as it was. A symlink `final` stays a link: the directory it
    points to is replaced. Leftovers of crashed writes of `final` are removed first."""
    final = check_output_directory(final)
    if final.is_symlink():
        final = final.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_partials(final)
    staging = Path(tempfile.mkdtemp(prefix=_temporary_prefix(final), suffix=PARTIAL, dir=final.parent))
    try:
        yield staging
        publish_directory(staging, final, replaces=replaces)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
