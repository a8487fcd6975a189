"""Checksums of what qlora_jax writes, verified when it is read back: a flipped byte is an error naming the file.

- safetensors files we write (adapters, merged and converted checkpoints) carry the SHA-256 of every tensor's
  bytes in their own header, under the metadata key `qlora_jax.sha256` (a JSON object: tensor name -> hex digest),
  so the checksum travels with the file; readers check each tensor as they read it (`check_tensor`). Files
  without the key (written by anything else) are read as they are.
- GGUF files we export carry the SHA-256 of their tensor data (everything after the header) under the metadata
  key `qlora_jax.tensor_data.sha256`, written into the header in place once the data is written
  (`seal_gguf`); `read_gguf` checks it (`check_gguf`).
- directories (a checkpoint step) get a manifest file listing each file's size and SHA-256 (`write_manifest`);
  `verify_manifest` re-reads them all.

SHA-256 (hashlib, about 1 GB/s here) detects any accidental change; it is not a signature.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qlora_jax import files
from qlora_jax.errors import InputError

__all__ = [
    "CHECKSUM_KEY",
    "IntegrityError",
    "tensor_sha256",
    "file_sha256",
    "GGUF_CHECKSUM_KEY",
    "seal_gguf",
    "check_gguf",
    "checksummed_metadata",
    "check_tensor",
    "write_manifest",
    "read_manifest",
    "verify_manifest",
]

CHECKSUM_KEY = "qlora_jax.sha256"  # safetensors metadata: {tensor name: SHA-256 of its bytes}, as JSON text
GGUF_CHECKSUM_KEY = "qlora_jax.tensor_data.sha256"  # GGUF metadata: SHA-256 of the file from its tensor data on
GGUF_PENDING = "0" * 64  # written first (the header precedes the data), replaced once the data is written
_CHUNK = 1 << 24


class IntegrityError(InputError):
    """A file we wrote no longer holds what we wrote (its checksum differs): damaged on disk or in transit."""


def tensor_sha256(array: np.ndarray) -> str:
    """The SHA-256 of an array's bytes (C order, as safetensors stores them), whatever its dtype."""
    data = np.ascontiguousarray(array)
    return hashlib.sha256(data.reshape(-1).view(np.uint8)).hexdigest()


def file_sha256(path: str | os.PathLike, start: int = 0) -> str:
    """The SHA-256 of a file's bytes from offset `start` to its end."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def seal_gguf(path: str | os.PathLike, data_offset: int) -> None:
    """Writes the SHA-256 of the GGUF file's tensor data (from `data_offset`) over the GGUF_PENDING value of its
    GGUF_CHECKSUM_KEY field, in place (same length: no offset moves), and syncs the file."""
    digest = file_sha256(path, data_offset)
    with open(path, "r+b") as f:
        header = f.read(data_offset)
        at = header.find(GGUF_CHECKSUM_KEY.encode())
        value = header.find(GGUF_PENDING.encode(), at) if at >= 0 else -1
        if value < 0:
            raise ValueError(f"{path}: no {GGUF_CHECKSUM_KEY} field to seal")
        f.seek(value)
        f.write(digest.encode())
        f.flush()
        os.fsync(f.fileno())


def check_gguf(path: str | os.PathLike, recorded: str | None, data_offset: int) -> None:
    """IntegrityError naming the file if its tensor data's SHA-256 differs from `recorded` (the field's value;
    None: not written by us, nothing to check)."""
    if recorded is None:
        return
    if recorded == GGUF_PENDING or file_sha256(path, data_offset) != recorded:
        raise IntegrityError(
            f"{path}: its tensor data does not match the checksum recorded when it was written "
            f"({GGUF_CHECKSUM_KEY}): the file is damaged or incomplete"
        )


def checksummed_metadata(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> dict[str, str]:
    """`metadata` (a safetensors header's) with the checksum of every tensor added under CHECKSUM_KEY."""
    sums = {name: tensor_sha256(array) for name, array in tensors.items()}
    return {**(metadata or {}), CHECKSUM_KEY: json.dumps(sums, sort_keys=True)}


def stored_checksums(metadata: Mapping[str, str] | None, path: str | os.PathLike) -> dict[str, str] | None:
    """The checksums a safetensors header records (None: the file has none); IntegrityError if unreadable."""
    if not metadata or CHECKSUM_KEY not in metadata:
        return None
    try:
        sums = json.loads(metadata[CHECKSUM_KEY])
    except ValueError:
        sums = None
    if not isinstance(sums, dict):
        raise IntegrityError(
            f"{path}: the checksums in its header ({CHECKSUM_KEY}) cannot be read: the file is damaged"
        )
    return sums


def check_tensor(path: str | os.PathLike, key: str, array: np.ndarray, sums: Mapping[str, str] | None) -> None:
    """Raises IntegrityError naming the file and tensor if `array` (as read from `path`) differs from the bytes
    whose checksum `sums` (`stored_checksums`) records; nothing to check if `sums` is None."""
    if sums is None:
        return
    expected = sums.get(key)
    if expected is None:
        raise IntegrityError(
            f"{path}: tensor {key} has no checksum in its header although the others do: the "
            "file is damaged or was changed after it was written"
        )
    if tensor_sha256(array) != expected:
        raise IntegrityError(
            f"{path}: tensor {key} does not match the checksum recorded when the file was written "
            "(a changed byte: the file is damaged); write it again from its source"
        )


def write_manifest(directory: str | os.PathLike, name: str, info: Mapping[str, Any]) -> Path:
    """Writes `directory/name` (atomically): `info` plus {"files": {relative path: {"bytes", "sha256"}}} for every
    file under `directory` but the manifest itself."""
    directory = Path(directory)
    listed = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != name:
            listed[str(path.relative_to(directory))] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return files.write_text(directory / name, json.dumps({**info, "files": listed}, indent=1))


def read_manifest(directory: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """The manifest `directory/name`, or None if there is none or it cannot be read."""
    try:
        manifest = json.loads((Path(directory) / name).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def verify_manifest(directory: str | os.PathLike, name: str) -> None:
    """Re-reads every file the manifest lists; IntegrityError naming the first that is missing, has another size,
    or another SHA-256."""
    directory = Path(directory)
    manifest = read_manifest(directory, name)
    if manifest is None:
        raise IntegrityError(f"{directory / name}: missing or unreadable: the checkpoint cannot be verified")
    for relative, expected in manifest["files"].items():
        path = directory / relative
        try:
            size = path.stat().st_size
        except OSError:
            raise IntegrityError(f"{path}: listed in {name} but missing: the checkpoint is damaged") from None
        if size != expected.get("bytes") or file_sha256(path) != expected.get("sha256"):
            raise IntegrityError(
                f"{path}: does not match the checksum recorded when it was saved ({name}): the file is damaged"
            )
