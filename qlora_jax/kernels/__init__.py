"""Pallas GPU kernels for 4-bit weights, each beside its plain-JAX reference, and their dispatch.

- `nf4_matmul(x, qt, options=KernelOptions(...))`: y = x @ dequantize(qt).T, forward and backward; XLA unless a
  measurement (the tuning cache, or the table shipped for the GPU kind) says a fused kernel is faster;
  `layer=` multiplies by one layer of a stacked weight, `nf4_matmul_group` by several weights that read one x.
- `decode_pallas` / `decode_group_pallas`: the decode kernel (M <= 16) that streams packed weights where they lie;
  `matmul_pallas` / `matmul_transposed_pallas`: the tiled fused kernels; `dequantize_pallas`: dequantization.
- `registry`: every kernel with its config type, candidate space, default and reference.
- `KernelOptions(...)`: the kernel choice of a call (impl, interpreter mode, autotuning, cache), a static value.
"""

from qlora_jax.kernels.autotune import Choice, TuningCache, TuningKey, default_fused_config, tuning_space
from qlora_jax.kernels.decode import DecodeConfig, decode_group_pallas, decode_pallas, decode_reference
from qlora_jax.kernels.dequant import DequantConfig, dequantize_pallas, dequantize_reference
from qlora_jax.kernels.dispatch import IMPLS, KernelOptions, dequantize_auto, nf4_matmul, nf4_matmul_group, plan_for
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
    "decode_group_pallas",
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
    "nf4_matmul_group",
    "plan_for",
    "tuning_space",
]
