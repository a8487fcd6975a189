"""ModelConfig: one frozen description of every supported decoder family, parsed from Hugging Face config.json.

Families: Llama 2/3/3.1/3.2 (incl. llama3 RoPE scaling), Mistral (sliding window), Qwen2/2.5 (qkv bias),
Qwen3 (q/k RMSNorm), Gemma 2 and 3 (1 + w RMSNorm, embedding scaling, sandwich norms, soft-capping,
local/global layers), Phi-3 (fused qkv_proj and gate_up_proj), Qwen3-MoE and Mixtral (a mixture of experts in
every layer's MLP: `ModelConfig.moe`, `qlora_jax.models.moe_config`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qlora_jax.errors import InputError
from qlora_jax.models.moe_config import MOE_MODEL_TYPES, UNSUPPORTED_MOE_TYPES, MoeConfig, parse_moe

if TYPE_CHECKING:
    from qlora_jax.models.generation_config import GenerationDefaults

__all__ = ["ModelConfig", "RopeConfig", "SUPPORTED_MODEL_TYPES", "UnsupportedModelError", "ConfigError"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", *MOE_MODEL_TYPES)
# transformers' ROPE_INIT_FUNCTIONS (5.x) that the supported families use, and "default"
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
FULL, SLIDING = "full_attention", "sliding_attention"


class UnsupportedModelError(InputError):
    """A config.json for a model family (or feature) that qlora-jax does not implement."""


class ConfigError(InputError):
    """A config.json field that is missing or malformed."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary embedding frequencies: theta, and the scaling of transformers' `rope_type` (its
    `ROPE_INIT_FUNCTIONS`, `modeling_rope_utils.py`), with transformers' parameter names and defaults.

    Attributes:
      theta: the base (`rope_theta`); rope_type: one of ROPE_TYPES.
      factor: the scaling factor (linear, dynamic, yarn, llama3; longrope's default attention factor).
      low_freq_factor, high_freq_factor: llama3's band edges.
      original_max_position_embeddings: the pretraining length (llama3, yarn, longrope).
      max_position_embeddings: the model's; dynamic scales frequencies past it.
      attention_factor: yarn / longrope: cos and sin are multiplied by it; None derives it from factor (and
        yarn's mscale, mscale_all_dim) as transformers does (`attention_scaling`).
      beta_fast, beta_slow, truncate: yarn's ramp between extrapolated and interpolated frequencies.
      short_factor, long_factor: longrope's per-frequency divisors, for sequences up to and past
        original_max_position_embeddings.
    """

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    max_position_embeddings: int = 4096
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()

    @property
    def length_dependent(self) -> bool:
        """Whether the frequencies depend on the sequence length (dynamic, longrope): `scaled_from` tokens and
        longer take the scaled ones."""
        return self.rope_type in ("dynamic", "longrope")

    @property
    def scaled_from(self) -> int:
        """For length-dependent types, the sequence length beyond which the scaled frequencies apply:
        transformers compares max(position_ids) + 1 with original_max_position_embeddings (longrope) or
        max_position_embeddings (dynamic)."""
        return self.original_max_position_embeddings if self.rope_type == "longrope" else self.max_position_embeddings

    @property
    def attention_scaling(self) -> float:
        """What cos and sin are multiplied by (transformers' `attention_scaling`): yarn's
        0.1 mscale ln(factor) + 1 (a ratio of two with mscale_all_dim), longrope's
        sqrt(1 + ln(factor) / ln(original_max_position_embeddings)), an explicit attention_factor, else 1."""
        if self.rope_type not in ("yarn", "longrope"):
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.rope_type == "longrope":
            if self.factor <= 1.0:
                return 1.0
            return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_position_embeddings))

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return float(mscale(self.factor, self.mscale) / mscale(self.factor, self.mscale_all_dim))
        return mscale(self.factor)

    def inverse_frequencies(self, rotary_dim: int, *, long: bool = False) -> np.ndarray:
        """float32[rotary_dim / 2], computed in float32 as transformers computes them.

        Length-dependent types: longrope's short factors (its long ones with `long`); dynamic's unscaled
        frequencies, what sequences up to max_position_embeddings use (`dynamic_inverse_frequencies` past it).
        """
        exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
        powers = np.power(np.float32(self.theta), exponents).astype(np.float32)
        inv_freq = (np.float32(1.0) / powers).astype(np.float32)
        if self.rope_type == "linear":
            return (inv_freq / np.float32(self.factor)).astype(np.float32)
        if self.rope_type == "llama3":
            old_len = self.original_max_position_embeddings
            low_wavelen, high_wavelen = old_len / self.low_freq_factor, old_len / self.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > low_wavelen, inv_freq / self.factor, inv_freq)
            smooth = (old_len / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return np.where(medium, smoothed, scaled).astype(np.float32)
        if self.rope_type == "longrope":
            factors = np.asarray(self.long_factor if long else self.short_factor, np.float32)
            return (np.float32(1.0) / (factors * powers)).astype(np.float32)
        if self.rope_type == "yarn":
            return self._yarn(rotary_dim, powers)
        return inv_freq

    def _yarn(self, rotary_dim: int, powers: np.ndarray) -> np.ndarray:
        """YaRN (transformers' `_compute_yarn_parameters`): interpolated (divided by factor) below the ramp's
        low dimension, extrapolated (unchanged) above its high one, linear in between."""

        def correction_dim(rotations: float) -> float:
            return (rotary_dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
                2 * math.log(self.theta)
            )

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rotary_dim - 1)
        if low == high:
            high += 0.001  # transformers' guard against a zero-width ramp
        ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
        extrapolation = (np.float32(1) - ramp.astype(np.float32)).astype(np.float32)
        inv_extrapolation = (np.float32(1.0) / powers).astype(np.float32)
        inv_interpolation = (np.float32(1.0) / (np.float32(self.factor) * powers)).astype(np.float32)
        inv_freq = inv_interpolation * (np.float32(1) - extrapolation) + inv_extrapolation * extrapolation
        return inv_freq.astype(np.float32)

    def wavelengths(self, rotary_dim: int) -> np.ndarray:
        """float64[rotary_dim / 2]: 2 pi theta^(2i / rotary_dim), each rotary frequency's unscaled wavelength."""
        return 2 * np.pi * self.theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)

    def frequency_divisors(self, rotary_dim: int) -> np.ndarray:
        """float64[rotary_dim / 2]: what each unscaled frequency is divided by, the way llama.cpp tabulates rope
        scaling (its `rope_freqs` tensor, `LlamaModel.generate_extra_tensors` in convert_hf_to_gguf.py).

        llama3: 1 for wavelengths below L / high_freq_factor, `factor` above L / low_freq_factor, and in between
        1 / ((1 - s) / factor + s) with s = (L / wavelength - low_freq_factor) / (high_freq_factor -
        low_freq_factor), L = original_max_position_embeddings (the same scaling as `inverse_frequencies`, in
        llama.cpp's float64 arithmetic); linear: `factor` everywhere; default: ones.
        """
        wavelengths = self.wavelengths(rotary_dim)
        if self.rope_type == "linear":
            return np.full_like(wavelengths, self.factor)
        if self.rope_type != "llama3":
            return np.ones_like(wavelengths)
        low, high, context = self.low_freq_factor, self.high_freq_factor, self.original_max_position_embeddings
        smooth = (context / wavelengths - low) / (high - low)
        return np.where(
            wavelengths < context / high,
            1.0,
            np.where(wavelengths > context / low, self.factor, 1 / ((1 - smooth) / self.factor + smooth)),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything the decoder needs to know about a model family and size (static and hashable)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float = 1e-6
    gemma_norm: bool = False  # RMSNorm scales by (1 + w), computed in float32
    hidden_act: str = "silu"  # "silu" or "gelu_tanh" (the gated MLP's activation)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k before RoPE
    sandwich_norms: bool = False  # Gemma 2/3: norms after attention and around the MLP
    fused_qkv: bool = False  # Phi-3: one qkv_proj
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj
    tie_word_embeddings: bool = False
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(hidden_size)
    attn_scale: float = 1.0
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    rope: RopeConfig = RopeConfig(theta=10000.0)
    rope_local: RopeConfig | None = None  # Gemma 3's sliding layers use their own RoPE
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    moe: MoeConfig | None = None  # a mixture of experts in every layer's MLP (qwen3_moe, mixtral)
    hf_config: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)
    # The image-text model whose text decoder this is (Gemma 3's Gemma3ForConditionalGeneration, how gemma-3-it is
    # published): its whole config.json (hf_config is its text_config); None for a causal LM checkpoint.
    multimodal_config: Mapping[str, Any] | None = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    @property
    def text_model_path(self) -> str:
        """Where the decoder's `model.*` modules sit in the transformers model the checkpoint loads as:
        `model.language_model` in Gemma 3's image-text model (`models.names.hf_module_name`), else `model`."""
        return "model" if self.multimodal_config is None else "model.language_model"

    # What the checkpoint ships for generation (generation_config.json, a GGUF's end ids): set by the loaders
    # (`qlora_jax.models.generation_config`), used by `qlora_jax.generate`, written back by the exports.
    generation: GenerationDefaults | None = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def sliding_layers(self) -> np.ndarray:
        """bool[num_layers]: which layers attend within the sliding window."""
        return np.array([t == SLIDING for t in self.layer_types], dtype=bool)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Parses a transformers config.json dict (old and new RoPE field layouts alike)."""
        return _parse(dict(hf), source)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            return cls.from_hf_config(json.loads(path.read_text()), source=str(path))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read a JSON config ({e})") from e

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json to write beside exported weights (the one we read, minus any quantization)."""
        out = {k: v for k, v in self.hf_config.items() if k != "quantization_config"}
        if not out:
            raise ConfigError("this ModelConfig was not parsed from a config.json; no HF config to write")
        return out


def _require(hf: dict[str, Any], key: str, source: str) -> Any:
    if hf.get(key) is None:
        raise ConfigError(f"{source}: required field '{key}' is missing")
    return hf[key]


def _rope(
    params: Mapping[str, Any] | None,
    theta: float | None,
    source: str,
    *,
    where: str,
    max_positions: int,
    rotary_dim: int,
    original: int | None = None,
) -> RopeConfig:
    """The RopeConfig of one rope parameter dict, with transformers' defaults and priorities
    (`RotaryEmbeddingConfigMixin.standardize_rope_params`). `where` names the dict in errors
    ("rope_scaling"); `original`: a top-level original_max_position_embeddings that takes priority (Phi-3's)."""
    params = dict(params or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"{source}: {where}.rope_type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    theta = params.get("rope_theta", theta)
    if theta is None:
        raise ConfigError(f"{source}: required field 'rope_theta' is missing")
    fields: dict[str, Any] = {"theta": float(theta), "rope_type": rope_type, "max_position_embeddings": max_positions}

    def number(key: str, default: Any = None, kind: type = float) -> Any:
        value = params.get(key)
        if value is None:
            if default is None:
                raise ConfigError(f"{source}: {where}.{key} is required for rope_type {rope_type!r}")
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{source}: {where}.{key} must be a positive number, got {value!r}")
        return kind(value)

    if rope_type in ("llama3", "yarn", "longrope"):
        fields["original_max_position_embeddings"] = (
            original if original is not None else number("original_max_position_embeddings", max_positions, int)
        )
    if rope_type in ("linear", "dynamic", "llama3"):
        fields["factor"] = number("factor")
    if rope_type == "llama3":
        fields.update(low_freq_factor=number("low_freq_factor", 1.0), high_freq_factor=number("high_freq_factor", 4.0))
    if rope_type in ("yarn", "longrope"):
        # transformers: without a factor, max_position_embeddings / original_max_position_embeddings
        fields["factor"] = number("factor", max_positions / fields["original_max_position_embeddings"])
        if params.get("attention_factor") is not None:
            fields["attention_factor"] = number("attention_factor")
    if rope_type == "yarn":
        for key in ("mscale", "mscale_all_dim"):
            if params.get(key) is not None:
                fields[key] = float(params[key])
        # transformers: `beta_fast or 32`, `beta_slow or 1`
        fields.update(beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0))
        if not isinstance(truncate := params.get("truncate", True), bool):
            raise ConfigError(f"{source}: {where}.truncate must be true or false, got {truncate!r}")
        fields["truncate"] = truncate
    if rope_type == "longrope":
        for key in ("short_factor", "long_factor"):
            values = params.get(key)
            if (
                not isinstance(values, list | tuple)
                or len(values) != rotary_dim // 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in values)
            ):
                raise ConfigError(
                    f"{source}: {where}.{key} must list {rotary_dim // 2} positive numbers (one per rotary "
                    f"frequency), got {values!r}"
                )
            fields[key] = tuple(float(v) for v in values)
    return RopeConfig(**fields)


def _layer_types(hf: dict[str, Any], model_type: str, num_layers: int, source: str) -> tuple[str, ...]:
    if types_ := hf.get("layer_types"):
        if len(types_) != num_layers or any(t not in (FULL, SLIDING) for t in types_):
            raise ConfigError(f"{source}: layer_types must list {num_layers} of {FULL!r} / {SLIDING!r}")
        return tuple(types_)
    window = hf.get("sliding_window")
    if model_type == "gemma2":
        return tuple(SLIDING if i % 2 == 0 else FULL for i in range(num_layers))
    if model_type == "gemma3_text":
        pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
        return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers))
    if model_type == "qwen3_moe":  # every layer slides when use_sliding_window (Qwen3MoeConfig)
        return (SLIDING if hf.get("use_sliding_window") and window else FULL,) * num_layers
    if model_type in ("qwen2", "qwen3"):
        first = hf.get("max_window_layers", num_layers) if hf.get("use_sliding_window") and window else num_layers
        return tuple(SLIDING if i >= first else FULL for i in range(num_layers))
    if model_type in ("mistral", "phi3", "mixtral") and window:
        return (SLIDING,) * num_layers
    return (FULL,) * num_layers


def _eos(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, list | tuple) else [value]))


