"""Every file format in and out, one module a format:

- `hf`: transformers checkpoints (safetensors, sharded; bitsandbytes 4-bit; GGUF read through `gguf`):
  `load_pretrained`, `save_pretrained`, `tensor_source`;
- `bnb`: bitsandbytes 4-bit tensors in state dicts (`to_state_dict`, `from_state_dict`, ...);
- `gguf`, `gguf_export`, `gguf_tokenizer`: llama.cpp's GGUF: `read_gguf`, `save_gguf`;
- `peft`: PEFT adapters: `save_peft_adapter`, `load_peft_adapter`;
- `merge`: adapters folded into the base: `merge_and_save`, `merged_tensors`;
- `safetensors_io`: sharded safetensors reading and writing; `state_map`: our variables <-> transformers' names.

The loaders and savers are importable from here (`from qlora_jax.convert import load_pretrained`), each imported
from its module on first use. A model's configuration alone: `qlora_jax.models.read_model_config`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "CheckpointError",
    "GGUFError",
    "PeftFormatError",
    "load_pretrained",
    "save_pretrained",
    "tensor_source",
    "read_gguf",
    "save_gguf",
    "load_peft_adapter",
    "save_peft_adapter",
    "merge_and_save",
    "merged_tensors",
]

# public name -> the module of this package that defines it
_EXPORTS = {
    **dict.fromkeys(["CheckpointError", "load_pretrained", "save_pretrained", "tensor_source"], "hf"),
    **dict.fromkeys(["GGUFError", "read_gguf"], "gguf"),
    "save_gguf": "gguf_export",
    **dict.fromkeys(["PeftFormatError", "load_peft_adapter", "save_peft_adapter"], "peft"),
    **dict.fromkeys(["merge_and_save", "merged_tensors"], "merge"),
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qlora_jax.convert' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from qlora_jax.convert.gguf import GGUFError, read_gguf
    from qlora_jax.convert.gguf_export import save_gguf
    from qlora_jax.convert.hf import CheckpointError, load_pretrained, save_pretrained, tensor_source
    from qlora_jax.convert.merge import merge_and_save, merged_tensors
    from qlora_jax.convert.peft import PeftFormatError, load_peft_adapter, save_peft_adapter
