"""Writing outputs so that no reader (and no crash) ever sees half of one.

A file is written beside its final name and moved over it with `os.replace` (`write_text`, `write_bytes`). A
directory is written whole in a staging directory beside it (`staged_directory`): a new one then appears by one
rename; into an existing one, each finished file is moved with `os.replace`, so every file is either the old one
or the new one, and files of the directory that the new output does not have are left as they were (unless
named in `replaces`). `check_output_directory` / `check_output_file` refuse an output path of the wrong kind
before any work is done.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from qlora_jax.errors import InputError

__all__ = ["write_text", "write_bytes", "staged_directory", "check_output_directory", "check_output_file"]


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` atomically (a temporary file beside it, flushed, then `os.replace`)."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
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


@contextlib.contextmanager
def staged_directory(final: str | os.PathLike, *, replaces: Iterable[str] = ()) -> Iterator[Path]:
    """A fresh staging directory to write the output `final` into; when the block ends without an error it is
    published: renamed to `final` if there is none, else its files are moved into `final` one `os.replace` each
    (and `final`'s files named in `replaces` that the new output lacks are removed: another layout of the same
    output). On an error the staging directory is removed and `final` is as it was."""
    final = check_output_directory(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield staging
        for path in staging.rglob("*"):
            if path.is_file():
                os.chmod(path, 0o644)
        try:
            os.rename(staging, final)  # fails if `final` exists (as a non-empty directory)
            os.chmod(final, 0o755)
            return
        except OSError:
            if not final.is_dir():
                raise
        new = {p.relative_to(staging) for p in staging.rglob("*") if not p.is_dir()}
        for name in replaces:
            for old in final.glob(name):
                if old.is_file() and old.relative_to(final) not in new:
                    old.unlink()
        for relative in sorted(new):
            (final / relative).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / relative, final / relative)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
