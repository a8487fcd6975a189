"""qlora-jax: QLoRA fine-tuning in JAX, with 4-bit NF4 base weights stored exactly as bitsandbytes stores them.

The public API, importable from here (each name is imported from its module on first use, so `import qlora_jax`
itself loads neither JAX nor any checkpoint library):

- models: `load_pretrained`, `save_pretrained`, `read_model_config`, `ModelConfig`, `DecoderLM`, `ComputeOptions`,
  `KernelOptions`;
- 4-bit weights: `QuantConfig`, `QuantizedTensor`, `quantize`, `dequantize`, `decode_absmax`;
- adapters: `LoraConfig`, `LoRA`, `apply_lora`, `trainable_parameters`, `loftq_initialize`,
  `resize_token_embeddings` (added tokens);
- training: `OptimConfig`, `make_optimizer`, `TrainState`, `make_train_step`, `make_eval_step`, `TrainConfig`,
  `load_config` (the driver of `qlora-jax train` is `qlora_jax.train.train`);
- generation: `SamplingConfig`, `generate_text`, `load_tokenizer`;
- files out: `save_peft_adapter`, `load_peft_adapter`, `merge_and_save`, `save_gguf`.

Every file format has its module in `qlora_jax.convert`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["load_pretrained", "save_pretrained"], "qlora_jax.convert.hf"),
    **dict.fromkeys(["read_model_config", "ModelConfig", "DecoderLM", "ComputeOptions"], "qlora_jax.models"),
    "KernelOptions": "qlora_jax.kernels",
    **dict.fromkeys(["QuantConfig", "QuantizedTensor", "quantize", "dequantize", "decode_absmax"], "qlora_jax.quant"),
    **dict.fromkeys(["LoraConfig", "LoRA", "apply_lora", "trainable_parameters", "loftq_initialize"], "qlora_jax.lora"),
    **dict.fromkeys(["OptimConfig", "make_optimizer"], "qlora_jax.train.optim"),
    **dict.fromkeys(["TrainState", "make_train_step", "make_eval_step"], "qlora_jax.train.step"),
    **dict.fromkeys(["TrainConfig", "load_config"], "qlora_jax.train.config"),
    **dict.fromkeys(["SamplingConfig", "generate_text"], "qlora_jax.generate"),
    "load_tokenizer": "qlora_jax.tokenizer",
    **dict.fromkeys(["save_peft_adapter", "load_peft_adapter"], "qlora_jax.convert.peft"),
    "merge_and_save": "qlora_jax.convert.merge",
    "save_gguf": "qlora_jax.convert.gguf_export",
    "resize_token_embeddings": "qlora_jax.tokens",
}
__all__ = ["__version__", *_EXPORTS]  # tests/test_public_api.py ties _EXPORTS to the imports below and the docstring


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qlora_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # what static checkers and IDEs see (`X`: an explicit re-export)
    from qlora_jax.convert.gguf_export import save_gguf
    from qlora_jax.convert.hf import load_pretrained, save_pretrained
    from qlora_jax.convert.merge import merge_and_save
    from qlora_jax.convert.peft import load_peft_adapter, save_peft_adapter
    from qlora_jax.generate import SamplingConfig, generate_text
    from qlora_jax.kernels import KernelOptions
    from qlora_jax.lora import (
        LoRA,
        LoraConfig,
        apply_lora,
        loftq_initialize,
        trainable_parameters,
    )
    from qlora_jax.models import (
        ComputeOptions,
        DecoderLM,
        ModelConfig,
        read_model_config,
    )
    from qlora_jax.quant import (
        QuantConfig,
        QuantizedTensor,
        decode_absmax,
        dequantize,
        quantize,
    )
    from qlora_jax.tokenizer import load_tokenizer
    from qlora_jax.tokens import resize_token_embeddings
    from qlora_jax.train.config import TrainConfig, load_config
    from qlora_jax.train.optim import OptimConfig, make_optimizer
    from qlora_jax.train.step import (
        TrainState,
        make_eval_step,
        make_train_step,
    )
