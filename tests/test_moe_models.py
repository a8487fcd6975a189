"""Qwen3-MoE and Mixtral against transformers: logits (float32 tight, bfloat16 documented), every checkpoint layout
of the experts (per expert, fused 3-D, sharded, bitsandbytes 4-bit per expert, transformers 5 + bitsandbytes),
NF4 experts bit-exact with bitsandbytes and equal to the dequantized dense model, routing ties, refusals."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from qlora_jax.convert.hf import CheckpointError, load_pretrained, save_pretrained
from qlora_jax.models import ModelConfig, UnsupportedModelError
from qlora_jax.models.config import ConfigError
from qlora_jax.quant import QuantConfig
from tests.families import MOE_FAMILIES, family_config
from tests.helpers import assert_close, random_tokens

F32_TOL, BF16_TOL = 2e-5, 3e-2


def test_unsupported_mixtures_of_experts_are_refused_by_model_type():
    with pytest.raises(UnsupportedModelError, match="'qwen2_moe' is a mixture of experts with shared experts"):
        ModelConfig.from_hf_config(family_config("qwen3_moe", model_type="qwen2_moe"))
    with pytest.raises(UnsupportedModelError, match="deepseek_v3"):
        ModelConfig.from_hf_config(family_config("qwen3_moe", model_type="deepseek_v3"))


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        (dict(decoder_sparse_step=2), UnsupportedModelError, "decoder_sparse_step"),
        (dict(mlp_only_layers=[1]), UnsupportedModelError, r"layers \[1\] are dense MLPs \(mlp_only_layers"),
        (dict(num_experts=0), ConfigError, "'num_experts' must be a positive integer"),
        (dict(num_experts_per_tok=9), ConfigError, "exceeds the 8 experts"),
        (dict(moe_intermediate_size=None), ConfigError, "moe_intermediate_size"),
    ],
)
def test_qwen3_moe_fields_are_checked(changes, error, match):
    with pytest.raises(error, match=match):
        ModelConfig.from_hf_config(family_config("qwen3_moe", **changes))


def test_mixtral_router_jitter_is_refused_and_num_experts_read_either_way():
    with pytest.raises(UnsupportedModelError, match="router_jitter_noise"):
        ModelConfig.from_hf_config(family_config("mixtral", router_jitter_noise=0.1))
    fields = family_config("qwen3_moe")
    fields["num_local_experts"] = fields.pop("num_experts")  # transformers 5's save_pretrained spells it so
    assert ModelConfig.from_hf_config(fields).moe.num_experts == 8
    sliding = ModelConfig.from_hf_config(family_config("qwen3_moe", use_sliding_window=True, sliding_window=3))
    assert sliding.layer_types == ("sliding_attention",) * 2


# --- against transformers (oracle) ----------------------------------------------------------------------------


def _hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return torch, transformers


def make_tiny_moe(family: str, directory, *, router_scale: float = 10.0, seed: int = 0, **changes):
    """A random tiny transformers model of `family`, saved (per-expert layout), with its router weights scaled up
    so that routing is decisive (no near-ties for bfloat16 rounding to flip)."""
    torch, _ = _hf()
    from tests.models_util import random_hf_model

    model = random_hf_model(family_config(family, **changes), seed=seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.mul_(router_scale)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module", params=sorted(MOE_FAMILIES))
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, make_tiny_moe(request.param, directory), directory


def _hf_logits(model, tokens, **kwargs):
    torch, _ = _hf()
    with torch.no_grad():
        kwargs = {k: torch.tensor(v) for k, v in kwargs.items()}
        return model(torch.tensor(tokens), **kwargs).logits.float().numpy()


@pytest.mark.oracle
def test_float32_logits_match(tiny):
    family, hf_model, directory = tiny
    model, config = load_pretrained(directory, quantization=None, dtype=jnp.float32)
    assert config.model_type == MOE_FAMILIES[family]["model_type"] and config.moe is not None
    tokens = random_tokens()
    assert_close(model(jnp.asarray(tokens)), _hf_logits(hf_model, tokens), F32_TOL)


@pytest.mark.oracle
def test_bfloat16_logits_match(tiny):
    torch, transformers = _hf()
    _, _, directory = tiny
    model, _ = load_pretrained(directory, quantization=None, dtype=jnp.bfloat16)
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    tokens = random_tokens()
    assert_close(model(jnp.asarray(tokens)), _hf_logits(hf_bf16, tokens), BF16_TOL)


@pytest.mark.oracle
def test_left_padding_matches(tiny):
    _, hf_model, directory = tiny
    model, _ = load_pretrained(directory, quantization=None, dtype=jnp.float32)
    tokens = random_tokens()
    valid = np.ones(tokens.shape, bool)
    valid[0, :3] = False
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    h, _ = model.hidden_states(jnp.asarray(tokens), positions=jnp.asarray(positions), valid=jnp.asarray(valid))
    theirs = _hf_logits(hf_model, tokens, attention_mask=valid.astype(np.int64), position_ids=positions)
    assert_close(np.asarray(model.logits(h))[valid], theirs[valid], F32_TOL)


@pytest.mark.oracle
def test_fused_and_sharded_checkpoints_load_alike(tiny, tmp_path):
    """transformers 5's in-memory 3-D layout (`mlp.experts.gate_up_proj` [E, 2I, H]) as a checkpoint, and the
    per-expert layout in many small shards, give the same model."""
    family, hf_model, directory = tiny
    tokens = random_tokens()
    theirs = _hf_logits(hf_model, tokens)
    fused = tmp_path / "fused"
    fused.mkdir()
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(fused / "model.safetensors"))
    (fused / "config.json").write_text((directory / "config.json").read_text())
    model, _ = load_pretrained(fused, quantization=None, dtype=jnp.float32)
    assert_close(model(jnp.asarray(tokens)), theirs, F32_TOL)
    sharded = tmp_path / "sharded"
    files = save_pretrained(model, sharded, max_shard_size="20KB")
    assert len(files) > 3  # shards, index, config
    again, _ = load_pretrained(sharded, quantization=None, dtype=jnp.float32)
    assert_close(again(jnp.asarray(tokens)), theirs, F32_TOL)


def _bnb_expert_checkpoint(directory, out, quant_type="nf4"):
    """transformers 4's bitsandbytes layout: every expert's nn.Linear as a 4-bit tensor (bitsandbytes'
    quantize_4bit), attention too; the router and norms in float32."""
    torch, _ = _hf()
    functional = pytest.importorskip("bitsandbytes.functional")
    from safetensors.torch import load_file
    from safetensors.torch import save_file as save_torch

    state = load_file(str(directory / "model.safetensors"))
    quantized = {}
    for key, w in state.items():
        if key.endswith("proj.weight") or key.endswith((".w1.weight", ".w2.weight", ".w3.weight")):
            q, qs = functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=quant_type)
            quantized[key] = q
            for name, value in qs.as_dict(packed=True).items():
                quantized[f"{key}.{name}"] = value
        else:
            quantized[key] = w
    out.mkdir()
    save_torch(quantized, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = dict(
        quant_method="bitsandbytes", load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True
    )
    (out / "config.json").write_text(json.dumps(config))
    return quantized


@pytest.mark.oracle
def test_bitsandbytes_expert_checkpoint_is_copied_bit_for_bit(tiny, tmp_path):
    """A 4-bit expert is bitsandbytes' tensor as it is (codes, absmax codes, nested absmax, offset) in our stacked
    [layers, experts, parts, ...] buffers, and the model computes the dequantized weights' logits."""
    family, _, directory = tiny
    stored = _bnb_expert_checkpoint(directory, tmp_path / "bnb")
    model, _ = load_pretrained(tmp_path / "bnb", dtype=jnp.float32)
    experts = model.model.layers.mlp.experts
    gate, up, down = ("gate_proj", "up_proj", "down_proj") if family == "qwen3_moe" else ("w1", "w3", "w2")
    block = "mlp" if family == "qwen3_moe" else "block_sparse_moe"
    for layer, expert in [(0, 0), (1, 3)]:
        for module, part, name in [
            (experts.gate_up_proj, 0, gate),
            (experts.gate_up_proj, 1, up),
            (experts.down_proj, 0, down),
        ]:
            key = f"model.layers.{layer}.{block}.experts.{expert}.{name}.weight"
            np.testing.assert_array_equal(module.packed[...][layer, expert, part], stored[key].numpy().reshape(-1))
            np.testing.assert_array_equal(module.absmax[...][layer, expert, part], stored[f"{key}.absmax"].numpy())
            np.testing.assert_array_equal(
                module.nested_absmax[...][layer, expert, part], stored[f"{key}.nested_absmax"].numpy()
            )
    # the same model dequantized: a dense checkpoint transformers loads, with our logits
    torch, transformers = _hf()
    save_pretrained(model, tmp_path / "dense", dequantize_weights=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    tokens = random_tokens()
    assert_close(model(jnp.asarray(tokens)), _hf_logits(hf, tokens), F32_TOL)


@pytest.mark.oracle
def test_nf4_model_equals_its_dequantized_dense_model(tiny, tmp_path):
    _, _, directory = tiny
    nf4, _ = load_pretrained(directory, quantization=QuantConfig(), dtype=jnp.float32)
    assert nf4.model.layers.mlp.experts.gate_up_proj.is_quantized
    save_pretrained(nf4, tmp_path / "dense", dequantize_weights=True)
    dense, _ = load_pretrained(tmp_path / "dense", quantization=None, dtype=jnp.float32)
    tokens = jnp.asarray(random_tokens())
    assert_close(nf4(tokens), dense(tokens), 1e-6)


@pytest.mark.oracle
def test_transformers_bitsandbytes_checkpoint_loads_with_nf4_experts(tiny, tmp_path):
    """transformers 5 + bitsandbytes keeps experts and router in 16 bits (nn.Linear layers only are 4-bit): the
    attention's 4-bit tensors are copied, the experts quantized on load; our 4-bit save is that layout again."""
    torch, transformers = _hf()
    _, _, directory = tiny
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=bnb_config, dtype=torch.float32, device_map="cpu"
    )
    hf.save_pretrained(tmp_path / "hf4")
    model, _ = load_pretrained(tmp_path / "hf4", dtype=jnp.float32)
    assert model.model.layers.self_attn.q_proj.is_quantized and model.model.layers.mlp.experts.down_proj.is_quantized
    save_pretrained(model, tmp_path / "ours4")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours4", device_map="cpu")
    tokens = random_tokens()
    dense, _ = load_pretrained(tmp_path / "hf4", quantization=None, dtype=jnp.float32)
    # attention is the same 4-bit tensor both sides; our experts are NF4 of transformers' 16-bit experts
    assert_close(_hf_logits(again, tokens), model(jnp.asarray(tokens)), 1e-5)
    assert np.abs(np.asarray(dense(jnp.asarray(tokens))) - _hf_logits(hf, tokens)).max() < 1e-4


