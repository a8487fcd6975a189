"""One decoder for every supported family, driven by ModelConfig, with layers stacked and run by `lax.scan`.

Module names mirror transformers' (`model.layers.N.self_attn.q_proj`, `model.embed_tokens`, `lm_head`, ...), so
converters map keys one to one and LoRA `target_modules` mean what they mean in PEFT. The N layers are one
module whose variables carry a leading [num_layers] axis; compile time does not grow with depth.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qlora_jax.kernels import KernelOptions
from qlora_jax.models.attention import (
    ATTENTION_IMPLS,
    AttentionMasks,
    apply_rope,
    attention_mask,
    multi_head_attention,
    resolve_attention,
    rope_tables,
)
from qlora_jax.models.config import ModelConfig
from qlora_jax.models.moe import RouterStats, SparseMoeBlock
from qlora_jax.models.names import LAYERS, hf_module_name, layer_name
from qlora_jax.nn import Embed, QLinear, QuantizedWeight, RMSNorm, linears, read_in_place
from qlora_jax.parallel.mesh import context_mesh, gathered, mesh_size
from qlora_jax.quant import QuantConfig

__all__ = ["ATTENTION_IMPLS", "ComputeOptions", "DecoderLM", "KVCache", "REMAT_POLICIES"]

# Gradient checkpointing of each layer: what the backward pass may keep from the forward pass.
REMAT_POLICIES = ("none", "full", "save_dots", "offload", "full_offload")
# The name of a layer's input inside the layer scan: what "full" saves, and "full_offload" keeps in host memory.
_LAYER_INPUT = "layer_input"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ComputeOptions:
    """How the model computes (never what): a static, hashable value passed to each call, so a function jitted
    for one value recompiles for another.

    Attributes:
      remat: gradient checkpointing of each layer, one of REMAT_POLICIES: "full" (the default: recompute the layer
        in the backward pass), "none", "save_dots" (keep matmul outputs, recompute the rest), "offload" (matmul
        outputs kept in pinned host memory), "full_offload" (as "full", with each layer's input, the one
        activation "full" keeps, in pinned host memory: the least device memory, for one copy out and one back
        per layer). Only a backward pass sees a difference. (A training config's `remat: auto` picks one of these
        by memory: `qlora_jax.train.plan`.)
      attention: the attention implementation, one of ATTENTION_IMPLS (`qlora_jax.models.attention`): "auto"
        (cuDNN's flash attention on a GPU where its masks suffice, else our Pallas flash kernel; XLA on CPU and for
        one-token decoding), "xla", "cudnn" or "pallas" (the Pallas kernel runs in Pallas' interpreter when
        `kernels.interpret`).
      attention_block: queries per block of the XLA attention (`attend`'s block_size): a longer sequence never
        holds its [heads, length, length] scores whole; 0 takes all queries at once. The flash paths need none.
      kernels: how 4-bit matmuls run (`qlora_jax.kernels.KernelOptions`).
      expert_parallel: a mixture of experts traced under a mesh with fsdp > 1 (`jax.set_mesh`) keeps its experts
        split by expert over `fsdp` and computes each where it is, the tokens gathered to it
        (`qlora_jax.sharding.param_shardings(..., expert_parallel=True)` places them so; docs/moe.md).
        No effect without such a mesh or on a dense model.

    Raises ValueError for an unknown remat policy or attention implementation, or a negative attention_block.
    """

    remat: str = "full"
    attention: str = "auto"
    attention_block: int = 512
    kernels: KernelOptions = KernelOptions()
    expert_parallel: bool = False

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat policy must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        if self.attention_block < 0:
            raise ValueError(f"attention_block must be >= 0 (0: unblocked), got {self.attention_block}")


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn)
    if policy == "save_dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    if policy == "offload":  # keep the matmul outputs, in pinned host memory, instead of recomputing them
        offload = jax.checkpoint_policies.offload_dot_with_no_batch_dims(
            offload_src="device", offload_dst="pinned_host"
        )
        return jax.checkpoint(fn, policy=offload)
    if policy == "full_offload":  # save nothing but the layer's input (named in the scan body), in host memory
        inputs = jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=(),
            names_which_can_be_offloaded=(_LAYER_INPUT,),
            offload_src="device",
            offload_dst="pinned_host",
        )
        return jax.checkpoint(fn, policy=inputs)
    raise ValueError(f"remat policy must be one of {REMAT_POLICIES}, got {policy!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer, for incremental decoding.

    k, v: [L, B, S, Hkv, D]; valid: bool [B, S], True where a slot holds a real (not padding) token;
    index: int32 [], the next slot to write (all sequences advance together; prompts are left-padded).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, length: int, dtype: Any = jnp.bfloat16) -> KVCache:
        shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, length), bool), jnp.int32(0))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """Every layer's keys and values [L, B, S, Hkv, D] and the index of the layer being run: a step writes its
    keys and values into the whole cache in place (one slot range of one layer), then reads its layer's slice."""

    k: jax.Array
    v: jax.Array
    layer: jax.Array

    def write(self, k: jax.Array, v: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array, LayerCache]:
        """(keys, values) of this layer [B, S, Hkv, D] after writing k, v [B, T, Hkv, D] at slot `index`, and the
        updated cache."""
        start = (self.layer, 0, index, 0, 0)
        k_all = jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype)[None], start)
        v_all = jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype)[None], start)
        layer_k = jax.lax.dynamic_index_in_dim(k_all, self.layer, 0, keepdims=False)
        layer_v = jax.lax.dynamic_index_in_dim(v_all, self.layer, 0, keepdims=False)
        return layer_k, layer_v, LayerCache(k_all, v_all, self.layer)


