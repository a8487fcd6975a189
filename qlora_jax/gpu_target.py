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

What XLA's compiled program does not say about a kernel (registers a thread, spills, programs resident per SM),
ptxas does: `compiled_kernels` compiles with XLA's own ptxas invocation wrapped so that it also writes its `-v`
report, and reads each kernel's launch (grid, threads, shared memory) from XLA's thunk sequence. That needs a
`ptxas` (CUDA >= 12.3; `/usr/local/cuda/bin`, the PATH, or the `nvidia-cuda-nvcc` wheel):
`kernel_resources_unavailable_reason` says when there is none.

Device facts have one owner here: a GPU's SM count and kind come from the device jax runs on when it is a GPU
(`device_facts`), else from a target file (`DEFAULT_TARGET` for lowering without a GPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.resources
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlora_jax.errors import InputError, QloraJaxError

__all__ = [
    "DEFAULT_TARGET",
    "TARGETS",
    "DeviceFacts",
    "DevicelessUnavailable",
    "GpuMemory",
    "GpuTarget",
    "KernelResources",
    "compile_for_target",
    "compiled_kernels",
    "device_facts",
    "deviceless_unavailable_reason",
    "AS_TUNED_ON_GPU",
    "find_ptxas",
    "kernel_resources_unavailable_reason",
    "load_target",
    "on_target",
    "programs_per_sm",
    "target_device",
]

# --target name -> the target file shipped in qlora_jax/gpu_targets/
TARGETS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}
# The GPU kernels are lowered and their launches sized for when there is no GPU to ask (tests, CPU tracing).
DEFAULT_TARGET = "h100"
SKIP_CHECK_ENV = "JAX_SKIP_CUDA_CONSTRAINTS_CHECK"
# Resident blocks per SM on compute capability 9.0 (CUDA C++ Programming Guide, "Technical Specifications per
# Compute Capability"); the one occupancy limit a GpuTargetConfigProto does not hold.
MAX_BLOCKS_PER_SM = 32
# Registers are allocated to a warp in units of 256 (the same table: "register allocation unit size").
_REGISTER_ALLOCATION_UNIT = 256
# Shared memory the CUDA runtime reserves per block on compute capability >= 8.0.
_RESERVED_SHARED_MEMORY_PER_BLOCK = 1024


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
      shared_memory_per_sm: bytes of shared memory per SM (what resident blocks share).
      threads_per_sm: resident threads per SM.
      compute_capability: (major, minor).
      cudnn_version: (major, minor, patch) of the cuDNN the target is compiled against.
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
    shared_memory_per_sm: int
    threads_per_sm: int
    compute_capability: tuple[int, int]
    cudnn_version: tuple[int, int, int]
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
    cudnn = re.search(r"dnn_version_info\s*{\s*major:\s*(\d+)\s*minor:\s*(\d+)(?:\s*patch:\s*(\d+))?", text)
    if cudnn is None:
        raise InputError(f"{source}: field 'dnn_version_info' missing from the GPU target")
    return GpuTarget(
        name=name,
        device_kind=_field(text, "name", source),
        sm_count=int(_field(text, "core_count", source)),
        memory_bytes=int(_field(text, "device_memory_size", source)),
        memory_bandwidth=float(_field(text, "memory_bandwidth", source)),
        l2_bytes=int(_field(text, "l2_cache_size", source)),
        shared_memory_per_block_optin=int(_field(text, "shared_memory_per_block_optin", source)),
        registers_per_sm=int(_field(text, "registers_per_core_limit", source)),
        shared_memory_per_sm=int(_field(text, "shared_memory_per_core", source)),
        threads_per_sm=int(_field(text, "threads_per_core_limit", source)),
        compute_capability=(int(capability[1]), int(capability[2] or 0)),
        cudnn_version=(int(cudnn[1]), int(cudnn[2]), int(cudnn[3] or 0)),
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
    """`tree` with every array (or ShapeDtypeStruct) leaf as a ShapeDtypeStruct placed on the target's device (in
    its pinned host memory where the leaf was placed in pinned host memory: an offloaded optimizer state)."""
    import jax

    device = target_device(target)
    sharding = jax.sharding.SingleDeviceSharding(device)
    host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")

    def place(leaf):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            kind = getattr(getattr(leaf, "sharding", None), "memory_kind", None)
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=host if kind == "pinned_host" else sharding)
        return leaf

    return jax.tree.map(place, tree)


