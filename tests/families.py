"""The tiny model families of the tests: one table of transformers config.json fields per family, at tiny sizes,
with the features that set each family apart switched on. Pure data: no torch needed to import it.

Tests that need other values (the GGUF tests' llama.cpp-compatible settings, say) start from a family and name
only what they change, with `family_config`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    ),
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
    ),
    "gemma3": dict(
        model_type="gemma3_text",
        head_dim=16,
        sliding_window=3,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"],
        rope_local_base_freq=100.0,
        rope_theta=10000.0,
        rope_scaling=dict(rope_type="linear", factor=4.0),
    ),
    "phi3": dict(model_type="phi3", pad_token_id=0),
}
# The mixture-of-experts families (`docs/moe.md`): every layer sparse. Kept apart from FAMILIES, whose tests
# (bitsandbytes' 4-bit transformers models among them) assume dense MLPs; qwen3_moe's `num_experts` as published
# checkpoints spell it (transformers 5 writes `num_local_experts`).
MOE_FAMILIES = {
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
    ),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, intermediate_size=48),
}
# A tiny Gemma 3 image-text model (Gemma3ForConditionalGeneration): its text decoder and its vision tower.
GEMMA3_TEXT = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=3,
)
GEMMA3_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
)
# What a GGUF file's metadata carries back besides the shapes (llama.cpp writes these ids and the norm epsilon).
SPECIAL_TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def family_config(family: str, **changes: Any) -> dict[str, Any]:
    """config.json fields (model_type included) of the tiny `family`, with `changes` on top (None is passed on as
    None: transformers' default for that field)."""
    return {**COMMON, **(FAMILIES | MOE_FAMILIES)[family], **changes}


def write_one_block_gguf(path: Any, tensors: list[tuple[str, Any, Any]]) -> None:
    """A one-block llama GGUF file (hidden 8, 2 heads, MLP 16) holding `tensors`: (GGUF name, array, raw GGML type
    or None for the array's own dtype). For tests of the GGUF reader on files they shape by hand."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    for key, value in (
        ("llama.embedding_length", 8),
        ("llama.feed_forward_length", 16),
        ("llama.attention.head_count", 2),
        ("llama.context_length", 32),
    ):
        writer.add_uint32(key, value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    for name, array, raw_dtype in tensors:
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# The planner's small Llama (config.json only: planning reads nothing else), for tests/test_plan.py and
# tests/test_gpu_plan.py.
PLAN_MODEL = {
    "model_type": "llama",
    "vocab_size": 2048,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


def config_only_model(directory: Path, fields: dict[str, Any] = PLAN_MODEL) -> Path:
    """`directory` holding only a config.json of `fields`."""
    (directory / "config.json").write_text(json.dumps(fields))
    return directory
