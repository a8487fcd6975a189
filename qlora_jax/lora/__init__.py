"""LoRA adapters with PEFT's configuration and maths: LoraConfig, apply_lora, DoRA, LoftQ.

One job per module:

- `config`: `LoraConfig`, PEFT's fields checked as PEFT checks them (also the YAML `lora` section);
- `targets`: which layers get an adapter, at which rank and alpha (PEFT's rules; `target_layers`);
- `layers`: the adapters themselves (`LoRA` with DoRA's magnitude, `ExpertLoRA`, `AdapterScaling`);
- `apply`: `apply_lora` (PEFT's initialization) and `trainable_parameters`;
- `loftq`: `loftq_initialize` (LoftQ's start: 4-bit weights and adapters fitted together).

A stacked module (a leading [num_layers] axis) holds its adapters for every layer, zero-padded to the largest rank,
with a per-layer scaling that is 0 where a layer has no adapter (docs/lora.md).
"""

from qlora_jax.lora.apply import apply_lora, trainable_parameters
from qlora_jax.lora.config import LoraConfig
from qlora_jax.lora.layers import AdapterScaling, ExpertLoRA, LoRA, dora_weight_norm
from qlora_jax.lora.loftq import loftq_initialize
from qlora_jax.lora.targets import target_layers, target_module_names

__all__ = [
    "LoraConfig",
    "LoRA",
    "AdapterScaling",
    "ExpertLoRA",
    "apply_lora",
    "trainable_parameters",
    "target_module_names",
    "target_layers",
    "loftq_initialize",
    "dora_weight_norm",
]
