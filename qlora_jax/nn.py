"""Layers with frozen base weights: QLinear (4-bit or 16-bit), Embed and RMSNorm.

The variable type decides what can train. Base weights are `Frozen`, the buffers of a 4-bit weight are
`QuantizedWeight`; neither is an `nnx.Param`, so no optimizer or `nnx.Param` filter can ever pick them up. LoRA
adapters (`qlora_jax.lora`) attach to a QLinear as its `lora` submodule and hold `nnx.LoRAParam`s.

How a layer computes (the kernel choice, LoRA dropout's key) is passed to each call, never read from state.
A QLinear whose 4-bit buffers are a whole stack of layers (the decoder's decode step reads them in place, never
slicing them) is given its layer's index with `read_in_place` by whoever merged it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qlora_jax.kernels import KernelOptions, nf4_matmul, nf4_matmul_group
from qlora_jax.kernels.decode import layer_of
from qlora_jax.kernels.tune_model import LinearShape
from qlora_jax.parallel.mesh import context_mesh, gathered, gathered_matmul, mesh_size
from qlora_jax.quant import QUANT_BUFFERS, QuantConfig, QuantizedTensor, dequantize, quantize

__all__ = [
    "Frozen",
    "QuantizedWeight",
    "QLinear",
    "Embed",
    "RMSNorm",
    "frozen_matmul",
    "linear_shapes",
    "linears",
    "read_in_place",
]


class Frozen(nnx.Variable):
    """A base-model weight: loaded, used, never trained."""


@jax.custom_vjp
def frozen_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w.T for a frozen w [out, in] of x's dtype, accumulated in float32, in x's dtype.

    The backward pass computes dx = dy @ w from the cotangent in x's dtype: the same products as autodiff's (a
    cotangent of a 16-bit output holds 16-bit values), without the float32 copy of w that autodiff makes to
    multiply a float32 cotangent (2 GiB for Llama-3's bf16 lm_head, the largest temporary of a QLoRA step).
    w gets no gradient: it never trains."""
    return jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(x.dtype)


def _frozen_matmul_fwd(x, w):
    return frozen_matmul(x, w), w


def _frozen_matmul_bwd(w, dy):
    dx = jnp.dot(dy.astype(w.dtype), w, preferred_element_type=jnp.float32).astype(dy.dtype)
    return dx, jnp.zeros_like(w)


frozen_matmul.defvjp(_frozen_matmul_fwd, _frozen_matmul_bwd)


class QuantizedWeight(nnx.Variable):
    """One buffer of a 4-bit weight: packed codes, absmax (codes), nested absmax or offset."""


