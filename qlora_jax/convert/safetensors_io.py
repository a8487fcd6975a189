"""Reading and writing (sharded) safetensors checkpoints, one tensor at a time, with errors that name the file.

Reading never holds more than one tensor in memory (files are memory-mapped); writing fills one shard at a time
and moves the finished files into place only at the end (`qlora_jax.files.staged_directory`), so an interrupted
write leaves an existing checkpoint in the directory untouched. A tensor with NaN or Inf is refused both ways,
naming the file (or the output) and the tensor. Every file written records its tensors' SHA-256 in its header
(`qlora_jax.integrity`), checked as each tensor is read back: a changed byte is an error naming file and tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from qlora_jax.convert.finite import non_finite
from qlora_jax.errors import InputError
from qlora_jax.files import output_error, staged_directory
from qlora_jax.integrity import check_tensor, checksummed_metadata, stored_checksums

__all__ = ["CheckpointError", "SafetensorsReader", "write_sharded", "parse_size", "LAYOUT_FILES"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The files of a checkpoint's weights, in either layout: a new checkpoint written over an old one replaces them all.
LAYOUT_FILES = (SINGLE_FILE, INDEX_FILE, "model-*-of-*.safetensors")


class CheckpointError(InputError):
    """A checkpoint file is missing, unreadable, truncated, or holds an unexpected tensor."""


class SafetensorsReader:
    """The tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.name = str(self.directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            if not isinstance(weight_map, dict) or not all(
                isinstance(name, str) and name and Path(name).name == name and name not in (".", "..")
                for name in weight_map.values()
            ):
                raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names in {directory}")
            self.files = sorted(set(weight_map.values()))
            self._expected = dict(weight_map)
        elif (self.directory / SINGLE_FILE).is_file():
            self.files, self._expected = [SINGLE_FILE], None
        else:
            raise CheckpointError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}")
        for name in self.files:
            if not (self.directory / name).is_file():
                raise CheckpointError(f"{self.directory / name}: shard listed in {INDEX_FILE} is missing")
        self._locations: dict[str, str] = {}
        self._checksums: dict[str, dict[str, str] | None] = {}
        for name in self.files:
            with self._open(name) as f:
                self._checksums[name] = stored_checksums(f.metadata(), self.directory / name)
                for key in f.keys():
                    if key in self._locations:
                        raise CheckpointError(f"{self.directory / name}: tensor {key} also in {self._locations[key]}")
                    self._locations[key] = name
        if self._expected is not None:
            for key, name in self._expected.items():
                if self._locations.get(key) != name:
                    raise CheckpointError(f"{self.directory / name}: tensor {key} listed in {INDEX_FILE} is missing")

    def _open(self, name: str):
        path = self.directory / name
        try:
            return safe_open(str(path), framework="numpy")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e

    def keys(self) -> list[str]:
        return list(self._locations)

    def file_of(self, key: str) -> Path:
        return self.directory / self._locations[key]

    def shape_and_dtype(self, key: str) -> tuple[tuple[int, ...], str]:
        with self._open(self._locations[key]) as f:
            view = f.get_slice(key)
            return tuple(view.get_shape()), view.get_dtype()

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape the file's header claims for `key` (nothing is read)."""
        return self.shape_and_dtype(key)[0]

    def tensor(self, key: str, *, check_finite: bool = True) -> np.ndarray:
        """One tensor, checked against its recorded checksum; a NaN or Inf in a floating-point one is an error unless
        not `check_finite` (bytes that only borrow a float dtype: bitsandbytes' packed 4-bit codes in a float
        `bnb_4bit_quant_storage`)."""
        if key not in self._locations:
            raise CheckpointError(f"{self.directory}: no tensor {key}")
        with self._open(self._locations[key]) as f:
            return self._read(f, key, self._locations[key], check_finite=check_finite)

    def _read(self, f, key: str, name: str, *, check_finite: bool = True) -> np.ndarray:
        path = self.directory / name
        try:
            array = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError, TypeError, AttributeError) as e:  # AttributeError: a dtype
            raise CheckpointError(f"{path}: cannot read tensor {key} ({e})") from e  # numpy lacks (F8_E4M3, ...)
        check_tensor(path, key, array, self._checksums[name])
        if check_finite and (problem := non_finite(array)):
            raise CheckpointError(f"{path}: tensor {key} {problem}")
        return array

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(key, array) for every tensor, file by file, one in memory at a time."""
        for name in self.files:
            with self._open(name) as f:
                for key in f.keys():
                    yield key, self._read(f, key, name)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "2GiB"."""
    if isinstance(size, int):
        return size
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    text = size.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def write_sharded(
    directory: str | os.PathLike,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    max_shard_size: int | str = "5GB",
    extra_files: dict[str, str] | None = None,
) -> list[Path]:
    """Writes tensors as transformers does: one `model.safetensors`, or shards plus an index past max_shard_size.

    Tensors stream in; at most one shard is held in memory. `extra_files` (name -> text, e.g. config.json) are
    written too. Everything is written to a staging directory first and moved into `directory` at the end, where
    it replaces a previous checkpoint's files of either layout. A tensor with NaN or Inf raises CheckpointError
    naming it, and nothing is written.
    """
    directory = Path(directory)
    limit = parse_size(max_shard_size)
    try:
        return _write_sharded(directory, tensors, limit, extra_files)
    except (SafetensorError, OSError) as e:  # a full disk, no permission: one line, the old checkpoint unchanged
        raise output_error(e, directory, "the checkpoint") from e


def _write_sharded(
    directory: Path, tensors: Iterable[tuple[str, np.ndarray]], limit: int, extra_files: dict[str, str] | None
) -> list[Path]:
    with staged_directory(directory, replaces=LAYOUT_FILES) as staging:
        shards: list[tuple[str, list[str]]] = []
        current: dict[str, np.ndarray] = {}
        current_size, total_size = 0, 0

        def flush() -> None:
            nonlocal current, current_size
            if current:
                name = f"part-{len(shards):05d}.safetensors"
                save_file(current, str(staging / name), metadata=checksummed_metadata(current, {"format": "pt"}))
                shards.append((name, list(current)))
                current, current_size = {}, 0

        for key, array in tensors:
            array = np.ascontiguousarray(array)
            if problem := non_finite(array):
                raise CheckpointError(f"{directory}: tensor {key} {problem}; nothing was written")
            if current and current_size + array.nbytes > limit:
                flush()
            current[key] = array
            current_size += array.nbytes
            total_size += array.nbytes
        flush()
        if not shards:
            raise ValueError("no tensors to write")
        final_names = (
            [SINGLE_FILE]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        for (temp, _), final in zip(shards, final_names, strict=True):
            (staging / temp).rename(staging / final)
        if len(shards) > 1:
            weight_map = {key: final for (_, keys), final in zip(shards, final_names, strict=True) for key in keys}
            index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2))
            final_names.append(INDEX_FILE)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
            final_names.append(name)
    return [directory / name for name in final_names]
