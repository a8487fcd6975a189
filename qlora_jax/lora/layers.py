"""LoRA adapters with PEFT's configuration and maths: LoraConfig, apply_lora, DoRA, LoftQ.

An adapter on a linear layer y = x @ W.T adds scaling * dropout(x) @ A.T @ B.T, with A [r, in] and B [out, r]
(PEFT's `lora_A.weight` / `lora_B.weight` layouts), scaling = lora_alpha / r (rsLoRA: / sqrt(r)), B starting at
zero. Adapters are float32 `nnx.LoRAParam`s (computed in the layer's dtype); the base weight stays frozen.

Which layers get one, with which rank and alpha, is PEFT's reading of the config (`qlora_jax.lora_targets`). A
stacked module (one per kind of linear layer, a leading [num_layers] axis) holds its adapters for every layer,
zero-padded to the largest rank, with a per-layer scaling that is 0 where a layer has no adapter: such layers add
exactly nothing, their (zero) parameters get exactly zero gradient and stay zero under the optimizer, and they are
never exported (docs/lora.md).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.kernels import KernelOptions
from qlora_jax.kernels.grouped import DEFAULT_TILE, grouped_matmul
from qlora_jax.lora_targets import ModuleTargets, select_targets
from qlora_jax.models.moe import QExperts, TopKRouter
from qlora_jax.models.names import layer_name
from qlora_jax.nn import Frozen, QLinear
from qlora_jax.quant import QUANT_BUFFERS, dequantize, quantize
from qlora_jax.tokens import (
    TrainableTokens,
    TrainedCopy,
    apply_trainable_rows,
    check_trainable_rows,
    normalize_modules_to_save,
    normalize_trainable_token_indices,
)

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

INIT_CHOICES = (True, False, "gaussian", "loftq")


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def dora_weight_norm(weight: jax.Array, delta: jax.Array) -> jax.Array:
    """||W + delta||, row by row: float32[out] for W, delta [out, in] (PEFT's `DoraLinearLayer.get_weight_norm`).

    DoRA's layer computes m / this norm times its adapted output, so its merged weight is (W + delta) * m / norm.
    """
    return jnp.linalg.norm((weight + delta).astype(jnp.float32), axis=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """PEFT's LoraConfig fields, with PEFT's meanings (peft 0.21; `qlora_jax.lora_targets` for the selection).

    Attributes:
      r: the rank; lora_alpha: scaling numerator (nonzero); lora_dropout: dropout on the adapter's input only.
      target_modules: PEFT's module names, one per layer (`model.layers.0.self_attn.q_proj`, `lm_head`): a list
        selects names equal to or ending in "." + an entry ("q_proj", "self_attn.v_proj"); a string is a regex that
        must match a whole name (r"model\\.layers\\.[0-3]\\.self_attn\\.(q|v)_proj"); "all-linear" is every linear
        layer but the output head.
      exclude_modules: names (a list, matched as target_modules' list is) or a regex (whole names) never adapted.
      layers_to_transform, layers_pattern: with a list target_modules, only these layer indices (the number after
        layers_pattern; by default the one in `model.layers.N.`).
      rank_pattern, alpha_pattern: {pattern: r or lora_alpha} for the modules whose name ends with a match of the
        pattern (the first matching key wins).
      use_rslora: scaling = lora_alpha / sqrt(r); use_dora: weight-decomposed LoRA (a trained magnitude vector).
      init_lora_weights: True (A Kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r)), "loftq" (see
        `loftq_initialize`), or False (B random too: a non-identity start, for tests).
      bias: "none" only (biases stay frozen; PEFT's "all"/"lora_only" would train them).
      loftq_iter: alternating quantize / SVD iterations for init_lora_weights="loftq".
      target_parameters: a mixture of experts' parameters to adapt, PEFT's names matched as suffixes
        (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`, `mlp.gate.weight`; docs/moe.md).
      trainable_token_indices: rows of the embedding trained as PEFT's trainable tokens (added tokens): a list of
        ids (the embedding's; a tied output head follows), or {"embed_tokens": ids, "lm_head": ids}
        (`qlora_jax.tokens`; docs/lora.md#added-tokens).
      modules_to_save: ["embed_tokens"] and / or ["lm_head"]: the whole table trained (untied models).
    """

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"
    exclude_modules: str | tuple[str, ...] | None = None
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    bias: str = "none"
    loftq_iter: int = 1
    target_parameters: tuple[str, ...] | None = None
    trainable_token_indices: tuple[int, ...] | dict[str, tuple[int, ...]] | None = None
    modules_to_save: tuple[str, ...] | None = None

    def __post_init__(self):
        object.__setattr__(
            self, "trainable_token_indices", normalize_trainable_token_indices(self.trainable_token_indices)
        )
        object.__setattr__(self, "modules_to_save", normalize_modules_to_save(self.modules_to_save))
        for name in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "target_parameters"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        params = self.target_parameters
        if not (params is None or isinstance(params, tuple) and all(isinstance(p, str) for p in params)):
            raise ValueError(f"target_parameters must be a list of parameter names, got {params!r}")
        for name in ("target_modules", "exclude_modules", "layers_pattern"):  # PEFT: a str, or a list of str
            value = getattr(self, name)
            if not (
                value is None
                or isinstance(value, str)
                or isinstance(value, tuple)
                and all(isinstance(v, str) for v in value)
            ):
                raise ValueError(f"{name} must be a string (a regex) or a list of module names, got {value!r}")
        layers = self.layers_to_transform
        if not (layers is None or _index(layers) or isinstance(layers, tuple) and all(map(_index, layers))):
            raise ValueError(f"layers_to_transform must be a layer index or a list of them, got {layers!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            value = {} if getattr(self, name) is None else getattr(self, name)
            if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                raise ValueError(f"{name} must map module-name patterns to values, got {value!r}")
            object.__setattr__(self, name, dict(value))
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"lora r must be a positive integer, got {self.r!r}")
        for key, r in self.rank_pattern.items():
            if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive integer, got {r!r}")
        for where, alpha in [("lora_alpha", self.lora_alpha)] + [
            (f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items()
        ]:
            if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha == 0 or not math.isfinite(alpha):
                raise ValueError(f"{where} must be a finite nonzero number (it scales the adapter), got {alpha!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.init_lora_weights not in INIT_CHOICES:
            raise ValueError(f"init_lora_weights must be one of {INIT_CHOICES}, got {self.init_lora_weights!r}")
        if self.bias != "none":
            raise ValueError(f"bias={self.bias!r} is not supported (biases stay frozen); use 'none'")
        if self.loftq_iter < 1:
            raise ValueError(f"loftq_iter must be >= 1, got {self.loftq_iter}")
        if not self.target_modules and not self.target_parameters:
            raise ValueError("target_modules must name at least one module (or target_parameters a parameter)")
        # PEFT's own checks (peft.LoraConfig.__post_init__)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "layers_to_transform cannot be used when target_modules is a str (a regex, or "
                "all-linear): name the layers in the regex, or list the module names"
            )
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("layers_pattern cannot be used when target_modules is a str")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("when layers_pattern is specified, layers_to_transform must be specified too")

    def __hash__(self) -> int:
        return hash(
            tuple(
                (f.name, tuple(v.items()) if isinstance(v := getattr(self, f.name), dict) else v)
                for f in dataclasses.fields(self)
            )
        )

    @property
    def scaling(self) -> float:
        """The scaling of a module with the default r and lora_alpha."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def target_layers(model: nnx.Module, config: LoraConfig) -> dict[str, ModuleTargets]:
    """{module path (`model.layers.self_attn.q_proj`, `lm_head`): its per-layer ranks and alphas} of every linear
    module that gets an adapter, by PEFT's rules (`qlora_jax.lora_targets.select_targets`; raises ValueError)."""
    return select_targets(model, config)


def target_module_names(model: nnx.Module, config: LoraConfig) -> list[str]:
    """The module paths (`model.layers.self_attn.q_proj`, per stacked module) that get an adapter on some layer."""
    return list(target_layers(model, config))


class AdapterScaling(nnx.Variable):
    """An adapter's scaling per layer ([num_layers] for a stacked module, [] otherwise), float32, 0.0 on a layer
    without an adapter. Fixed by the config: never trained (not an nnx.Param), never exported."""


class LoRA(nnx.Module):
    """The adapter of one QLinear: lora_A [r, in], lora_B [out, r] (and DoRA's magnitude [out]), float32, with a
    leading [num_layers] axis for a stacked module (r: the largest rank of its layers, the rest zero-padded).

    ranks: the rank per layer (0: no adapter there), static; scaling: an AdapterScaling, 0.0 where the rank is 0.
    """

    def __init__(
        self,
        a: jax.Array,
        b: jax.Array,
        magnitude: jax.Array | None,
        *,
        scaling: Any,
        ranks: Sequence[int],
        dropout: float,
        key_id: int,
    ):
        self.lora_A = nnx.LoRAParam(a)
        self.lora_B = nnx.LoRAParam(b)
        self.lora_magnitude_vector = None if magnitude is None else nnx.LoRAParam(magnitude)
        self.scaling = AdapterScaling(jnp.asarray(scaling, jnp.float32))
        self.ranks, self.dropout, self.key_id = tuple(int(r) for r in ranks), dropout, key_id

    def delta_weight(self, layer: int | None = None) -> jax.Array:
        """scaling * B @ A, float32: [out, in] for one layer (`layer` of a stacked module, or the module as one
        step of the layer scan sees it), [num_layers, out, in] for a whole stacked module with layer=None."""
        index = () if layer is None else (layer,)
        a, b, scaling = self.lora_A[...][index], self.lora_B[...][index], self.scaling[...][index]
        return scaling.reshape(scaling.shape + (1, 1)) * (b @ a)

    def _dropped(self, x: jax.Array, key: jax.Array | None) -> tuple[jax.Array, bool]:
        if self.dropout == 0 or key is None:  # eval, or no dropout
            return x, False
        keep = jax.random.bernoulli(jax.random.fold_in(key, self.key_id), 1 - self.dropout, x.shape)
        return jnp.where(keep, x / (1 - self.dropout), 0).astype(x.dtype), True

    def __call__(
        self,
        x: jax.Array,
        layer: QLinear,
        base_out: jax.Array,
        *,
        kernels: KernelOptions = KernelOptions(),
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """What the adapter adds to the layer's output `base_out` for input x [..., in_features], for one layer (a
        step of the layer scan, or a module outside the stacked layers).

        dropout_key: the layer's key for dropout (folded with this module's id), None in eval (as PEFT's eval mode);
        kernels: how DoRA recomputes the base layer on the dropped-out input.
        """
        dtype = base_out.dtype
        x_in, dropped = self._dropped(x, dropout_key)
        scaling = self.scaling[...]  # [] here; 0.0 on a layer without an adapter (whose A and B are zero too)
        a, b = self.lora_A[...].astype(dtype), self.lora_B[...].astype(dtype)
        lora_out = jnp.dot(jnp.dot(x_in.astype(dtype), a.T), b.T) * scaling.astype(dtype)
        if self.lora_magnitude_vector is None:
            return lora_out
        # DoRA: rescale each output row to the learned magnitude; the norm of the adapted weight is a constant.
        weight = jax.lax.stop_gradient(layer.dense_weight(dtype))
        delta = jax.lax.stop_gradient(self.delta_weight()).astype(dtype)
        norm = jax.lax.stop_gradient(dora_weight_norm(weight, delta))
        magnitude_scale = (self.lora_magnitude_vector[...] / norm).astype(dtype)
        if dropped:
            base = layer.base(x_in, kernels=kernels)
        else:
            base = base_out
        if layer.bias is not None:
            base = base - layer.bias[...].astype(dtype)
        out = (magnitude_scale - 1) * base + magnitude_scale * lora_out
        # A layer without an adapter adds nothing, and its (never exported) magnitude gets no gradient.
        return jnp.where(scaling != 0, out, jnp.zeros_like(out))


# --- a mixture of experts' 3-D parameters (PEFT's lora.ParamWrapper) ---------------------------------------------


class ExpertLoRA(nnx.Module):
    """The adapter of a QExperts parameter, as PEFT's `lora.ParamWrapper` adapts a 3-D [E, out, in] parameter:
    per expert e, lora_A [r, in] and lora_B [out, r], delta_e = scaling * B_e @ A_e (its `get_delta_weight`),
    float32, stored [E, r, in] / [E, out, r] with a leading [num_layers] axis (zero-padded past a layer's rank, as
    `LoRA`). No dropout and no DoRA: PEFT's ParamWrapper refuses both.

    PEFT's files flatten the experts: lora_A.weight [E r, in] (row e r + j is expert e's row j), lora_B.weight
    [out, r E] (column j E + e is expert e's column j): `to_peft` / `from_peft`.
    """

    def __init__(self, a: jax.Array, b: jax.Array, *, scaling: Any, ranks: Sequence[int]):
        self.lora_A = nnx.LoRAParam(a)
        self.lora_B = nnx.LoRAParam(b)
        self.scaling = AdapterScaling(jnp.asarray(scaling, jnp.float32))
        self.ranks = tuple(int(r) for r in ranks)

    def delta_weight(self, layer: int | None = None) -> jax.Array:
        """scaling * B_e @ A_e, float32 [E, out, in] for one layer (or as one step of the layer scan sees it)."""
        index = () if layer is None else (layer,)
        a, b, scaling = self.lora_A[...][index], self.lora_B[...][index], self.scaling[...][index]
        return scaling.reshape(scaling.shape + (1, 1, 1)) * jnp.einsum("...eor,...eri->...eoi", b, a)

    def __call__(self, x: jax.Array, group_sizes: jax.Array, *, tile: int = DEFAULT_TILE) -> jax.Array:
        """What the adapter adds for rows x [M, in] sorted by expert (group_sizes [E]), one layer: [M, out]."""
        dtype = x.dtype
        xa = grouped_matmul(x, self.lora_A[...].astype(dtype), group_sizes, tile=tile)  # [M, r]
        return grouped_matmul(xa, self.lora_B[...].astype(dtype), group_sizes, tile=tile) * self.scaling[...].astype(
            dtype
        )

    @staticmethod
    def to_peft(a: jax.Array, b: jax.Array) -> tuple[np.ndarray, np.ndarray]:
        """One layer's A [E, r, in], B [E, out, r] as PEFT's lora_A.weight [E r, in], lora_B.weight [out, r E]."""
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        e, r, _ = a.shape
        return a.reshape(e * r, -1), b.transpose(1, 2, 0).reshape(b.shape[1], r * e)

    @staticmethod
    def from_peft(a: np.ndarray, b: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
        """The inverse of `to_peft`: A [E, r, in], B [E, out, r]."""
        r = a.shape[0] // num_experts
        return a.reshape(num_experts, r, a.shape[1]), b.reshape(b.shape[0], r, num_experts).transpose(2, 0, 1)


def _initial_expert_adapter(
    key: jax.Array, module: QExperts, config: LoraConfig, r: jax.Array, rank: int
) -> tuple[jax.Array, jax.Array]:
    """(A [E, rank, in], B [E, out, rank]) of one layer, rows / columns past r zero: PEFT's ParamWrapper init, its
    nn.Linear(in, E r) A Kaiming-uniform (U(-1/sqrt(in), 1/sqrt(in))) or N(0, 1/r), B zero."""
    key_a, key_b = jax.random.split(key)
    e, fan_in, fan_out = module.num_experts, module.in_features, module.parts * module.out_features
    if config.init_lora_weights == "gaussian":
        a = jax.random.normal(key_a, (e, rank, fan_in), jnp.float32) / jnp.maximum(r, 1)
    else:
        bound = 1 / math.sqrt(fan_in)
        a = jax.random.uniform(key_a, (e, rank, fan_in), jnp.float32, -bound, bound)
    if config.init_lora_weights is False:
        b = jax.random.normal(key_b, (e, fan_out, rank), jnp.float32) * 0.02
    else:
        b = jnp.zeros((e, fan_out, rank), jnp.float32)
    used = jnp.arange(rank) < r
    return jnp.where(used[:, None], a, 0), jnp.where(used[None, :], b, 0)


def _check_parameter_target(name: str, config: LoraConfig) -> None:
    """PEFT's ParamWrapper (the adapter of a parameter: experts, router) refuses dropout and DoRA."""
    for field, bad in (("lora_dropout", config.lora_dropout != 0), ("use_dora", config.use_dora)):
        if bad:
            raise ValueError(
                f"{field}={getattr(config, field)!r} is not supported on {name}, a mixture of "
                f"experts' parameter (PEFT's lora.ParamWrapper refuses it too)"
            )


def _initial_adapter(
    key: jax.Array, layer: QLinear, config: LoraConfig, r: jax.Array, rank: int, scaling: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(A [rank, in], B [out, rank], magnitude [out] or None) for one (unstacked) layer whose adapter has rank
    r <= rank: rows / columns past r are zero (r = 0: no adapter, all zero), float32."""
    key_a, key_b = jax.random.split(key)
    fan_in, fan_out = layer.in_features, layer.out_features
    if config.init_lora_weights == "gaussian":  # PEFT: nn.init.normal_(A, std=1 / r)
        a = jax.random.normal(key_a, (rank, fan_in), jnp.float32) / jnp.maximum(r, 1)
    else:  # PEFT's default: nn.init.kaiming_uniform_(A, a=sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in))
        bound = 1 / math.sqrt(fan_in)
        a = jax.random.uniform(key_a, (rank, fan_in), jnp.float32, -bound, bound)
    if config.init_lora_weights is False:
        b = jax.random.normal(key_b, (fan_out, rank), jnp.float32) * 0.02
    else:
        b = jnp.zeros((fan_out, rank), jnp.float32)
    used = jnp.arange(rank) < r  # [rank]: zero padding in both A and B adds nothing and gets zero gradient
    a, b = jnp.where(used[:, None], a, 0), jnp.where(used[None, :], b, 0)
    magnitude = None
    if config.use_dora:
        magnitude = dora_weight_norm(layer.dense_weight(jnp.float32), scaling * (b @ a))
    return a, b, magnitude


def _stacked(module: QLinear) -> int | None:
    """The layer count if this QLinear's variables carry a leading layer axis, else None."""
    value = module.packed[...] if module.is_quantized else module.weight[...]
    return value.shape[0] if value.ndim == (2 if module.is_quantized else 3) else None


def _key_id(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF  # a stable, distinct dropout stream per module


def apply_lora(
    model: nnx.Module, config: LoraConfig, *, rngs: nnx.Rngs, targets: Mapping[str, ModuleTargets] | None = None
) -> list[str]:
    """Adds an adapter to every targeted QLinear (4-bit or dense) of `model`, in place, on the layers PEFT's rules
    select (`target_layers`), each layer with its own rank and alpha; `targets` replaces that selection.

    The embedding's (and an untied head's) rows named by `trainable_token_indices` / `modules_to_save` become
    trainable as PEFT makes them (`qlora_jax.tokens.apply_trainable_rows`).

    Returns the adapted module paths. Raises ValueError if nothing matches, if the selection names a module that
    is not a linear layer (or a tied lm_head), or if the model already has adapters.
    """
    if config.init_lora_weights == "loftq":
        raise ValueError("init_lora_weights='loftq' needs the 16-bit weights: use lora.loftq_initialize(...)")
    targets = target_layers(model, config) if targets is None else dict(targets)
    rows = config.trainable_token_indices is not None or config.modules_to_save is not None
    if rows:  # checked before the model changes
        check_trainable_rows(model, config.trainable_token_indices, config.modules_to_save, lora_targets=targets)
    modules = dict(nnx.iter_graph(model))
    for name, target in targets.items():
        module = modules[tuple(name.split("."))]
        if module.lora is not None:
            raise ValueError(f"{name} already has a LoRA adapter")
        key, rank = rngs.params(), target.max_rank
        ranks = jnp.asarray(target.ranks, jnp.int32)
        scalings = jnp.asarray(target.scalings(config.use_rslora), jnp.float32)
        if isinstance(module, QExperts | TopKRouter):
            _check_parameter_target(name, config)
        if isinstance(module, QExperts):
            a, b = jax.vmap(lambda k, r, n=rank, m=module: _initial_expert_adapter(k, m, config, r, n))(
                jax.random.split(key, len(target.ranks)), ranks
            )
            module.lora = ExpertLoRA(a, b, scaling=scalings, ranks=target.ranks)
            continue
        if not target.stacked:
            a, b, m = _initial_adapter(key, module, config, ranks[0], rank, scalings[0])
            scaling = scalings[0]
        else:
            graphdef, state = nnx.split(module)
            a, b, m = jax.vmap(
                lambda k, st, r, s, g=graphdef, n=rank: _initial_adapter(k, nnx.merge(g, st), config, r, n, s)
            )(jax.random.split(key, len(target.ranks)), state, ranks, scalings)
            scaling = scalings
        module.lora = LoRA(
            a, b, m, scaling=scaling, ranks=target.ranks, dropout=config.lora_dropout, key_id=_key_id(name)
        )
    if rows:
        apply_trainable_rows(model, config.trainable_token_indices, config.modules_to_save)
    return list(targets)


def trainable_parameters(model: nnx.Module, *, verbose: bool = True) -> tuple[int, int]:
    """(trainable, total) parameter counts, printed like PEFT's `print_trainable_parameters`.

    Adapters count their layers' own ranks (not the zero padding of a stacked module, nor layers without one);
    4-bit weights count their original elements (as PEFT counts a Linear4bit's), not their bytes.
    """
    trainable = 0
    for _, module in nnx.iter_graph(model):
        if isinstance(module, LoRA):
            fan_in, fan_out = module.lora_A[...].shape[-1], module.lora_B[...].shape[-2]
            dora = fan_out if module.lora_magnitude_vector is not None else 0
            trainable += sum(r * (fan_in + fan_out) + dora for r in module.ranks if r)
        elif isinstance(module, ExpertLoRA):
            (experts, _, fan_in), fan_out = module.lora_A[...].shape[-3:], module.lora_B[...].shape[-2]
            trainable += sum(experts * r * (fan_in + fan_out) for r in module.ranks if r)
        elif isinstance(module, TrainableTokens | TrainedCopy):
            trainable += sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.LoRAParam)))
    frozen = sum(x.size for x in jax.tree.leaves(nnx.state(model, Frozen)))
    quantized = sum(
        m.in_features * m.out_features * (_stacked(m) or 1)
        for _, m in nnx.iter_graph(model)
        if isinstance(m, QLinear) and m.is_quantized
    ) + sum(
        math.prod(m.packed[...].shape[:-1]) * m.in_features * m.out_features
        for _, m in nnx.iter_graph(model)
        if isinstance(m, QExperts) and m.is_quantized
    )
    total = trainable + frozen + quantized
    if verbose:
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    return trainable, total


def loftq_initialize(
    model: nnx.Module,
    weights: Any,
    config: LoraConfig,
    *,
    names: Sequence[str] | None = None,
) -> dict[str, tuple[float, float]]:
    """LoftQ: re-quantize each adapted 4-bit weight and set its adapter so that dequant(Q) + s * B @ A ~= W.

    For each adapted layer (`target_layers`, with its own rank and scaling), alternate `config.loftq_iter` times:
    Q = quantize(W - B A), then B A = the rank-r truncated SVD of W - dequant(Q) (PEFT's loop; B is divided by the
    scaling so the sum holds for any lora_alpha). Layers without an adapter keep their weights. `weights` gives
    the 16-bit weights, one at a time: a mapping or a TensorSource from `qlora_jax.convert` with `tensor(name)`
    for transformers names (`model.layers.3.self_attn.q_proj.weight`). `names`: only these module paths.

    Returns {module path: (||W - dequant(Q_plain)||_F, ||W - (dequant(Q) + s B A)||_F)} summed over its adapted
    layers: the reconstruction error with a plain init and with LoftQ.
    """
    get = weights.tensor if hasattr(weights, "tensor") else weights.__getitem__
    modules = dict(nnx.iter_graph(model))
    targets = target_layers(model, config)
    if names is not None:
        unknown = [n for n in names if n not in targets]
        if unknown:
            raise ValueError(f"{unknown[0]} gets no adapter with this config (targets: {', '.join(targets)})")
        targets = {n: targets[n] for n in names}
    errors = {}
    for name, target in targets.items():
        module: QLinear = modules[tuple(name.split("."))]
        if isinstance(module, QExperts | TopKRouter):
            raise ValueError(f"LoftQ is not supported on {name}, a mixture of experts' parameter")
        if not module.is_quantized:
            continue
        rank, scalings = target.max_rank, target.scalings(config.use_rslora)
        plain_err = loftq_err = 0.0
        buffers: dict[str, list] = {}
        a_list, b_list, m_list = [], [], []
        for k, r in enumerate(target.ranks):
            index = (k,) if target.stacked else ()
            old = {buf: getattr(module, buf)[...][index] for buf in QUANT_BUFFERS if getattr(module, buf) is not None}
            a = jnp.zeros((rank, module.in_features), jnp.float32)
            b = jnp.zeros((module.out_features, rank), jnp.float32)
            if r == 0:  # no adapter on this layer: its weight stays as loaded
                new = old
                qt = jax.tree.map(lambda x, i=index: x[i], module.quantized_tensor())
            else:
                w = jnp.asarray(
                    np.asarray(get(layer_name(name, k if target.stacked else None) + ".weight")), jnp.float32
                )
                qt, a_r, b_r, plain, err = _loftq_one(w, module, r, scalings[k], config.loftq_iter)
                plain_err, loftq_err = plain_err + plain**2, loftq_err + err**2
                new = {buf: getattr(qt, buf) for buf in old}
                a, b = a.at[:r].set(a_r), b.at[:, :r].set(b_r)
            for buf, value in new.items():
                buffers.setdefault(buf, []).append(value)
            a_list.append(a)
            b_list.append(b)
            if config.use_dora:  # the magnitude starts at the row norms of the adapted weight (PEFT's DoRA init)
                m_list.append(dora_weight_norm(dequantize(qt, jnp.float32), scalings[k] * (b @ a)))
        stack = (lambda xs: jnp.stack(xs)) if target.stacked else (lambda xs: xs[0])
        for buf, values in buffers.items():
            getattr(module, buf).set_value(stack(values))
        a, b = stack(a_list), stack(b_list)
        magnitude = stack(m_list) if config.use_dora else None
        scaling = jnp.asarray(scalings if target.stacked else scalings[0], jnp.float32)
        if module.lora is None:
            module.lora = LoRA(
                a, b, magnitude, scaling=scaling, ranks=target.ranks, dropout=config.lora_dropout, key_id=_key_id(name)
            )
        else:
            if module.lora.ranks != target.ranks:
                raise ValueError(f"{name}: its adapter has ranks {module.lora.ranks}, the config {target.ranks}")
            module.lora.lora_A.set_value(a)
            module.lora.lora_B.set_value(b)
            if magnitude is not None and module.lora.lora_magnitude_vector is not None:
                module.lora.lora_magnitude_vector.set_value(magnitude)
        errors[name] = (math.sqrt(plain_err), math.sqrt(loftq_err))
    return errors


def _loftq_one(w: jax.Array, layer: QLinear, r: int, scaling: float, iterations: int):
    q = layer.quant
    dtype = layer.param_dtype
    plain = float(jnp.linalg.norm(w - dequantize(quantize(w.astype(dtype), q), jnp.float32)))
    residual = w
    for i in range(iterations):
        qt = quantize(residual.astype(dtype), q)
        u, s, vt = jnp.linalg.svd(w - dequantize(qt, jnp.float32), full_matrices=False)
        root = jnp.sqrt(s[:r])
        left, right = u[:, :r] * root, root[:, None] * vt[:r]  # [out, r], [r, in]
        if i + 1 < iterations:
            residual = w - left @ right
    a, b = right, left / scaling
    err = float(jnp.linalg.norm(w - (dequantize(qt, jnp.float32) + scaling * (b @ a))))
    return qt, a, b, plain, err
