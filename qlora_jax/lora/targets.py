"""Which linear layers get a LoRA adapter, with which rank and alpha: PEFT's meaning of LoraConfig's fields.

PEFT matches each module of the transformers model by its name, one per layer (`model.layers.3.self_attn.q_proj`,
`lm_head`; in Gemma 3's image-text model `model.language_model.layers.3.self_attn.q_proj`:
`models.names.hf_module_name`), as peft.tuners.tuners_utils.check_target_module_exists (peft 0.21) does:

- `exclude_modules` first: a string is a regex that must match the whole name; a list excludes a name equal to
  an entry or ending in "." + entry.
- `target_modules`: "all-linear" is every linear layer but the output head; another string is a regex that must
  match the whole name (`re.fullmatch`); a list selects a name equal to an entry or ending in "." + entry.
- `layers_to_transform` (an index or a list) keeps, of the names a list selected by suffix, those whose layer
  index is in it; the index is the number after `layers_pattern` (default: after the first "name." segment pair,
  `model.layers.N.`). Names given whole in the list are kept whatever their layer, as in PEFT.
- `rank_pattern` / `alpha_pattern`: the first key (in order) that matches the end of the name
  (`re.match(rf"(.*\\.)?({key})$", name)`, peft.utils.other.get_pattern_key) gives that module's r / lora_alpha.

Our layers are stacked (one module, a leading [num_layers] axis, run by `lax.scan`), so a selection is computed
per layer name and kept per stacked module as a rank per layer, 0 where the layer has no adapter
(docs/lora.md says how such a module holds adapters on some layers only).

Mixtures of experts (qwen3_moe, mixtral) are read as PEFT 0.21 reads them on transformers 5 (docs/moe.md): their
experts are 3-D parameters (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) and their router a parameter
(`mlp.gate.weight`), adapted through `target_parameters` (PEFT's `_inject_parameters`: a parameter name equal to an
entry or ending in "." + entry, every layer; rank_pattern / alpha_pattern on the parameter's name), and
`target_modules` is first converted as `peft.utils.transformers_weight_conversion._convert_peft_config_moe` does.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from flax import nnx

from qlora_jax.lora.config import LoraConfig
from qlora_jax.models.moe import QExperts, TopKRouter
from qlora_jax.models.moe_config import EXPERT_NAMES
from qlora_jax.models.names import LAYERS, hf_module_name, is_stacked, layer_name
from qlora_jax.nn import Embed, QLinear

__all__ = ["ModuleTargets", "select_targets", "target_layers", "target_module_names", "converted_config_fields"]


def _listed(names: tuple[str, ...], key: str) -> bool:
    return key in names or any(key.endswith("." + name) for name in names)


def _layer_index(config: LoraConfig | _Converted, key: str) -> int | None:
    patterns = config.layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in (patterns,) if isinstance(patterns, str) else patterns:
            if match := re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key):
                break
    return int(match.group("idx")) if match else None


def _selects(config: LoraConfig | _Converted, key: str, linear_names: frozenset[str]) -> bool:
    """Whether PEFT would adapt the module named `key` (check_target_module_exists)."""
    exclude = config.exclude_modules
    if exclude and (re.fullmatch(exclude, key) if isinstance(exclude, str) else _listed(exclude, key)):
        return False
    target = config.target_modules
    if isinstance(target, str) and target.lower() == "all-linear":
        return key in linear_names  # PEFT expands it to the full names of every linear layer but the output head
    if isinstance(target, str):
        return re.fullmatch(target, key) is not None
    if key in target:
        return True
    found = any(key.endswith("." + name) for name in target)
    layers = config.layers_to_transform
    if found and layers is not None and (not isinstance(layers, tuple) or layers):
        index = _layer_index(config, key)
        found = index is not None and (index == layers if isinstance(layers, int) else index in layers)
    return found


def _pattern_value(patterns: Mapping[str, Any], key: str, default: Any) -> Any:
    for pattern, value in patterns.items():  # the first that matches, in the mapping's order (PEFT's)
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


@dataclasses.dataclass(frozen=True)
class ModuleTargets:
    """The adapters of one linear module: per layer (one entry for a module outside the stacked layers), its rank
    (0: no adapter on that layer) and lora_alpha."""

    ranks: tuple[int, ...]
    alphas: tuple[float, ...]
    stacked: bool

    @property
    def max_rank(self) -> int:
        return max(self.ranks)

    def scalings(self, use_rslora: bool) -> tuple[float, ...]:
        """PEFT's scaling per layer, lora_alpha / r (rsLoRA: / sqrt(r)); 0.0 where the layer has no adapter."""
        return tuple(
            0.0 if r == 0 else a / (math.sqrt(r) if use_rslora else r)
            for r, a in zip(self.ranks, self.alphas, strict=True)
        )


