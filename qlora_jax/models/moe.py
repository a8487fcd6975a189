"""A mixture of experts in place of the MLP (Qwen3-MoE, Mixtral): a top-k router, the experts as stacked 4-bit
weights multiplied by grouped matmuls over the tokens routed to each, and the router's load-balancing statistics.

Module names mirror transformers 5's (`modeling_qwen3_moe.py`, `modeling_mixtral.py`): `mlp.gate` (the router,
`weight` [E, H]), `mlp.experts.gate_up_proj` ([E, 2 I, H], gate rows first) and `mlp.experts.down_proj` ([E, H, I]),
so that PEFT's `target_parameters` name them as they are. The expert weights are kept as bitsandbytes would quantize
each expert's nn.Linear (`experts.N.gate_proj`, `.up_proj`, `.down_proj`, one 4-bit tensor each): `QExperts` holds
them stacked [E, P, ...] with P = 2 parts (gate, up) for gate_up_proj and 1 for down_proj (`docs/moe.md`).

The block computes what transformers' `Qwen3MoeSparseMoeBlock` / `MixtralSparseMoeBlock` do:

    logits = x @ gate.T                                   (compute dtype)
    probs = softmax(float32(logits)); top_w, top_e = top_k(probs)   (ties: the lower expert index first)
    top_w /= sum(top_w)                                   (norm_topk_prob; always in Mixtral)
    out[t] = sum over j of top_w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)),  e = top_e[t, j]

with the token-expert pairs sorted by expert and each expert's rows multiplied by its weight alone
(`qlora_jax.kernels.grouped`). Adapters on the experts and the router are `qlora_jax.lora`'s, set on each
module's `lora` slot.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from qlora_jax.kernels import KernelOptions
from qlora_jax.kernels.grouped import DEFAULT_TILE, grouped_frozen_matmul
from qlora_jax.models.config import ModelConfig
from qlora_jax.models.moe_config import MoeConfig
from qlora_jax.nn import Frozen, QuantizedWeight
from qlora_jax.parallel.mesh import BATCH_AXES, FSDP, context_mesh, gathered, gathers_weights, mesh_size
from qlora_jax.quant import QUANT_BUFFERS, QuantConfig, QuantizedTensor, dequantize, quantize

__all__ = ["QExperts", "TopKRouter", "Experts", "SparseMoeBlock", "RouterStats", "route", "load_balancing_loss"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RouterStats:
    """What transformers' `load_balancing_loss_func` sums over one layer's tokens (masked rows left out):
    counts [E] (top-k selections of each expert), prob_sum [E] (routing probabilities), rows [] (tokens);
    float32, with a leading [num_layers] axis out of the layer scan."""

    counts: jax.Array
    prob_sum: jax.Array
    rows: jax.Array


def route(logits: jax.Array, moe: MoeConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(probs float32 [N, E], top-k experts int32 [N, k], their weights [N, k]) from router logits [N, E].

    Softmax in float32, top-k by probability (equal probabilities: the lower expert index first), renormalized
    when `norm_topk_prob`; the weights are cast to the logits' dtype when `weights_in_compute_dtype` (Qwen3-MoE),
    else float32 (Mixtral).
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_w, top_e = jax.lax.top_k(probs, moe.top_k)
    if moe.norm_topk_prob:
        top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    if moe.weights_in_compute_dtype:
        top_w = top_w.astype(logits.dtype)
    return probs, top_e, top_w


def load_balancing_loss(stats: RouterStats, num_experts: int) -> jax.Array:
    """transformers' `load_balancing_loss_func` (Switch Transformer, eqs. 4-6) from every layer's RouterStats:
    E * sum_e (selections of e / rows) * (probability mass of e / rows), with rows and sums pooled over layers."""
    rows = jnp.sum(stats.rows)
    tokens_per_expert = jnp.sum(stats.counts, axis=0) / rows
    prob_per_expert = jnp.sum(stats.prob_sum, axis=0) / rows
    return jnp.sum(tokens_per_expert * prob_per_expert) * num_experts


class QExperts(nnx.Module):
    """One projection of E experts, frozen: W [E, parts * out_features, in_features] (transformers 5's 3-D
    parameter), stored in 4 bits as `parts` tensors [out_features, in_features] per expert, each quantized as
    bitsandbytes quantizes one nn.Linear's weight (buffers [E, parts, ...]), or dense in `param_dtype`.

    Args:
      num_experts, in_features, out_features: one expert part's weight is [out_features, in_features].
      parts: the per-expert nn.Linears fused on the output axis (2 for gate_up_proj: gate rows, then up rows).
      quant: 4-bit storage, or None for a dense base; dtype: compute dtype; rngs: random initial weights.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        *,
        parts: int = 1,
        quant: QuantConfig | None = None,
        dtype: Any = jnp.bfloat16,
        param_dtype: Any = jnp.bfloat16,
        rngs: nnx.Rngs,
    ):
        self.num_experts, self.parts = num_experts, parts
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
        shape = (num_experts, parts, out_features, in_features)
        w = (jax.random.normal(rngs.params(), shape, jnp.float32) * 0.02).astype(param_dtype)
        self.quant = quant
        if quant is None:
            self.weight = Frozen(w.reshape(num_experts, parts * out_features, in_features))
        else:
            qt = jax.vmap(jax.vmap(lambda a: quantize(a, quant)))(w)
            for name in QUANT_BUFFERS:
                value = getattr(qt, name)
                setattr(self, name, None if value is None else QuantizedWeight(value))
        self.lora: nnx.Module | None = nnx.data(None)  # set by qlora_jax.lora.apply_lora

    @property
    def is_quantized(self) -> bool:
        return self.quant is not None

    def weights(self, *, gather: bool = True) -> QuantizedTensor | jax.Array:
        """The frozen weights as the grouped matmul takes them: a QuantizedTensor of shape (out_features,
        in_features) whose buffers lead with [E, parts] (and a layer axis where stacked), or the dense array."""
        if not self.is_quantized:
            w = jax.lax.stop_gradient(self.weight[...])
            return gathered(w) if gather else w
        buffers = {n: (None if getattr(self, n) is None else getattr(self, n)[...]) for n in QUANT_BUFFERS}
        if gather:
            buffers = gathered(buffers)
        q = self.quant
        return QuantizedTensor(
            **buffers,
            shape=(self.out_features, self.in_features),
            dtype=self.param_dtype,
            quant_type=q.quant_type,
            blocksize=q.blocksize,
            dq_blocksize=q.dq_blocksize if q.double_quant else None,
        )

    def dense_weight(self, dtype: Any = None) -> jax.Array:
        """W [E, parts * out_features, in_features] in `dtype` (dequantized if 4-bit), for one layer."""
        dtype = self.param_dtype if dtype is None else dtype
        w = self.weights()
        if not self.is_quantized:
            return w.astype(dtype)
        parts = jax.vmap(jax.vmap(lambda t: dequantize(t, dtype)))(w)  # [E, parts, out, in]
        return parts.reshape(self.num_experts, self.parts * self.out_features, self.in_features)

    def base(self, x: jax.Array, group_sizes: jax.Array, *, tile: int = DEFAULT_TILE) -> jax.Array:
        """The frozen experts alone on rows x [M, in] sorted by expert: [M, parts * out] in the compute dtype."""
        x = x.astype(self.dtype)
        if not gathers_weights():
            return grouped_frozen_matmul(x, self.weights(), group_sizes, tile=tile)
        # Under FSDP: gather inside a checkpoint, so the backward pass gathers again instead of keeping every
        # layer's gathered experts alive (as `qlora_jax.parallel.mesh.gathered_matmul` does for a linear).
        return jax.checkpoint(lambda x, w: grouped_frozen_matmul(x, gathered(w), group_sizes, tile=tile))(
            x, self.weights(gather=False)
        )

    def __call__(self, x: jax.Array, group_sizes: jax.Array, *, tile: int = DEFAULT_TILE) -> jax.Array:
        """Rows x [M, in] sorted by expert (group_sizes [E] rows each) -> [M, parts * out], adapter included."""
        y = self.base(x, group_sizes, tile=tile)
        if self.lora is not None:
            y = y + self.lora(x, group_sizes, tile=tile).astype(y.dtype)
        return y


