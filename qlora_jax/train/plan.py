"""Memory plan of a training config, before loading anything: what each part of one training step costs.

Weights, adapters, optimizer state and the batch are counted exactly from the abstract (shape-only) model.
Activations depend on what XLA fuses, saves and schedules, so they are not guessed: the real training step is
compiled (abstract weights: nothing is allocated) for the model cut to 2 and to 4 layers, and XLA's temporary
memory is extrapolated linearly in depth. The scan runs the same layer body for every layer, so each layer adds the
same saved activations; the rest (one layer's backward working set, the logits chunk, gradients) does not grow with
depth. That holds where the step's device peak is in the layers' backward (where the saved activations are live),
as it is for real models; on a tiny one the peak can lie elsewhere (XLA:GPU schedules the loss value's chunk
loop, with its 32 MiB cuBLASLt workspace, after the backward), and then the per-layer figure is only what stays
live there (the adapter gradients). `compare=True` also compiles the full-depth step and reports XLA's own figure
beside the plan. Activations a policy keeps in pinned host memory ("offload", "full_offload": XLA:GPU puts them in
host memory space S(5)) are XLA's host temporaries, extrapolated in depth the same way, and reported apart.

The figures are for the backend the plan runs on (XLA:CPU buffer assignment differs from XLA:GPU), or, with
`target="h100" | "h200"`, XLA:GPU's own for that GPU, compiled on this machine without one
(`qlora_jax.gpu_target`: jax's CUDA plugin, no GPU needed); the kernel and attention choices are then the ones the
run makes on that GPU. Nothing is allocated either way.

`train.remat: auto` is resolved here too (`choose_remat`): the policies are planned from the cheapest in compute
to the most frugal in memory (none, save_dots, offload, full, full_offload) and the first whose device total fits
`train.memory_budget` is taken. The default budget is 90% of the device's free memory (`memory_stats()`); on CPU,
where there is no device memory, 90% of the host's available memory (/proc/meminfo's MemAvailable); for a GPU
target, 90% of what jax takes of its memory (XLA_PYTHON_CLIENT_MEM_FRACTION, default 75%). "offload" and
"full_offload" are only candidates on an accelerator (on CPU the host *is* the device memory) and when their host
side fits the host's available memory (not checked for a target: its host is not this one). Policies whose stored
parts alone (weights, adapters, optimizer state, batch) exceed the budget are not compiled.

With a `mesh` section every figure is per device: the stored parts as the sharding rule places them
(`qlora_jax.sharding`), the batch split over data x fsdp, and XLA's analysis of the step compiled for the mesh
(which is per device). That needs as many devices as the mesh; on CPU, simulate them by starting Python with
XLA_FLAGS=--xla_force_host_platform_device_count=N.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax import gpu_target
from qlora_jax.errors import InputError
from qlora_jax.models import read_model_config
from qlora_jax.nn import QuantizedWeight
from qlora_jax.sharding import param_shardings, shard_bytes
from qlora_jax.train.build import abstract_model, make_steps, quant_config, run_optimizer
from qlora_jax.train.config import TrainConfig, parse_bytes, resolve_package_path
from qlora_jax.train.loss import auto_chunk_size
from qlora_jax.train.parallel import configured_mesh, step_shardings
from qlora_jax.train.step import BATCH_FIELDS, TrainState

__all__ = [
    "MemoryPlan",
    "CompiledMemory",
    "RematChoice",
    "REMAT_ORDER",
    "plan_memory",
    "compiled_memory",
    "choose_remat",
    "longest_row",
    "memory_budget",
    "resolve_remat",
]

# remat: auto tries the policies in this order (least recomputation first; "full_offload" recomputes as "full" does,
# and copies each layer's input to the host and back) and takes the first that fits.
REMAT_ORDER = ("none", "save_dots", "offload", "full", "full_offload")
# Policies that keep activations in pinned host memory: candidates only on an accelerator.
HOST_POLICIES = ("offload", "full_offload")
# The default budget is this fraction of the free memory: room for the planner's error and XLA's fragmentation.
DEFAULT_BUDGET_FRACTION = 0.9

# Depths the step is compiled at to measure activations; the per-layer cost is their difference.
_PROBE_LAYERS = (2, 4)


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """XLA's memory analysis of one compiled step (bytes)."""

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    host_temporaries: int

    @property
    def total(self) -> int:
        """Device bytes live at the peak: inputs, outputs not written in place of donated inputs, temporaries."""
        return self.arguments + self.outputs - self.aliased + self.temporaries

    @classmethod
    def of(cls, compiled: Any) -> CompiledMemory:
        m = compiled.memory_analysis()
        return cls(
            int(m.argument_size_in_bytes),
            int(m.output_size_in_bytes),
            int(m.alias_size_in_bytes),
            int(m.temp_size_in_bytes),
            int(getattr(m, "host_temp_size_in_bytes", 0) or 0),
        )


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per component of one training step; `device_total` is what must fit on the accelerator."""

    quantized_weights: int  # 4-bit codes + absmax statistics of the frozen linears
    dense_weights: int  # embeddings, norms, lm_head and any unquantized linear
    adapters: int
    optimizer_state: int
    optimizer_offloaded: bool  # then it lives in pinned host memory, not on the device
    batch: int
    saved_activations_per_layer: int
    num_layers: int
    working_set: int  # one layer's backward, the logits chunk, gradients: does not grow with depth
    logits_chunk: int  # float32 [chunk, vocab]: the largest single temporary of the loss
    host_activations: int  # activations in pinned host memory ("offload" / "full_offload" remat policies)
    compiled: CompiledMemory | None = None  # XLA's analysis of the full step, if compared
    mesh: tuple[int, int] | None = None  # (data, fsdp): then every figure is per device
    remat: str = "full"  # the checkpointing policy planned
    remat_choice: RematChoice | None = None  # how remat: auto chose it
    backend: str = "cpu"  # whose compiled figures: "cpu", "gpu" (this machine's), or a GPU target ("h200")

    @property
    def stored(self) -> int:
        """The device bytes that are known without compiling: weights, adapters, optimizer state (if on the
        device) and the batch."""
        optimizer = 0 if self.optimizer_offloaded else self.optimizer_state
        return self.quantized_weights + self.dense_weights + self.adapters + optimizer + self.batch

    @property
    def saved_activations(self) -> int:
        return self.saved_activations_per_layer * self.num_layers

    @property
    def device_total(self) -> int:
        return self.stored + self.saved_activations + self.working_set

    @property
    def compiled_by(self) -> str:
        """Whose buffer assignment the activations come from ("XLA:CPU", or "XLA:GPU, NVIDIA H200 (deviceless)")."""
        if self.backend in gpu_target.TARGETS:
            return f"XLA:GPU, {gpu_target.load_target(self.backend).device_kind} (deviceless)"
        return f"XLA:{self.backend.upper()}"

    def device_parts(self) -> dict[str, int]:
        """{part: device bytes}, the parts `device_total` sums (the logits chunk is inside the working set)."""
        return {
            "4-bit base weights": self.quantized_weights,
            "16/32-bit base weights": self.dense_weights,
            "LoRA adapters": self.adapters,
            "optimizer state": 0 if self.optimizer_offloaded else self.optimizer_state,
            "batch": self.batch,
            "saved activations": self.saved_activations,
            "working set": self.working_set,
        }

    def verdict(self, budget: int) -> str:
        """Whether the step fits `budget` bytes per device, and if not, the parts that take the most memory."""
        if self.device_total <= budget:
            return f"fits {_size(budget)}: {_size(self.device_total)} ({_size(budget - self.device_total)} to spare)"
        largest = sorted(self.device_parts().items(), key=lambda item: -item[1])[:3]
        parts = ", ".join(f"{name} {_size(n)} ({n / self.device_total:.0%})" for name, n in largest)
        return (
            f"does not fit {_size(budget)}: {_size(self.device_total)}, {_size(self.device_total - budget)} "
            f"over; the largest parts: {parts}"
        )

    def table(self) -> str:
        where = "pinned host" if self.optimizer_offloaded else "device"
        rows = [
            ("base weights, 4-bit (codes + statistics)", self.quantized_weights, "device"),
            ("base weights, 16/32-bit (embeddings, norms, lm_head)", self.dense_weights, "device"),
            ("LoRA adapters (float32)", self.adapters, "device"),
            ("optimizer state (AdamW moments)", self.optimizer_state, where),
            ("batch (tokens, targets, positions, segments)", self.batch, "device"),
            (
                f"saved activations ({self.num_layers} layers x {_size(self.saved_activations_per_layer)})",
                self.saved_activations,
                "device",
            ),
            ("working set (a layer's backward, loss chunk, gradients)", self.working_set, "device"),
            ("  of which one float32 logits chunk", self.logits_chunk, "device"),
        ]
        if self.host_activations:
            rows.append((f"activations offloaded by remat={self.remat}", self.host_activations, "pinned host"))
        width = max(len(name) for name, _, _ in rows)
        lines = []
        if self.mesh is not None:
            data, fsdp = self.mesh
            lines.append(f"per device, on a mesh of data={data} x fsdp={fsdp} ({data * fsdp} devices):")
        lines.append(f"activations and totals: {self.compiled_by} figures")
        lines += [f"{name:<{width}}  {_size(n):>10}  {kind}" for name, n, kind in rows]
        lines.append(f"{'device total (estimate)':<{width}}  {_size(self.device_total):>10}")
        if self.compiled is not None:
            error = self.device_total / self.compiled.total - 1
            lines.append(
                f"{'device total (XLA, full step)':<{width}}  {_size(self.compiled.total):>10}  plan {error:+.1%}"
            )
            c = self.compiled
            lines.append(
                f"{'  XLA: arguments / outputs (aliased) / temporaries':<{width}}  {_size(c.arguments)} / "
                f"{_size(c.outputs)} ({_size(c.aliased)}) / {_size(c.temporaries)}"
            )
            if c.host_temporaries:
                lines.append(f"{'  XLA: host temporaries (pinned host memory)':<{width}}  {_size(c.host_temporaries)}")
        if self.remat_choice is not None:
            lines.append(self.remat_choice.explain())
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class RematChoice:
    """What `remat: auto` chose and why: the policy, the budget (bytes per device) and where it came from, and
    the planned device total of each policy tried (None: skipped, with the reason in `skipped`)."""

    policy: str
    budget: int
    budget_source: str
    totals: dict[str, int]  # policy -> planned device bytes, in the order tried
    skipped: dict[str, str]  # policy -> why it was not a candidate

    @property
    def fits(self) -> bool:
        return self.totals.get(self.policy, 0) <= self.budget

    def explain(self) -> str:
        tried = [f"{p} {_size(n)} {'fits' if n <= self.budget else 'does not fit'}" for p, n in self.totals.items()]
        tried += [f"{p} skipped ({why})" for p, why in self.skipped.items()]
        verdict = f"remat: auto -> {self.policy}"
        if not self.fits:
            verdict += " (no policy fits: the least memory-hungry is taken; the step may run out of memory)"
        return f"{verdict}; budget {_size(self.budget)} ({self.budget_source}); " + ", ".join(tried)


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def memory_budget(config: TrainConfig, *, target: str | None = None) -> tuple[int, str]:
    """(bytes per device, where the figure comes from): `train.memory_budget` if set, else 90% of the first
    device's free memory (bytes_limit - bytes_in_use), or on CPU 90% of the host's available memory; for a GPU
    target, 90% of the part of its memory jax takes (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75)."""
    if config.train.memory_budget is not None:
        return parse_bytes(config.train.memory_budget), "train.memory_budget"
    if target is not None:
        gpu = gpu_target.load_target(target)
        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
        budget = int(gpu.memory_bytes * fraction * DEFAULT_BUDGET_FRACTION)
        return budget, f"90% of the {fraction:.0%} of {gpu.device_kind}'s {_size(gpu.memory_bytes)} that jax takes"
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return int(free * DEFAULT_BUDGET_FRACTION), f"90% of {device.device_kind}'s free memory"
    available = _host_available()
    if available is None:
        raise ValueError("train.memory_budget: cannot read the free memory of this machine; set it (e.g. 24GiB)")
    return int(available * DEFAULT_BUDGET_FRACTION), "90% of the host's available memory (CPU)"


def _with_remat(config: TrainConfig, policy: str) -> TrainConfig:
    return dataclasses.replace(config, train=dataclasses.replace(config.train, remat=policy))


def choose_remat(
    config: TrainConfig, *, budget: int | None = None, target: str | None = None
) -> tuple[RematChoice, MemoryPlan]:
    """The cheapest checkpointing policy (REMAT_ORDER) whose planned step fits the budget (default:
    `memory_budget(config)`), and its plan. If none fits, the least memory-hungry planned, flagged in the choice.
    `target`: plan for that GPU (see the module docstring). Raises InputError for a target on a mesh."""
    source = "given"
    if budget is None:
        budget, source = memory_budget(config, target=target)
    on_accelerator = target is not None or jax.default_backend() != "cpu"
    host = None if target is not None else _host_available()
    stored = _parts(config, target)[0]
    totals: dict[str, int] = {}
    skipped: dict[str, str] = {}
    plans: dict[str, MemoryPlan] = {}
    if stored > budget:  # no policy can fit: plan the least memory-hungry one only
        skipped.update({p: f"the stored parts alone ({_size(stored)}) exceed the budget" for p in REMAT_ORDER[:-1]})
    for policy in REMAT_ORDER:
        if policy in skipped:
            continue
        if policy in HOST_POLICIES and not on_accelerator:
            skipped[policy] = "on CPU the host is the device memory"
            continue
        plan = plan_memory(_with_remat(config, policy), target=target)
        if policy in HOST_POLICIES and host is not None and plan.host_activations > host:
            skipped[policy] = f"its {_size(plan.host_activations)} of host activations exceed the host's free memory"
            continue
        plans[policy], totals[policy] = plan, plan.device_total
        if plan.device_total <= budget:
            break
    fitting = [p for p, n in totals.items() if n <= budget]
    policy = fitting[0] if fitting else min(totals, key=totals.get)
    choice = RematChoice(policy, budget, source, totals, skipped)
    return choice, dataclasses.replace(plans[policy], remat_choice=choice)


def resolve_remat(config: TrainConfig) -> tuple[TrainConfig, RematChoice | None]:
    """`config` with `train.remat: auto` replaced by `choose_remat`'s policy (and the choice), or unchanged. The
    one place a run resolves it (`setup.set_up`, once, before the model takes device memory)."""
    if config.train.remat != "auto":
        return config, None
    choice, _ = choose_remat(config)
    if jax.process_count() > 1:  # every process must compile the same step: process 0's choice holds
        from jax.experimental import multihost_utils

        index = int(multihost_utils.broadcast_one_to_all(np.int32(REMAT_ORDER.index(choice.policy))))
        choice = dataclasses.replace(choice, policy=REMAT_ORDER[index])
    return _with_remat(config, choice.policy), choice


def longest_row(
    config: TrainConfig,
    *,
    budget: int | None = None,
    policy: str = "full",
    multiple: int = 1024,
    limit: int = 2**20,
    target: str | None = None,
) -> tuple[int, MemoryPlan | None]:
    """The longest `data.max_length` (a multiple of `multiple`, up to `limit`) whose one-row step (batch_size 1,
    grad_accum 1) under `policy` fits `budget` (default `memory_budget(config)`), and its plan; (0, None) if even
    `multiple` tokens do not fit. `target`: plan for that GPU (see the module docstring).

    A row's memory grows about linearly with its length, so each next length is where the line through the plans
    so far meets the budget (extrapolated until one length does not fit, then interpolated inside the bracket),
    with a bisection step whenever that did not halve the bracket: typically 4-6 plans of 2 compiles each, never
    more than about 2 log2(limit / multiple)."""
    if budget is None:
        budget, _ = memory_budget(config, target=target)
    one_row = dataclasses.replace(config.train, batch_size=1, grad_accum=1, remat=policy)
    totals: dict[int, int] = {}  # planned lengths (in units of `multiple`) -> device bytes

    def plan_at(units: int) -> MemoryPlan:
        data = dataclasses.replace(config.data, max_length=units * multiple)
        plan = plan_memory(dataclasses.replace(config, train=one_row, data=data), target=target)
        totals[units] = plan.device_total
        return plan

    low, high, top = 0, None, limit // multiple  # low fits (0: nothing yet), high does not (None: none yet)
    best_plan, probe, width = None, 1, top
    while probe is not None:
        plan = plan_at(probe)
        if plan.device_total <= budget:
            low, best_plan = probe, plan
        else:
            high = probe
        probe, width = _next_length(low, high, top, totals, budget, width)
    return low * multiple, best_plan


def _next_length(
    low: int, high: int | None, top: int, totals: dict[int, int], budget: int, width: int
) -> tuple[int | None, int]:
    """(the next length to plan or None when the bracket is closed, the bracket's width now): see `longest_row`."""
    upper = top + 1 if high is None else high
    if low == 0 and high is not None or upper - low <= 1:
        return None, 0
    if high is None:  # still fitting: extrapolate the line through the two longest plans (or double)
        (a, ta), (b, tb) = sorted(totals.items())[-2:] if len(totals) > 1 else ((0, 0), (low, totals[low]))
        slope = (tb - ta) / (b - a)
        guess = b + (budget - tb) / slope if slope > 0 else 2 * b
        guess = max(guess, b + 1)
        return min(int(guess), top), upper - low
    new_width = upper - low
    if new_width * 2 > width:  # the last step did not halve the bracket: bisect
        return (low + high) // 2, new_width
    slope = (totals[high] - totals[low]) / (high - low)
    guess = low + (budget - totals[low]) / slope if slope > 0 else (low + high) / 2
    return min(max(int(guess), low + 1), high - 1), new_width


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _nbytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _dq_blocksize(config: TrainConfig) -> int:
    quant = quant_config(config)
    return quant.dq_blocksize if quant is not None else 256


def _abstract_step(config: TrainConfig, num_layers: int | None, target: str | None = None):
    """(jitted step, abstract arguments, abstract model, step shardings or None) for the configured run, the model
    cut to `num_layers` if given, built by the run's own builder (`build.make_steps`); for a GPU target, with its
    choices, on its device."""
    t = config.train
    model = abstract_model(config, num_layers=num_layers)
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    optimizer = run_optimizer(config)
    state = jax.eval_shape(lambda adapters: TrainState.create(adapters, optimizer), lora)
    if target is not None and not config.mesh.is_single_device:
        raise InputError(
            f"mesh: a plan for GPU target {target!r} is for one GPU; plan a mesh on its machines (or on CPU with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N), or drop the mesh section"
        )
    mesh = configured_mesh(config)
    shardings = None
    if mesh is not None:
        shardings = step_shardings(
            mesh,
            lora,
            base,
            optimizer,
            dq_blocksize=_dq_blocksize(config),
            expert_parallel=config.mesh.expert_parallel,
            offload=config.optim.offload,
        )
    elif config.optim.offload:
        device = jax.devices()[0] if target is None else gpu_target.target_device(target)
        host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
        state = dataclasses.replace(
            state,
            opt_state=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=host), state.opt_state),
        )
    steps = make_steps(
        config, graphdef, optimizer, vocab_size=model.config.vocab_size, shardings=shardings, target=target
    )
    shape = (t.grad_accum, t.batch_size // t.grad_accum, config.data.max_length)
    batch = {field: jax.ShapeDtypeStruct(shape, jnp.int32) for field in BATCH_FIELDS}
    key = jax.eval_shape(lambda: jax.random.key(0, impl=t.dropout_rng))
    return steps.train_step, (state, base, batch, key), model, shardings


def compiled_memory(config: TrainConfig, *, num_layers: int | None = None, target: str | None = None) -> CompiledMemory:
    """XLA's memory analysis of the configured training step, compiled for abstract arguments; for a GPU target,
    XLA:GPU's, compiled without the GPU (raises `gpu_target.DevicelessUnavailable` with the reason where this
    machine cannot).

    Kept per process for an equal config, model configuration (its config.json or GGUF metadata, read again each
    call), depth, target and device set: planning the same step twice (`remat: auto`, then `--longest-row` or
    `train`) compiles it once."""
    model_config = read_model_config(resolve_package_path(config.model.path))
    return _compiled_memory(config, model_config, num_layers, target, tuple(map(str, jax.devices())))


@functools.lru_cache(maxsize=64)
def _compiled_memory(
    config: TrainConfig, model_config: Any, num_layers: int | None, target: str | None, devices: tuple[str, ...]
) -> CompiledMemory:
    del model_config, devices  # cache keys only
    step, args, _, _ = _abstract_step(config, num_layers, target)
    if target is not None:
        compiled = gpu_target.compile_for_target(
            step, *args, target=target, compiler_options=gpu_target.AS_TUNED_ON_GPU
        )
        return CompiledMemory.of(compiled)
    return CompiledMemory.of(step.lower(*args).compile())


def plan_memory(config: TrainConfig, *, compare: bool = False, target: str | None = None) -> MemoryPlan:
    """The memory plan of `config`'s training step (see the module docstring for how each part is found); per
    device on the configured mesh; for a GPU target (`gpu_target.TARGETS`), from XLA:GPU's compile for it. With
    `train.remat: auto`, the plan of the policy `choose_remat` picks."""
    if config.train.remat == "auto":
        choice, plan = choose_remat(config, target=target)
        if compare:
            compiled = compiled_memory(_with_remat(config, choice.policy), target=target)
            plan = dataclasses.replace(plan, compiled=compiled)
        return plan
    _, parts, num_layers, vocab, devices, mesh = _parts(config, target)
    shallow = [compiled_memory(config, num_layers=n, target=target) for n in _PROBE_LAYERS]
    (low, high), (m_low, m_high) = _PROBE_LAYERS, shallow
    per_layer = (m_high.temporaries - m_low.temporaries) // (high - low)
    host_per_layer = (m_high.host_temporaries - m_low.host_temporaries) // (high - low)
    chunk_size = config.train.loss_chunk_size or auto_chunk_size(vocab)
    micro_rows = config.train.batch_size // config.train.grad_accum
    if devices == 1:
        chunk_tokens = min(chunk_size, micro_rows * config.data.max_length)
    else:  # chunks keep each device's rows and cut the sequence (qlora_jax.train.loss)
        rows = micro_rows // devices
        chunk_tokens = rows * max(1, min(config.data.max_length, chunk_size // rows))
    return MemoryPlan(
        **parts,
        saved_activations_per_layer=max(per_layer, 0),
        num_layers=num_layers,
        working_set=max(m_low.temporaries - low * per_layer, 0),
        logits_chunk=chunk_tokens * vocab * 4,
        host_activations=max(host_per_layer, 0) * num_layers,
        compiled=compiled_memory(config, target=target) if compare else None,
        mesh=mesh,
        remat=config.train.remat,
        backend=target or jax.default_backend(),
    )


def _parts(config: TrainConfig, target: str | None):
    """(stored bytes, the MemoryPlan fields of the stored parts, layers, vocabulary size, devices, (data, fsdp) or
    None), counted from the abstract model and arguments (nothing is compiled)."""
    if config.train.remat == "auto":  # the stored parts do not depend on the policy
        config = _with_remat(config, "full")
    _, (state, base, batch, _), model, shardings = _abstract_step(config, None, target)
    quantized_state = nnx.state(model, QuantizedWeight)
    devices = 1 if shardings is None else shardings.mesh.size
    if shardings is None:
        quantized, dense = _nbytes(quantized_state), _nbytes(base) - _nbytes(quantized_state)
        adapters, optimizer_state = _nbytes(state.lora), _nbytes(state.opt_state)
    else:
        mesh = shardings.mesh
        quantized = shard_bytes(
            quantized_state, param_shardings(quantized_state, mesh, dq_blocksize=_dq_blocksize(config))
        )
        dense = shard_bytes(base, shardings.base) - quantized
        adapters = shard_bytes(state.lora, shardings.state.lora)
        optimizer_state = shard_bytes(state.opt_state, shardings.state.opt_state)
    parts = dict(
        quantized_weights=quantized,
        dense_weights=dense,
        adapters=adapters,
        optimizer_state=optimizer_state,
        optimizer_offloaded=config.optim.offload,
        batch=_nbytes(batch) // devices,
    )
    stored = quantized + dense + adapters + (0 if config.optim.offload else optimizer_state) + parts["batch"]
    mesh = None if shardings is None else (shardings.mesh.shape["data"], shardings.mesh.shape["fsdp"])
    return stored, parts, model.config.num_layers, model.config.vocab_size, devices, mesh
