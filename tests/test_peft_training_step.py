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


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_one_step_loss_and_lora_gradients_match_peft_bitsandbytes(family, tmp_path):
    make_tiny_model(family, tmp_path / "base")
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=bnb_config, dtype=torch.float32, device_map="cpu"
    )
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                           task_type="CAUSAL_LM")  # fmt: skip
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(hf, lora)
    peft_model.train()
    peft_model.save_pretrained(tmp_path / "adapter")

    tokens = np.random.default_rng(0).integers(1, 96, (2, 9))
    out = peft_model(torch.tensor(tokens), labels=torch.tensor(tokens))
    out.loss.backward()
    theirs = {name: p.grad.numpy() for name, p in peft_model.named_parameters() if p.requires_grad}

    model, _ = load_pretrained(tmp_path / "base", quantization=QuantConfig(),
                               dtype=jnp.float32)  # fmt: skip
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

    flat = {".".join(path): variable.get_value() for path, variable in nnx.to_flat_state(grads)}
    matched = 0
    for name, grad in theirs.items():
        # base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight -> our stacked leaf, layer 1
        m = re.match(r"base_model\.model\.model\.layers\.(\d+)\.(.+)\.(lora_[AB])\.default\.weight", name)
        assert m, name
        layer, module, field = int(m.group(1)), m.group(2), m.group(3)
        ours = np.asarray(flat[f"model.layers.{module}.lora.{field}"])[layer]
        scale = max(np.abs(grad).max(), 1e-8)
        np.testing.assert_allclose(ours, grad, atol=2e-4 * scale, rtol=0, err_msg=name)
        matched += 1
    assert matched == len(theirs) == 2 * 2 * 7