class TopKRouter(nnx.Module):
    """transformers 5's router (`mlp.gate`): logits = x @ weight.T, weight [num_experts, hidden] frozen and never
    quantized (transformers' bitsandbytes integration quantizes nn.Linear layers only). Not a linear layer for
    PEFT: adapters reach it through `target_parameters=["gate.weight"]`."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        *,
        dtype: Any = jnp.bfloat16,
        param_dtype: Any = jnp.bfloat16,
        rngs: nnx.Rngs,
    ):
        self.in_features, self.out_features = hidden_size, num_experts
        self.dtype, self.param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)
        w = jax.random.normal(rngs.params(), (num_experts, hidden_size), jnp.float32) * 0.02
        self.weight = Frozen(w.astype(param_dtype))
        self.bias = None
        self.lora: nnx.Module | None = nnx.data(None)  # set by qlora_jax.lora.apply_lora

    def dense_weight(self, dtype: Any = None) -> jax.Array:
        return self.weight[...].astype(self.param_dtype if dtype is None else dtype)

    def base(self, x: jax.Array, *, kernels: KernelOptions = KernelOptions()) -> jax.Array:
        w = jax.lax.stop_gradient(gathered(self.weight[...])).astype(self.dtype)
        return jnp.dot(x.astype(self.dtype), w.T, preferred_element_type=jnp.float32).astype(self.dtype)

    def __call__(
        self, x: jax.Array, *, kernels: KernelOptions = KernelOptions(), dropout_key: jax.Array | None = None
    ) -> jax.Array:
        y = self.base(x, kernels=kernels)
        if self.lora is not None:
            y = y + self.lora(x, self, y, kernels=kernels, dropout_key=dropout_key).astype(y.dtype)
        return y


class Experts(nnx.Module):
    """transformers 5's `mlp.experts`: gate_up_proj (gate and up of every expert) and down_proj."""

    def __init__(self, config: ModelConfig, *, quant_gate_up, quant_down, dtype, param_dtype, rngs: nnx.Rngs):
        c, m = config, config.moe
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_up_proj = QExperts(
            m.num_experts, c.hidden_size, m.expert_size, parts=2, quant=quant_gate_up, **kwargs
        )
        self.down_proj = QExperts(m.num_experts, m.expert_size, c.hidden_size, quant=quant_down, **kwargs)
        self.expert_size = m.expert_size

    def __call__(self, x: jax.Array, group_sizes: jax.Array, *, tile: int = DEFAULT_TILE) -> jax.Array:
        gate_up = self.gate_up_proj(x, group_sizes, tile=tile)  # [M, 2 I]
        gate, up = gate_up[:, : self.expert_size], gate_up[:, self.expert_size :]
        return self.down_proj(jax.nn.silu(gate) * up, group_sizes, tile=tile)