def _moe(hf: dict[str, Any], model_type: str, num_layers: int, source: str) -> MoeConfig | None:
    if model_type not in MOE_MODEL_TYPES:
        return None
    return parse_moe(hf, model_type, num_layers, source, unsupported=UnsupportedModelError, config_error=ConfigError)


def _parse(hf: dict[str, Any], source: str) -> ModelConfig:
    multimodal = None
    if hf.get("model_type") == "gemma3" and "text_config" in hf:  # the image-text model: its text decoder
        multimodal = types.MappingProxyType(dict(hf))
        quantization = {"quantization_config": hf["quantization_config"]} if "quantization_config" in hf else {}
        hf = {**hf["text_config"], "model_type": "gemma3_text", **quantization}
    model_type = hf.get("model_type")
    if model_type in UNSUPPORTED_MOE_TYPES:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is a mixture of experts with {UNSUPPORTED_MOE_TYPES[model_type]}, "
            f"which is not supported; supported mixtures of experts: {', '.join(MOE_MODEL_TYPES)}"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    hidden = int(_require(hf, "hidden_size", source))
    heads = int(_require(hf, "num_attention_heads", source))
    layers = int(_require(hf, "num_hidden_layers", source))
    head_dim = int(hf.get("head_dim") or hidden // heads)
    max_positions = int(hf.get("max_position_embeddings") or 4096)
    gemma = model_type in ("gemma2", "gemma3_text")
    where = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope_params = hf.get("rope_parameters") or hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    partial = float(hf.get("partial_rotary_factor") or (rope_params or {}).get("partial_rotary_factor") or 1.0)
    rope_fields = dict(max_positions=max_positions, rotary_dim=int(head_dim * partial))
    if model_type == "phi3":  # Phi3Config's own field (default 4096) takes priority over rope_scaling's
        rope_fields["original"] = int(hf.get("original_max_position_embeddings") or 4096)
    if gemma and model_type == "gemma3_text":
        nested = isinstance(rope_params, Mapping) and FULL in rope_params
        full = rope_params.get(FULL) if nested else rope_params
        sliding = rope_params.get(SLIDING) if nested else {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
        where_full, where_sliding = (f"{where}.{FULL}", f"{where}.{SLIDING}") if nested else (where, where)
        rope = _rope(full, theta if theta is not None else 1_000_000.0, source, where=where_full, **rope_fields)
        rope_local = _rope(sliding, 10000.0, source, where=where_sliding, **rope_fields)
    else:
        rope = _rope(rope_params, theta if theta is not None else 10000.0, source, where=where, **rope_fields)
        rope_local = None
    activation = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if activation in ("gelu_pytorch_tanh", "gelu_tanh"):
        activation = "gelu_tanh"
    elif activation != "silu":
        raise UnsupportedModelError(f"{source}: hidden activation {activation!r} is not supported")
    attention_bias = bool(hf.get("attention_bias", False))
    query_scalar = hf.get("query_pre_attn_scalar") if gemma else None
    layer_types = _layer_types(hf, model_type, layers, source)
    window = hf.get("sliding_window") if SLIDING in layer_types else None
    if SLIDING in layer_types and not window:
        raise ConfigError(f"{source}: sliding-window layers need 'sliding_window'")
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(_require(hf, "vocab_size", source)),
        hidden_size=hidden,
        intermediate_size=int(_require(hf, "intermediate_size", source)),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        gemma_norm=gemma,
        hidden_act=activation,
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias and model_type not in ("qwen2",),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "gemma3_text", "qwen3_moe"),
        sandwich_norms=gemma,
        fused_qkv=model_type == "phi3",
        fused_gate_up=model_type == "phi3",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        embed_scale=math.sqrt(hidden) if gemma else None,
        attn_scale=float(query_scalar if query_scalar else head_dim) ** -0.5,
        attn_logit_softcap=hf.get("attn_logit_softcapping") if gemma else None,
        final_logit_softcap=hf.get("final_logit_softcapping") if gemma else None,
        sliding_window=int(window) if window else None,
        layer_types=layer_types,
        rope=rope,
        rope_local=rope_local,
        partial_rotary_factor=partial,
        max_position_embeddings=max_positions,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        moe=_moe(hf, model_type, layers, source),
        hf_config=types.MappingProxyType(hf),
        multimodal_config=multimodal,
    )
