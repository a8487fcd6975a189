"""Pallas GPU kernels for 4-bit weights, each beside its plain-JAX reference, and their automatic dispatch.

- `nf4_matmul(x, qt, impl=...)`: y = x @ dequantize(qt).T, fused dequantize-matmul forward and backward.
- `dequantize_pallas(qt, dtype)`: the Pallas dequantization kernel; `dequantize_auto` picks it on GPU.
- `KernelOptions(...)`: the kernel choice of a call (impl, interpreter mode, autotuning), a static value.
"""

from qlora_jax.kernels.autotune import Choice, TuningCache, TuningKey, tuning_space
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
    "DequantConfig",
    "KernelOptions",
    "MatmulConfig",
    "TuningCache",
    "TuningKey",
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
