"""Tiny random transformers models of every supported family (`tests.families`), saved locally (no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.families import COMMON, FAMILIES, SPECIAL_TOKENS, family_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

__all__ = [
    "COMMON",
    "FAMILIES",
    "SPECIAL_TOKENS",
    "family_config",
    "random_hf_model",
    "make_tiny_model",
    "load_hf_model",
    "hf_logits",
]


def random_hf_model(fields: dict[str, Any], *, seed: int = 0):
    """A random float32 transformers model (eval mode) for config.json `fields`, model_type included; norms and
    biases are randomized too, so that their placement (and Gemma's 1 + w) is tested."""
    fields = dict(fields)
    model_type = fields.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms start at ones/zeros: randomize them so that their placement is tested too
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0 if model_type.startswith("gemma") else 1.0, 0.1)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return model.eval()


def make_tiny_model(family: str, directory: Path, *, seed: int = 0, **overrides):
    """Saves a random tiny model of this family in float32 to `directory` (config fields `overrides` changed);
    returns the transformers model."""
    model = random_hf_model(family_config(family, **overrides), seed=seed)
    model.save_pretrained(directory)
    return model


def load_hf_model(directory: Path):
    """The transformers causal LM saved in `directory`, in float32 and eval mode."""
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def hf_logits(model, tokens, **kwargs):
    """`model`'s float32 logits for `tokens` (and array `kwargs`, e.g. attention_mask) as numpy, without grad."""
    with torch.no_grad():
        kwargs = {k: torch.tensor(v) for k, v in kwargs.items()}
        return model(torch.tensor(tokens), **kwargs).logits.float().numpy()
