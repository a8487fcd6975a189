"""The errors qlora_jax raises on purpose, under one base, so that a caller (the CLI, a user's script) can tell
them from bugs: `except QloraJaxError` catches every refused input or run, and nothing else.

Readers of files and configs raise `InputError` subclasses (also `ValueError`s, as they always were):
`CheckpointError` (safetensors / model directories), `GGUFError`, `BnbFormatError`, `PeftFormatError`,
`ConfigFieldError`, `DataError`, `UnsupportedModelError`. Their messages start with the file (and line, field or
tensor) they are about.
"""

from __future__ import annotations

__all__ = ["QloraJaxError", "InputError", "OutputError"]


class QloraJaxError(Exception):
    """Every error qlora_jax raises on purpose: bad input, a refused or stopped run. The message says what and
    where (file, field, tensor or line) and, where there is one, the way out."""


class InputError(QloraJaxError, ValueError):
    """An input that cannot be read or used: a file, a tensor in it, a config field, a data line."""


class OutputError(QloraJaxError):
    """An output that cannot be written (a full disk, no permission, a read-only file system); what was there
    before is as it was."""
