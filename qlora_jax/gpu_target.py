"""Compiling for an NVIDIA H100/H200 on a machine without a GPU ("deviceless" ahead-of-time compilation).

XLA:GPU compiles a jitted function for a GPU described by a `GpuTargetConfigProto` (the chip's published facts,
shipped in `qlora_jax/gpu_targets/`), with jax's CUDA plugin installed but no GPU present. What comes back is the
real XLA:GPU program: its scheduled HLO (fusions, cuBLAS/cuDNN/Triton calls, copies) and `memory_analysis()`
(argument, output, alias and temporary bytes: the device memory of the step). Nothing runs, nothing is timed.

Requirements (checked by `deviceless_unavailable_reason`): `jax-cuda13-plugin` and `jax-cuda13-pjrt` (or the
cuda12 pair) at jaxlib's version, installed with `--no-deps` (no CUDA libraries are needed), and the environment
variable `JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1` set before jax starts on a machine without the CUDA libraries
(the plugin otherwise refuses to register). `qlora-jax plan --target` sets it itself.

    target = load_target("h200")
    compiled = compile_for_target(step, *abstract_args, target=target)
    GpuMemory.of(compiled).temp_bytes

Pallas' Triton lowering asks the default device for its compute capability; `compile_for_target` makes the
target's device the default while lowering, so Pallas kernels compile for sm_90 as they would on the chip.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.resources
import os
import re
from collections.abc import Callable
from typing import Any

from qlora_jax.errors import InputError, QloraJaxError

__all__ = [
    "TARGETS",
    "DevicelessUnavailable",
    "GpuMemory",
    "GpuTarget",
    "compile_for_target",
    "deviceless_unavailable_reason",
    "load_target",
    "on_target",
    "target_device",
]

# --target name -> the target file shipped in qlora_jax/gpu_targets/
TARGETS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}
SKIP_CHECK_ENV = "JAX_SKIP_CUDA_CONSTRAINTS_CHECK"


class DevicelessUnavailable(QloraJaxError):
    """The deviceless compile cannot run in this process (the message says why and what to install or set)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class GpuTarget:
    """One GPU's published facts, read from its `GpuTargetConfigProto` text file.

    Attributes:
      name: the `--target` name ("h100", "h200").
      device_kind: jax's `device_kind` of the chip ("NVIDIA H200").
      sm_count: streaming multiprocessors.
      memory_bytes: device memory in bytes.
      memory_bandwidth: bytes per second.
      l2_bytes: L2 cache in bytes.
      shared_memory_per_block_optin: bytes a block may opt into.
      registers_per_sm: 32-bit registers per SM.
      compute_capability: (major, minor).
      clock_ghz: the boost clock.
      config_text: the whole `GpuTargetConfigProto` in text format, as XLA reads it.
    """

    name: str
    device_kind: str
    sm_count: int
    memory_bytes: int
    memory_bandwidth: float
    l2_bytes: int
    shared_memory_per_block_optin: int
    registers_per_sm: int
    compute_capability: tuple[int, int]
    clock_ghz: float
    config_text: str = dataclasses.field(repr=False, compare=False)


def _field(text: str, name: str, source: str) -> str:
    match = re.search(rf'^\s*{name}:\s*("[^"]*"|\S+)', text, re.MULTILINE)
    if match is None:
        raise InputError(f"{source}: field {name!r} missing from the GPU target")
    return match[1].strip('"')


@functools.cache
def load_target(name: str) -> GpuTarget:
    """The GPU target shipped under `name` (one of `TARGETS`). Raises InputError for another name."""
    if name not in TARGETS:
        raise InputError(f"unknown GPU target {name!r}: choose one of {sorted(TARGETS)}")
    resource = importlib.resources.files("qlora_jax") / "gpu_targets" / TARGETS[name]
    text = resource.read_text()
    source = f"qlora_jax/gpu_targets/{TARGETS[name]}"
    capability = re.search(r"cuda_compute_capability\s*{\s*major:\s*(\d+)(?:\s*minor:\s*(\d+))?", text)
    if capability is None:
        raise InputError(f"{source}: field 'cuda_compute_capability' missing from the GPU target")
    return GpuTarget(
        name=name,
        device_kind=_field(text, "name", source),
        sm_count=int(_field(text, "core_count", source)),
        memory_bytes=int(_field(text, "device_memory_size", source)),
        memory_bandwidth=float(_field(text, "memory_bandwidth", source)),
        l2_bytes=int(_field(text, "l2_cache_size", source)),
        shared_memory_per_block_optin=int(_field(text, "shared_memory_per_block_optin", source)),
        registers_per_sm=int(_field(text, "registers_per_core_limit", source)),
        compute_capability=(int(capability[1]), int(capability[2] or 0)),
        clock_ghz=float(_field(text, "clock_rate_ghz", source)),
        config_text=text,
    )


