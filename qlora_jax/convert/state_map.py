"""The map between a DecoderLM's variables and transformers' tensor names.

Module names mirror transformers', so the map is mechanical: a variable at path
("model", "layers", "self_attn", "q_proj", "packed") belongs to the tensors `model.layers.{i}.self_attn.q_proj.weight`
for every layer i (the layers are stacked on a leading axis: `qlora_jax.models.names`), and the buffers of a 4-bit
weight (`qlora_jax.quant.QUANT_BUFFERS`) all come from (and go to) that one `.weight`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from flax import nnx

from qlora_jax.models.moe import QExperts
from qlora_jax.models.names import is_stacked, layer_name, split_layer_name
from qlora_jax.nn import QLinear, QuantizedWeight
from qlora_jax.quant import QUANT_BUFFERS

__all__ = ["Slot", "model_slots", "resolve", "all_keys", "variable_at"]


@dataclasses.dataclass(frozen=True)
class Slot:
    """One transformers tensor name (per layer, for stacked variables) and where it lives in the model.

    name: the HF name; for a stacked variable without the layer index ("model.layers.mlp.up_proj.weight", whose
      layer 3 is `key(3)`: "model.layers.3.mlp.up_proj.weight").
    paths: the state paths it fills: one for a dense tensor, the buffers of a 4-bit weight otherwise.
    shape: the tensor's shape in the checkpoint (one layer's); quantized: whether it is a 4-bit QLinear weight.
    """

    name: str
    paths: tuple[tuple[str, ...], ...]
    shape: tuple[int, ...]
    stacked: bool
    quantized: bool
    module_path: tuple[str, ...]

    def key(self, layer: int | None) -> str:
        return layer_name(self.name, layer) if self.stacked else self.name


def _hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    return ".".join(path), is_stacked(path)


def model_slots(model: nnx.Module) -> dict[str, Slot]:
    """Every tensor name the model reads or writes (stacked ones without their layer index), excluding LoRA
    adapters and a mixture of experts' expert weights (one checkpoint tensor per expert: `convert.moe_io`)."""
    slots: dict[str, Slot] = {}
    experts = tuple(tuple(str(p) for p in path) for path, m in nnx.iter_graph(model) if isinstance(m, QExperts))
    for module_path, module in nnx.iter_graph(model):
        if not isinstance(module, QLinear) or not module.is_quantized:
            continue
        name, stacked = _hf_name(tuple(str(p) for p in module_path) + ("weight",))
        paths = tuple(
            tuple(str(p) for p in module_path) + (b,) for b in QUANT_BUFFERS if getattr(module, b) is not None
        )
        shape = (module.out_features, module.in_features)
        slots[name] = Slot(name, paths, shape, stacked, True, tuple(str(p) for p in module_path))
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        path = tuple(str(p) for p in path)
        if isinstance(variable, QuantizedWeight | nnx.LoRAParam) or "lora" in path or path[:-1] in experts:
            continue
        name, stacked = _hf_name(path)
        shape = tuple(variable.get_value().shape)
        slots[name] = Slot(name, (path,), shape[1:] if stacked else shape, stacked, False, path[:-1])
    return slots


def resolve(key: str, slots: dict[str, Slot], num_layers: int) -> tuple[Slot, int | None] | None:
    """The slot and layer index of a transformers tensor name, or None if the model has no such tensor."""
    name, layer = split_layer_name(key)
    slot = slots.get(name)
    if slot is None or slot.stacked != (layer is not None) or (layer is not None and layer >= num_layers):
        return None
    return slot, layer


def all_keys(slots: dict[str, Slot], num_layers: int) -> Iterator[tuple[str, Slot, int | None]]:
    """Every concrete tensor name, layer by layer (the order a streaming writer wants)."""
    flat = [s for s in slots.values() if not s.stacked]
    stacked = [s for s in slots.values() if s.stacked]
    for slot in flat:
        if slot.name.startswith("model.embed_tokens"):
            yield slot.key(None), slot, None
    for layer in range(num_layers):
        for slot in stacked:
            yield slot.key(layer), slot, layer
    for slot in flat:
        if not slot.name.startswith("model.embed_tokens"):
            yield slot.key(None), slot, None


def variable_at(model: nnx.Module, path: tuple[str, ...]) -> Any:
    node: Any = model
    for part in path:
        node = getattr(node, part)
    return node