@dataclasses.dataclass(frozen=True)
class _StackedQuant:
    """The QuantConfig as the stacked layers see it: their modules are named per layer, as transformers names them
    (`model.layers.<i>.<path>`; `model.language_model.layers.<i>.<path>` in Gemma 3's image-text model)."""

    quant: QuantConfig
    num_layers: int
    text_model: str = "model"  # ModelConfig.text_model_path


def _quant_for(quant: QuantConfig | _StackedQuant | None, path: str) -> QuantConfig | None:
    """How the linear at `path` (relative to the stacked layers, inside them) is stored: None (16 bits) where
    `skip_modules` keeps it. A stacked module holds one storage for all its layers, so it is 16-bit when any layer's
    name is skipped (an Unsloth checkpoint's `model.layers.0.mlp`): exact for every layer, at the 16-bit memory cost
    for the whole stack (counted by the memory planner, logged by the loader)."""
    if isinstance(quant, _StackedQuant):
        names = [hf_module_name(layer_name(f"{LAYERS}.{path}", i), quant.text_model) for i in range(quant.num_layers)]
        return None if any(quant.quant.skips(name) for name in names) else quant.quant
    return None if quant is None or quant.skips(path) else quant


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, quant, dtype, param_dtype, rngs: nnx.Rngs):
        c = config
        linear = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if c.fused_qkv:
            self.qkv_proj = QLinear(
                c.hidden_size,
                c.q_size + 2 * c.kv_size,
                use_bias=c.qkv_bias,
                quant=_quant_for(quant, "self_attn.qkv_proj"),
                **linear,
            )
        else:
            for name, size in (("q_proj", c.q_size), ("k_proj", c.kv_size), ("v_proj", c.kv_size)):
                layer = QLinear(
                    c.hidden_size, size, use_bias=c.qkv_bias, quant=_quant_for(quant, f"self_attn.{name}"), **linear
                )
                setattr(self, name, layer)
        self.o_proj = QLinear(
            c.q_size, c.hidden_size, use_bias=c.o_bias, quant=_quant_for(quant, "self_attn.o_proj"), **linear
        )
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, eps=c.norm_eps, gemma=c.gemma_norm, param_dtype=param_dtype)
            self.k_norm = RMSNorm(c.head_dim, eps=c.norm_eps, gemma=c.gemma_norm, param_dtype=param_dtype)
        self.config = config

    def __call__(
        self,
        x,
        *,
        cos,
        sin,
        masks: AttentionMasks,
        attention: str,
        options: ComputeOptions,
        dropout_key=None,
        cache_kv=None,
        cache_index=None,
    ):
        c = self.config
        b, t, _ = x.shape
        linear = dict(kernels=options.kernels, dropout_key=dropout_key)
        if c.fused_qkv:
            qkv = self.qkv_proj(x, **linear)
            q, k, v = qkv[..., : c.q_size], qkv[..., c.q_size : c.q_size + c.kv_size], qkv[..., c.q_size + c.kv_size :]
        else:
            q, k, v = linears((self.q_proj, self.k_proj, self.v_proj), x, **linear)
        q = q.reshape(b, t, c.num_heads, c.head_dim)
        k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_kv = None
        if cache_kv is not None:  # write this step's keys and values (in place), attend over the whole cache
            k, v, new_kv = cache_kv.write(k, v, cache_index)
        out = multi_head_attention(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
            masks,
            impl=attention,
            window=c.sliding_window if c.sliding_layers.any() else None,
            scale=c.attn_scale,
            softcap=c.attn_logit_softcap,
            block_size=options.attention_block,
            interpret=options.kernels.interpret,
        )
        return self.o_proj(out.reshape(b, t, c.q_size), **linear), new_kv


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, quant, dtype, param_dtype, rngs: nnx.Rngs):
        c = config
        linear = dict(use_bias=c.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if c.fused_gate_up:
            self.gate_up_proj = QLinear(
                c.hidden_size, 2 * c.intermediate_size, quant=_quant_for(quant, "mlp.gate_up_proj"), **linear
            )
        else:
            self.gate_proj = QLinear(
                c.hidden_size, c.intermediate_size, quant=_quant_for(quant, "mlp.gate_proj"), **linear
            )
            self.up_proj = QLinear(c.hidden_size, c.intermediate_size, quant=_quant_for(quant, "mlp.up_proj"), **linear)
        self.down_proj = QLinear(c.intermediate_size, c.hidden_size, quant=_quant_for(quant, "mlp.down_proj"), **linear)
        self.config = config

    def __call__(self, x, *, options: ComputeOptions, dropout_key=None):
        c = self.config
        linear = dict(kernels=options.kernels, dropout_key=dropout_key)
        if c.fused_gate_up:
            gate_up = self.gate_up_proj(x, **linear)
            gate, up = gate_up[..., : c.intermediate_size], gate_up[..., c.intermediate_size :]
        else:
            gate, up = linears((self.gate_proj, self.up_proj), x, **linear)
        act = jax.nn.silu(gate) if c.hidden_act == "silu" else jax.nn.gelu(gate, approximate=True)
        return self.down_proj(act * up, **linear)


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, quant, dtype, param_dtype, rngs: nnx.Rngs):
        c = config
        norm = dict(eps=c.norm_eps, gemma=c.gemma_norm, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(c.hidden_size, **norm)
        self.self_attn = Attention(c, quant=quant, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # In Llama this is the norm before the MLP; in Gemma it normalizes the attention output.
        self.post_attention_layernorm = RMSNorm(c.hidden_size, **norm)
        if c.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, **norm)
            self.post_feedforward_layernorm = RMSNorm(c.hidden_size, **norm)
        # A mixture of experts (qwen3_moe, mixtral) in place of the MLP: `qlora_jax.models.moe`.
        if c.moe is None:
            self.mlp = MLP(c, quant=quant, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        else:
            self.mlp = SparseMoeBlock(
                c, quant_for=lambda path: _quant_for(quant, path), dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
        self.config = config

    def _mlp(self, x, *, router_mask=None, **kwargs) -> tuple[jax.Array, RouterStats | None]:
        """The MLP's output, and a mixture of experts' router statistics (None for a dense MLP)."""
        if self.config.moe is None:
            return self.mlp(x, **kwargs), None
        return self.mlp(x, router_mask=router_mask, **kwargs)

    def __call__(
        self,
        h,
        *,
        cos,
        sin,
        masks: AttentionMasks,
        attention: str,
        options: ComputeOptions,
        dropout_key=None,
        cache_kv=None,
        cache_index=None,
        router_mask=None,
    ):
        """(h, (the new keys and values or None, router statistics or None))."""
        attn, new_kv = self.self_attn(
            self.input_layernorm(h),
            cos=cos,
            sin=sin,
            masks=masks,
            attention=attention,
            options=options,
            dropout_key=dropout_key,
            cache_kv=cache_kv,
            cache_index=cache_index,
        )
        mlp = dict(options=options, dropout_key=dropout_key, router_mask=router_mask)
        if self.config.sandwich_norms:
            h = h + self.post_attention_layernorm(attn)
            out, router = self._mlp(self.pre_feedforward_layernorm(h), **mlp)
            h = h + self.post_feedforward_layernorm(out)
        else:
            h = h + attn
            out, router = self._mlp(self.post_attention_layernorm(h), **mlp)
            h = h + out
        return h, (new_kv, router)


def _stacked_layers(config: ModelConfig, *, quant, dtype, param_dtype, rngs: nnx.Rngs) -> DecoderLayer:
    """num_layers DecoderLayers as one module whose variables have a leading layer axis."""
    quant = None if quant is None else _StackedQuant(quant, config.num_layers, config.text_model_path)
    kwargs = dict(quant=quant, dtype=dtype, param_dtype=param_dtype)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: DecoderLayer(config, rngs=nnx.Rngs(0), **kwargs)))
    keys = jax.random.split(rngs.params(), config.num_layers)
    states = jax.vmap(lambda key: nnx.state(DecoderLayer(config, rngs=nnx.Rngs(key), **kwargs)))(keys)
    return nnx.merge(graphdef, states)


class Backbone(nnx.Module):
    """transformers' `model.*`: embed_tokens, the stacked layers, the final norm."""

    def __init__(self, config: ModelConfig, *, quant, dtype, param_dtype, rngs: nnx.Rngs):
        c = config
        self.embed_tokens = Embed(
            c.vocab_size, c.hidden_size, scale=c.embed_scale, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.layers = _stacked_layers(c, quant=quant, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = RMSNorm(c.hidden_size, eps=c.norm_eps, gemma=c.gemma_norm, param_dtype=param_dtype)


class DecoderLM(nnx.Module):
    """A causal language model: tokens -> logits, with optional 4-bit linear layers.

    Args:
      config: the family and size (`ModelConfig.from_hf_config`).
      quant: store every linear weight in 4 bits except `quant.skip_modules`; None for a dense model.
      dtype: compute dtype; param_dtype: the dtype of dense base weights, embeddings and norms.
      rngs: random initial weights (the loaders in `qlora_jax.convert` replace them).

    How it computes (checkpointing, attention blocks, kernels) is a `ComputeOptions` argument of each call.
    Its stacked layers live at `model.layers` (`qlora_jax.models.names`), as transformers names them.

    >>> config = ModelConfig.from_hf_config(dict(model_type="llama", vocab_size=128, hidden_size=64,
    ...     intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    >>> model = DecoderLM(config, quant=QuantConfig(), rngs=nnx.Rngs(0))  # NF4 linears, bfloat16 compute
    >>> logits = model(jnp.ones((1, 8), jnp.int32), options=ComputeOptions(attention_block=0))
    >>> logits.shape, logits.dtype
    ((1, 8, 128), dtype('float32'))
    >>> model.model.layers.self_attn.q_proj.packed[...].shape  # 2 layers of 64 x 64 weights, two codes a byte
    (2, 2048)
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        quant: QuantConfig | None = None,
        dtype: Any = jnp.bfloat16,
        param_dtype: Any = jnp.bfloat16,
        rngs: nnx.Rngs,
    ):
        self.config, self.quant = config, quant
        self.dtype = jnp.dtype(dtype)
        self.model = Backbone(config, quant=quant, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else QLinear(
                config.hidden_size,
                config.vocab_size,
                quant=_quant_for(quant, "lm_head"),
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        )

    def hidden_states(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        valid: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        options: ComputeOptions = ComputeOptions(),
        router_mask: jax.Array | None = None,
        return_router_stats: bool = False,
    ) -> tuple[jax.Array, KVCache | None] | tuple[jax.Array, KVCache | None, RouterStats | None]:
        """The final-normed hidden states [B, T, D] for tokens [B, T], and the updated cache.

        Args:
          positions: [B, T] RoPE positions (default: 0.. T-1, after the cache's tokens when decoding).
          segment_ids: [B, T] packed-example ids; tokens attend only within their own segment.
          cache: a KVCache to read and extend (decoding); its index advances by T.
          valid: [B, T] False for padding tokens: they are never attended to (left padding).
          dropout_key: turns LoRA dropout on (training), folded with each layer's index.
          options: how to compute (checkpointing, attention blocks, kernels).
          router_mask, return_router_stats: a mixture of experts' router statistics of every layer
            (`qlora_jax.models.moe.RouterStats`, [num_layers, ...]; None for a dense model) come back third when
            asked, over the tokens where router_mask [B, T] is True (default: all).
        """
        c = self.config
        b, t = tokens.shape
        h = self.model.embed_tokens(tokens)
        start = jnp.int32(0) if cache is None else cache.index
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        q_index = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        if cache is None:
            k_index, k_valid, new_valid = q_index, valid, None
        else:
            step_valid = jnp.ones((b, t), bool) if valid is None else valid
            new_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, step_valid, cache.index, axis=1)
            k_index = jnp.broadcast_to(jnp.arange(cache.valid.shape[1], dtype=jnp.int32), cache.valid.shape)
            k_valid = new_valid
        sliding = c.sliding_layers
        attention = resolve_attention(
            options.attention,
            queries=t,
            dtype=self.dtype,
            head_dim=c.head_dim,
            softcap=c.attn_logit_softcap,
            packed=segment_ids is not None,
            key_mask=k_valid is not None,
            backend=options.kernels.device.platform,
        )
        full_mask = sliding_mask = None
        if attention == "xla":  # the dense masks, built once for every layer
            masks = dict(q_segments=segment_ids, k_segments=segment_ids, k_valid=k_valid)
            full_mask = attention_mask(q_index, k_index, **masks)
            if sliding.any():
                sliding_mask = attention_mask(q_index, k_index, window=c.sliding_window, **masks)
        mixed = bool(sliding.any()) and not bool(sliding.all())
        cos, sin = rope_tables(c.rope, c.rotary_dim, positions, self.dtype)
        local_rope = None if c.rope_local is None else rope_tables(c.rope_local, c.rotary_dim, positions, self.dtype)

        graphdef, layer_state = nnx.split(self.model.layers)
        # Decoding (a cache, no gradient) reads the stacked 4-bit weights in place: the layers get them whole and
        # each layer's matmuls take its index, so no layer's weights are sliced out (copied) before a kernel.
        in_place = cache is not None and mesh_size(context_mesh()) == 1
        stacked = ()
        if in_place:  # the linears' 4-bit buffers (a mixture of experts' stacked experts stay sliced per layer)
            linears = {path for path, m in nnx.iter_graph(self.model.layers) if isinstance(m, QLinear)}
            of_linear = nnx.All(QuantizedWeight, lambda path, _: tuple(path[:-1]) in linears)
            weights, layer_state = nnx.split_state(layer_state, of_linear, ...)
            stacked = (weights,)

        def layer_step(h, xs):
            h = checkpoint_name(h, _LAYER_INPUT)  # a no-op but for the "full_offload" checkpointing policy
            state, is_sliding, index, kv = xs
            # Under a mesh, this layer's adapters are gathered here, inside the scan (its base weights where used).
            adapters, rest = nnx.split_state(state, nnx.LoRAParam, ...)
            layer = nnx.merge(graphdef, jax.tree.map(gathered, adapters), rest, *stacked)
            if in_place:
                read_in_place(layer, index)
            mask, (cos_l, sin_l) = full_mask, (cos, sin)
            if sliding_mask is not None:
                mask = jnp.where(is_sliding, sliding_mask, full_mask)
            masks = AttentionMasks(mask, segment_ids, segment_ids, k_valid, start, is_sliding if mixed else None)
            if local_rope is not None:
                cos_l, sin_l = jnp.where(is_sliding, local_rope[0], cos), jnp.where(is_sliding, local_rope[1], sin)
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
            return layer(
                h,
                cos=cos_l,
                sin=sin_l,
                masks=masks,
                attention=attention,
                options=options,
                dropout_key=key,
                cache_kv=kv,
                cache_index=start,
                router_mask=router_mask,
            )

        step = _remat(layer_step, options.remat)
        layer_index = jnp.arange(c.num_layers, dtype=jnp.int32)
        if cache is None:
            h, (_, router_stats) = jax.lax.scan(step, h, (layer_state, jnp.asarray(sliding), layer_index, None))
            h = self.model.norm(h)
            return (h, None, router_stats) if return_router_stats else (h, None)
        if in_place and t == 1:
            # Decoding a token: the layers written out one after another, each reading its weights and its slice
            # of the cache at a constant offset (XLA fuses a constant slice into the attention's reductions, where
            # a scan's dynamic one would be copied out first); no loop overhead between layers.
            k_all, v_all, routers = cache.k, cache.v, []
            for i in range(c.num_layers):
                index = jnp.int32(i)
                state = jax.tree.map(lambda a, i=i: a[i], layer_state)
                h, (kv, router) = step(h, (state, sliding[i], index, LayerCache(k_all, v_all, index)))
                k_all, v_all = kv.k, kv.v
                routers.append(router)
            router_stats = jax.tree.map(lambda *a: jnp.stack(a), *routers) if routers[0] is not None else None
            k, v = k_all, v_all
        else:

            def cached_step(carry, xs):  # the whole cache is carried and written in place, one layer at a time
                h, k_all, v_all = carry
                state, is_sliding, index = xs
                h, (kv, router) = step(h, (state, is_sliding, index, LayerCache(k_all, v_all, index)))
                return (h, kv.k, kv.v), router

            xs = (layer_state, jnp.asarray(sliding), layer_index)
            (h, k, v), router_stats = jax.lax.scan(cached_step, (h, cache.k, cache.v), xs)
        h, new_cache = self.model.norm(h), KVCache(k, v, new_valid, cache.index + t)
        return (h, new_cache, router_stats) if return_router_stats else (h, new_cache)

    def logits(self, h: jax.Array, *, options: ComputeOptions = ComputeOptions()) -> jax.Array:
        """float32 logits [..., vocab] from final hidden states (Gemma's final soft-capping applied)."""
        if self.lm_head is None:
            out = self.model.embed_tokens.attend(h)
        else:
            out = self.lm_head(h, kernels=options.kernels)  # no dropout here
        out = out.astype(jnp.float32)
        if self.config.final_logit_softcap is not None:
            cap = self.config.final_logit_softcap
            out = jnp.tanh(out / cap) * cap
        return out

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        options: ComputeOptions = ComputeOptions(),
    ) -> jax.Array:
        """float32 logits [B, T, vocab] for tokens [B, T] (no cache)."""
        h, _ = self.hidden_states(tokens, positions=positions, segment_ids=segment_ids, options=options)
        return self.logits(h, options=options)
