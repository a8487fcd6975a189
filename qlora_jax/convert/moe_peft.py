"""A mixture of experts' adapters in PEFT files: what PEFT 0.21 saves on transformers 5, and what it loads.

PEFT adapts transformers 5's 3-D expert parameters with `lora.ParamWrapper`, which wraps the module holding the
parameter (`mlp.experts`); a second parameter of the same module wraps the first wrapper. gate_up_proj comes first
in `mlp.experts`, so with both adapted a layer's file holds

    base_model.model.model.layers.L.mlp.experts.base_layer.lora_A.weight   [E R, H]    gate_up_proj
    base_model.model.model.layers.L.mlp.experts.base_layer.lora_B.weight   [2 I, E R]
    base_model.model.model.layers.L.mlp.experts.lora_A.weight              [E r, I]    down_proj
    base_model.model.model.layers.L.mlp.experts.lora_B.weight              [H, E r]

and with one of them, that one at `mlp.experts.lora_A/B` (`ExpertLoRA.to_peft` for the flattening). The router's
adapter is `mlp.gate.lora_A/B.weight`, laid out like a linear layer's.

Adapters trained on transformers 4 name every expert's nn.Linear (`mlp.experts.3.gate_proj.lora_A.weight`,
Mixtral's `block_sparse_moe.experts.3.w1...` and `block_sparse_moe.gate...`); PEFT loads them onto transformers 5
by `transformers_weight_conversion`: gate and up's A matrices concatenated ([2 r, H] per expert), their B matrices
block-diagonal ([2 I, 2 r]), down's as they are; so do we.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np
from flax import nnx

from qlora_jax.convert.moe_io import expert_modules
from qlora_jax.errors import InputError
from qlora_jax.lora import ExpertLoRA
from qlora_jax.lora.targets import ModuleTargets
from qlora_jax.models.moe import QExperts
from qlora_jax.models.moe_config import EXPERT_NAMES
from qlora_jax.models.names import LAYERS

__all__ = ["save_tensors", "split_tensors", "router_key", "expert_keys"]

_PREFIX = "base_model.model."
_FUSED = re.compile(rf"^{re.escape(_PREFIX + LAYERS)}\.(\d+)\.mlp\.experts\.(base_layer\.)?(lora_A|lora_B)\.weight$")
_PER_EXPERT = re.compile(
    rf"^{re.escape(_PREFIX + LAYERS)}\.(\d+)\.(mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.(lora_A|lora_B)\.weight$"
)
_PROJECTIONS = ("gate_up_proj", "down_proj")  # the order of the parameters in `mlp.experts`


def expert_keys(keys: Iterable[str]) -> set[str]:
    """The keys of an adapter file that hold expert adapters (either PEFT layout: `split_tensors`)."""
    return {key for key in keys if _FUSED.match(key) or _PER_EXPERT.match(key)}


def router_key(key: str) -> str:
    """transformers 4's Mixtral router adapter keys (`block_sparse_moe.gate.`) as transformers 5 names them."""
    return key.replace(".block_sparse_moe.gate.", ".mlp.gate.")


def _peft_names(adapted: list[str]) -> dict[str, str]:
    """{projection: its ParamWrapper's module name under the layer} for the projections adapted on one layer."""
    if len(adapted) == 2:
        return {"gate_up_proj": "mlp.experts.base_layer", "down_proj": "mlp.experts"}
    return {p: "mlp.experts" for p in adapted}


def _layer_projections(targets: Mapping[str, ModuleTargets], modules: Mapping[str, QExperts], layer: int) -> list[str]:
    return [
        p
        for p in _PROJECTIONS
        for path in modules
        if path.endswith(p) and path in targets and targets[path].ranks[layer]
    ]


def save_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """{PEFT key: float32 array} of every expert adapter, each layer at its own rank (as PEFT 0.21 saves them)."""
    modules = {p: m for p, m in expert_modules(model).items() if m.lora is not None}
    targets = {p: ModuleTargets(m.lora.ranks, (), True) for p, m in modules.items()}
    out = {}
    for layer in range(model.config.num_layers):
        names = _peft_names(_layer_projections(targets, modules, layer))
        for path, module in modules.items():
            projection = path.rsplit(".", 1)[-1]
            r = module.lora.ranks[layer]
            if r == 0:
                continue
            a, b = ExpertLoRA.to_peft(module.lora.lora_A[...][layer][:, :r], module.lora.lora_B[...][layer][..., :r])
            name = f"{_PREFIX}{LAYERS}.{layer}.{names[projection]}"
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a)
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b)
    return out


def _block_diagonal(blocks: list[np.ndarray]) -> np.ndarray:
    rows, cols = sum(b.shape[0] for b in blocks), sum(b.shape[1] for b in blocks)
    out = np.zeros((rows, cols), np.float32)
    r = c = 0
    for b in blocks:
        out[r : r + b.shape[0], c : c + b.shape[1]] = b
        r, c = r + b.shape[0], c + b.shape[1]
    return out