class QLinear(nnx.Module):
    """y = x @ W.T (+ b) with W [out_features, in_features] frozen, in 4 bits (`quant`) or in `param_dtype`.

    Args:
      in_features, out_features: the weight's shape is (out_features, in_features), PyTorch's layout.
      use_bias: a frozen bias (Qwen2's q/k/v projections).
      quant: a QuantConfig to store W in 4 bits, or None for a dense base.
      dtype: the compute dtype of activations; param_dtype: what a dense W (and the bias) is stored in.
      rngs: for the random initial weight (normal, std 0.02; loaders overwrite it).

    >>> layer = QLinear(64, 32, quant=QuantConfig(), rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 64), jnp.bfloat16)).shape
    (2, 32)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        quant: QuantConfig | None = None,
        dtype: Any = jnp.bfloat16,
        param_dtype: Any = jnp.bfloat16,
        rngs: nnx.Rngs,
    ):
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
        w = (jax.random.normal(rngs.params(), (out_features, in_features), jnp.float32) * 0.02).astype(param_dtype)
        self.quant = quant
        if quant is None:
            self.weight = Frozen(w)
        else:
            qt = quantize(w, quant)
            for name in QUANT_BUFFERS:
                value = getattr(qt, name)
                setattr(self, name, None if value is None else QuantizedWeight(value))
        self.bias = Frozen(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.lora: nnx.Module | None = nnx.data(None)  # set by qlora_jax.lora.apply_lora
        # trained rows of an output head (PEFT's trainable tokens / modules_to_save), set by qlora_jax.tokens
        self.trainable_rows: nnx.Module | None = nnx.data(None)
        # The layer of a stacked 4-bit weight this module multiplies by (`read_in_place`); None: unstacked.
        self.layer_index: jax.Array | None = nnx.data(None)

    @property
    def is_quantized(self) -> bool:
        return self.quant is not None

    def quantized_tensor(self, *, gather: bool = True) -> QuantizedTensor:
        """The 4-bit weight as a QuantizedTensor (its buffers may carry a leading layer axis: the whole stack when
        read in place); traced under a mesh (`qlora_jax.parallel.mesh.context_mesh`), whole on every device
        (gathered just in time) unless not `gather`."""
        assert self.quant is not None, "this QLinear holds a dense weight"
        buffers = {name: (None if getattr(self, name) is None else getattr(self, name)[...]) for name in QUANT_BUFFERS}
        if gather:
            buffers = gathered(buffers)
        return QuantizedTensor(
            **buffers,
            shape=(self.out_features, self.in_features),
            dtype=self.param_dtype,
            quant_type=self.quant.quant_type,
            blocksize=self.quant.blocksize,
            dq_blocksize=self.quant.dq_blocksize if self.quant.double_quant else None,
        )

    def dense_weight(self, dtype: Any = None) -> jax.Array:
        """W [out_features, in_features] in `dtype` (dequantized if 4-bit)."""
        dtype = self.param_dtype if dtype is None else dtype
        if self.is_quantized:
            return dequantize(layer_of(self.quantized_tensor(), self.layer_index), dtype)
        return self.weight[...].astype(dtype)

    def base(self, x: jax.Array, *, kernels: KernelOptions = KernelOptions()) -> jax.Array:
        """The frozen layer alone: x @ W.T + b, accumulated in float32, in the compute dtype; a 4-bit W is
        multiplied by `nf4_matmul` with the kernel choice `kernels`."""
        x = x.astype(self.dtype)
        if self.is_quantized:
            matmul = functools.partial(nf4_matmul, options=kernels, layer=self.layer_index)
            y = gathered_matmul(matmul, x, self.quantized_tensor(gather=False))
        else:
            w = jax.lax.stop_gradient(gathered(self.weight[...])).astype(self.dtype)
            y = frozen_matmul(x, w)
        return self._biased(y)

    def _biased(self, y: jax.Array) -> jax.Array:
        if self.bias is not None:
            y = y + jax.lax.stop_gradient(gathered(self.bias[...])).astype(self.dtype)
        return y

    def adapted(self, x: jax.Array, y: jax.Array, *, kernels: KernelOptions, dropout_key: jax.Array | None):
        """The base output y with the adapter's contribution added (y itself without an adapter)."""
        if self.lora is not None:
            y = y + self.lora(x, self, y, kernels=kernels, dropout_key=dropout_key).astype(y.dtype)
        if self.trainable_rows is not None:  # an output head with trained rows: their outputs replaced
            y = self.trainable_rows.project(x.astype(self.dtype), y, self.param_dtype)
        return y

    def __call__(
        self, x: jax.Array, *, kernels: KernelOptions = KernelOptions(), dropout_key: jax.Array | None = None
    ) -> jax.Array:
        """x [..., in_features] -> [..., out_features] in the compute dtype, adapter included.

        kernels: how a 4-bit W is multiplied; dropout_key: turns the adapter's dropout on (training), None off.
        """
        return self.adapted(x, self.base(x, kernels=kernels), kernels=kernels, dropout_key=dropout_key)


