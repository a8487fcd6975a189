"""One QLoRA training step here equals one in PyTorch (transformers + bitsandbytes 4-bit + PEFT) on CPU: same
loss and same LoRA gradients, from identical initial adapters."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qlora_jax.convert.hf import load_pretrained
from qlora_jax.convert.peft import load_peft_adapter
from qlora_jax.quant import QuantConfig
from qlora_jax.train.loss import IGNORE_INDEX, chunked_cross_entropy
from tests.models_util import make_tiny_model, torch, transformers

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.oracle


LORA = {
    "all-linear": dict(target_modules="all-linear"),
    # adapters on some layers only, with per-layer ranks and alphas: zero-padded here, unpadded in PEFT
    "per-layer": dict(
        target_modules=r"model\.layers\.[02]\.(self_attn\.(q|v)|mlp\.down)_proj",
        rank_pattern={"v_proj": 2, r"layers\.2\.mlp\.down_proj": 6},
        alpha_pattern={"q_proj": 32},
    ),
}


@pytest.mark.parametrize(
    ("family", "lora_kwargs"),
    [("llama", LORA["all-linear"]), ("qwen2", LORA["all-linear"]), ("llama", LORA["per-layer"])],
    ids=["llama", "qwen2", "llama-per-layer"],
)
def test_one_step_loss_and_lora_gradients_match_peft_bitsandbytes(family, lora_kwargs, tmp_path):
    per_layer = "rank_pattern" in lora_kwargs
    make_tiny_model(family, tmp_path / "base", **({"num_hidden_layers": 3} if per_layer else {}))
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=bnb_config, dtype=torch.float32, device_map="cpu"
    )
    lora = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM", **lora_kwargs)
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(hf, lora)
    peft_model.train()
    peft_model.save_pretrained(tmp_path / "adapter")

    tokens = np.random.default_rng(0).integers(1, 96, (2, 9))
    out = peft_model(torch.tensor(tokens), labels=torch.tensor(tokens))
    out.loss.backward()
    theirs = {name: p.grad.numpy() for name, p in peft_model.named_parameters() if p.requires_grad}

    model, _ = load_pretrained(tmp_path / "base", quantization=QuantConfig(), dtype=jnp.float32)
    load_peft_adapter(model, tmp_path / "adapter")
    graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
    targets = np.concatenate([tokens[:, 1:], np.full((2, 1), IGNORE_INDEX)], axis=1)

    def loss(adapters):
        m = nnx.merge(graphdef, adapters, base)
        h, _ = m.hidden_states(jnp.asarray(tokens))
        total, count = chunked_cross_entropy(m.logits, h, jnp.asarray(targets), chunk_size=8)
        return total / count

    value, grads = jax.value_and_grad(loss)(adapters)
    np.testing.assert_allclose(float(value), out.loss.item(), rtol=1e-5)

    flat = {".".join(path): np.asarray(variable.get_value()) for path, variable in nnx.to_flat_state(grads)}
    matched = set()
    for name, grad in theirs.items():
        # base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight -> our stacked leaf, layer 1
        m = re.match(r"base_model\.model\.model\.layers\.(\d+)\.(.+)\.(lora_[AB])\.default\.weight", name)
        assert m, name
        layer, module, field = int(m.group(1)), m.group(2), m.group(3)
        key = f"model.layers.{module}.lora.{field}"
        ours = flat[key][layer]
        r = grad.shape[0] if field == "lora_A" else grad.shape[1]
        ours, padding = (ours[:r], ours[r:]) if field == "lora_A" else (ours[:, :r], ours[:, r:])
        scale = max(np.abs(grad).max(), 1e-8)
        np.testing.assert_allclose(ours, grad, atol=2e-4 * scale, rtol=0, err_msg=name)
        assert not padding.any(), name  # the zero padding of a smaller rank gets exactly zero gradient
        matched.add((key, layer))
    assert len(matched) == len(theirs) == (2 * 2 * 7 if not per_layer else 2 * 3 * 2)
    # layers without an adapter (and modules of ours PEFT does not have): exactly zero gradient
    for key, grad in flat.items():
        for layer in range(grad.shape[0] if key.startswith("model.layers.") else 0):
            if (key, layer) not in matched:
                assert not grad[layer].any(), (key, layer)