def _modules(model: nnx.Module) -> dict[str, nnx.Module]:
    out = {}
    for path, module in nnx.iter_graph(model):
        # a mixture of experts' expert weights are parameters for PEFT (transformers 5's 3-D nn.Parameters)
        if path and isinstance(module, nnx.Module) and "lora" not in path and not isinstance(module, QExperts):
            out[".".join(str(p) for p in path)] = module
    return out


# --- mixtures of experts: PEFT 0.21's reading on transformers 5 -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Converted:
    """The targeting fields of a LoraConfig after PEFT's transformers-5 conversion (`_convert_peft_config_moe`)."""

    target_modules: str | tuple[str, ...]
    target_parameters: tuple[str, ...]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    exclude_modules: str | tuple[str, ...] | None
    layers_to_transform: int | tuple[int, ...] | None
    layers_pattern: str | tuple[str, ...] | None
    r: int
    lora_alpha: float


def _peft_names(model: nnx.Module, num_layers: int) -> tuple[list[str], list[str]]:
    """The module and parameter names of the transformers 5 model (its `named_modules`, `named_parameters`)."""
    modules, params = ["", "model", "model.rotary_emb", "lm_head", LAYERS], []
    for path, module in nnx.iter_graph(model):
        if "lora" in path or not isinstance(module, nnx.Module) or not path:
            continue
        name = ".".join(str(p) for p in path)
        for key in [layer_name(name, i) for i in range(num_layers)] if is_stacked(name) or name == LAYERS else [name]:
            if isinstance(module, QExperts):
                params.append(key)  # an nn.Parameter of `mlp.experts`
                continue
            modules.append(key)
            if isinstance(module, QLinear | TopKRouter | Embed) or hasattr(module, "weight"):
                params.append(f"{key}.weight")
            if getattr(module, "bias", None) is not None:
                params.append(f"{key}.bias")
        if name.endswith("mlp.experts"):
            modules.extend(f"{layer_name(name, i)}.act_fn" for i in range(num_layers))
    return modules, params


