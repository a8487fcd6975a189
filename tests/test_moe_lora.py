"""Adapters on a mixture of experts with PEFT's meaning (peft 0.21 on transformers 5, docs/moe.md): the same
selection as `get_peft_model`, PEFT's files both ways with equal logits (transformers 5's fused layout and
transformers 4's per-expert one), merging, and one training step's loss and LoRA gradients equal PEFT's (with the
load-balancing loss)."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qlora_jax.convert.hf import load_pretrained, save_pretrained
from qlora_jax.convert.merge import merge_and_save
from qlora_jax.convert.peft import PeftFormatError, load_peft_adapter, save_peft_adapter
from qlora_jax.lora import ExpertLoRA, LoraConfig, apply_lora, target_layers, trainable_parameters
from qlora_jax.quant import QuantConfig
from qlora_jax.train.loss import IGNORE_INDEX
from qlora_jax.train.step import _loss
from tests.families import MOE_FAMILIES
from tests.helpers import assert_close, random_tokens
from tests.models_util import load_hf_model
from tests.test_moe_models import make_tiny_moe

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.oracle

NAMES = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}


@pytest.fixture(scope="module", params=sorted(MOE_FAMILIES))
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    make_tiny_moe(request.param, directory)
    return request.param, directory


def _peft_selection(peft_model) -> dict[str, tuple[int, float]]:
    """{our module path per layer: (r, scaling)} of a PEFT model's adapters."""
    out = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, peft.tuners.lora.LoraLayer) or "default" not in module.r:
            continue
        name = name.removeprefix("base_model.model.")
        if name.endswith("mlp.experts.base_layer") or (
            name.endswith("mlp.experts") and module.parameter_name == "gate_up_proj"
        ):
            name = name.replace("mlp.experts.base_layer", "mlp.experts").replace(
                "mlp.experts", "mlp.experts.gate_up_proj"
            )
        elif name.endswith("mlp.experts"):
            name += ".down_proj"
        out[name] = (module.r["default"], module.scaling["default"])
    return out


def _our_selection(model, config) -> dict[str, tuple[int, float]]:
    out = {}
    for path, target in target_layers(model, config).items():
        for layer, (r, s) in enumerate(zip(target.ranks, target.scalings(config.use_rslora), strict=True)):
            if r:
                out[path.replace("model.layers.", f"model.layers.{layer}.")] = (r, s)
    return out


