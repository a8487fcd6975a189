"""Memory plan of a training config, before loading anything: what each part of one training step costs.

Weights, adapters, optimizer state and the batch are counted exactly from the abstract (shape-only) model.
Activations depend on what XLA fuses, saves and schedules, so they are not guessed: the real training step is
compiled (abstract weights: nothing is allocated) for the model cut to 2 and to 4 layers, and XLA's temporary
memory is extrapolated linearly in depth. The scan runs the same layer body for every layer, so each layer adds the
same saved activations; the rest (one layer's backward working set, the logits chunk, gradients) does not grow with
depth. `compare=True` also compiles the full-depth step and reports XLA's own figure beside the plan.

The figures are for the backend the plan runs on (XLA:CPU buffer assignment differs from XLA:GPU): run it on the
target machine for its numbers; it allocates no device memory there either.

`train.remat: auto` is resolved here too (`choose_remat`): the policies are planned from the cheapest in compute
to the most frugal in memory (none, save_dots, offload, full) and the first whose device total fits
`train.memory_budget` is taken. The default budget is 90% of the device's free memory (`memory_stats()`); on CPU,
where there is no device memory, 90% of the host's available memory (/proc/meminfo's MemAvailable). "offload"
is only a candidate on an accelerator (on CPU the host *is* the device memory) and when its host side fits the
host's available memory.

With a `mesh` section every figure is per device: the stored parts as the sharding rule places them
(`qlora_jax.sharding`), the batch split over data x fsdp, and XLA's analysis of the step compiled for the mesh
(which is per device). That needs as many devices as the mesh; on CPU, simulate them by starting Python with
XLA_FLAGS=--xla_force_host_platform_device_count=N.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.models import read_model_config
from qlora_jax.nn import QuantizedWeight
from qlora_jax.sharding import param_shardings, shard_bytes
from qlora_jax.train.build import abstract_model, compute_options, quant_config
from qlora_jax.train.config import TrainConfig, parse_bytes, resolve_package_path
from qlora_jax.train.loss import auto_chunk_size
from qlora_jax.train.optim import learning_rate_schedule, make_optimizer
from qlora_jax.train.parallel import configured_mesh, step_shardings
from qlora_jax.train.step import BATCH_FIELDS, TrainState, make_train_step

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

# remat: auto tries the policies in this order (least recomputation first) and takes the first that fits.
REMAT_ORDER = ("none", "save_dots", "offload", "full")
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
        return cls(int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.alias_size_in_bytes),
                   int(m.temp_size_in_bytes), int(getattr(m, "host_temp_size_in_bytes", 0) or 0))  # fmt: skip


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
    host_activations: int  # activations offloaded to host by the "offload" remat policy
    compiled: CompiledMemory | None = None  # XLA's analysis of the full step, if compared
    mesh: tuple[int, int] | None = None  # (data, fsdp): then every figure is per device
    remat: str = "full"  # the checkpointing policy planned
    remat_choice: RematChoice | None = None  # how remat: auto chose it

    @property
    def saved_activations(self) -> int:
        return self.saved_activations_per_layer * self.num_layers

    @property
    def device_total(self) -> int:
        optimizer = 0 if self.optimizer_offloaded else self.optimizer_state
        return (self.quantized_weights + self.dense_weights + self.adapters + optimizer + self.batch
                + self.saved_activations + self.working_set)  # fmt: skip

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
            ),  # fmt: skip
            ("working set (a layer's backward, loss chunk, gradients)", self.working_set, "device"),
            ("  of which one float32 logits chunk", self.logits_chunk, "device"),
        ]
        if self.host_activations:
            rows.append(("activations offloaded by remat=offload", self.host_activations, "pinned host"))
        width = max(len(name) for name, _, _ in rows)
        lines = []
        if self.mesh is not None:
            data, fsdp = self.mesh
            lines.append(f"per device, on a mesh of data={data} x fsdp={fsdp} ({data * fsdp} devices):")
        lines += [f"{name:<{width}}  {_size(n):>10}  {kind}" for name, n, kind in rows]
        lines.append(f"{'device total (estimate)':<{width}}  {_size(self.device_total):>10}")
        if self.compiled is not None:
            error = self.device_total / self.compiled.total - 1
            lines.append(f"{'device total (XLA, full step)':<{width}}  {_size(self.compiled.total):>10}  "
                         f"plan {error:+.1%}")  # fmt: skip
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


def memory_budget(config: TrainConfig) -> tuple[int, str]:
    """(bytes per device, where the figure comes from): `train.memory_budget` if set, else 90% of the first
    device's free memory (bytes_limit - bytes_in_use), or on CPU 90% of the host's available memory."""
    if config.train.memory_budget is not None:
        return parse_bytes(config.train.memory_budget), "train.memory_budget"
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


def choose_remat(config: TrainConfig, *, budget: int | None = None) -> tuple[RematChoice, MemoryPlan]:
    """The cheapest checkpointing policy (REMAT_ORDER) whose planned step fits the budget (default:
    `memory_budget(config)`), and its plan. If none fits, "full" (the least memory), flagged in the choice."""
    source = "given"
    if budget is None:
        budget, source = memory_budget(config)
    on_accelerator = jax.default_backend() != "cpu"
    host = _host_available()
    totals: dict[str, int] = {}
    skipped: dict[str, str] = {}
    plans: dict[str, MemoryPlan] = {}
    for policy in REMAT_ORDER:
        if policy == "offload" and not on_accelerator:
            skipped[policy] = "on CPU the host is the device memory"
            continue
        plan = plan_memory(_with_remat(config, policy))
        if policy == "offload" and host is not None and plan.host_activations > host:
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
    """`config` with `train.remat: auto` replaced by `choose_remat`'s policy (and the choice), or unchanged."""
    if config.train.remat != "auto":
        return config, None
    choice, _ = choose_remat(config)
    if jax.process_count() > 1:  # every process must compile the same step: process 0's choice holds
        from jax.experimental import multihost_utils

        index = int(multihost_utils.broadcast_one_to_all(np.int32(REMAT_ORDER.index(choice.policy))))
        choice = dataclasses.replace(choice, policy=REMAT_ORDER[index])
    return _with_remat(config, choice.policy), choice


