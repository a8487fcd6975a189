"""The adapter layers: `LoRA` on a linear layer (with DoRA's magnitude), `ExpertLoRA` on a mixture of experts'
3-D parameter, their per-layer scaling (`AdapterScaling`).

An adapter on a linear layer y = x @ W.T adds scaling * dropout(x) @ A.T @ B.T, with A [r, in] and B [out, r]
(PEFT's `lora_A.weight` / `lora_B.weight` layouts), scaling = lora_alpha / r (rsLoRA: / sqrt(r)), B starting at
zero. Adapters are float32 `nnx.LoRAParam`s (computed in the layer's dtype); the base weight stays frozen.

A stacked module (one per kind of linear layer, a leading [num_layers] axis) holds its adapters for every layer,
zero-padded to the largest rank, with a per-layer scaling that is 0 where a layer has no adapter: such layers add
exactly nothing, their (zero) parameters get exactly zero gradient and stay zero under the optimizer, and they are
never exported (docs/lora.md).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.kernels import KernelOptions
from qlora_jax.kernels.grouped import DEFAULT_TILE, grouped_matmul
from qlora_jax.nn import QLinear

__all__ = ["AdapterScaling", "LoRA", "ExpertLoRA", "dora_weight_norm", "dropout_key_id"]


def dropout_key_id(name: str) -> int:
    """The id a module's adapter folds into the layer's dropout key (`LoRA`'s `key_id`): a stable, distinct
    dropout stream per module path."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def dora_weight_norm(weight: jax.Array, delta: jax.Array) -> jax.Array:
    """||W + delta||, row by row: float32[out] for W, delta [out, in] (PEFT's `DoraLinearLayer.get_weight_norm`).

    DoRA's layer computes m / this norm times its adapted output, so its merged weight is (W + delta) * m / norm.
    """
    return jnp.linalg.norm((weight + delta).astype(jnp.float32), axis=1)


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