def _per_expert(model: nnx.Module, found: dict, where: str, error: type[InputError]) -> dict:
    """transformers 4's per-expert adapters converted as PEFT converts them: {(layer, projection): (A [E, R, in],
    B [E, out, R])}."""
    gate, up, down = EXPERT_NAMES[model.config.model_type][1]
    parts = {"gate_up_proj": (gate, up), "down_proj": (down,)}
    num_experts = model.config.moe.num_experts
    out = {}
    layers = sorted({layer for layer, _, _ in found})
    for layer in layers:
        for projection, names in parts.items():
            present = [n for n in names if any((layer, e, n) in found for e in range(num_experts))]
            if not present:
                continue
            if len(present) < len(names):
                raise error(
                    f"{where}: layer {layer} adapts {present[0]} without {set(names) - set(present)}: they are "
                    f"one fused parameter ({projection}) on transformers 5"
                )
            a_list, b_list = [], []
            for e in range(num_experts):
                tensors = []
                for n in names:
                    fields = found.get((layer, e, n))
                    if fields is None or set(fields) != {"lora_A", "lora_B"}:
                        raise error(
                            f"{where}: expert {e} of layer {layer} has no complete {n} adapter (lora_A and "
                            f"lora_B of every expert are needed)"
                        )
                    tensors.append((fields["lora_A"], fields["lora_B"]))
                a_list.append(np.concatenate([a for a, _ in tensors], axis=0))  # [R, in]: Concatenate(dim=1)
                b_list.append(_block_diagonal([b for _, b in tensors]))  # [out, R]: PeftConcatenate
            out[(layer, projection)] = (np.stack(a_list), np.stack(b_list))
    return out


def split_tensors(
    model: nnx.Module,
    targets: Mapping[str, ModuleTargets],
    tensors: Mapping[str, np.ndarray],
    where: str,
    error: type[InputError],
) -> tuple[dict[str, np.ndarray], dict]:
    """(the other tensors, {our expert path: {"lora_A": [L, E, R_max, in], "lora_B": [L, E, out, R_max]}}) of an
    adapter file, checked against the layers and ranks `targets` selects (`error`, naming `where`, if not)."""
    modules = expert_modules(model)
    rest: dict[str, np.ndarray] = {}
    fused: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    per_expert: dict[tuple[int, int, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        if match := _FUSED.match(key):
            fused.setdefault((int(match[1]), "base_layer" if match[2] else "outer"), {})[match[3]] = value
        elif match := _PER_EXPERT.match(key):
            per_expert.setdefault((int(match[1]), int(match[3]), match[4]), {})[match[5]] = value
        else:
            rest[router_key(key)] = value
    if not modules:
        if fused or per_expert:
            raise error(f"{where}: holds expert adapters, but this {model.config.model_type} model has no experts")
        return rest, {}
    if fused and per_expert:
        raise error(f"{where}: mixes transformers 5's fused expert adapters with transformers 4's per-expert ones")
    num_layers, num_experts = model.config.num_layers, model.config.moe.num_experts
    found: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
    if per_expert:
        found = _per_expert(model, per_expert, where, error)
    for (layer, nesting), fields in fused.items():
        projections = _layer_projections(targets, modules, layer) if layer < num_layers else []
        names = {v: k for k, v in _peft_names(projections).items()}
        projection = names.get("mlp.experts.base_layer" if nesting == "base_layer" else "mlp.experts")
        if projection is None:
            raise error(
                f"{where}: holds {LAYERS}.{layer}.mlp.experts{'.base_layer' if nesting == 'base_layer' else ''}"
                f" adapters, which its config does not select"
            )
        if set(fields) != {"lora_A", "lora_B"}:
            raise error(f"{where}: {LAYERS}.{layer}.{names and projection}: lora_A and lora_B are both needed")
        a, b = fields["lora_A"], fields["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] % num_experts or b.shape[1] != a.shape[0]:
            raise error(
                f"{where}: {LAYERS}.{layer} {projection} adapter has shapes {a.shape} and {b.shape}, not "
                f"[E r, in] and [out, E r] for {num_experts} experts"
            )
        found[(layer, projection)] = ExpertLoRA.from_peft(a, b, num_experts)
    values = {}
    for path, module in modules.items():
        projection = path.rsplit(".", 1)[-1]
        target = targets.get(path)
        ranks = target.ranks if target is not None else (0,) * num_layers
        fan_in, fan_out = module.in_features, module.parts * module.out_features
        if target is not None:
            shape = (num_layers, num_experts)
            values[path] = {
                "lora_A": np.zeros(shape + (target.max_rank, fan_in), np.float32),
                "lora_B": np.zeros(shape + (fan_out, target.max_rank), np.float32),
            }
        for layer, r in enumerate(ranks):
            pair = found.pop((layer, projection), None)
            name = f"{LAYERS}.{layer}.mlp.experts.{projection}"
            if r == 0 and pair is not None:
                raise error(f"{where}: holds {name}, which its config does not adapt")
            if r == 0:
                continue
            if pair is None:
                raise error(f"{where}: no adapter for {name}, which its config adapts")
            need = ((num_experts, r, fan_in), (num_experts, fan_out, r))
            if (pair[0].shape, pair[1].shape) != need:
                raise error(
                    f"{where}: {name} has A {pair[0].shape[1:]}, B {pair[1].shape[1:]} per expert; the model "
                    f"needs {need[0][1:]}, {need[1][1:]} (rank {r} from the config)"
                )
            values[path]["lora_A"][layer, :, :r] = pair[0]
            values[path]["lora_B"][layer, :, :, :r] = pair[1]
    if found:  # pairs of layers beyond the model's
        layer, projection = sorted(found)[0]
        raise error(f"{where}: holds {LAYERS}.{layer}.mlp.experts.{projection}, which its config does not adapt")
    return rest, values