# XLA's options for a compile whose memory should match what the GPU itself compiles. Without a GPU, XLA cannot
# autotune, and its untuned default makes every dot a Triton gemm fusion that reads the 4-bit weight's dequantized
# values in its prologue. On the one H200 measured (2026-11-30) the autotuner chose per dot, measuring each; the
# measured commit's step compiles here to 12% more temporaries than that run's with cuBLAS for every dot (whose
# operands are whole dequantized weights) and 19% less with the untuned default (docs/benchmarks.md): cuBLAS is
# the upper side of the bracket, which a memory plan wants.
AS_TUNED_ON_GPU = {"xla_gpu_enable_triton_gemm": False}


@contextlib.contextmanager
def _cudnn_as_on(target: GpuTarget):
    """While tracing for a target: jax's cuDNN attention asks the local cuDNN library for its version and the local
    GPU for its compute capability (neither exists here); answer with the target's. Restored on exit."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn
    except ImportError:  # a jax without it has no cuDNN attention to trace
        yield
        return
    version = target.cudnn_version[0] * 10000 + target.cudnn_version[1] * 100 + target.cudnn_version[2]
    capability = target.compute_capability

    def parse(text: str) -> tuple[int, ...]:
        return tuple(int(part) for part in text.split("."))

    answers = {
        "check_cudnn_version": lambda: version,
        "check_compute_capability": lambda c: capability >= parse(c),
        "is_cuda_compute_capability_equal": lambda c: capability == parse(c),
    }
    saved = {name: getattr(cudnn, name) for name in answers if hasattr(cudnn, name)}
    with _CUDNN_LOCK:
        try:
            for name in saved:
                setattr(cudnn, name, answers[name])
            yield
        finally:
            for name, original in saved.items():
                setattr(cudnn, name, original)


_CUDNN_LOCK = threading.Lock()


def compile_for_target(
    fn: Callable[..., Any],
    *args: Any,
    target: GpuTarget | str,
    compiler_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """XLA:GPU's compiled program (`jax.stages.Compiled`) of `jax.jit(fn)(*args, **kwargs)` for a GPU target.

    `args`/`kwargs` leaves may be arrays or ShapeDtypeStructs (only shapes and dtypes are used; they are placed on
    the target's device). `fn` may already be jitted (its static arguments then apply). `compiler_options`: XLA
    debug options for this compile (`AS_TUNED_ON_GPU` for memory as the GPU compiles it). Raises
    DevicelessUnavailable when this process cannot compile for a GPU (see `deviceless_unavailable_reason`).
    """
    import jax

    target = load_target(target) if isinstance(target, str) else target
    device = target_device(target)
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    args, kwargs = on_target((args, kwargs), target)
    # Pallas' Triton lowering reads the compute capability of the default device.
    with jax.default_device(device), _cudnn_as_on(target):
        lowered = jitted.lower(*args, **kwargs)
    return lowered.compile(compiler_options or {})


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

    @classmethod
    def of(cls, compiled: Any) -> GpuMemory:
        stats = compiled.memory_analysis()
        return cls(
            argument_bytes=stats.argument_size_in_bytes,
            output_bytes=stats.output_size_in_bytes,
            alias_bytes=stats.alias_size_in_bytes,
            temp_bytes=stats.temp_size_in_bytes,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceFacts:
    """What the choices made while tracing (kernels, attention) need to know of the device a program is for.

    A static, hashable value. Attributes:
      platform: jax's platform of that device ("gpu", "cpu", ...).
      device_kind: its `device_kind` ("NVIDIA H200"), which keys the measured kernel tables.
      sm_count: the GPU's streaming multiprocessors (what kernels split their work over); without a GPU, those of
        `DEFAULT_TARGET`, the GPU that kernels lowered here are sized for.
    """

    platform: str
    device_kind: str
    sm_count: int


def device_facts(target: GpuTarget | str | None = None) -> DeviceFacts:
    """The facts of a GPU target when one is named; else of jax's default device (a GPU reports its own SM count),
    with `DEFAULT_TARGET`'s SM count when it is not a GPU. Raises InputError for an unknown target name."""
    if target is not None:
        target = load_target(target) if isinstance(target, str) else target
        return DeviceFacts(platform="gpu", device_kind=target.device_kind, sm_count=target.sm_count)
    import jax

    device = jax.devices()[0]
    cores = getattr(device, "core_count", None) if device.platform == "gpu" else None
    return DeviceFacts(
        platform=device.platform,
        device_kind=device.device_kind,
        sm_count=int(cores or load_target(DEFAULT_TARGET).sm_count),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelResources:
    """One GPU kernel of a compiled program: what ptxas made of it and how XLA launches it.

    Attributes:
      name: the kernel's name (a Pallas kernel's `name=`; XLA's fusions have theirs).
      registers: 32-bit registers a thread.
      spill_store_bytes, spill_load_bytes: bytes a thread spills to local memory and reads back (0 and 0: none).
      stack_frame_bytes: a thread's stack frame.
      shared_memory_bytes: shared memory a block is launched with.
      threads: threads a block.
      grid: blocks launched (x, y, z).
      programs_per_sm: blocks resident at once on one SM (`programs_per_sm`), and `limited_by` what bounds it.
      pallas: a kernel jax's Pallas emitted (a Triton custom call), not one XLA generated.
      tensor_cores: how its dots run, from its PTX: "wgmma" (Hopper's warpgroup MMA), "mma" (the warp-level MMA of
        earlier GPUs, which Hopper runs at a fraction of wgmma's rate), or "" (no tensor-core instruction).
    """

    name: str
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_frame_bytes: int
    shared_memory_bytes: int
    threads: int
    grid: tuple[int, int, int]
    programs_per_sm: int
    limited_by: str
    pallas: bool = False
    tensor_cores: str = ""

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0

    def __str__(self) -> str:
        spills = "no spills"
        if self.spills:
            spills = f"spills {self.spill_store_bytes} B stored / {self.spill_load_bytes} B loaded"
        mma = f", {self.tensor_cores}" if self.tensor_cores else ""
        return (
            f"{self.name}: {self.registers} registers, {spills}, {self.shared_memory_bytes / 1024:.1f} KiB shared, "
            f"{self.threads} threads, grid {'x'.join(map(str, self.grid))}, {self.programs_per_sm} programs/SM "
            f"(bound: {self.limited_by}){mma}"
        )


def programs_per_sm(*, registers: int, threads: int, shared_memory: int, target: GpuTarget | str) -> tuple[int, str]:
    """(blocks resident per SM, the limit that bounds it: "registers" | "shared memory" | "threads" | "blocks"), as
    CUDA's occupancy calculator counts them for the target: registers go to a warp in units of 256, each block
    costs 1 KiB of shared memory beyond its own, at most MAX_BLOCKS_PER_SM blocks."""
    target = load_target(target) if isinstance(target, str) else target
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // _REGISTER_ALLOCATION_UNIT) * _REGISTER_ALLOCATION_UNIT
    limits = {
        "registers": (target.registers_per_sm // per_warp) // warps if per_warp else MAX_BLOCKS_PER_SM,
        "shared memory": target.shared_memory_per_sm // (shared_memory + _RESERVED_SHARED_MEMORY_PER_BLOCK),
        "threads": target.threads_per_sm // (warps * 32),
        "blocks": MAX_BLOCKS_PER_SM,
    }
    bound = min(limits, key=limits.get)
    return limits[bound], bound


def _nvidia_wheel_ptxas() -> list[Path]:
    """ptxas of the `nvidia-cuda-nvcc` wheels (CUDA 13 installs under nvidia/cu13, CUDA 12 under nvidia/cuda_nvcc)."""
    found = []
    for entry in sys.path:
        for sub in ("nvidia/cu13/bin/ptxas", "nvidia/cuda_nvcc/bin/ptxas"):
            candidate = Path(entry) / sub
            if candidate.is_file():
                found.append(candidate)
    return found


def find_ptxas() -> str | None:
    """The ptxas that reports kernels' resources: on the PATH, in /usr/local/cuda/bin, or from the `nvidia-cuda-nvcc`
    wheel; None if there is none."""
    candidates = [shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas", *map(str, _nvidia_wheel_ptxas())]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def kernel_resources_unavailable_reason() -> str | None:
    """Why `compiled_kernels` cannot run in this process, or None when it can. Never raises."""
    if reason := deviceless_unavailable_reason():
        return reason
    if find_ptxas() is None:
        return (
            "no ptxas found (on the PATH, /usr/local/cuda/bin, or the nvidia-cuda-nvcc wheel: "
            "pip install nvidia-cuda-nvcc): it reports the kernels' registers and spills"
        )
    return None


# XLA runs ptxas as a subprocess from `xla_gpu_cuda_data_dir/bin` when that directory has one; this wrapper runs the
# real one with XLA's own arguments plus `-v` (the resource report), and keeps a copy of what it printed.
_PTXAS_WRAPPER = """#!/bin/sh
case "$1" in --version) exec "{ptxas}" "$@";; esac
log="{logs}/ptxas.$$.log"
cp "$1" "{logs}/kernel.$$.ptx" 2>/dev/null
"{ptxas}" "$@" -v 2>"$log"
status=$?
cat "$log" >&2
exit $status
"""
_PTXAS_FUNCTION = re.compile(
    r"Compiling entry function '(?P<name>[^']+)'.*?"
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads.*?"
    r"Used (?P<registers>\d+) registers",
    re.DOTALL,
)
# A Pallas kernel in XLA:GPU's program: a Triton custom call whose backend config names the kernel.
_TRITON_CALL_NAME = re.compile(r'custom_call_target="__gpu\$xla\.gpu\.triton".*?\bname = "([^"]+)"')
_THUNK = re.compile(
    r"\] (?P<name>\S+) grid: \[(?P<grid>[\d, ]+)\] threads: \[(?P<threads>[\d, ]+)\]\s+"
    r"shared_memory: (?P<smem>\d+) bytes"
)


def parse_ptxas_report(text: str) -> dict[str, tuple[int, int, int, int]]:
    """{entry function: (registers, spill store bytes, spill load bytes, stack frame bytes)} from `ptxas -v`."""
    out = {}
    for chunk in re.split(r"(?=ptxas info\s+: Compiling entry function)", text):
        if match := _PTXAS_FUNCTION.search(chunk):
            out[match["name"]] = (
                int(match["registers"]),
                int(match["stores"]),
                int(match["loads"]),
                int(match["stack"]),
            )
    return out


def ptx_tensor_cores(ptx: str) -> dict[str, str]:
    """{entry function: "wgmma" | "mma" | ""}: the tensor-core instructions each kernel of a PTX file uses."""
    out = {}
    for chunk in re.split(r"(?=\.visible \.entry |\.entry )", ptx):
        if match := re.match(r"(?:\.visible )?\.entry (\w+)", chunk):
            out[match[1]] = "wgmma" if "wgmma.mma_async" in chunk else "mma" if "mma.sync" in chunk else ""
    return out


def parse_thunk_sequence(text: str) -> dict[str, tuple[tuple[int, int, int], int, int]]:
    """{kernel: (grid, threads a block, shared memory bytes)} from XLA's dumped thunk sequence."""
    out = {}
    for match in _THUNK.finditer(text):
        grid = tuple(int(v) for v in match["grid"].split(","))
        threads = 1
        for v in match["threads"].split(","):
            threads *= int(v)
        out[match["name"]] = (grid, threads, int(match["smem"]))
    return out


def compiled_kernels(
    fn: Callable[..., Any], *args: Any, target: GpuTarget | str, **kwargs: Any
) -> tuple[KernelResources, ...]:
    """Every GPU kernel XLA:GPU compiles for `jax.jit(fn)(*args, **kwargs)` on the target (arguments as for
    `compile_for_target`), with its registers, spills, launch and programs per SM, in launch order.

    Raises DevicelessUnavailable (with the reason) when this process cannot compile for a GPU or has no ptxas."""
    import jax

    if reason := kernel_resources_unavailable_reason():
        raise DevicelessUnavailable(f"cannot report GPU kernel resources: {reason}")
    target = load_target(target) if isinstance(target, str) else target
    device = target_device(target)
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    args, kwargs = on_target((args, kwargs), target)
    with tempfile.TemporaryDirectory(prefix="qlora_jax_ptxas_") as work:
        root = Path(work)
        (root / "bin").mkdir()
        (root / "logs").mkdir()
        wrapper = root / "bin" / "ptxas"
        ptxas = find_ptxas()
        wrapper.write_text(_PTXAS_WRAPPER.format(ptxas=ptxas, logs=root / "logs"))
        wrapper.chmod(0o755)
        real_bin = Path(ptxas).resolve().parent
        for tool in ("nvlink", "fatbinary"):  # XLA looks for its other CUDA tools beside ptxas
            if (real_bin / tool).is_file():
                (root / "bin" / tool).symlink_to(real_bin / tool)
        if (real_bin.parent / "nvvm").is_dir():
            (root / "nvvm").symlink_to(real_bin.parent / "nvvm")
        options = {"xla_gpu_cuda_data_dir": str(root), "xla_dump_to": str(root / "dump")}
        with jax.default_device(device), _cudnn_as_on(target):  # see compile_for_target
            lowered = jitted.lower(*args, **kwargs)
        pallas = set(_TRITON_CALL_NAME.findall(lowered.compile(options).as_text()))
        report = "\n".join(log.read_text() for log in sorted((root / "logs").glob("*.log")))
        tensor_cores = {}
        for ptx in (root / "logs").glob("*.ptx"):
            tensor_cores.update(ptx_tensor_cores(ptx.read_text(errors="replace")))
        launches = {}
        for dump in sorted((root / "dump").glob("*thunk_sequence*.txt")):
            launches.update(parse_thunk_sequence(dump.read_text()))
    if not report:
        raise DevicelessUnavailable(f"XLA did not run the ptxas at {ptxas} (no resource report)")
    out = []
    for name, (registers, stores, loads, stack) in parse_ptxas_report(report).items():
        grid, threads, shared = launches.get(name, ((0, 0, 0), 0, 0))
        blocks, bound = programs_per_sm(registers=registers, threads=threads or 1, shared_memory=shared, target=target)
        out.append(
            KernelResources(
                name=name,
                registers=registers,
                spill_store_bytes=stores,
                spill_load_bytes=loads,
                stack_frame_bytes=stack,
                shared_memory_bytes=shared,
                threads=threads,
                grid=grid,
                programs_per_sm=blocks,
                limited_by=bound,
                pallas=name in pallas,
                tensor_cores=tensor_cores.get(name, ""),
            )
        )
    return tuple(out)