@pytest.mark.oracle
def test_router_ties_match_transformers_router():
    """Equal probabilities inside the top k: the same experts and weights as transformers' router (the order of
    two tied experts does not change the output). Across the k-th place: the lower expert index (docs/moe.md;
    torch's CPU kernel follows libstdc++'s nth_element there)."""
    torch, transformers = _hf()
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    from qlora_jax.models.moe import route

    config = transformers.Qwen3MoeConfig(**{k: v for k, v in family_config("qwen3_moe").items() if k != "model_type"})
    router = Qwen3MoeTopKRouter(config)
    logits = np.array(
        [
            [2.0, 1.0, 2.0, 0.5, 0.0, 0.0, -1.0, 0.3],  # experts 0 and 2 tie for first
            [0.1, 3.0, 0.2, 0.2, 3.0, 0.2, 0.0, 0.0],
        ],
        np.float32,
    )  # 1 and 4 tie for first
    with torch.no_grad():
        router.weight.copy_(torch.eye(8, config.hidden_size))
        hidden = torch.zeros(2, config.hidden_size)
        hidden[:, :8] = torch.tensor(logits)
        _, theirs_w, theirs_e = router(hidden)
    moe = ModelConfig.from_hf_config(family_config("qwen3_moe")).moe
    _, ours_e, ours_w = route(jnp.asarray(logits), moe)
    for row in range(2):
        assert sorted(np.asarray(ours_e[row]).tolist()) == sorted(theirs_e[row].tolist())
        np.testing.assert_allclose(np.sort(np.asarray(ours_w[row])), np.sort(theirs_w[row].numpy()), rtol=1e-6)
    boundary = jnp.asarray([[1.0, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0]])  # three experts tie for second place
    assert np.asarray(route(boundary, moe)[1]).tolist() == [[0, 1]]