def longest_row(
    config: TrainConfig, *, budget: int | None = None, policy: str = "full", multiple: int = 1024,
    limit: int = 2**20,
) -> tuple[int, MemoryPlan | None]:  # fmt: skip
    """The longest `data.max_length` (a multiple of `multiple`, up to `limit`) whose one-row step (batch_size 1,
    grad_accum 1) under `policy` fits `budget` (default `memory_budget(config)`), and its plan; (0, None) if even
    `multiple` tokens do not fit. Doubling, then bisection: about 2 log2(limit / multiple) plans of 2 compiles."""
    if budget is None:
        budget, _ = memory_budget(config)
    one_row = dataclasses.replace(config.train, batch_size=1, grad_accum=1, remat=policy)

    def plan_at(length: int) -> MemoryPlan:
        return plan_memory(dataclasses.replace(config, train=one_row,
                                               data=dataclasses.replace(config.data, max_length=length)))  # fmt: skip

    best, best_plan, high = 0, None, multiple
    while high <= limit:
        plan = plan_at(high)
        if plan.device_total > budget:
            break
        best, best_plan, high = high, plan, high * 2
    low, high = best // multiple, min(high, limit + multiple) // multiple  # in units of `multiple`: low fits
    while high - low > 1:
        middle = (low + high) // 2
        plan = plan_at(middle * multiple)
        if plan.device_total <= budget:
            low, best, best_plan = middle, middle * multiple, plan
        else:
            high = middle
    return best, best_plan


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


