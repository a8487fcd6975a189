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
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from flax import nnx

from qlora_jax.models.names import LAYERS, hf_module_name, is_stacked, layer_name
from qlora_jax.nn import QLinear

__all__ = ["ModuleTargets", "select_targets"]


def _listed(names: tuple[str, ...], key: str) -> bool:
    return key in names or any(key.endswith("." + name) for name in names)


def _layer_index(config: Any, key: str) -> int | None:
    patterns = config.layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in (patterns,) if isinstance(patterns, str) else patterns:
            if match := re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key):
                break
    return int(match.group("idx")) if match else None


def _selects(config: Any, key: str, linear_names: frozenset[str]) -> bool:
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
        return tuple(0.0 if r == 0 else a / (math.sqrt(r) if use_rslora else r)
                     for r, a in zip(self.ranks, self.alphas, strict=True))  # fmt: skip


def _modules(model: nnx.Module) -> dict[str, nnx.Module]:
    out = {}
    for path, module in nnx.iter_graph(model):
        if path and isinstance(module, nnx.Module) and "lora" not in path:
            out[".".join(str(p) for p in path)] = module
    return out


def select_targets(model: nnx.Module, config: Any) -> dict[str, ModuleTargets]:
    """{our module path: its adapters} for every linear module that gets at least one, by PEFT's rules above.

    Raises ValueError if nothing is selected, or if the selection names a module that is not a linear layer
    (PEFT adapts embeddings too, and a tied output head: here adapters go on linear layers only).
    """
    num_layers, text_model = model.config.num_layers, model.config.text_model_path
    modules = _modules(model)
    keys: dict[str, list[tuple[str, int | None]]] = {}
    for path in modules:
        layers = range(num_layers) if is_stacked(path) else [None]
        keys[path] = [(hf_module_name(layer_name(path, i), text_model), i) for i in layers]
    linear_names = frozenset(k for p, m in modules.items() if isinstance(m, QLinear) for k, _ in keys[p]
                             if k != "lm_head")  # fmt: skip
    if getattr(model, "lm_head", True) is None and _selects(config, "lm_head", linear_names):
        raise ValueError(
            "target_modules selects lm_head, but this model ties its output head to model.embed_tokens "
            "(tie_word_embeddings): an adapter on a tied head is not supported here (PEFT would adapt it); "
            "leave lm_head out of target_modules"
        )
    out = {}
    for path, module in modules.items():
        chosen = {i: key for key, i in keys[path] if _selects(config, key, linear_names)}
        if not chosen:
            continue
        if not isinstance(module, QLinear):
            key = next(iter(chosen.values()))
            raise ValueError(f"target_modules selects {key}, a {type(module).__name__}, but adapters here go on "
                             f"linear layers only")  # fmt: skip
        ranks, alphas = [], []
        for _, i in keys[path]:
            key = chosen.get(i)
            ranks.append(0 if key is None else int(_pattern_value(config.rank_pattern, key, config.r)))
            alphas.append(0.0 if key is None else float(_pattern_value(config.alpha_pattern, key, config.lora_alpha)))
        out[path] = ModuleTargets(tuple(ranks), tuple(alphas), is_stacked(path))
    if not out:
        raise ValueError(
            f"target_modules={config.target_modules!r} matches no linear layer of the model (PEFT's names, one per "
            f"layer: {hf_module_name(LAYERS, text_model)}.0.self_attn.q_proj, ..., lm_head)"
        )
    return out