def _installed_plugin() -> tuple[str, str] | None:
    """(distribution, version) of the installed jax CUDA plugin, or None."""
    for cuda in ("cuda13", "cuda12"):
        try:
            return f"jax-{cuda}-plugin", importlib.metadata.version(f"jax-{cuda}-plugin")
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def deviceless_unavailable_reason() -> str | None:
    """Why this process cannot compile for a GPU target, or None when it can. Never raises."""
    try:
        import jaxlib
    except ImportError:
        return "jax is not installed"
    plugin = _installed_plugin()
    jaxlib_version = jaxlib.__version__
    install = (
        f"pip install --no-deps jax-cuda13-plugin=={jaxlib_version} jax-cuda13-pjrt=={jaxlib_version} "
        f"(no GPU or CUDA libraries needed)"
    )
    if plugin is None:
        return f"jax's CUDA plugin is not installed: {install}"
    if plugin[1] != jaxlib_version:
        return f"{plugin[0]} {plugin[1]} does not match jaxlib {jaxlib_version}: {install}"
    try:
        _topology_device("h200")
    except Exception as error:  # the plugin's own errors differ across versions; report them as they are
        hint = "" if os.environ.get(SKIP_CHECK_ENV) else f"; set {SKIP_CHECK_ENV}=1 before jax starts"
        return f"jax's CUDA plugin did not register ({type(error).__name__}: {error}){hint}"
    return None


@functools.cache
def _topology_device(name: str) -> Any:
    from jax.experimental import topologies

    target = load_target(name)
    topology = topologies.get_topology_desc(
        topology_name=name, platform="cuda", target_config=target.config_text, topology="1x1x1"
    )
    return topology.devices[0]


def target_device(target: GpuTarget | str) -> Any:
    """The (compile-only) jax device of a GPU target. Raises DevicelessUnavailable with the reason."""
    name = target if isinstance(target, str) else target.name
    load_target(name)
    try:
        return _topology_device(name)
    except Exception:
        raise DevicelessUnavailable(
            f"cannot compile for GPU target {name!r}: {deviceless_unavailable_reason()}"
        ) from None


def on_target(tree: Any, target: GpuTarget | str) -> Any:
    """`tree` with every array (or ShapeDtypeStruct) leaf as a ShapeDtypeStruct placed on the target's device."""
    import jax

    sharding = jax.sharding.SingleDeviceSharding(target_device(target))

    def place(leaf):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
        return leaf

    return jax.tree.map(place, tree)


def compile_for_target(fn: Callable[..., Any], *args: Any, target: GpuTarget | str, **kwargs: Any) -> Any:
    """XLA:GPU's compiled program (`jax.stages.Compiled`) of `jax.jit(fn)(*args, **kwargs)` for a GPU target.

    `args`/`kwargs` leaves may be arrays or ShapeDtypeStructs (only shapes and dtypes are used; they are placed on
    the target's device). `fn` may already be jitted (its static arguments then apply). Raises
    DevicelessUnavailable when this process cannot compile for a GPU (see `deviceless_unavailable_reason`).
    """
    import jax

    device = target_device(target)
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    args, kwargs = on_target((args, kwargs), target)
    # Pallas' Triton lowering reads the compute capability of the default device.
    with jax.default_device(device):
        return jitted.lower(*args, **kwargs).compile()


@dataclasses.dataclass(frozen=True, kw_only=True)
class GpuMemory:
    """XLA:GPU's buffer assignment of one compiled program, in bytes.

    Attributes:
      argument_bytes, output_bytes: the program's inputs and outputs.
      alias_bytes: outputs that reuse (donated) inputs' memory.
      temp_bytes: everything the program allocates while it runs.
    """

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int

    @property
    def peak_bytes(self) -> int:
        """Device memory the program needs while it runs: inputs, new outputs and temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @classmethod
    def of(cls, compiled: Any) -> GpuMemory:
        stats = compiled.memory_analysis()
        return cls(
            argument_bytes=stats.argument_size_in_bytes,
            output_bytes=stats.output_size_in_bytes,
            alias_bytes=stats.alias_size_in_bytes,
            temp_bytes=stats.temp_size_in_bytes,
        )
