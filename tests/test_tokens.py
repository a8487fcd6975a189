"""Added tokens: ids past the embedding refused by name; the embedding resized as transformers resizes it; new
rows trained as PEFT trains them (trainable_token_indices, modules_to_save), exported so that PEFT loads them with
our logits, PEFT's adapters loaded here, merged into a checkpoint transformers loads."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from qlora_jax.convert.hf import load_pretrained
from qlora_jax.convert.merge import merge_and_save
from qlora_jax.convert.peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PeftFormatError,
    load_peft_adapter,
    read_adapter_config_dict,
    save_peft_adapter,
)
from qlora_jax.generate import SamplingConfig, generate
from qlora_jax.lora import LoraConfig, apply_lora, trainable_parameters
from qlora_jax.quant import QuantConfig
from qlora_jax.tokenizer import TokenIdError
from qlora_jax.tokens import TrainableTokens, resize_token_embeddings, trainable_row_modules
from tests.models_util import hf_logits, load_hf_model, make_tiny_model, torch, transformers

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.oracle

OLD, NEW = 96, 100  # the tiny families' vocabulary, and four added tokens
TOKENS = np.array([[5, 96, 17, 98, 33, 99, 2, 97, 41]])  # old and new ids mixed


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # untied, tied
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    make_tiny_model(request.param, directory)
    return directory


def _ours(directory, quant=None):
    model, _ = load_pretrained(directory, quantization=quant, dtype=jnp.float32)
    return resize_token_embeddings(model, NEW)


def _hf(directory, resize=True):
    model = load_hf_model(directory)
    if resize:
        model.resize_token_embeddings(NEW)
    return model


def _trained(model, seed=0):
    """Trained-looking values for every adapter and trainable row (away from their initial values)."""
    rng = np.random.default_rng(seed)
    for _, module in nnx.iter_graph(model):
        if getattr(module, "lora", None) is not None:
            b = module.lora.lora_B
            b.set_value(rng.standard_normal(b[...].shape).astype(np.float32) * 0.05)
    for rows in trainable_row_modules(model).values():
        param = rows.trainable_tokens_delta if isinstance(rows, TrainableTokens) else rows.weight
        param.set_value(param[...] + rng.standard_normal(param[...].shape).astype(np.float32) * 0.1)
    return model


def _configs(tied: bool) -> list[LoraConfig]:
    lora = dict(r=2, lora_alpha=4, target_modules=("q_proj", "v_proj"))
    if tied:  # the tied head follows the embedding's rows; a whole-table copy would untie them (refused)
        return [LoraConfig(**lora, trainable_token_indices=(96, 97, 98, 99))]
    return [
        LoraConfig(**lora, trainable_token_indices={"embed_tokens": (96, 97, 98, 99), "lm_head": (96, 97, 98, 99)}),
        LoraConfig(**lora, modules_to_save=("embed_tokens", "lm_head")),
    ]


def test_ids_past_the_embedding_are_refused_by_name(tiny):
    model, _ = load_pretrained(tiny, quantization=None, dtype=jnp.float32)
    with pytest.raises(TokenIdError, match=r"token ids 96, 99 are outside the model's embedding of 96 rows"):
        generate(model, [[1, 96, 2], [99, 3]], SamplingConfig(max_new_tokens=2))
    resize_token_embeddings(model, NEW)
    assert len(generate(model, [[1, 96, 2], [99, 3]], SamplingConfig(max_new_tokens=2, stop_token_ids=()))[0]) == 2


def test_resize_is_transformers_mean_resizing(tiny):
    ours = _ours(tiny)
    theirs = _hf(tiny)
    embed = np.asarray(ours.model.embed_tokens.weight[...])
    hf_embed = theirs.get_input_embeddings().weight.detach().numpy()
    assert embed.shape == hf_embed.shape == (NEW, 64) and ours.config.vocab_size == NEW
    np.testing.assert_array_equal(embed[:OLD], hf_embed[:OLD])
    # transformers: the old rows' mean plus noise of 1e-9 times their covariance
    np.testing.assert_allclose(embed[OLD:], hf_embed[OLD:], atol=1e-5)
    if ours.lm_head is not None:
        head = np.asarray(ours.lm_head.weight[...])
        np.testing.assert_allclose(head, theirs.get_output_embeddings().weight.detach().numpy(), atol=1e-5)
    mean = np.broadcast_to(embed[:OLD].mean(axis=0), (NEW - OLD, 64))  # our init: the mean, up to summation order
    np.testing.assert_allclose(embed[OLD:], mean, rtol=1e-5, atol=1e-9)
    # the old tokens' logits over the old vocabulary are untouched (the new rows differ by transformers' noise)
    old = np.array([[5, 17, 33, 2, 41]])
    np.testing.assert_allclose(
        np.asarray(ours(jnp.asarray(old)))[..., :OLD], hf_logits(theirs, old)[..., :OLD], atol=1e-5
    )


def test_peft_loads_our_trained_tokens_with_our_logits(tiny, tmp_path):
    tied = "qwen2" in str(tiny)
    for k, config in enumerate(_configs(tied)):
        model = _ours(tiny)
        apply_lora(model, config, rngs=nnx.Rngs(0))
        _trained(model, seed=k)
        out = save_peft_adapter(model, tmp_path / f"a{k}", config, base_model_name_or_path=str(tiny))
        saved = load_file(out / ADAPTER_WEIGHTS)
        raw = json.loads((out / ADAPTER_CONFIG).read_text())
        if config.modules_to_save:
            assert saved["base_model.model.model.embed_tokens.weight"].shape == (NEW, 64)
            assert raw["modules_to_save"] == ["embed_tokens", "lm_head"]
        else:
            assert saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"].shape == (4, 64)
        peft_model = peft.PeftModel.from_pretrained(_hf(tiny), out).eval()
        theirs = hf_logits(peft_model, TOKENS)
        ours = np.asarray(model(jnp.asarray(TOKENS)))
        np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())
        # the merged checkpoint: transformers loads the resized, trained embedding without PEFT
        merge_and_save(model, tmp_path / f"m{k}", dtype=jnp.float32)
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"m{k}", dtype=torch.float32).eval()
        assert merged.config.vocab_size == NEW
        np.testing.assert_allclose(hf_logits(merged, TOKENS), theirs, atol=1e-4 * np.abs(theirs).max())


def test_peft_adapters_with_trained_tokens_load_here(tiny, tmp_path):
    tied = "qwen2" in str(tiny)
    fields = [{"trainable_token_indices": [96, 97, 98, 99]}]
    if not tied:
        fields += [
            {"trainable_token_indices": {"embed_tokens": [97, 99], "lm_head": [96, 98]}},
            {"modules_to_save": ["embed_tokens", "lm_head"]},
        ]
    for k, extra in enumerate(fields):
        torch.manual_seed(k)
        peft_model = peft.get_peft_model(
            _hf(tiny), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False, **extra)
        )
        with torch.no_grad():  # trained rows
            for name, param in peft_model.named_parameters():
                if param.requires_grad and "lora" not in name:
                    param.add_(torch.randn_like(param) * 0.1)
        peft_model.save_pretrained(tmp_path / f"p{k}")
        theirs = hf_logits(peft_model.eval(), TOKENS)
        model = _ours(tiny)
        config = load_peft_adapter(model, tmp_path / f"p{k}")
        assert config.modules_to_save == (tuple(extra["modules_to_save"]) if "modules_to_save" in extra else None)
        ours = np.asarray(model(jnp.asarray(TOKENS)))
        np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())
        # back out: PEFT -> qlora-jax -> PEFT changes no tensor
        template = read_adapter_config_dict(tmp_path / f"p{k}")  # its base: the tiny model of 96 rows
        save_peft_adapter(model, tmp_path / f"q{k}", config, template=template)
        before, after = load_file(tmp_path / f"p{k}" / ADAPTER_WEIGHTS), load_file(tmp_path / f"q{k}" / ADAPTER_WEIGHTS)
        assert sorted(before) == sorted(after)
        for key in before:
            np.testing.assert_array_equal(before[key], after[key])
        # and onto a model not resized: refused by name, the model unchanged
        small, _ = load_pretrained(tiny, quantization=None, dtype=jnp.float32)
        with pytest.raises(
            PeftFormatError,
            match=r"(token ids up to 99 but the embedding has 96 rows: resize it"
            r"|resize the model's embedding to 100 rows first)",
        ):
            load_peft_adapter(small, tmp_path / f"p{k}")
        assert not trainable_row_modules(small)


def test_only_the_trained_rows_get_gradients_and_move(tiny):
    """One optimizer step: the trainable rows are the only embedding parameters, the frozen table gets none, and
    only rows that occur in the batch move."""
    from qlora_jax.train.optim import OptimConfig, make_optimizer
    from qlora_jax.train.step import TrainState, make_train_step

    model = _ours(tiny)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=("q_proj",), trainable_token_indices=(96, 97, 98, 99))
    apply_lora(model, config, rngs=nnx.Rngs(0))
    trainable, _ = trainable_parameters(model, verbose=False)
    assert trainable == 2 * 2 * (64 + 64) + 4 * 64  # q_proj's A and B in 2 layers, 4 rows of 64
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    names = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(lora)}
    assert "model.embed_tokens.trainable_rows.trainable_tokens_delta" in names
    assert not any("embed_tokens.weight" in n for n in names)
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0), total_steps=2)
    state = TrainState.create(lora, optimizer)
    step = make_train_step(graphdef, optimizer, chunk_size=16)
    tokens = jnp.asarray([[5, 96, 17, 98, 33, 7, 2, 9]])
    batch = {
        "tokens": tokens[None],
        "targets": jnp.roll(tokens, -1)[None].at[..., -1].set(-100),
        "positions": jnp.arange(8)[None, None],
        "segment_ids": jnp.ones((1, 1, 8), jnp.int32),
    }
    before = np.asarray(model.model.embed_tokens.trainable_rows.trainable_tokens_delta[...])  # (the step donates it)
    new_state, metrics = step(state, base, batch, jax.random.key(0))
    assert bool(metrics["finite"])
    after = np.asarray(
        nnx.merge(graphdef, new_state.lora, base).model.embed_tokens.trainable_rows.trainable_tokens_delta[...]
    )
    moved = np.abs(after - before).max(axis=1) > 0
    # 96 and 98 are inputs; the tied head's logits of every row get gradients when tied, else only the inputs
    expected = [True, True, True, True] if model.config.tie_word_embeddings else [True, False, True, False]
    assert moved.tolist() == expected


def test_bad_token_configs_are_refused_before_the_model_changes(tiny):
    tied = "qwen2" in str(tiny)
    model = _ours(tiny)
    lora = dict(r=2, target_modules=("q_proj",))
    with pytest.raises(ValueError, match="token ids up to 100 but the embedding has 100 rows: resize it first"):
        apply_lora(model, LoraConfig(**lora, trainable_token_indices=(96, 100)), rngs=nnx.Rngs(0))
    if tied:
        with pytest.raises(ValueError, match="modules_to_save: this model ties its output head"):
            apply_lora(model, LoraConfig(**lora, modules_to_save=("embed_tokens",)), rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match="lm_head: this model ties its output head to the embedding"):
            apply_lora(model, LoraConfig(**lora, trainable_token_indices={"lm_head": (96,)}), rngs=nnx.Rngs(0))
    else:
        with pytest.raises(ValueError, match="lm_head also gets a LoRA adapter"):
            apply_lora(
                model, LoraConfig(r=2, target_modules=("lm_head",), modules_to_save=("lm_head",)), rngs=nnx.Rngs(0)
            )
    assert not trainable_row_modules(model) and all(
        m.lora is None for _, m in nnx.iter_graph(model) if hasattr(m, "lora")
    )
    for bad, match in [
        ({"norm": (1,)}, "module 'norm' is not supported"),
        ((3, 3), "more than once"),
        ((), "non-empty list"),
        ((-1,), "integers >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            LoraConfig(trainable_token_indices=bad)
    with pytest.raises(ValueError, match="modules_to_save: 'norm' is not supported"):
        LoraConfig(modules_to_save=("norm",))
    with pytest.raises(ValueError, match="embed_tokens is in both modules_to_save and trainable_token_indices"):
        apply_lora(
            model,
            LoraConfig(**lora, modules_to_save=("embed_tokens",), trainable_token_indices=(96,)),
            rngs=nnx.Rngs(0),
        )


def test_a_4bit_head_is_refused_for_resizing(tiny):
    if "qwen2" in str(tiny):
        pytest.skip("tied: no head of its own")
    model, _ = load_pretrained(tiny, quantization=QuantConfig(skip_modules=()), dtype=jnp.float32)
    with pytest.raises(ValueError, match="lm_head is stored in 4 bits"):
        resize_token_embeddings(model, NEW)
    assert model.config.vocab_size == OLD


@pytest.mark.slow
def test_a_run_with_added_tokens_is_refused_then_trains_their_rows(tmp_path, smollm2_gguf):
    """A tokenizer with an added token on a model not resized: `train` refuses the data by name before loading
    or compiling anything; with `model.resize_token_embeddings` and `lora.trainable_token_indices` it trains the new
    row, and PEFT loads the exported adapter onto the resized transformers model with our logits."""
    import yaml

    from qlora_jax.train.config import load_config
    from qlora_jax.train.loop import train
    from tests.tiny_smol import save_tiny_smol

    model_dir = save_tiny_smol(tmp_path / "model", smollm2_gguf)  # tied, 49152 rows
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|call|>"]})
    tok.save_pretrained(model_dir)
    new = tok.convert_tokens_to_ids("<|call|>")
    assert new == 49152
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"Question {i}: <|call|> answer {i}"}) + "\n" for i in range(8)))
    raw = {
        "model": {"path": str(model_dir), "quant": "none", "dtype": "float32"},
        "data": {"train": str(data), "max_length": 32},
        "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]},
        "optim": {"learning_rate": 1e-2},
        "train": {"output_dir": str(tmp_path / "run"), "steps": 2, "batch_size": 2, "remat": "none"},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(
        TokenIdError,
        match=r"data.train \(.*\): token ids 49152 are outside the model's embedding of "
        r"49152 rows .* set model.resize_token_embeddings: 49153",
    ):
        train(load_config(tmp_path / "c.yaml"), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any work
    raw["model"]["resize_token_embeddings"] = 49153
    raw["lora"]["trainable_token_indices"] = [new]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    result = train(load_config(tmp_path / "c.yaml"), progress=False)
    adapter = result.output_dir / "adapter"
    saved = load_file(adapter / ADAPTER_WEIGHTS)
    delta = saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert delta.shape == (1, 64)
    initial = saved["base_model.model.model.embed_tokens.token_adapter.base_layer.weight"][new]
    assert np.abs(delta[0] - initial).max() > 0  # the new row trained
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf.resize_token_embeddings(49153)
    peft_model = peft.PeftModel.from_pretrained(hf, adapter).eval()
    tokens = np.array([tok("Question 3: <|call|> answer")["input_ids"]])
    ours, _ = load_pretrained(model_dir, quantization=None, dtype=jnp.float32)
    resize_token_embeddings(ours, 49153)
    load_peft_adapter(ours, adapter)
    theirs = hf_logits(peft_model, tokens)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(tokens))), theirs, atol=1e-4 * np.abs(theirs).max())