def _selections(family):
    gate, up, down = NAMES[family]
    return [
        dict(target_modules="all-linear"),
        dict(target_modules=["q_proj", gate, up, down]),
        dict(target_modules=["v_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
        dict(target_modules=[], target_parameters=["mlp.experts.down_proj"]),
        dict(target_modules=["gate", "o_proj"], rank_pattern={"o_proj": 3}, alpha_pattern={"gate": 7}),
        dict(target_modules=r"model\.layers\.0\.self_attn\.q_proj"),  # PEFT resolves it to `q_proj`: every layer
        dict(target_modules=rf".*\.(k_proj|{down})", use_rslora=True),
    ]


def test_selection_equals_peft(tiny):
    family, directory = tiny
    model, _ = load_pretrained(directory, quantization=None, dtype=jnp.float32)
    for kwargs in _selections(family):
        config = LoraConfig(r=2, lora_alpha=4, **{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
        torch.manual_seed(0)
        theirs = _peft_selection(
            peft.get_peft_model(load_hf_model(directory), peft.LoraConfig(r=2, lora_alpha=4, **kwargs))
        )
        assert _our_selection(model, config) == theirs, kwargs


def test_refusals_name_the_reason(tiny):
    family, directory = tiny
    model, _ = load_pretrained(directory, quantization=None, dtype=jnp.float32)
    gate = NAMES[family][0]
    with pytest.raises(ValueError, match=f"names {gate} without"):
        target_layers(model, LoraConfig(target_modules=(gate,)))
    with pytest.raises(ValueError, match=r"lora_dropout=0\.1 is not supported on model\.layers\.mlp"):
        apply_lora(model, LoraConfig(target_modules="all-linear", lora_dropout=0.1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="use_dora"):
        apply_lora(
            model, LoraConfig(target_modules=(), target_parameters=("down_proj",), use_dora=True), rngs=nnx.Rngs(0)
        )
    with pytest.raises(ValueError, match="target_parameters=.*matches no parameter"):
        target_layers(model, LoraConfig(target_modules=(), target_parameters=("mlp.experts.nothing",)))


def _peft_model(directory, tmp_path, **kwargs):
    torch.manual_seed(0)
    model = peft.get_peft_model(
        load_hf_model(directory), peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **kwargs)
    )
    model.eval()
    model.save_pretrained(tmp_path / "peft")
    return model


def _peft_logits(peft_model, tokens):
    with torch.no_grad():
        return peft_model(torch.tensor(tokens)).logits.numpy()


def test_peft_adapter_loads_with_peft_logits_and_round_trips(tiny, tmp_path):
    """PEFT's all-linear adapter (attention, router, both expert parameters) on our NF4 model... computed on the
    dense model here, so that both sides hold the same base weights."""
    family, directory = tiny
    peft_model = _peft_model(directory, tmp_path, target_modules="all-linear")
    model, _ = load_pretrained(directory, quantization=None, dtype=jnp.float32)
    config = load_peft_adapter(model, tmp_path / "peft")
    tokens = random_tokens()
    assert_close(model(jnp.asarray(tokens)), _peft_logits(peft_model, tokens))
    save_peft_adapter(model, tmp_path / "ours", config)
    again = peft.PeftModel.from_pretrained(load_hf_model(directory), tmp_path / "ours").eval()
    assert_close(model(jnp.asarray(tokens)), _peft_logits(again, tokens))
    from safetensors.numpy import load_file

    theirs, ours = (
        load_file(str(tmp_path / "peft/adapter_model.safetensors")),
        load_file(str(tmp_path / "ours/adapter_model.safetensors")),
    )
    assert sorted(theirs) == sorted(ours)
    for key in theirs:  # PEFT -> qlora-jax -> PEFT changes no tensor
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    written = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    assert sorted(written["target_parameters"]) == ["down_proj", "gate.weight", "gate_up_proj"]


def test_our_adapter_loads_in_peft_with_our_logits(tiny, tmp_path):
    family, directory = tiny
    model, _ = load_pretrained(directory, quantization=None, dtype=jnp.float32)
    config = LoraConfig(
        r=3,
        lora_alpha=6,
        target_modules=("o_proj",),
        target_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        rank_pattern={r"layers\.1\.mlp\.experts\.down_proj": 2},
        init_lora_weights=False,
    )
    apply_lora(model, config, rngs=nnx.Rngs(1))
    assert isinstance(model.model.layers.mlp.experts.down_proj.lora, ExpertLoRA)
    assert model.model.layers.mlp.experts.down_proj.lora.ranks == (3, 2)
    save_peft_adapter(model, tmp_path / "ours", config)
    tokens = random_tokens()
    peft_model = peft.PeftModel.from_pretrained(load_hf_model(directory), tmp_path / "ours").eval()
    assert_close(model(jnp.asarray(tokens)), _peft_logits(peft_model, tokens))
    trainable, _ = trainable_parameters(model, verbose=False)
    assert trainable == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)


def _per_expert_adapter(family, directory, out, r=2, alpha=4):
    """An adapter as PEFT wrote it on transformers 4 (every expert's nn.Linear adapted, the router too)."""
    gate, up, down = NAMES[family]
    block = "mlp" if family == "qwen3_moe" else "block_sparse_moe"
    config = transformers.AutoConfig.from_pretrained(directory)
    experts = getattr(config, "num_experts", None) or config.num_local_experts
    size = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    hidden = config.hidden_size
    rng = np.random.default_rng(5)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        prefix = f"base_model.model.model.layers.{layer}.{block}"
        for e in range(experts):
            for name, fan_in, fan_out in ((gate, hidden, size), (up, hidden, size), (down, size, hidden)):
                tensors[f"{prefix}.experts.{e}.{name}.lora_A.weight"] = rng.normal(size=(r, fan_in)).astype(np.float32)
                tensors[f"{prefix}.experts.{e}.{name}.lora_B.weight"] = rng.normal(size=(fan_out, r)).astype(np.float32)
        tensors[f"{prefix}.gate.lora_A.weight"] = rng.normal(size=(r, hidden)).astype(np.float32)
        tensors[f"{prefix}.gate.lora_B.weight"] = rng.normal(size=(experts, r)).astype(np.float32) * 0.1
    out.mkdir()
    from safetensors.numpy import save_file

    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    fields = dict(
        peft_type="LORA",
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=[gate, up, down, "gate"],
    )
    (out / "adapter_config.json").write_text(json.dumps(fields))


def test_transformers_4_per_expert_adapter_loads_as_peft_loads_it(tiny, tmp_path):
    family, directory = tiny
    _per_expert_adapter(family, directory, tmp_path / "v4")
    peft_model = peft.PeftModel.from_pretrained(load_hf_model(directory), tmp_path / "v4").eval()
    model, _ = load_pretrained(directory, quantization=None, dtype=jnp.float32)
    load_peft_adapter(model, tmp_path / "v4")
    assert model.model.layers.mlp.experts.gate_up_proj.lora.ranks == (4, 4)  # gate and up fused: rank 2 r
    tokens = random_tokens()
    assert_close(model(jnp.asarray(tokens)), _peft_logits(peft_model, tokens), 1e-4)


def test_bad_expert_adapters_are_refused(tiny, tmp_path):
    family, directory = tiny
    _peft_model(directory, tmp_path, target_modules=[], target_parameters=["mlp.experts.down_proj"])
    from safetensors.numpy import load_file, save_file

    path = tmp_path / "peft/adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.model.layers.1.mlp.experts.lora_A.weight"
    tensors[key] = tensors[key][:-1]
    save_file(tensors, str(path))
    model, _ = load_pretrained(directory, quantization=None, dtype=jnp.float32)
    with pytest.raises(PeftFormatError, match=r"model\.layers\.1 down_proj adapter has shapes"):
        load_peft_adapter(model, tmp_path / "peft")
    del tensors[key]
    save_file(tensors, str(path))
    with pytest.raises(PeftFormatError, match="lora_A and lora_B are both needed"):
        load_peft_adapter(model, tmp_path / "peft")
    assert model.model.layers.mlp.experts.down_proj.lora is None  # nothing changed


def test_merged_model_loads_in_transformers_with_the_adapted_logits(tiny, tmp_path):
    """16-bit merge (experts per expert, as transformers 5 writes them) and the 4-bit one (attention re-quantized,
    experts and router 16-bit: transformers 5 + bitsandbytes' layout)."""
    family, directory = tiny
    peft_model = _peft_model(directory, tmp_path, target_modules="all-linear")
    tokens = random_tokens()
    theirs = _peft_logits(peft_model, tokens)
    model, _ = load_pretrained(directory, quantization=None, dtype=jnp.float32)
    load_peft_adapter(model, tmp_path / "peft")
    merge_and_save(model, tmp_path / "merged", dtype=jnp.float32)
    assert_close(load_hf_model(tmp_path / "merged")(torch.tensor(tokens)).logits.detach().numpy(), theirs)
    merge_and_save(model, tmp_path / "merged4", dtype=jnp.float32, quant=QuantConfig())
    four = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged4", device_map="cpu")
    assert type(four.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    ours4, _ = load_pretrained(tmp_path / "merged4", dtype=jnp.float32)  # its attention as written, experts NF4
    dense4, _ = load_pretrained(tmp_path / "merged4", quantization=None, dtype=jnp.float32)
    with torch.no_grad():
        assert_close(four(torch.tensor(tokens)).logits.numpy(), dense4(jnp.asarray(tokens)), 1e-5)
    assert ours4.model.layers.mlp.experts.gate_up_proj.is_quantized


@pytest.mark.parametrize("aux", [False, True], ids=["ce", "ce+aux"])
def test_one_step_loss_and_lora_gradients_match_peft(tiny, tmp_path, aux):
    """Our NF4 model against PEFT on the transformers model holding the same weights dequantized (transformers 5
    + bitsandbytes cannot hold 4-bit experts): loss (with the load-balancing loss when configured) and every
    adapter's gradient, experts and router included."""
    family, directory = tiny
    nf4, _ = load_pretrained(directory, dtype=jnp.float32)
    save_pretrained(nf4, tmp_path / "dequantized", dequantize_weights=True)
    config = json.loads((tmp_path / "dequantized/config.json").read_text())
    config.update(output_router_logits=aux, router_aux_loss_coef=0.5)
    (tmp_path / "dequantized/config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized", dtype=torch.float32)
    peft_model = peft.get_peft_model(
        hf, peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules="all-linear")
    )
    peft_model.train()
    peft_model.save_pretrained(tmp_path / "adapter")
    tokens = random_tokens()
    out = peft_model(torch.tensor(tokens), labels=torch.tensor(tokens))
    out.loss.backward()
    theirs = {n: p.grad.numpy() for n, p in peft_model.named_parameters() if p.requires_grad}

    model = nf4  # whose dequantized weights PEFT's base holds
    load_peft_adapter(model, tmp_path / "adapter")
    graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
    targets = np.concatenate([tokens[:, 1:], np.full((2, 1), IGNORE_INDEX)], axis=1)
    batch = dict(
        tokens=jnp.asarray(tokens),
        targets=jnp.asarray(targets),
        segment_ids=jnp.ones(tokens.shape, jnp.int32),
        positions=jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape),
    )

    def loss(adapters):
        total, count = _loss(
            graphdef,
            adapters,
            base,
            batch,
            None,
            chunk_size=8,
            options=model_options(),
            packed_rows=False,
            router_aux_loss_coef=0.5 if aux else None,
        )
        return total / count

    value, grads = jax.value_and_grad(loss)(adapters)
    np.testing.assert_allclose(float(value), out.loss.item(), rtol=1e-5)
    flat = {".".join(path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}
    experts = model.config.moe.num_experts
    for name, grad in theirs.items():
        m = re.match(r"base_model\.model\.model\.layers\.(\d+)\.(.+)\.(lora_[AB])\.default\.weight", name)
        layer, module, field = int(m[1]), m[2], m[3]
        if module.startswith("mlp.experts"):
            projection = "gate_up_proj" if module == "mlp.experts.base_layer" else "down_proj"
            a, b = (
                flat[f"model.layers.mlp.experts.{projection}.lora.lora_A"][layer],
                flat[f"model.layers.mlp.experts.{projection}.lora.lora_B"][layer],
            )
            ours = ExpertLoRA.to_peft(a, b)[0 if field == "lora_A" else 1]
            assert a.shape[0] == experts
        else:
            ours = flat[f"model.layers.{module}.lora.{field}"][layer]
        np.testing.assert_allclose(ours, grad, atol=2e-4 * max(np.abs(grad).max(), 1e-8), rtol=0, err_msg=name)


def model_options():
    from qlora_jax.models import ComputeOptions

    return ComputeOptions(remat="full", attention_block=0)
