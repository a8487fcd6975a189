"""A mixture of experts' tensors in checkpoints: the names and layouts of Qwen3-MoE and Mixtral experts, both ways.

Checkpoints hold the experts in one of two layouts (transformers 5, `conversion_mapping.py`):

- per expert, as published and as transformers 5's `save_pretrained` writes them:
  `model.layers.L.mlp.experts.E.{gate_proj,up_proj,down_proj}.weight` (qwen3_moe) and
  `model.layers.L.block_sparse_moe.experts.E.{w1,w3,w2}.weight` (mixtral; `block_sparse_moe.gate.weight` is
  its router), each [out, in] like an nn.Linear; in bitsandbytes 4-bit checkpoints of transformers 4, each a 4-bit
  tensor with its statistics;
- fused, as transformers 5 holds them in memory: `model.layers.L.mlp.experts.gate_up_proj` [E, 2 I, H] (gate rows,
  then up rows: `Concatenate(dim=1)` of the per-expert w1 / gate_proj and w3 / up_proj) and
  `model.layers.L.mlp.experts.down_proj` [E, H, I]; no transposes.

Both land in the model's `QExperts` one (expert, part) [out, in] piece at a time, quantized as it arrives (or a
bitsandbytes piece copied as it is), so host memory holds one piece in 16 bits. Writing uses the per-expert names
(what transformers 5 writes and loads); experts are written in 16 bits even in a 4-bit checkpoint, as transformers 5
with bitsandbytes stores them (its integration quantizes nn.Linear layers only; a 4-bit expert does not load).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.models import ModelConfig
from qlora_jax.models.moe import QExperts
from qlora_jax.models.moe_config import EXPERT_NAMES
from qlora_jax.models.names import LAYERS
from qlora_jax.quant import QUANT_BUFFERS, QuantConfig, QuantizedTensor, dequantize, quantize

__all__ = [
    "ExpertSlot",
    "ExpertKey",
    "expert_slots",
    "our_name",
    "checkpoint_name",
    "expert_key",
    "fill_expert",
    "missing_pieces",
    "expert_tensors",
    "expert_modules",
    "layer_module",
    "PROJECTIONS",
]

PROJECTIONS = ("gate_up_proj", "down_proj")  # transformers 5's parameters of `mlp.experts`
_OURS = "mlp"  # transformers 5's (and our) name of the block
# One part of every expert stacked [E, out, in] (how GGUF stores them): (projection, part)
_ONE_PART = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0)}
_LAYER = re.compile(rf"^{re.escape(LAYERS)}\.(0|[1-9][0-9]*)\.(.+)$")


@dataclasses.dataclass(frozen=True)
class ExpertSlot:
    """A model's QExperts module: where its variables are, and one piece's shape."""

    projection: str  # "gate_up_proj" | "down_proj"
    module_path: tuple[str, ...]
    paths: tuple[tuple[str, ...], ...]  # the 4-bit buffers, or the dense weight
    quantized: bool
    num_experts: int
    parts: int
    shape: tuple[int, int]  # one piece: [out, in]


@dataclasses.dataclass(frozen=True)
class ExpertKey:
    """A checkpoint key of expert weights: one (expert, part) piece [out, in], one part of every expert
    [E, out, in] (expert None), or the fused stack [E, P * out, in] (expert and part None)."""

    projection: str
    layer: int
    expert: int | None
    part: int | None


def expert_slots(model: nnx.Module) -> dict[str, ExpertSlot]:
    """{projection: its slot} of a (possibly abstract) model's QExperts; empty for a dense model."""
    slots = {}
    for path, module in nnx.iter_graph(model):
        if not isinstance(module, QExperts):
            continue
        path = tuple(str(p) for p in path)
        names = [b for b in QUANT_BUFFERS if getattr(module, b) is not None] if module.is_quantized else ["weight"]
        slots[path[-1]] = ExpertSlot(
            path[-1],
            path,
            tuple(path + (n,) for n in names),
            module.is_quantized,
            module.num_experts,
            module.parts,
            (module.out_features, module.in_features),
        )
    return slots


def expert_modules(model: nnx.Module) -> dict[str, QExperts]:
    """{our path (`model.layers.mlp.experts.gate_up_proj`): module} of the QExperts of a model."""
    return {".".join(str(p) for p in path): m for path, m in nnx.iter_graph(model) if isinstance(m, QExperts)}


def _block(config: ModelConfig) -> str:
    return EXPERT_NAMES[config.model_type][0]


def our_name(config: ModelConfig, key: str) -> str:
    """A checkpoint's tensor name as the model names it (Mixtral's `block_sparse_moe.` is `mlp.`)."""
    if config.moe is None or _block(config) == _OURS or (match := _LAYER.match(key)) is None:
        return key
    rest = match[2]
    if rest.startswith(_block(config) + "."):
        rest = _OURS + rest[len(_block(config)) :]
    return f"{LAYERS}.{match[1]}.{rest}"


def checkpoint_name(config: ModelConfig, key: str) -> str:
    """The model's tensor name as checkpoints name it (the inverse of `our_name`)."""
    if config.moe is None or _block(config) == _OURS or (match := _LAYER.match(key)) is None:
        return key
    rest = match[2]
    if rest.startswith(_OURS + "."):
        rest = _block(config) + rest[len(_OURS) :]
    return f"{LAYERS}.{match[1]}.{rest}"


