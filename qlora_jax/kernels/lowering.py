"""Lowering kernels for CUDA without a GPU: `jax.export` for platform "cuda" from any machine.

The tests lower every kernel configuration this way, so a kernel that cannot lower for a GPU fails CI on a CPU
machine. Pallas emits Triton IR here; PTX is produced later, when XLA compiles the module on the GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jax
from jax import export

from qlora_jax import gpu_target
from qlora_jax.parallel.mesh import BATCH_AXES

__all__ = ["export_for_cuda"]

# The Triton custom call's target is named differently across jax versions; only its safety check is disabled.
_TRITON_TARGETS = ("triton_kernel_call", "__gpu$xla.gpu.triton")
# cuDNN's fused attention (jax.nn.dot_product_attention(implementation="cudnn")), forward and backward.
_CUDNN_TARGETS = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")


def export_for_cuda(fn: Callable[..., Any], *args: Any, target: str = gpu_target.DEFAULT_TARGET) -> export.Exported:
    """Exports `jax.jit(fn)(*args)` (args may be ShapeDtypeStructs) for CUDA, as if on the GPU of `target` (one of
    `qlora_jax.gpu_target.TARGETS`)."""
    checks = [export.DisabledSafetyCheck.custom_call(target) for target in _TRITON_TARGETS + _CUDNN_TARGETS]
    context: contextlib.AbstractContextManager = contextlib.nullcontext()
    if jax.default_backend() != "gpu":
        # Newer jax asks the device for its compute capability while lowering; name an abstract one, on a mesh of
        # that one GPU with the axes the model computes on (`parallel.mesh.context_mesh` accepts it: one device).
        facts = gpu_target.device_facts(target)
        device = jax.sharding.AbstractDevice(device_kind=facts.device_kind, num_cores=facts.sm_count, platform="gpu")
        one_gpu = jax.sharding.AbstractMesh((1,) * len(BATCH_AXES), BATCH_AXES, abstract_device=device)
        context = jax.sharding.use_abstract_mesh(one_gpu)
    with context:
        return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
