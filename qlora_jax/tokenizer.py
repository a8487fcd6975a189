"""Tokenizers and chat templates, through transformers' AutoTokenizer (no torch needed), also from GGUF files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["load_tokenizer"]


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer of a model directory (tokenizer.json, tokenizer_config.json, chat template) or of a GGUF file
    (transformers rebuilds it, with its chat template, from the GGUF metadata)."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        if path.is_file():
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: cannot load a tokenizer ({type(e).__name__}: {e})") from e