def _abstract_step(config: TrainConfig, num_layers: int | None):
    """(jitted step, abstract arguments, abstract model, step shardings or None) for the configured run, the model
    cut to `num_layers` if given."""
    t = config.train
    model = abstract_model(config, num_layers=num_layers)
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    optimizer = make_optimizer(config.optim, t.steps)
    state = jax.eval_shape(lambda adapters: TrainState.create(adapters, optimizer), lora)
    mesh = configured_mesh(config)
    shardings = None
    if mesh is not None:
        shardings = step_shardings(mesh, lora, base, optimizer, dq_blocksize=_dq_blocksize(config),
                                   expert_parallel=config.mesh.expert_parallel,
                                   offload=config.optim.offload)  # fmt: skip
    elif config.optim.offload:
        host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
        state = dataclasses.replace(state, opt_state=jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=host), state.opt_state))  # fmt: skip
    chunk_size = t.loss_chunk_size or auto_chunk_size(model.config.vocab_size)
    step = make_train_step(graphdef, optimizer, chunk_size=chunk_size, options=compute_options(config),
                           offload_optimizer=config.optim.offload,
                           learning_rate=learning_rate_schedule(config.optim, t.steps),
                           shardings=shardings, packed_rows=config.data.packing,
                           router_aux_loss_coef=t.router_aux_loss_coef)  # fmt: skip
    shape = (t.grad_accum, t.batch_size // t.grad_accum, config.data.max_length)
    batch = {field: jax.ShapeDtypeStruct(shape, jnp.int32) for field in BATCH_FIELDS}
    key = jax.eval_shape(lambda: jax.random.key(0, impl=t.dropout_rng))
    return step, (state, base, batch, key), model, shardings


def compiled_memory(config: TrainConfig, *, num_layers: int | None = None) -> CompiledMemory:
    """XLA's memory analysis of the configured training step, compiled for abstract arguments.

    Kept per process for an equal config, model configuration (its config.json or GGUF metadata, read again each
    call), depth and device set: planning the same step twice (`remat: auto`, then `--longest-row` or `train`)
    compiles it once."""
    model_config = read_model_config(resolve_package_path(config.model.path))
    return _compiled_memory(config, model_config, num_layers, tuple(map(str, jax.devices())))


@functools.lru_cache(maxsize=64)
def _compiled_memory(config: TrainConfig, model_config: Any, num_layers: int | None, devices: tuple[str, ...]
                     ) -> CompiledMemory:  # fmt: skip
    del model_config, devices  # cache keys only
    step, args, _, _ = _abstract_step(config, num_layers)
    return CompiledMemory.of(step.lower(*args).compile())


def plan_memory(config: TrainConfig, *, compare: bool = False) -> MemoryPlan:
    """The memory plan of `config`'s training step (see the module docstring for how each part is found); per
    device on the configured mesh. With `train.remat: auto`, the plan of the policy `choose_remat` picks."""
    if config.train.remat == "auto":
        choice, plan = choose_remat(config)
        if compare:
            compiled = compiled_memory(_with_remat(config, choice.policy))
            plan = dataclasses.replace(plan, compiled=compiled)
        return plan
    _, (state, base, batch, _), model, shardings = _abstract_step(config, None)
    num_layers = model.config.num_layers
    quantized_state = nnx.state(model, QuantizedWeight)
    devices = 1 if shardings is None else shardings.mesh.size
    if shardings is None:
        quantized, dense = _nbytes(quantized_state), _nbytes(base) - _nbytes(quantized_state)
        adapters, optimizer_state = _nbytes(state.lora), _nbytes(state.opt_state)
    else:
        mesh = shardings.mesh
        quantized = shard_bytes(quantized_state, param_shardings(quantized_state, mesh,
                                                                 dq_blocksize=_dq_blocksize(config)))  # fmt: skip
        dense = shard_bytes(base, shardings.base) - quantized
        adapters = shard_bytes(state.lora, shardings.state.lora)
        optimizer_state = shard_bytes(state.opt_state, shardings.state.opt_state)
    shallow = [compiled_memory(config, num_layers=n) for n in _PROBE_LAYERS]
    (low, high), (m_low, m_high) = _PROBE_LAYERS, shallow
    per_layer = (m_high.temporaries - m_low.temporaries) // (high - low)
    host_per_layer = (m_high.host_temporaries - m_low.host_temporaries) // (high - low)
    vocab = model.config.vocab_size
    chunk_size = config.train.loss_chunk_size or auto_chunk_size(vocab)
    micro_rows = config.train.batch_size // config.train.grad_accum
    if devices == 1:
        chunk_tokens = min(chunk_size, micro_rows * config.data.max_length)
    else:  # chunks keep each device's rows and cut the sequence (qlora_jax.train.loss)
        rows = micro_rows // devices
        chunk_tokens = rows * max(1, min(config.data.max_length, chunk_size // rows))
    return MemoryPlan(
        quantized_weights=quantized,
        dense_weights=dense,
        adapters=adapters,
        optimizer_state=optimizer_state,
        optimizer_offloaded=config.optim.offload,
        batch=_nbytes(batch) // devices,
        saved_activations_per_layer=max(per_layer, 0),
        num_layers=num_layers,
        working_set=max(m_low.temporaries - low * per_layer, 0),
        logits_chunk=chunk_tokens * vocab * 4,
        host_activations=max(host_per_layer, 0) * num_layers,
        compiled=compiled_memory(config) if compare else None,
        mesh=None if shardings is None else (shardings.mesh.shape["data"], shardings.mesh.shape["fsdp"]),
        remat=config.train.remat,
    )
