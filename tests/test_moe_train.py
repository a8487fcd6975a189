"""A mixture of experts end to end through the command line: `train` (NF4 experts, adapters on attention, router
and experts, the load-balancing loss), the PEFT adapter loaded by PEFT with our logits, `merge` loaded by
transformers, `generate`; and the API's step with and without the auxiliary loss."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from qlora_jax.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory, smol_dir):
    """A 2-layer random Qwen3-MoE (8 experts, top 2) with SmolLM2's vocabulary and tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("tiny_moe")
    config = transformers.Qwen3MoeConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        tie_word_embeddings=True,
        eos_token_id=2,
        bos_token_id=1,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
    )
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(smol_dir).save_pretrained(directory)
    return directory


def _config(tmp_path, model_dir, **lora):
    data = ROOT / "examples" / "data"
    raw = {
        "model": {"path": str(model_dir), "quant": "nf4", "dtype": "float32"},
        "data": {"train": str(data / "dates_train.jsonl"), "max_length": 64},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"} | lora,
        "optim": {"learning_rate": 3e-3, "warmup_steps": 1},
        "train": {"output_dir": str(tmp_path / "run"), "steps": 5, "batch_size": 4, "grad_accum": 2, "remat": "full"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_train_merge_generate_through_the_cli(tmp_path, tiny_moe_dir, capsys):
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from qlora_jax.convert.hf import load_pretrained
    from qlora_jax.convert.peft import load_peft_adapter

    assert cli_main(["train", str(_config(tmp_path, tiny_moe_dir)), "--no-progress"]) == 0
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    # PEFT computes our logits with it (on the base our NF4 model dequantizes to)
    model, _ = load_pretrained(tiny_moe_dir, dtype=jnp.float32)
    load_peft_adapter(model, adapter)
    assert float(jnp.abs(model.model.layers.mlp.experts.gate_up_proj.lora.lora_B[...]).max()) > 0  # trained
    # `convert` writes our NF4 base dequantized: PEFT's base for the comparison
    assert cli_main(["convert", "--model", str(tiny_moe_dir), "--dtype", "float32", str(tmp_path / "nf4")]) == 0
    tokens = np.random.default_rng(0).integers(1, 49152, (1, 7))
    from qlora_jax.convert.hf import save_pretrained

    nf4, _ = load_pretrained(tiny_moe_dir, dtype=jnp.float32)
    save_pretrained(nf4, tmp_path / "nf4-dequantized", dequantize_weights=True)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nf4-dequantized", dtype=torch.float32).eval()
    peft_model = peft.PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, theirs, atol=2e-5 * np.abs(theirs).max(), rtol=0)
    four = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu")  # 4-bit attention
    assert type(four.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    # merged: transformers loads it
    assert (
        cli_main(
            [
                "merge",
                "--model",
                str(tiny_moe_dir),
                "--adapter",
                str(adapter),
                str(tmp_path / "merged"),
                "--out-dtype",
                "float32",
            ]
        )
        == 0
    )
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert np.isfinite(merged(torch.tensor(tokens)).logits.numpy()).all()
    capsys.readouterr()
    assert (
        cli_main(
            [
                "generate",
                "--model",
                str(tiny_moe_dir),
                "--adapter",
                str(adapter),
                "--prompt",
                "March 5, 2021",
                "--max-new-tokens",
                "4",
                "--no-chat",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip()


def test_dropout_on_expert_adapters_is_one_line_error(tmp_path, tiny_moe_dir):
    with pytest.raises(SystemExit, match=r"qlora-jax train: lora_dropout=0\.1 is not supported on model\.layers"):
        cli_main(["train", str(_config(tmp_path, tiny_moe_dir, lora_dropout=0.1)), "--no-progress"])


def test_step_adds_the_load_balancing_loss_as_configured(tiny_moe_dir):
    """config.json says output_router_logits with coefficient 0.02: the step's loss is cross-entropy plus 0.02
    times the load-balancing loss (which is about 1 for a balanced router); coefficient 0 drops it."""
    from qlora_jax.convert.hf import load_pretrained
    from qlora_jax.lora import LoraConfig, apply_lora
    from qlora_jax.models.moe import load_balancing_loss
    from qlora_jax.train import OptimConfig, TrainState, make_optimizer, make_train_step

    model, _ = load_pretrained(tiny_moe_dir, dtype=jnp.float32)
    apply_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"), rngs=nnx.Rngs(0))
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-3), total_steps=2)
    tokens = np.random.default_rng(1).integers(1, 49152, (1, 2, 16)).astype(np.int32)
    batch = dict(
        tokens=jnp.asarray(tokens),
        targets=jnp.asarray(np.roll(tokens, -1, axis=-1)),
        positions=jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), tokens.shape),
        segment_ids=jnp.ones(tokens.shape, jnp.int32),
    )
    losses = {}
    for coef in (None, 0.0):
        step = make_train_step(graphdef, optimizer, router_aux_loss_coef=coef)
        state = TrainState.create(jax.tree.map(jnp.copy, lora), optimizer)
        _, metrics = step(state, base, batch, jax.random.key(0))
        losses[coef] = float(metrics["loss"])
    h, _, stats = model.hidden_states(batch["tokens"][0], return_router_stats=True)
    aux = float(load_balancing_loss(stats, 8))
    assert 0.5 < aux < 4
    np.testing.assert_allclose(losses[None] - losses[0.0], 0.02 * aux, rtol=1e-3)