def expert_key(config: ModelConfig, name: str) -> ExpertKey | None:
    """The expert piece(s) a tensor name (ours: `our_name` first) holds, or None for any other tensor."""
    if config.moe is None or (match := _LAYER.match(name)) is None:
        return None
    layer, rest = int(match[1]), match[2]
    gate, up, down = EXPERT_NAMES[config.model_type][1]
    for projection in PROJECTIONS:
        if rest == f"{_OURS}.experts.{projection}":
            return ExpertKey(projection, layer, None, None)
    if (m := re.fullmatch(rf"{_OURS}\.experts\.(gate_proj|up_proj|down_proj)\.weight", rest)) is not None:
        projection, part = _ONE_PART[m[1]]
        return ExpertKey(projection, layer, None, part)  # (GGUF's) every expert's gate, up or down: [E, out, in]
    if (m := re.fullmatch(rf"{_OURS}\.experts\.(0|[1-9][0-9]*)\.({gate}|{up}|{down})\.weight", rest)) is None:
        return None
    part = {gate: ("gate_up_proj", 0), up: ("gate_up_proj", 1), down: ("down_proj", 0)}[m[2]]
    return ExpertKey(part[0], layer, int(m[1]), part[1])


def _piece_name(config: ModelConfig, projection: str, layer: int, expert: int, part: int) -> str:
    gate, up, down = EXPERT_NAMES[config.model_type][1]
    name = {("gate_up_proj", 0): gate, ("gate_up_proj", 1): up, ("down_proj", 0): down}[(projection, part)]
    return checkpoint_name(config, f"{LAYERS}.{layer}.{_OURS}.experts.{expert}.{name}.weight")


def _pieces(slot: ExpertSlot, key: ExpertKey, value: Any, where: str) -> Iterator[tuple[tuple[int, int], Any]]:
    """((expert, part), one [out, in] piece) of a checkpoint tensor; ValueError naming `where` for a bad shape."""
    out, inp = slot.shape
    if key.expert is not None:
        shape = tuple(value.shape)
        if shape != (out, inp):
            raise ValueError(f"{where} has shape {shape}, expected {(out, inp)}")
        if key.expert >= slot.num_experts:
            raise ValueError(f"{where}: expert {key.expert} of a model with {slot.num_experts} experts")
        yield (key.expert, key.part), value
        return
    parts = [key.part] if key.part is not None else list(range(slot.parts))
    expected = (slot.num_experts, len(parts) * out, inp)
    if isinstance(value, QuantizedTensor) or tuple(value.shape) != expected:
        raise ValueError(f"{where} has shape {tuple(value.shape)}, expected {expected}")
    for e in range(slot.num_experts):
        for i, p in enumerate(parts):
            yield (e, p), value[e, i * out : (i + 1) * out]


def fill_expert(
    buffers: dict,
    slot: ExpertSlot,
    key: ExpertKey,
    value: Any,
    *,
    quantization: QuantConfig | None,
    param_dtype: Any,
    cast: Any,
    where: str,
) -> list[tuple]:
    """Writes the piece(s) of one checkpoint tensor into the model's host buffers: a 16-bit array is quantized (or
    cast, `cast(array, dtype)`), a bitsandbytes QuantizedTensor copied (or dequantized into a dense model).
    Returns the filled pieces' ids; ValueError naming `where` for a shape or 4-bit layout that does not fit."""
    filled = []
    for (expert, part), piece in _pieces(slot, key, value, where):
        index = (key.layer, expert, part)
        if slot.quantized:
            if isinstance(piece, QuantizedTensor):
                qt = piece
            else:
                q = quantization
                qt = quantize(cast(piece, param_dtype), q)
            for path in slot.paths:
                array, target = np.asarray(getattr(qt, path[-1])), buffers[path]
                if array.shape != target.shape[3:] or array.dtype != target.dtype:
                    raise ValueError(
                        f"{where}: 4-bit {path[-1]} is {array.dtype}{list(array.shape)}, expected "
                        f"{target.dtype}{list(target.shape[3:])} (another blocksize or quant "
                        f"type?)"
                    )
                target[index] = array
        else:
            (path,) = slot.paths
            target = buffers[path]
            dense = dequantize(piece, target.dtype) if isinstance(piece, QuantizedTensor) else cast(piece, target.dtype)
            out = slot.shape[0]
            target[key.layer, expert, part * out : (part + 1) * out] = np.asarray(dense)
        filled.append((slot.projection, *index))
    return filled


def missing_pieces(config: ModelConfig, slots: dict[str, ExpertSlot], filled: set[tuple]) -> list[str]:
    """Checkpoint names of the expert pieces not filled (per-expert names)."""
    missing = []
    for slot in slots.values():
        for layer in range(config.num_layers):
            for e in range(slot.num_experts):
                for p in range(slot.parts):
                    if (slot.projection, layer, e, p) not in filled:
                        missing.append(_piece_name(config, slot.projection, layer, e, p))
    return missing


def layer_module(module: QExperts, layer: int) -> QExperts:
    """A copy of a stacked QExperts (and its adapter) holding only layer `layer`."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[layer], state))


def expert_tensors(model: nnx.Module, weight: Any, dtype: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(per-expert checkpoint name, [out, in] array in `dtype`) of every expert piece, layer by layer.

    `weight(module, layer)` gives one layer's [E, parts * out, in] float32 weight of a stacked QExperts module (its
    base dequantized, or merged with its adapter)."""
    config = model.config
    slots = expert_slots(model)
    modules = dict(nnx.iter_graph(model))
    for layer in range(config.num_layers):
        for slot in slots.values():
            w = weight(modules[slot.module_path], layer)  # [E, P out, in]
            out = slot.shape[0]
            for e in range(slot.num_experts):
                for p in range(slot.parts):
                    piece = w[e, p * out : (p + 1) * out].astype(jnp.dtype(dtype))
                    yield _piece_name(config, slot.projection, layer, e, p), np.asarray(piece)
