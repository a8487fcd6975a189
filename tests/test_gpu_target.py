"""The deviceless compile for an H100/H200 (qlora_jax.gpu_target): target facts, XLA:GPU memory, Pallas kernels.

The compile tests need jax's CUDA plugin at jaxlib's version (no GPU); without it they skip with the reason.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from qlora_jax import gpu_target
from qlora_jax.errors import InputError


def test_targets_hold_the_chips_facts():
    h100, h200 = gpu_target.load_target("h100"), gpu_target.load_target("h200")
    assert (h100.device_kind, h200.device_kind) == ("NVIDIA H100 80GB HBM3", "NVIDIA H200")
    assert h100.sm_count == h200.sm_count == 132
    assert h100.compute_capability == h200.compute_capability == (9, 0)
    assert h200.memory_bandwidth == 4.8e12 and h100.memory_bandwidth == pytest.approx(3.35e12, rel=1e-3)
    assert h200.memory_bytes > 140e9 and 80e9 < h100.memory_bytes < 86e9
    assert h200.l2_bytes == 50 * 2**20 and h200.shared_memory_per_block_optin == 227 * 1024


def test_an_unknown_target_names_the_choices():
    with pytest.raises(InputError, match=r"'a100'.*\['h100', 'h200'\]"):
        gpu_target.load_target("a100")


@pytest.fixture(scope="module")
def h200():
    if reason := gpu_target.deviceless_unavailable_reason():
        pytest.skip(f"deviceless GPU compile unavailable: {reason}")
    return gpu_target.load_target("h200")


@pytest.mark.deviceless
def test_a_matmul_compiles_for_the_h200_with_xla_gpu_memory(h200):
    x = jax.ShapeDtypeStruct((2048, 4096), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((4096, 4096), jnp.float32)
    compiled = gpu_target.compile_for_target(lambda x, w: x @ w.astype(jnp.bfloat16), x, w, target=h200)
    memory = gpu_target.GpuMemory.of(compiled)
    assert memory.argument_bytes == 2048 * 4096 * 2 + 4096 * 4096 * 4
    assert memory.output_bytes == 2048 * 4096 * 2
    assert "sm_9" in compiled.as_text() or "gemm_fusion" in compiled.as_text()  # XLA:GPU's program, not XLA:CPU's


@pytest.mark.deviceless
def test_a_pallas_kernel_compiles_for_sm90(h200):
    from qlora_jax.kernels.decode import DecodeConfig, decode_pallas
    from qlora_jax.quant import quantize

    qt = jax.eval_shape(quantize, jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16))
    x = jax.ShapeDtypeStruct((1, 1024), jnp.bfloat16)
    compiled = gpu_target.compile_for_target(
        lambda x, qt: decode_pallas(x, qt, config=DecodeConfig(dot="mma")), x, qt, target=h200
    )
    assert "__gpu$xla.gpu.triton" in compiled.as_text()
