"""The mixture-of-experts part of a model's configuration: `MoeConfig`, read from transformers' config.json.

Two families, with transformers' field names and meanings (transformers 5, `Qwen3MoeConfig`, `MixtralConfig`):

- `qwen3_moe`: `num_experts` (written `num_local_experts` by transformers 5's `save_pretrained`),
  `num_experts_per_tok`, `moe_intermediate_size`, `norm_topk_prob`; `decoder_sparse_step` and `mlp_only_layers`
  say which layers are sparse. Every layer must be sparse here (the decoder stacks identical layers): a config
  with dense layers is refused, naming the field.
- `mixtral`: `num_local_experts`, `num_experts_per_tok`, `intermediate_size` (each expert's), top-k weights always
  renormalized; `router_jitter_noise` (training-time noise on the router's input) must be 0.

Both: `output_router_logits` (the auxiliary load-balancing loss joins the training loss) and
`router_aux_loss_coef`. Other mixture-of-experts families (shared experts: qwen2_moe, deepseek, ...) are refused by
model_type (`UNSUPPORTED_MOE_TYPES`).

How each family names its experts in checkpoints and in PEFT's per-module adapters is `EXPERT_NAMES`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from qlora_jax.errors import InputError

__all__ = ["MoeConfig", "MOE_MODEL_TYPES", "UNSUPPORTED_MOE_TYPES", "EXPERT_NAMES", "parse_moe"]

MOE_MODEL_TYPES = ("qwen3_moe", "mixtral")
# transformers' mixture-of-experts model types not implemented here, with what sets them apart.
UNSUPPORTED_MOE_TYPES = {
    "qwen2_moe": "shared experts",
    "qwen3_next": "shared experts and linear attention",
    "deepseek_v2": "shared experts and latent attention",
    "deepseek_v3": "shared experts and latent attention",
    "olmoe": "its own q/k norms",
    "granitemoe": "its own expert layout",
    "granitemoeshared": "shared experts",
    "dbrx": "fused expert layout",
    "jamba": "state-space layers",
    "phimoe": "sparsemixer routing",
    "gpt_oss": "biased experts and attention sinks",
    "llama4_text": "shared experts",
    "glm4_moe": "shared experts",
    "minimax": "lightning attention",
    "ernie4_5_moe": "shared experts",
    "hunyuan_v1_moe": "shared experts",
    "dots1": "shared experts",
    "switch_transformers": "an encoder-decoder",
    "nllb_moe": "an encoder-decoder",
}
# Per family: (the MoE block's name in checkpoints, the per-expert (gate, up, down) projection names). transformers
# 5 names the block `mlp` in every family and fuses gate and up into `mlp.experts.gate_up_proj` [E, 2 I, H], with
# `mlp.experts.down_proj` [E, H, I]; its save_pretrained writes the per-expert names back (conversion_mapping.py).
EXPERT_NAMES: dict[str, tuple[str, tuple[str, str, str]]] = {
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoeConfig:
    """A sparse mixture-of-experts MLP in every layer (static and hashable).

    Attributes:
      num_experts: experts per layer (E); top_k: experts each token is routed to (`num_experts_per_tok`).
      expert_size: each expert's intermediate size (I): `moe_intermediate_size` (qwen3_moe), `intermediate_size`
        (mixtral).
      norm_topk_prob: renormalize the top-k routing weights to sum to 1 (always in Mixtral).
      weights_in_compute_dtype: Qwen3-MoE casts the routing weights to the router logits' dtype before weighting
        the experts' outputs; Mixtral weights them in float32 and casts the product.
      output_router_logits, router_aux_loss_coef: add `router_aux_loss_coef` times transformers'
        `load_balancing_loss_func` to the training loss.
    """

    num_experts: int
    top_k: int
    expert_size: int
    norm_topk_prob: bool
    weights_in_compute_dtype: bool
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001


def _int(hf: Mapping[str, Any], key: str, source: str, errors: type[InputError]) -> int:
    value = hf.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise errors(f"{source}: '{key}' must be a positive integer, got {value!r}")
    return value


def parse_moe(
    hf: Mapping[str, Any],
    model_type: str,
    num_layers: int,
    source: str,
    *,
    unsupported: type[InputError],
    config_error: type[InputError],
) -> MoeConfig:
    """The MoeConfig of a qwen3_moe or mixtral config.json dict; `unsupported` for what the decoder does not
    implement (dense layers among sparse ones, router jitter), `config_error` for a malformed field."""
    experts_key = "num_experts" if hf.get("num_experts") is not None else "num_local_experts"
    num_experts = _int(hf, experts_key, source, config_error)
    top_k = _int(hf, "num_experts_per_tok", source, config_error)
    if top_k > num_experts:
        raise config_error(f"{source}: num_experts_per_tok={top_k} exceeds the {num_experts} experts")
    if model_type == "qwen3_moe":
        step = hf.get("decoder_sparse_step", 1)
        dense_only = list(hf.get("mlp_only_layers") or [])
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise config_error(f"{source}: 'decoder_sparse_step' must be a positive integer, got {step!r}")
        # transformers' Qwen3MoeDecoderLayer: sparse unless listed in mlp_only_layers or off the sparse step
        dense = [i for i in range(num_layers) if i in dense_only or (i + 1) % step != 0]
        if dense:
            field = "mlp_only_layers" if any(i in dense_only for i in dense) else "decoder_sparse_step"
            raise unsupported(
                f"{source}: layers {dense[:8]} are dense MLPs ({field}={hf.get(field)!r}); only models whose every "
                f"layer is a mixture of experts are supported (decoder_sparse_step=1, mlp_only_layers=[])"
            )
        return MoeConfig(
            num_experts=num_experts,
            top_k=top_k,
            expert_size=_int(hf, "moe_intermediate_size", source, config_error),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            weights_in_compute_dtype=True,
            output_router_logits=bool(hf.get("output_router_logits", False)),
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
        )
    if float(hf.get("router_jitter_noise") or 0.0) != 0.0:
        raise unsupported(
            f"{source}: router_jitter_noise={hf['router_jitter_noise']!r} (training-time noise on the "
            f"router's input) is not supported; set it to 0.0"
        )
    return MoeConfig(
        num_experts=num_experts,
        top_k=top_k,
        expert_size=_int(hf, "intermediate_size", source, config_error),
        norm_topk_prob=True,
        weights_in_compute_dtype=False,
        output_router_logits=bool(hf.get("output_router_logits", False)),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
    )
