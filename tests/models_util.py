"""Tiny random transformers models of every supported family, saved locally (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

# Each family with the features that set it apart switched on at tiny sizes (sliding windows of 3 tokens, so
# a 9-token sequence exercises them).
FAMILIES = {
    "llama": dict(model_type="llama"),
    "llama3.2": dict(
        model_type="llama",
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),  # fmt: skip
    "mistral": dict(model_type="mistral", sliding_window=3),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", head_dim=32),
    "gemma2": dict(
        model_type="gemma2",
        head_dim=16,
        sliding_window=3,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=0.1,
        final_logit_softcapping=0.3,  # small: tiny random logits reach them
    ),  # fmt: skip
    "gemma3": dict(
        model_type="gemma3_text",
        head_dim=16,
        sliding_window=3,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"],
        rope_local_base_freq=100.0,
        rope_theta=10000.0,
        rope_scaling=dict(rope_type="linear", factor=4.0),
    ),  # fmt: skip
    "phi3": dict(model_type="phi3", pad_token_id=0),
}


def make_tiny_model(family: str, directory: Path, *, seed: int = 0, **overrides):
    """Saves a random tiny model of this family in float32 to `directory` (config fields `overrides` changed);
    returns the transformers model."""
    fields = dict(COMMON) | FAMILIES[family] | overrides
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
    model.eval()
    model.save_pretrained(directory)
    return model
