"""LoRA adapters with PEFT's configuration and maths: LoraConfig, apply_lora, DoRA, LoftQ, the trainable filter.

An adapter on a linear layer y = x @ W.T adds scaling * dropout(x) @ A.T @ B.T, with A [r, in] and B [out, r]
(PEFT's `lora_A.weight` / `lora_B.weight` layouts), scaling = lora_alpha / r (rsLoRA: / sqrt(r)), B starting at
zero. Adapters are float32 `nnx.LoRAParam`s (computed in the layer's dtype); the base weight stays frozen.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.kernels import KernelOptions
from qlora_jax.nn import Frozen, QLinear
from qlora_jax.quant import dequantize, quantize

__all__ = [
    "LoraConfig",
    "LoRA",
    "apply_lora",
    "lora_filter",
    "trainable_parameters",
    "target_module_names",
    "loftq_initialize",
]

INIT_CHOICES = (True, False, "gaussian", "loftq")
BIAS_CHOICES = ("none", "all", "lora_only")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """PEFT's LoraConfig fields, with PEFT's meanings.

    Attributes:
      r: the rank; lora_alpha: scaling numerator; lora_dropout: dropout on the adapter's input only.
      target_modules: module names ("q_proj", "v_proj", ...), one regex string matched against the full module
        path (as PEFT does), or "all-linear" (every linear layer but the output head).
      use_rslora: scaling = lora_alpha / sqrt(r); use_dora: weight-decomposed LoRA (a trained magnitude vector).
      init_lora_weights: True (A Kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r)), "loftq" (see
        `loftq_initialize`), or False (B random too: a non-identity start, for tests).
      bias: "none" only (biases stay frozen; PEFT's "all"/"lora_only" would train them).
      loftq_iter: alternating quantize / SVD iterations for init_lora_weights="loftq".
    """

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    bias: str = "none"
    loftq_iter: int = 1

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora r must be a positive integer, got {self.r!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.init_lora_weights not in INIT_CHOICES:
            raise ValueError(f"init_lora_weights must be one of {INIT_CHOICES}, got {self.init_lora_weights!r}")
        if self.bias != "none":
            raise ValueError(f"bias={self.bias!r} is not supported (biases stay frozen); use 'none'")
        if self.loftq_iter < 1:
            raise ValueError(f"loftq_iter must be >= 1, got {self.loftq_iter}")
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _matches(config: LoraConfig, path: str) -> bool:
    target = config.target_modules
    if target == "all-linear":
        return path != "lm_head"
    if isinstance(target, str):
        return re.fullmatch(target, path) is not None
    return any(path == name or path.endswith("." + name) for name in target)


def target_module_names(model: nnx.Module, config: LoraConfig) -> list[str]:
    """The dotted paths (`model.layers.self_attn.q_proj`, per stacked layer group) that get adapters."""
    names = []
    for path, module in nnx.iter_graph(model):
        name = ".".join(str(p) for p in path)
        if isinstance(module, QLinear) and _matches(config, name):
            names.append(name)
    return names


class LoRA(nnx.Module):
    """The adapter of one QLinear: lora_A [r, in], lora_B [out, r] (and DoRA's magnitude [out]), float32."""

    def __init__(self, a: jax.Array, b: jax.Array, magnitude: jax.Array | None, *, scaling: float, dropout: float,
                 key_id: int):  # fmt: skip
        self.lora_A = nnx.LoRAParam(a)
        self.lora_B = nnx.LoRAParam(b)
        self.lora_magnitude_vector = None if magnitude is None else nnx.LoRAParam(magnitude)
        self.scaling, self.dropout, self.key_id = scaling, dropout, key_id

    def delta_weight(self) -> jax.Array:
        """scaling * B @ A, [out, in], float32."""
        return self.scaling * (self.lora_B[...] @ self.lora_A[...])

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
        """What the adapter adds to the layer's output `base_out` for input x [..., in_features].

        dropout_key: the layer's key for dropout (folded with this module's id), None in eval (as PEFT's eval mode);
        kernels: how DoRA recomputes the base layer on the dropped-out input.
        """
        dtype = base_out.dtype
        x_in, dropped = self._dropped(x, dropout_key)
        a, b = self.lora_A[...].astype(dtype), self.lora_B[...].astype(dtype)
        lora_out = jnp.dot(jnp.dot(x_in.astype(dtype), a.T), b.T) * jnp.asarray(self.scaling, dtype)
        if self.lora_magnitude_vector is None:
            return lora_out
        # DoRA: rescale each output row to the learned magnitude; the norm of the adapted weight is a constant.
        weight = jax.lax.stop_gradient(layer.dense_weight(dtype))
        adapted = weight + jax.lax.stop_gradient(self.delta_weight()).astype(dtype)
        norm = jax.lax.stop_gradient(jnp.linalg.norm(adapted.astype(jnp.float32), axis=1))
        magnitude_scale = (self.lora_magnitude_vector[...] / norm).astype(dtype)
        if dropped:
            base = layer.base(x_in, kernels=kernels)
        else:
            base = base_out
        if layer.bias is not None:
            base = base - layer.bias[...].astype(dtype)
        return (magnitude_scale - 1) * base + magnitude_scale * lora_out


def _initial_adapter(
    key: jax.Array, layer: QLinear, config: LoraConfig
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(A, B, magnitude) for one (unstacked) layer, float32."""
    key_a, key_b = jax.random.split(key)
    fan_in, fan_out, r = layer.in_features, layer.out_features, config.r
    if config.init_lora_weights == "gaussian":
        a = jax.random.normal(key_a, (r, fan_in), jnp.float32) / r
    else:  # PEFT's default: nn.init.kaiming_uniform_(A, a=sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in))
        bound = 1 / math.sqrt(fan_in)
        a = jax.random.uniform(key_a, (r, fan_in), jnp.float32, -bound, bound)
    if config.init_lora_weights is False:
        b = jax.random.normal(key_b, (fan_out, r), jnp.float32) * 0.02
    else:
        b = jnp.zeros((fan_out, r), jnp.float32)
    magnitude = None
    if config.use_dora:
        adapted = layer.dense_weight(jnp.float32) + config.scaling * (b @ a)
        magnitude = jnp.linalg.norm(adapted, axis=1)
    return a, b, magnitude


def _stacked(module: QLinear) -> int | None:
    """The layer count if this QLinear's variables carry a leading layer axis, else None."""
    value = module.packed[...] if module.is_quantized else module.weight[...]
    return value.shape[0] if value.ndim == (2 if module.is_quantized else 3) else None


def apply_lora(model: nnx.Module, config: LoraConfig, *, rngs: nnx.Rngs) -> list[str]:
    """Adds an adapter to every targeted QLinear (4-bit or dense) of `model`, in place.

    Returns the adapted module paths. Raises if nothing matches, or if the model already has adapters.
    """
    names = target_module_names(model, config)
    if not names:
        raise ValueError(f"target_modules={config.target_modules!r} matches no linear layer of the model")
    if config.init_lora_weights == "loftq":
        raise ValueError("init_lora_weights='loftq' needs the 16-bit weights: use lora.loftq_initialize(...)")
    modules = dict(nnx.iter_graph(model))
    for name in names:
        module = modules[tuple(name.split("."))]
        if module.lora is not None:
            raise ValueError(f"{name} already has a LoRA adapter")
        key = rngs.params()
        layers = _stacked(module)
        if layers is None:
            a, b, m = _initial_adapter(key, module, config)
        else:
            graphdef, state = nnx.split(module)
            a, b, m = jax.vmap(lambda k, st, g=graphdef: _initial_adapter(k, nnx.merge(g, st), config))(
                jax.random.split(key, layers), state
            )
        key_id = zlib.crc32(name.encode()) & 0x7FFFFFFF  # a stable, distinct dropout stream per module
        module.lora = LoRA(a, b, m, scaling=config.scaling, dropout=config.lora_dropout, key_id=key_id)
    return names


def lora_filter() -> Any:
    """The nnx filter of exactly the adapter parameters (nothing else is ever trained)."""
    return nnx.LoRAParam


def trainable_parameters(model: nnx.Module, *, verbose: bool = True) -> tuple[int, int]:
    """(trainable, total) parameter counts, printed like PEFT's `print_trainable_parameters`.

    4-bit weights count their original elements (as PEFT counts a Linear4bit's), not their bytes.
    """
    trainable = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    frozen = sum(x.size for x in jax.tree.leaves(nnx.state(model, Frozen)))
    quantized = sum(
        m.in_features * m.out_features * (_stacked(m) or 1)
        for _, m in nnx.iter_graph(model)
        if isinstance(m, QLinear) and m.is_quantized
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

    For each layer, alternate `config.loftq_iter` times: Q = quantize(W - B A), then B A = the rank-r truncated SVD
    of W - dequant(Q) (PEFT's loop; B is divided by the scaling so the sum holds for any lora_alpha). `weights`
    gives the 16-bit weights, one at a time: a mapping or a TensorSource from `qlora_jax.convert` with
    `tensor(name)` for transformers names (`model.layers.3.self_attn.q_proj.weight`).

    Returns {module path: (||W - dequant(Q_plain)||_F, ||W - (dequant(Q) + s B A)||_F)} summed over layers: the
    reconstruction error with a plain init and with LoftQ.
    """
    get = weights.tensor if hasattr(weights, "tensor") else weights.__getitem__
    modules = dict(nnx.iter_graph(model))
    names = list(names) if names is not None else target_module_names(model, config)
    errors = {}
    for name in names:
        module: QLinear = modules[tuple(name.split("."))]
        if not module.is_quantized:
            continue
        layers = _stacked(module)
        indices = range(layers) if layers is not None else [None]
        plain_err = loftq_err = 0.0
        new_buffers: dict[str, list] = {}
        a_list, b_list = [], []
        for i in indices:
            layer_name = name if i is None else name.replace("model.layers.", f"model.layers.{i}.", 1)
            w = jnp.asarray(np.asarray(get(layer_name + ".weight")), jnp.float32)
            qt, a, b, plain, err = _loftq_one(w, module, config)
            plain_err, loftq_err = plain_err + plain**2, loftq_err + err**2
            for buf in ("packed", "absmax", "nested_absmax", "offset"):
                if getattr(qt, buf) is not None:
                    new_buffers.setdefault(buf, []).append(getattr(qt, buf))
            a_list.append(a)
            b_list.append(b)
        for buf, values in new_buffers.items():
            getattr(module, buf).set_value(jnp.stack(values) if layers is not None else values[0])
        a = jnp.stack(a_list) if layers is not None else a_list[0]
        b = jnp.stack(b_list) if layers is not None else b_list[0]
        if module.lora is None:
            key_id = zlib.crc32(name.encode()) & 0x7FFFFFFF
            module.lora = LoRA(a, b, None, scaling=config.scaling, dropout=config.lora_dropout, key_id=key_id)
        else:
            module.lora.lora_A.set_value(a)
            module.lora.lora_B.set_value(b)
        errors[name] = (math.sqrt(plain_err), math.sqrt(loftq_err))
    return errors


def _loftq_one(w: jax.Array, layer: QLinear, config: LoraConfig):
    q = layer.quant
    kwargs = dict(quant_type=q.quant_type, blocksize=q.blocksize, double_quant=q.double_quant,
                  dq_blocksize=q.dq_blocksize)  # fmt: skip
    dtype = layer.param_dtype
    plain = float(jnp.linalg.norm(w - dequantize(quantize(w.astype(dtype), **kwargs), jnp.float32)))
    residual = w
    for i in range(config.loftq_iter):
        qt = quantize(residual.astype(dtype), **kwargs)
        u, s, vt = jnp.linalg.svd(w - dequantize(qt, jnp.float32), full_matrices=False)
        root = jnp.sqrt(s[: config.r])
        left, right = u[:, : config.r] * root, root[:, None] * vt[: config.r]  # [out, r], [r, in]
        if i + 1 < config.loftq_iter:
            residual = w - left @ right
    a, b = right, left / config.scaling
    err = float(jnp.linalg.norm(w - (dequantize(qt, jnp.float32) + config.scaling * (b @ a))))
    return qt, a, b, plain, err
