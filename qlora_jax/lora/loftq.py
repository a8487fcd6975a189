"""LoftQ: 4-bit weights re-quantized together with their adapters' start, so that dequant(Q) + s * B @ A ~= W
(PEFT's `init_lora_weights="loftq"`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.lora.config import LoraConfig
from qlora_jax.lora.layers import LoRA, dora_weight_norm, dropout_key_id
from qlora_jax.lora.targets import target_layers
from qlora_jax.models.moe import QExperts, TopKRouter
from qlora_jax.models.names import layer_name
from qlora_jax.nn import QLinear
from qlora_jax.quant import QUANT_BUFFERS, dequantize, quantize

__all__ = ["loftq_initialize"]


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
                a,
                b,
                magnitude,
                scaling=scaling,
                ranks=target.ranks,
                dropout=config.lora_dropout,
                key_id=dropout_key_id(name),
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
