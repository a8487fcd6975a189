"""A 2-layer random Llama with SmolLM2's vocabulary and tokenizer: fast enough to train in a test."""

from __future__ import annotations

from pathlib import Path


def save_tiny_smol(directory: Path, smollm2_gguf: Path) -> Path:
    """Writes the model (transformers checkpoint) and SmolLM2's tokenizer to `directory`; needs torch."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        eos_token_id=2,
        bos_token_id=1,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
