"""The GPU the kernels are traced for: the default device, or the target of a deviceless compile.

`qlora_jax.gpu_target.compile_for_target` makes the target chip's (compile-only) device the default device while
it traces, so the dispatch sees the H200 it compiles for, not the CPU it runs on: the same kernels, tables and
tiles as on the chip. A chip's facts come from the device itself, else from the shipped target file of its kind.
"""

from __future__ import annotations

import functools
from typing import Any

import jax

from qlora_jax import gpu_target

__all__ = ["current_device", "on_gpu", "device_kind", "core_count", "cores_of_kind"]


def current_device() -> Any:
    """The device jax places new arrays on: `jax.default_device(...)`'s if set, else the first device."""
    device = jax.config.jax_default_device
    if device is None or isinstance(device, str):
        return jax.devices(device)[0] if isinstance(device, str) else jax.devices()[0]
    return device


def on_gpu() -> bool:
    """Whether the kernels are traced for a GPU (a real one, or a deviceless compile's target)."""
    return current_device().platform == "gpu"


def device_kind() -> str:
    """The traced-for device's kind ("NVIDIA H200", "cpu", ...)."""
    return current_device().device_kind


@functools.cache
def cores_of_kind(kind: str) -> int | None:
    """The SM count a shipped GPU target file gives for this device kind, or None for another kind."""
    for name in gpu_target.TARGETS:
        target = gpu_target.load_target(name)
        if target.device_kind == kind:
            return target.sm_count
    return None


def core_count() -> int:
    """Streaming multiprocessors of the traced-for GPU: the device's own count, else its kind's target file's,
    else the H200's (what tile heuristics assume off a GPU, in the interpreter; never a correctness matter)."""
    device = current_device()
    cores = getattr(device, "core_count", None) if device.platform == "gpu" else None
    return int(cores or cores_of_kind(device.device_kind) or gpu_target.load_target("h200").sm_count)
