"""Attention: the XLA path taken in query blocks (each rematerialized) equals attention over all queries; the
Pallas flash kernel (interpreted) equals its reference, which is today's attention on every query that sees a key,
in value and gradient for every mask the decoder uses; the GPU paths lower for CUDA without a score matrix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.kernels.flash_attention import FlashConfig, flash_attention, flash_attention_reference
from qlora_jax.kernels.lowering import export_for_cuda
from qlora_jax.models.attention import (
    AttentionMasks,
    attend,
    attention_mask,
    multi_head_attention,
    resolve_attention,
)


def _inputs(t=13, s=13, heads=4, kv_heads=2, dim=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (2, t, heads, dim))
    k = jax.random.normal(keys[1], (2, s, kv_heads, dim))
    v = jax.random.normal(keys[2], (2, s, kv_heads, dim))
    return q, k, v


def _mask(t, *, window=None, padded=False):
    index = jnp.broadcast_to(jnp.arange(t), (2, t))
    segments = jnp.asarray(np.repeat([[0] * 6 + [1] * (t - 6)], 2, axis=0))
    valid = jnp.ones((2, t), bool).at[0, :3].set(not padded)
    return attention_mask(index, index, q_segments=segments, k_segments=segments, k_valid=valid, window=window)


@pytest.mark.parametrize("block_size", [1, 4, 5, 12])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("window", [None, 3])
def test_blocked_equals_whole_in_value_and_gradient(block_size, softcap, window):
    q, k, v = _inputs()
    mask = _mask(q.shape[1], window=window, padded=True)  # row 0's first 3 keys are padding: some rows see nothing

    def loss(q, k, v, block):
        out = attend(q, k, v, mask, scale=0.3, softcap=softcap, block_size=block)
        return jnp.sum(jnp.sin(out)), out

    value_and_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    (_, whole), whole_grads = value_and_grads(q, k, v, None)
    (_, blocked), blocked_grads = value_and_grads(q, k, v, block_size)
    assert np.isfinite(np.asarray(blocked)).all()
    np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(blocked_grads, whole_grads, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_block_at_least_the_length_is_attention_over_all_queries():
    q, k, v = _inputs()
    mask = _mask(q.shape[1])
    whole = attend(q, k, v, mask, scale=0.3)
    np.testing.assert_array_equal(attend(q, k, v, mask, scale=0.3, block_size=13), whole)
    np.testing.assert_array_equal(attend(q, k, v, mask, scale=0.3, block_size=0), whole)


def test_blocked_attention_never_holds_the_whole_score_matrix():
    """The compiled backward pass of 4 blocks needs far less temporary memory than all queries at once."""
    q, k, v = _inputs(t=512, s=512, heads=8, kv_heads=8, dim=16)
    mask = _mask(512)

    def temporaries(block):
        grad = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, mask, scale=0.25, block_size=block)), (0, 1, 2))
        return jax.jit(grad).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    scores = 2 * 8 * 512 * 512 * 4  # batch x heads x T x S float32
    assert temporaries(None) >= scores
    assert temporaries(128) < temporaries(None) / 2


# ------------------------------------------------------------------------------------------ flash attention paths

SMALL = FlashConfig(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)


def _flash_case(name, t=40, heads=4, kv_heads=2, dim=24, s=None):
    """(q, k, v, kwargs) of one mask case: rows of 2 segments and padding, left padding, windows, cache offsets."""
    s = s or t
    q, k, v = _inputs(t=t, s=s, heads=heads, kv_heads=kv_heads, dim=dim)
    segments = jnp.asarray(np.repeat([[1] * 15 + [2] * (t - 20) + [0] * 5], 2, axis=0))
    left_padded = jnp.ones((2, s), bool).at[0, :3].set(False)
    cases = {
        "causal": {},
        "packed": dict(q_segments=segments, k_segments=segments),
        "left-padding-window": dict(k_valid=left_padded, window=7),
        "softcap-traced-window": dict(softcap=5.0, window=jnp.int32(5)),
        "packed-padded-gqa4": dict(q_segments=segments, k_segments=segments, k_valid=left_padded),
        # prefill of a KV cache: 8 queries written at slots 5..12 of a 24-slot cache, left padding before them
        "cache-prefill": dict(
            k_valid=jnp.zeros((2, s), bool).at[:, 5:13].set(True).at[1, 5].set(False), q_offset=jnp.int32(5)
        ),
    }
    return q, k, v, cases[name]


def _visible(kwargs, t, s):
    """bool [B, T]: queries that may attend at least one key (the others are padding: no output is defined)."""
    q_index = jnp.broadcast_to(kwargs.get("q_offset", 0) + jnp.arange(t), (2, t))
    k_index = jnp.broadcast_to(jnp.arange(s), (2, s))
    segments = {"q_segments": kwargs.get("q_segments"), "k_segments": kwargs.get("k_segments")}
    mask = attention_mask(q_index, k_index, k_valid=kwargs.get("k_valid"), window=kwargs.get("window"), **segments)
    return mask, mask.any(-1)


@pytest.mark.parametrize("case", ["causal", "packed", "left-padding-window", "softcap-traced-window"])
def test_reference_is_todays_attention_on_every_visible_query(case):
    """The flash reference (and so the kernel) computes what `attend` (the XLA path) computes, value and
    gradient, for every query that sees a key; queries that see none get 0 there (the XLA path averages)."""
    q, k, v, kwargs = _flash_case(case)
    mask, visible = _visible(kwargs, q.shape[1], k.shape[1])
    weights = visible[:, :, None, None].astype(jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * weights)

    xla = lambda q, k, v: attend(q, k, v, mask, scale=0.3, softcap=kwargs.get("softcap"))  # noqa: E731
    ref = lambda q, k, v: flash_attention_reference(q, k, v, scale=0.3, **kwargs)  # noqa: E731
    np.testing.assert_allclose(np.asarray(ref(q, k, v))[visible], np.asarray(xla(q, k, v))[visible], atol=2e-6)
    assert not np.asarray(ref(q, k, v))[~visible].any()
    for ours, theirs in zip(
        jax.grad(loss(ref), (0, 1, 2))(q, k, v), jax.grad(loss(xla), (0, 1, 2))(q, k, v), strict=True
    ):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize(
    ("case", "heads", "kv_heads", "dim", "t", "s"),
    [
        ("causal", 4, 4, 16, 40, None),
        ("packed", 4, 2, 24, 40, None),
        ("left-padding-window", 6, 3, 16, 33, None),
        ("softcap-traced-window", 4, 1, 16, 40, None),
        ("packed-padded-gqa4", 8, 2, 8, 40, None),
        ("cache-prefill", 4, 2, 16, 8, 24),
    ],
)
def test_flash_kernel_equals_reference_in_value_and_gradient(case, heads, kv_heads, dim, t, s):
    """The Pallas kernels (interpreted on CPU), forward and both backward kernels, against the plain-JAX
    reference: grouped-query heads (1, 2, 3, 4 query heads per key head), ragged lengths and head dims."""
    q, k, v, kwargs = _flash_case(case, t=t, heads=heads, kv_heads=kv_heads, dim=dim, s=s)
    weights = jax.random.normal(jax.random.key(7), q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

    kernel = lambda q, k, v: flash_attention(q, k, v, scale=0.3, config=SMALL, interpret=True, **kwargs)  # noqa: E731
    ref = lambda q, k, v: flash_attention_reference(q, k, v, scale=0.3, **kwargs)  # noqa: E731
    out, grads = jax.jit(jax.value_and_grad(loss(kernel), (0, 1, 2)))(q, k, v)
    ref_out, ref_grads = jax.value_and_grad(loss(ref), (0, 1, 2))(q, k, v)
    np.testing.assert_allclose(float(out), float(ref_out), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(kernel)(q, k, v)), np.asarray(ref(q, k, v)), atol=2e-6)
    for ours, theirs in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=5e-6)


def test_resolve_attention_picks_per_backend_and_mask():
    common = dict(queries=512, dtype=jnp.bfloat16, head_dim=128, softcap=None, packed=False, key_mask=False)
    assert resolve_attention("auto", backend="cpu", **common) == "xla"
    assert resolve_attention("auto", backend="gpu", **common) == "cudnn"
    assert resolve_attention("auto", backend="gpu", **(common | {"packed": True})) == "pallas"
    assert resolve_attention("auto", backend="gpu", **(common | {"softcap": 50.0})) == "pallas"
    assert resolve_attention("auto", backend="gpu", **(common | {"key_mask": True})) == "pallas"
    assert resolve_attention("auto", backend="gpu", **(common | {"dtype": jnp.float32})) == "xla"  # tiles spill
    assert resolve_attention("auto", backend="gpu", **(common | {"queries": 1})) == "xla"  # decoding
    assert resolve_attention("pallas", backend="cpu", **common) == "pallas"
    with pytest.raises(ValueError, match="cannot compute packed segments"):
        resolve_attention("cudnn", **(common | {"packed": True}))
    with pytest.raises(ValueError, match="logit soft-capping"):
        resolve_attention("cudnn", **(common | {"softcap": 50.0}))
    with pytest.raises(ValueError, match="must be one of"):
        resolve_attention("flash", **common)


@pytest.fixture
def cudnn_without_a_gpu(monkeypatch):
    """jax asks the local cuDNN for its version and the GPU for its compute capability while lowering cuDNN
    attention; this machine has neither, so the test names a Hopper GPU with cuDNN 9.10 (only lowering runs)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)