def _converted(model: nnx.Module, config: LoraConfig, linear_names: frozenset[str]) -> _Converted:
    """What PEFT's `convert_peft_config_for_transformers` makes of a config for a qwen3_moe or mixtral model.

    The router (`gate`) and the per-expert projections of transformers 4 (`gate_proj`/`up_proj`/`down_proj`,
    Mixtral's `w1`/`w3`/`w2`) named in target_modules become target_parameters: `gate.weight`, `gate_up_proj`
    (gate and up together; rank and alpha doubled, as their fused adapter's), `down_proj`. A string target_modules
    is first resolved to the leaf names it matches ("all-linear": every linear layer's, plus those four). Raises
    ValueError for gate without up (or up without gate), which share one fused parameter.
    """
    gate, up, down = EXPERT_NAMES[model.config.model_type][1]
    mapping = {"gate": "gate.weight", gate: "gate_up_proj", up: "gate_up_proj", down: "down_proj"}  # PEFT's order
    fused = {"gate_up_proj": (gate, up)}
    targets = config.target_modules
    rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
    parameters = set(config.target_parameters or ())
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            resolved = {name.rsplit(".", 1)[-1] for name in linear_names} | set(mapping)
        else:
            module_names, param_names = _peft_names(model, model.config.num_layers)
            resolved = {n.rsplit(".", 1)[-1] for n in module_names + param_names if re.fullmatch(targets, n)}
            containers: dict[str, set[str]] = {}
            for name in param_names:
                container, _, leaf = name.rpartition(".")
                containers.setdefault(leaf, set()).add(container)
            for old, new in mapping.items():  # a pre-fusion name matches no real key: probe `<container>.<old>`
                if old not in resolved and any(re.fullmatch(targets, f"{c}.{old}") for c in containers.get(new, ())):
                    resolved.add(old)
        targets = tuple(sorted(resolved)) if resolved else targets  # nothing matched: the module selection says so
    remaining, present = [], {name: set() for name in fused}
    for target in () if isinstance(targets, str) else targets:
        old_new = next(((o, n) for o, n in mapping.items() if target == o or target.endswith("." + o)), None)
        if old_new is None:
            remaining.append(target)
            continue
        parameters.add(old_new[1])
        if old_new[1] in fused:
            present[old_new[1]].add(old_new[0])
    for new, required in fused.items():
        if 0 < len(present[new]) < len(required):
            missing = sorted(set(required) - present[new])
            raise ValueError(
                f"target_modules names {', '.join(sorted(present[new]))} without {', '.join(missing)}: "
                f"both are one fused parameter ({new}) on transformers 5, as PEFT says"
            )
        if len(present[new]) == len(required):
            rank_pattern[rf".*\.{re.escape(new)}"] = config.r * len(required)
            alpha_pattern[rf".*\.{re.escape(new)}"] = config.lora_alpha * len(required)
    remaining = targets if isinstance(targets, str) else tuple(remaining)
    return _Converted(
        remaining,
        tuple(sorted(parameters)),
        rank_pattern,
        alpha_pattern,
        config.exclude_modules,
        config.layers_to_transform,
        config.layers_pattern,
        config.r,
        config.lora_alpha,
    )


def converted_config_fields(model: nnx.Module, config: LoraConfig) -> dict[str, Any]:
    """The targeting fields PEFT saves for this config and model (adapter_config.json): for a mixture of experts,
    after PEFT's transformers-5 conversion (target_modules, target_parameters, rank_pattern, alpha_pattern)."""
    if model.config.moe is None:
        return {}
    modules = _modules(model)
    view = _converted(model, config, _linear_names(_module_keys(model, modules), modules))
    return {
        "target_modules": list(view.target_modules)
        if not isinstance(view.target_modules, str)
        else view.target_modules,
        "target_parameters": list(view.target_parameters),
        "rank_pattern": view.rank_pattern,
        "alpha_pattern": view.alpha_pattern,
    }


def _parameter_targets(model: nnx.Module, view: _Converted) -> dict[str, ModuleTargets]:
    """{module path: adapters} of the parameters target_parameters names (every layer; the rank and alpha patterns
    on the parameter's name), as PEFT's `_inject_parameters` selects them."""
    names = view.target_parameters
    out = {}
    for path, module in nnx.iter_graph(model):
        if "lora" in path or not isinstance(module, QExperts | TopKRouter):
            continue
        name = ".".join(str(p) for p in path)
        ranks, alphas = [], []
        for i in range(model.config.num_layers):
            key = layer_name(name, i) + (".weight" if isinstance(module, TopKRouter) else "")
            chosen = key in names or any(key.endswith("." + n) for n in names)
            ranks.append(int(_pattern_value(view.rank_pattern, key, view.r)) if chosen else 0)
            alphas.append(float(_pattern_value(view.alpha_pattern, key, view.lora_alpha)) if chosen else 0.0)
        if any(ranks):
            out[name] = ModuleTargets(tuple(ranks), tuple(alphas), True)
    if names and not out:
        raise ValueError(
            f"target_parameters={list(names)} matches no parameter of the model (PEFT's names: "
            f"{LAYERS}.0.mlp.experts.gate_up_proj, ...down_proj, ...mlp.gate.weight)"
        )
    return out


