"""`LoraConfig`: PEFT's LoraConfig fields as a frozen dataclass, checked as PEFT checks them.

It is also the YAML `lora` section of a training config (`qlora_jax.train.config`). Which layers its fields
select is `qlora_jax.lora.targets`; what an adapter computes is `qlora_jax.lora.layers`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from qlora_jax.tokens import normalize_modules_to_save, normalize_trainable_token_indices

__all__ = ["LoraConfig", "INIT_CHOICES"]

INIT_CHOICES = (True, False, "gaussian", "loftq")


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """PEFT's LoraConfig fields, with PEFT's meanings (peft 0.21; `qlora_jax.lora.targets` for the selection).

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