def _masks(b, t, *, segments=False, k_valid=False, is_sliding=None):
    seg = jnp.ones((b, t), jnp.int32) if segments else None
    valid = jnp.ones((b, t), bool) if k_valid else None
    return AttentionMasks(None, seg, seg, valid, jnp.int32(0), is_sliding)


@pytest.mark.parametrize(
    ("impl", "heads", "kv_heads", "dim", "window", "mixed", "softcap", "dtype"),
    [
        ("cudnn", 32, 8, 128, None, False, None, jnp.bfloat16),  # Llama 3 8B's heads
        ("cudnn", 8, 2, 64, 32, False, None, jnp.float16),  # Mistral: every layer slides
        ("cudnn", 8, 4, 128, 32, True, None, jnp.bfloat16),  # Gemma 3: sliding and global layers
        ("pallas", 28, 4, 128, None, False, None, jnp.bfloat16),  # Qwen2 7B: 7 query heads per key head
        ("pallas", 8, 4, 256, 32, True, 50.0, jnp.bfloat16),  # Gemma 2: soft-capping, mixed windows
        ("pallas", 32, 32, 96, None, False, None, jnp.float16),  # Phi-3: head_dim 96
        ("pallas", 4, 2, 64, None, False, None, jnp.float32),
    ],
)
def test_gpu_attention_lowers_for_cuda_without_a_score_matrix(
    cudnn_without_a_gpu, impl, heads, kv_heads, dim, window, mixed, softcap, dtype
):
    """Forward and backward of each GPU path lower for CUDA, and nothing in the module is [.., T, S] shaped: the
    scores live in the kernels' registers and shared memory only (the XLA path, for contrast, has them)."""
    b, t = 1, 512
    spec = jax.ShapeDtypeStruct((b, t, heads, dim), dtype)
    kv = jax.ShapeDtypeStruct((b, t, kv_heads, dim), dtype)

    def grads(q, k, v, sliding):
        masks = _masks(b, t, segments=impl == "pallas", k_valid=impl == "pallas", is_sliding=sliding if mixed else None)

        def loss(q, k, v):
            out = multi_head_attention(q, k, v, masks, impl=impl, window=window, scale=dim**-0.5, softcap=softcap)
            return jnp.sum(out.astype(jnp.float32))

        return jax.grad(loss, (0, 1, 2))(q, k, v)

    text = export_for_cuda(grads, spec, kv, kv, jax.ShapeDtypeStruct((), bool)).mlir_module()
    assert ("cudnn" in text) if impl == "cudnn" else ("triton" in text)
    assert f"x{t}x{t}x" not in text and f"<{t}x{t}x" not in text

    def xla_grads(q, k, v):
        mask = jnp.tril(jnp.ones((b, t, t), bool))
        return jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, mask, scale=0.1).astype(jnp.float32)), (0, 1, 2))(
            q, k, v
        )

    assert f"x{t}x{t}x" in export_for_cuda(xla_grads, spec, kv, kv).mlir_module()