@pytest.mark.oracle
def test_tied_experts_give_transformers_logits(tmp_path):
    """Expert 5 a copy of expert 2 (router row and weights) in every layer: they tie for every token, wherever in
    the ranking; whichever of the two each side picks, the logits are transformers'."""
    torch, _ = _hf()
    hf = make_tiny_moe("qwen3_moe", tmp_path / "base", router_scale=1.0, num_experts_per_tok=3)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.gate.weight[5] = layer.mlp.gate.weight[2]
            layer.mlp.experts.gate_up_proj[5] = layer.mlp.experts.gate_up_proj[2]
            layer.mlp.experts.down_proj[5] = layer.mlp.experts.down_proj[2]
    hf.save_pretrained(tmp_path / "tied")
    model, _ = load_pretrained(tmp_path / "tied", quantization=None, dtype=jnp.float32)
    tokens = random_tokens()
    assert_close(model(jnp.asarray(tokens)), _hf_logits(hf, tokens), F32_TOL)


def test_expert_checkpoint_errors_name_the_tensor(tmp_path):
    pytest.importorskip("transformers")
    directory = tmp_path / "m"
    make_tiny_moe("mixtral", directory)
    from safetensors.numpy import load_file

    state = load_file(str(directory / "model.safetensors"))
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    del state[name]
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['model\.layers\.1\.block_sparse_moe\.experts\.2\.w3"):
        load_pretrained(directory)
    state[name] = np.zeros((3, 64), np.float32)
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"experts\.2\.w3\.weight has shape \(3, 64\), expected \(48, 64\)"):
        load_pretrained(directory)


