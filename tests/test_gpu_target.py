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
def h200(h200):
    """conftest's h200 (skips where the deviceless compile is unavailable), loaded."""
    return gpu_target.load_target(h200)


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


# --- kernel resources: ptxas' report and XLA's launches ---------------------------------------------------------

PTXAS_REPORT = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'flash_attention_dkv' for 'sm_90a'
ptxas info    : Function properties for flash_attention_dkv
    24 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
ptxas info    : Compile time = 288.963 ms
ptxas info    : Compiling entry function 'loop_add_fusion' for 'sm_90a'
ptxas info    : Function properties for loop_add_fusion
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 16 registers, used 0 barriers
"""
THUNKS = """000: kCommandBuffer [source | sink]
    001: kCustomKernel [source       | next=002 (1)] loop_add_fusion grid: [2048, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
    002: kCustomKernel [prev=001 (1) | sink        ] flash_attention_dkv grid: [32, 1, 8] threads: [128, 1, 1]  shared_memory: 107520 bytes
"""  # noqa: E501


def test_ptxas_reports_and_thunk_sequences_are_read():
    assert gpu_target.parse_ptxas_report(PTXAS_REPORT) == {
        "flash_attention_dkv": (255, 12, 16, 24),
        "loop_add_fusion": (16, 0, 0, 0),
    }
    assert gpu_target.parse_thunk_sequence(THUNKS) == {
        "loop_add_fusion": ((2048, 1, 1), 128, 0),
        "flash_attention_dkv": ((32, 1, 8), 128, 107520),
    }


@pytest.mark.parametrize(
    ("registers", "threads", "shared", "expected"),
    [
        (255, 128, 512, (2, "registers")),  # 256 x 32 registers a warp, 4 warps: 2 blocks of 64K registers
        (40, 128, 0, (12, "registers")),  # 40 -> 1280 a warp (a multiple of 256): 51 warps, 12 blocks of 4
        (24, 128, 0, (16, "threads")),  # 2048 threads an SM (registers would allow 21)
        (64, 256, 107520, (2, "shared memory")),  # 228 KiB an SM, 105 + 1 KiB a block
        (16, 32, 0, (32, "blocks")),
    ],
)
def test_programs_per_sm_follow_the_occupancy_rules(registers, threads, shared, expected):
    assert (
        gpu_target.programs_per_sm(registers=registers, threads=threads, shared_memory=shared, target="h200")
        == expected
    )


def test_device_facts_of_a_target_and_of_this_machine():
    assert gpu_target.device_facts("h200") == gpu_target.DeviceFacts(
        platform="gpu", device_kind="NVIDIA H200", sm_count=132
    )
    here = gpu_target.device_facts()
    assert here.platform == jax.default_backend()
    if here.platform != "gpu":  # no GPU to ask: the GPU kernels are lowered for
        assert here.sm_count == gpu_target.load_target(gpu_target.DEFAULT_TARGET).sm_count


@pytest.fixture(scope="module")
def ptxas_h200(h200):
    if reason := gpu_target.kernel_resources_unavailable_reason():
        pytest.skip(f"GPU kernel resources unavailable: {reason}")
    return h200


@pytest.mark.deviceless
def test_compiled_kernels_report_registers_spills_and_launches(ptxas_h200):
    from qlora_jax.kernels.dequant import DequantConfig, dequantize_pallas
    from qlora_jax.quant import quantize

    qt = jax.eval_shape(quantize, jax.ShapeDtypeStruct((256, 1024), jnp.bfloat16))
    config = DequantConfig(block_rows=32, block_cols=64, num_warps=4)
    kernels = gpu_target.compiled_kernels(lambda qt: dequantize_pallas(qt, config=config), qt, target=ptxas_h200)
    (kernel,) = [k for k in kernels if k.name == "dequantize_nf4"]
    assert 0 < kernel.registers <= 255 and not kernel.spills
    assert kernel.threads == 32 * config.num_warps
    assert kernel.grid == (256 * 1024 // 64 // config.block_rows, 1, 1)
    assert (kernel.programs_per_sm, kernel.limited_by) == gpu_target.programs_per_sm(
        registers=kernel.registers, threads=kernel.threads, shared_memory=kernel.shared_memory_bytes, target=ptxas_h200
    )
    assert "dequantize_nf4:" in str(kernel) and "programs/SM" in str(kernel)
