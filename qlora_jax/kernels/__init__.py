"""Pallas GPU kernels for 4-bit weights, each beside its plain-JAX reference, and their dispatch.

- `nf4_matmul(x, qt, options=KernelOptions(...))`: y = x @ dequantize(qt).T, forward and backward; XLA unless a
  measurement (the tuning cache, or the table shipped for the GPU kind) says a fused kernel is faster.
- `decode_pallas`: the decode kernel (M <= 16) that streams the packed weight; `matmul_pallas` /
  `matmul_transposed_pallas`: the tiled fused kernels; `dequantize_pallas`: the dequantization kernel.
- `KernelOptions(...)`: the kernel choice of a call (impl, interpreter mode, autotuning, cache), a static value.
"""

from qlora_jax.kernels.autotune import Choice, TuningCache, TuningKey, default_fused_config, tuning_space
from qlora_jax.kernels.decode import DecodeConfig, decode_pallas, decode_reference
from qlora_jax.kernels.dequant import DequantConfig, dequantize_pallas, dequantize_reference
from qlora_jax.kernels.dispatch import IMPLS, KernelOptions, dequantize_auto, nf4_matmul, plan_for
from qlora_jax.kernels.matmul import (
    MatmulConfig,
    matmul_pallas,
    matmul_reference,
    matmul_transposed_pallas,
    matmul_transposed_reference,
)

__all__ = [
    "IMPLS",
    "Choice",
    "DecodeConfig",
    "DequantConfig",
    "KernelOptions",
    "MatmulConfig",
    "TuningCache",
    "TuningKey",
    "decode_pallas",
    "decode_reference",
    "default_fused_config",
    "dequantize_auto",
    "dequantize_pallas",
    "dequantize_reference",
    "matmul_pallas",
    "matmul_reference",
    "matmul_transposed_pallas",
    "matmul_transposed_reference",
    "nf4_matmul",
    "plan_for",
    "tuning_space",
]