@pytest.mark.oracle
def test_greedy_generation_matches_transformers(tiny):
    """KV-cached generation with left padding (the padding tokens routed too, and never attended to)."""
    torch, _ = _hf()
    from qlora_jax.generate import SamplingConfig, generate

    _, hf_model, directory = tiny
    model, _ = load_pretrained(directory, quantization=None, dtype=jnp.float32)
    prompts = [[5, 17, 33, 2, 9, 41], [7, 3, 60]]
    ours = generate(model, prompts, SamplingConfig(max_new_tokens=6, stop_token_ids=()))
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        theirs = hf_model.generate(
            ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None
        )[:, longest:]
    assert ours == theirs.tolist()


@pytest.mark.oracle
def test_each_expert_is_quantized_as_bitsandbytes_quantizes_its_linear(tiny):
    """Quantizing on load (16-bit experts in, NF4 out): every (layer, expert, part) piece is bitsandbytes'
    quantize_4bit of that piece: its codes byte for byte, and given the same offset (a float32 mean, which torch
    sums in a CPU-dependent order: tests/test_quant_bnb.py) its absmax codes and nested absmax."""
    torch, _ = _hf()
    functional = pytest.importorskip("bitsandbytes.functional")
    _, hf_model, directory = tiny
    model, _ = load_pretrained(directory, dtype=jnp.float32)
    experts = model.model.layers.mlp.experts
    size = model.config.moe.expert_size
    for layer, expert in [(0, 1), (1, 3)]:
        hf_experts = hf_model.model.layers[layer].mlp.experts
        pieces = [
            (experts.gate_up_proj, 0, hf_experts.gate_up_proj[expert, :size]),
            (experts.gate_up_proj, 1, hf_experts.gate_up_proj[expert, size:]),
            (experts.down_proj, 0, hf_experts.down_proj[expert]),
        ]
        for module, part, weight in pieces:
            weight = weight.detach().float().contiguous()
            packed, state = functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
            _, plain = functional.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type="nf4")
            index = (layer, expert, part)
            np.testing.assert_array_equal(module.packed[...][index], packed.numpy().reshape(-1))
            offset = np.float32(module.offset[...][index])  # ours: the correctly rounded mean; torch's within ulps
            np.testing.assert_allclose(offset, state.offset.item(), rtol=3e-7)
            codes, nested = functional.quantize_blockwise(plain.absmax - torch.tensor(offset), blocksize=256)
            np.testing.assert_array_equal(module.absmax[...][index], codes.numpy())
            np.testing.assert_array_equal(module.nested_absmax[...][index], nested.absmax.numpy())