def linears(
    layers: tuple[QLinear, ...],
    x: jax.Array,
    *,
    kernels: KernelOptions = KernelOptions(),
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """Each layer applied to the same x (q/k/v, gate/up), adapters included: what `layer(x)` gives for each, with
    the 4-bit bases multiplied by one `nf4_matmul_group` call (one decode-kernel launch where it is the choice).

    The group needs 4-bit layers of one compute dtype, all stacked alike, and one device (under a mesh of more,
    `qlora_jax.parallel.mesh.context_mesh`, each layer runs on its own, per device)."""
    grouped = (
        len(layers) > 1
        and all(layer.is_quantized for layer in layers)
        and mesh_size(context_mesh()) == 1
        and len({layer.dtype for layer in layers}) == 1
        and len({layer.layer_index is None for layer in layers}) == 1
    )
    if not grouped:
        return tuple(layer(x, kernels=kernels, dropout_key=dropout_key) for layer in layers)
    first = layers[0]
    xc = x.astype(first.dtype)
    qts = [layer.quantized_tensor(gather=False) for layer in layers]
    bases = nf4_matmul_group(xc, qts, layer=first.layer_index, options=kernels)
    return tuple(
        layer.adapted(x, layer._biased(y), kernels=kernels, dropout_key=dropout_key)
        for layer, y in zip(layers, bases, strict=True)
    )


def read_in_place(module: nnx.Module, index: jax.Array) -> None:
    """Tells every QLinear in `module` whose 4-bit buffers are a stack of layers to multiply by layer `index`
    (an int32 scalar, traced), reading the stack where it lies. For a module merged inside a step (the decoder's
    layer scan); the stacked buffers are never sliced before the matmul."""
    for _, sub in nnx.iter_graph(module):
        if isinstance(sub, QLinear) and sub.is_quantized and jnp.ndim(sub.packed[...]) > 1:
            sub.layer_index = index


class Embed(nnx.Module):
    """Token embeddings [vocab, hidden], frozen; `attend` is the tied output projection. `trainable_rows` (set by
    `qlora_jax.tokens`: PEFT's trainable tokens or a trained copy) replaces rows wherever the table is read."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        scale: float | None = None,
        dtype: Any = jnp.bfloat16,
        param_dtype: Any = jnp.bfloat16,
        rngs: nnx.Rngs,
    ):
        self.weight = Frozen(
            (jax.random.normal(rngs.params(), (num_embeddings, features), jnp.float32) * 0.02).astype(param_dtype)
        )
        self.scale, self.dtype = scale, jnp.dtype(dtype)
        self.trainable_rows: nnx.Module | None = nnx.data(None)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        table = jax.lax.stop_gradient(gathered(self.weight[...]))
        x = jnp.take(table, tokens, axis=0)  # [B, T, D]
        if self.trainable_rows is not None:
            x = self.trainable_rows.embed(tokens, x)
        if self.scale is not None:  # Gemma: times sqrt(hidden), rounded to the weight's dtype first
            x = x * jnp.asarray(self.scale, table.dtype)
        return x.astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        table = jax.lax.stop_gradient(gathered(self.weight[...]))
        x = x.astype(self.dtype)
        out = frozen_matmul(x, table.astype(self.dtype))
        if self.trainable_rows is not None:  # the tied head reads the trained rows too
            out = self.trainable_rows.project(x, out, table.dtype)
        return out


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32. Llama style: w * normed.astype(dtype); Gemma style: (normed * (1 + w)) in
    float32, then cast (the two round differently, and we follow each exactly)."""

    def __init__(self, features: int, *, eps: float, gemma: bool = False, param_dtype: Any = jnp.bfloat16):
        self.weight = Frozen(jnp.zeros((features,), param_dtype) if gemma else jnp.ones((features,), param_dtype))
        self.eps, self.gemma = eps, gemma

    def __call__(self, x: jax.Array) -> jax.Array:
        w = jax.lax.stop_gradient(gathered(self.weight[...]))
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.gemma:
            return (normed * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
        return w.astype(x.dtype) * normed.astype(x.dtype)


def linear_shapes(model: nnx.Module) -> list[LinearShape]:
    """The distinct quantized linear weights of a (possibly abstract) model, in order of first appearance."""
    found: dict[tuple, list[str]] = {}
    for path, module in nnx.iter_graph(model):
        if not isinstance(module, QLinear) or not module.is_quantized:
            continue
        q = module.quant
        key = (
            module.out_features,
            module.in_features,
            module.param_dtype.name,
            module.dtype.name,
            q.quant_type,
            q.blocksize,
            q.double_quant,
        )
        name = ".".join(str(p) for p in path[-2:])
        found.setdefault(key, [])
        if name not in found[key]:
            found[key].append(name)
    return [LinearShape(*key, tuple(names)) for key, names in found.items()]