# ------------------------------------------------------------------------------------------ in the decoder

TINY = {
    "llama-gqa": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2),
    "gemma2": dict(
        model_type="gemma2",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=5,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=30.0,
    ),
}


def _tiny_decoder(family):
    from flax import nnx

    from qlora_jax.models import DecoderLM, ModelConfig

    hf = (
        dict(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            rope_theta=10000.0,
            max_position_embeddings=128,
        )
        | TINY[family]
    )
    return DecoderLM(
        ModelConfig.from_hf_config(hf), quant=None, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)
    )


def _pallas_options():
    from qlora_jax.kernels import KernelOptions
    from qlora_jax.models import ComputeOptions

    return ComputeOptions(attention="pallas", kernels=KernelOptions(interpret=True))


@pytest.mark.parametrize("family", sorted(TINY))
def test_decoder_with_the_flash_kernel_equals_the_xla_path(family):
    """Packed segments in one row, left padding in the other, sliding and global layers, soft-capping: the
    decoder's hidden states through the Pallas kernel equal the XLA path's on every real token."""
    from qlora_jax.models import ComputeOptions

    model = _tiny_decoder(family)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 96, (2, 20)))
    segments = jnp.asarray([[1] * 12 + [2] * 8, [0] * 3 + [1] * 17])
    positions = jnp.asarray([list(range(12)) + list(range(8)), [0] * 3 + list(range(17))])
    valid = segments > 0
    outs = [
        model.hidden_states(tokens, positions=positions, segment_ids=segments, valid=valid, options=options)[0]
        for options in (ComputeOptions(attention="xla"), _pallas_options())
    ]
    np.testing.assert_allclose(np.asarray(outs[1])[valid], np.asarray(outs[0])[valid], rtol=2e-5, atol=2e-5)


def test_cached_generation_with_the_flash_kernel_generates_the_same():
    """Prefill of left-padded prompts into the KV cache (a query offset, key-validity mask) and decoding."""
    from qlora_jax.generate import SamplingConfig, generate
    from qlora_jax.models import ComputeOptions

    model = _tiny_decoder("gemma2")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    config = SamplingConfig(max_new_tokens=5, stop_token_ids=())
    assert generate(model, prompts, config, options=_pallas_options()) == generate(
        model, prompts, config, options=ComputeOptions(attention="xla")
    )