def _module_keys(model: nnx.Module, modules: dict[str, nnx.Module]) -> dict[str, list[tuple[str, int | None]]]:
    """{our module path: [(its per-layer name in the transformers model, layer or None)]}."""
    num_layers, text_model = model.config.num_layers, model.config.text_model_path
    return {
        path: [
            (hf_module_name(layer_name(path, i), text_model), i)
            for i in (range(num_layers) if is_stacked(path) else [None])
        ]
        for path in modules
    }


def _linear_names(keys: dict[str, list[tuple[str, int | None]]], modules: dict[str, nnx.Module]) -> frozenset[str]:
    return frozenset(k for p, m in modules.items() if isinstance(m, QLinear) for k, _ in keys[p] if k != "lm_head")


def select_targets(model: nnx.Module, config: LoraConfig) -> dict[str, ModuleTargets]:
    """{our module path: its adapters} for every linear module that gets at least one, by PEFT's rules above.

    Raises ValueError if nothing is selected, or if the selection names a module that is not a linear layer
    (PEFT adapts embeddings too, and a tied output head: here adapters go on linear layers only).
    """
    text_model = model.config.text_model_path
    modules = _modules(model)
    keys = _module_keys(model, modules)
    linear_names = _linear_names(keys, modules)
    parameters = {}
    view: LoraConfig | _Converted = config
    if model.config.moe is not None:  # PEFT's transformers-5 reading of a mixture of experts (above)
        view = _converted(model, config, linear_names)
        parameters = _parameter_targets(model, view)
    elif config.target_parameters:
        raise ValueError(
            "target_parameters adapt a mixture of experts' expert parameters and router (qwen3_moe, "
            f"mixtral); a {model.config.model_type} model has none: use target_modules"
        )
    if getattr(model, "lm_head", True) is None and _selects(view, "lm_head", linear_names):
        raise ValueError(
            "target_modules selects lm_head, but this model ties its output head to model.embed_tokens "
            "(tie_word_embeddings): an adapter on a tied head is not supported here (PEFT would adapt it); "
            "leave lm_head out of target_modules"
        )
    out = {}
    for path, module in modules.items():
        chosen = {i: key for key, i in keys[path] if _selects(view, key, linear_names)}
        if not chosen:
            continue
        if not isinstance(module, QLinear):
            key = next(iter(chosen.values()))
            raise ValueError(
                f"target_modules selects {key}, a {type(module).__name__}, but adapters here go on linear layers only"
            )
        ranks, alphas = [], []
        for _, i in keys[path]:
            key = chosen.get(i)
            ranks.append(0 if key is None else int(_pattern_value(view.rank_pattern, key, view.r)))
            alphas.append(0.0 if key is None else float(_pattern_value(view.alpha_pattern, key, view.lora_alpha)))
        out[path] = ModuleTargets(tuple(ranks), tuple(alphas), is_stacked(path))
    out.update(parameters)
    if not out:
        raise ValueError(
            f"target_modules={view.target_modules!r} matches no linear layer of the model (PEFT's names, one per "
            f"layer: {hf_module_name(LAYERS, text_model)}.0.self_attn.q_proj, ..., lm_head)"
        )
    return out


def target_layers(model: nnx.Module, config: LoraConfig) -> dict[str, ModuleTargets]:
    """{module path (`model.layers.self_attn.q_proj`, `lm_head`): its per-layer ranks and alphas} of every linear
    module that gets an adapter, by PEFT's rules (`select_targets`; raises ValueError)."""
    return select_targets(model, config)


def target_module_names(model: nnx.Module, config: LoraConfig) -> list[str]:
    """The module paths (`model.layers.self_attn.q_proj`, per stacked module) that get an adapter on some layer."""
    return list(target_layers(model, config))