class SparseMoeBlock(nnx.Module):
    """transformers' `Qwen3MoeSparseMoeBlock` / `MixtralSparseMoeBlock`: `gate` (TopKRouter) and `experts`."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        quant_for: Callable[[str], QuantConfig | None],
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        """`quant_for(path)`: how the experts at `path` (in a layer: `mlp.experts.gate_up_proj`) are stored, None for
        16 bits (the decoder's rule, `skip_modules` matched per layer)."""
        if config.moe is None:
            raise ValueError(f"a {config.model_type} config has no mixture of experts")
        self.gate = TopKRouter(
            config.hidden_size, config.moe.num_experts, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.experts = Experts(
            config,
            quant_gate_up=quant_for("mlp.experts.gate_up_proj"),
            quant_down=quant_for("mlp.experts.down_proj"),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.moe = config.moe

    def __call__(
        self, x: jax.Array, *, options: Any, dropout_key: jax.Array | None = None, router_mask: jax.Array | None = None
    ) -> tuple[jax.Array, RouterStats]:
        """x [B, T, H] -> (out [B, T, H], this layer's RouterStats); `router_mask` [B, T] (False: left out of the
        statistics, as transformers leaves out padding); `options`: a ComputeOptions (its kernels; expert_parallel,
        under a mesh with fsdp > 1: the experts computed where they are, `_expert_parallel`)."""
        moe = self.moe
        b, t, h = x.shape
        x2 = x.reshape(b * t, h)
        logits = self.gate(x2, kernels=options.kernels, dropout_key=dropout_key)  # [N, E]
        probs, top_e, top_w = route(logits, moe)
        mesh = context_mesh()
        if options.expert_parallel and mesh_size(mesh, FSDP) > 1:
            out = _expert_parallel(self.experts, x2, top_e, top_w, mesh)
        else:
            out = _dispatch(self.experts, x2, top_e, top_w, moe.num_experts)
        flat = top_e.reshape(-1)
        keep = jnp.ones((b * t,), jnp.float32) if router_mask is None else router_mask.reshape(-1).astype(jnp.float32)
        stats = RouterStats(
            counts=jnp.zeros(moe.num_experts, jnp.float32).at[flat].add(jnp.repeat(keep, moe.top_k)),
            prob_sum=jnp.sum(probs * keep[:, None], axis=0),
            rows=jnp.sum(keep),
        )
        return out.reshape(b, t, h), stats


def _dispatch(
    experts: Experts, x: jax.Array, top_e: jax.Array, top_w: jax.Array, num_experts: int, first: jax.Array | int = 0
) -> jax.Array:
    """sum over j of top_w[n, j] * expert top_e[n, j](x[n]) for rows x [N, H], the experts numbered from `first`
    (`num_experts` of them; pairs routed to others add nothing): the pairs sorted by expert, each expert's rows
    multiplied by its weights alone, scattered back to their tokens."""
    k = top_e.shape[-1]
    local = top_e.reshape(-1) - first  # [N k]: token n's j-th expert at n * k + j
    local = jnp.where((local >= 0) & (local < num_experts), local, num_experts)  # others: after every group
    order = jnp.argsort(local, stable=True)  # sorted by expert, the token order kept within one
    token = order // k
    group_sizes = jnp.zeros(num_experts + 1, jnp.int32).at[local].add(1)[:num_experts]
    ys = experts(x[token], group_sizes, tile=DEFAULT_TILE)  # [N k, H]; zero past the groups
    weights = top_w.reshape(-1)[order]
    contributions = (ys * weights[:, None]).astype(x.dtype)  # Mixtral: the product in float32, then cast
    return jnp.zeros_like(x).at[token].add(contributions)


def _expert_parallel(
    experts: Experts, x: jax.Array, top_e: jax.Array, top_w: jax.Array, mesh: jax.sharding.AbstractMesh
) -> jax.Array:
    """`_dispatch` with the experts split over the mesh's fsdp axis (expert axis 0 of every expert array, their
    adapters' too): each device gathers its fsdp group's rows, computes its own experts' share for all of them,
    and a reduce-scatter sums the shares back onto each device's rows. No expert weight moves."""
    devices = mesh.shape[FSDP]
    graphdef, state = nnx.split(experts)
    num_experts = experts.down_proj.num_experts
    if num_experts % devices:
        raise ValueError(f"expert parallelism: {num_experts} experts do not split over fsdp={devices} devices")
    local_experts = num_experts // devices
    specs = jax.tree.map(lambda a: P(FSDP) if a.ndim and a.shape[0] == num_experts else P(), state)
    rows = P(BATCH_AXES)

    def body(x, top_e, top_w, state):
        # inside, the mesh's axes are manual (`context_mesh()` is None): this device's arrays as they are, no gather
        gather = functools.partial(jax.lax.all_gather, axis_name=FSDP, axis=0, tiled=True)
        first = jax.lax.axis_index(FSDP) * local_experts
        out = _dispatch(nnx.merge(graphdef, state), gather(x), gather(top_e), gather(top_w), local_experts, first)
        return jax.lax.psum_scatter(out, FSDP, scatter_dimension=0, tiled=True)

    call = jax.shard_map(body, mesh=mesh, in_specs=(rows, rows, rows, specs), out_specs=rows, check_vma=False)
    return call(x, top_e, top_w, state)
