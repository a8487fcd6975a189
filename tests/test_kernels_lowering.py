"""Every kernel configuration lowers for CUDA (jax.export, platform "cuda"), so one that cannot fails CI on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from qlora_jax import gpu_target
from qlora_jax.kernels import (
    DecodeConfig,
    DequantConfig,
    KernelOptions,
    MatmulConfig,
    decode_group_pallas,
    decode_pallas,
    dequantize_pallas,
    matmul_transposed_pallas,
    nf4_matmul,
    registry,
    tuning_space,
)
from qlora_jax.kernels.autotune import default_fused_config
from qlora_jax.kernels.lowering import export_for_cuda
from qlora_jax.quant import quantize

N, K = 256, 512
SMS = gpu_target.device_facts().sm_count  # on CPU: the SMs of the GPU kernels are lowered for


def _abstract_weight(dtype=jnp.bfloat16, quant_type="nf4", double_quant=True, blocksize=128, shape=(N, K)):
    """A QuantizedTensor of ShapeDtypeStructs: lowering needs shapes only."""
    return jax.eval_shape(
        lambda: quantize(jnp.zeros(shape, dtype), quant_type=quant_type, double_quant=double_quant, blocksize=blocksize)
    )


def _spec(*shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _assert_triton_call(exported):
    text = exported.mlir_module()
    assert "triton" in text, "expected a Triton custom call in the CUDA module"


def _forward(config):
    kernel = registry.kernel_for("forward", config)
    return lambda x, q: kernel.call(x, q, config=config)


@pytest.mark.parametrize(
    ("op", "m"),
    [("forward", 1), ("forward", 4), ("forward", 16), ("forward", 300), ("backward", 16), ("backward", 300)],
)
def test_every_config_in_the_tuning_space_lowers(op, m):
    qt = _abstract_weight()
    configs = tuning_space(op, m, N, K, qt.blocksize)
    assert configs
    for config in [*configs, default_fused_config(op, m, N, K, qt.blocksize, SMS)]:
        if op == "forward":
            exported = export_for_cuda(_forward(config), _spec(m, K), qt)
        else:
            exported = export_for_cuda(
                lambda dy, q, c=config: matmul_transposed_pallas(dy, q, config=c), _spec(m, N), qt
            )
        _assert_triton_call(exported)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)])
def test_every_quant_variant_and_dtype_lowers(dtype, quant_type, double_quant):
    qt = _abstract_weight(dtype, quant_type, double_quant, blocksize=64)
    for m in (1, 7, 300):
        config = default_fused_config("forward", m, N, K, 64, SMS)
        _assert_triton_call(export_for_cuda(_forward(config), _spec(m, K, dtype=dtype), qt))
    for config in (DecodeConfig(dot="fma", lookup="select"), DecodeConfig(dot="mma", block_k=512, split_k=1)):
        _assert_triton_call(export_for_cuda(_forward(config), _spec(3, K, dtype=dtype), qt))
    _assert_triton_call(
        export_for_cuda(
            lambda dy, q: matmul_transposed_pallas(dy, q, config=MatmulConfig()), _spec(300, N, dtype=dtype), qt
        )
    )
    for config in (DequantConfig(), *registry.DEQUANT_SPACE):
        _assert_triton_call(export_for_cuda(lambda q, c=config: dequantize_pallas(q, dtype, config=c), qt))


@pytest.mark.parametrize("blocksize", [64, 256])
def test_decode_block_layouts_lower(blocksize):
    """Both lookups and dots, block_k below / above the blocksize, split or not, a stack read in place."""
    qt = _abstract_weight(blocksize=blocksize)
    stack = jax.eval_shape(lambda: jax.vmap(quantize)(jnp.zeros((3, N, K), jnp.bfloat16)))
    for block_k in (64, 512):
        for lookup in ("gather", "select"):
            for dot, split in (("fma", 1), ("mma", 1)):
                config = DecodeConfig(block_n=128, block_k=block_k, split_k=split, dot=dot, lookup=lookup)
                _assert_triton_call(export_for_cuda(_forward(config), _spec(1, K), qt))
    config = DecodeConfig(block_n=32, block_k=128, split_k=2)
    exported = export_for_cuda(
        lambda x, s, i: decode_pallas(x, s, i, config=config), _spec(2, K), stack, jax.ShapeDtypeStruct((), jnp.int32)
    )
    _assert_triton_call(exported)


def test_decode_group_lowers():
    """q/k/v-shaped weights (different out_features) in one launch, stacked and read in place."""
    stacks = tuple(
        jax.eval_shape(lambda n=n: jax.vmap(quantize)(jnp.zeros((2, n, K), jnp.bfloat16))) for n in (N, N // 2, N // 2)
    )
    for config in registry.decode_space(1, N, K, 64):
        exported = export_for_cuda(
            lambda x, s, i, c=config: decode_group_pallas(x, s, i, config=c),
            _spec(1, K),
            stacks,
            jax.ShapeDtypeStruct((), jnp.int32),
        )
        calls = [line for line in exported.mlir_module().splitlines() if "custom_call" in line and "triton" in line]
        assert len(calls) == 1


def test_decoding_through_nf4_matmul_lowers():
    """impl="pallas" at M <= 16 inside a scan over stacked layers: the decode kernel, mapped over the layers."""
    stacked = jax.eval_shape(lambda: jax.vmap(quantize)(jnp.zeros((2, K, K), jnp.bfloat16)))
    options = KernelOptions(impl="pallas")

    def forward(x, layers):
        return jax.lax.scan(lambda h, qt: (nf4_matmul(h, qt, options=options), None), x, layers)[0]

    exported = export_for_cuda(forward, _spec(8, K), stacked)
    assert "nf4_decode" in exported.mlir_module()


def test_training_step_through_nf4_matmul_lowers():
    """value_and_grad through the custom VJP (fused forward and backward) inside a scan over stacked layers."""
    stacked = jax.eval_shape(lambda: jax.vmap(quantize)(jnp.zeros((2, K, K), jnp.bfloat16)))

    def loss(x, layers):
        def layer(h, qt):
            forward = MatmulConfig(block_m=64, block_n=64, block_k=64)  # M > 16 runs XLA unless told
            return jax.checkpoint(lambda a: nf4_matmul(a, qt, impl="pallas", config=forward))(h), None

        return jnp.sum(jax.lax.scan(layer, x, layers)[0].astype(jnp.float32) ** 2)

    exported = export_for_cuda(jax.value_and_grad(loss), _spec(4, 128, K), stacked)
    assert exported.mlir_module().count("nf4_matmul") >= 2  # the forward and the transposed kernels


@pytest.mark.skipif(
    registry.by_name("decode_mosaic").unavailable() is not None,
    reason=str(registry.by_name("decode_mosaic").unavailable()),
)
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("stacked", [False, True])
def test_the_mosaic_decode_kernel_lowers(m, stacked):
    """Mosaic GPU's decode kernel (jax >= 0.11; selectable by name only): its default and other split/pipeline
    depths, on one weight and in place on a layer of a stack, emit one Mosaic GPU custom call."""
    from qlora_jax.kernels.decode_mosaic import MosaicDecodeConfig, decode_mosaic

    qt = _abstract_weight(blocksize=64)
    if stacked:  # two layers, as the decoder stacks them (every buffer with a leading layer axis)
        qt = jax.eval_shape(lambda: jax.vmap(lambda w: quantize(w, blocksize=64))(jnp.zeros((2, N, K), jnp.bfloat16)))
    layer = (jax.ShapeDtypeStruct((), jnp.int32),) if stacked else ()
    kernel = registry.by_name("decode_mosaic")
    for config in (kernel.default(m, N, K, 64, 132), MosaicDecodeConfig(split_k=1, max_concurrent_steps=2)):
        exported = export_for_cuda(
            lambda x, q, *i, c=config: decode_mosaic(x, q, *i, config=c), _spec(m, K), qt, *layer
        )
        assert exported.mlir_module().count("custom_call @mosaic_gpu") == 1
