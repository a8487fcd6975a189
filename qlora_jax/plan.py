"""Memory plan of a training config, before loading anything: what each part of one training step costs.

Weights, adapters, optimizer state and the batch are counted exactly from the abstract (shape-only) model.
Activations depend on what XLA fuses, saves and schedules, so they are not guessed: the real training step is
compiled (abstract weights: nothing is allocated) for the model cut to 2 and to 4 layers, and XLA's temporary
memory is extrapolated linearly in depth. The scan runs the same layer body for every layer, so each layer adds the
same saved activations; the rest (one layer's backward working set, the logits chunk, gradients) does not grow with
depth. `compare=True` also compiles the full-depth step and reports XLA's own figure beside the plan.

The figures are for the backend the plan runs on (XLA:CPU buffer assignment differs from XLA:GPU): run it on the
target machine for its numbers; it allocates no device memory there either.

With a `mesh` section every figure is per device: the stored parts as the sharding rule places them
(`qlora_jax.sharding`), the batch split over data x fsdp, and XLA's analysis of the step compiled for the mesh
(which is per device). That needs as many devices as the mesh; on CPU, simulate them by starting Python with
XLA_FLAGS=--xla_force_host_platform_device_count=N.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.nn import QuantizedWeight
from qlora_jax.sharding import param_shardings, shard_bytes
from qlora_jax.train.build import abstract_model, compute_options, quant_config
from qlora_jax.train.config import TrainConfig
from qlora_jax.train.loss import auto_chunk_size
from qlora_jax.train.optim import learning_rate_schedule, make_optimizer
from qlora_jax.train.parallel import configured_mesh, step_shardings
from qlora_jax.train.step import BATCH_FIELDS, TrainState, make_train_step

__all__ = ["MemoryPlan", "CompiledMemory", "plan_memory", "compiled_memory"]

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
        return "\n".join(lines)


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
                                   offload=config.optim.offload)  # fmt: skip
    elif config.optim.offload:
        host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
        state = dataclasses.replace(state, opt_state=jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=host), state.opt_state))  # fmt: skip
    chunk_size = t.loss_chunk_size or auto_chunk_size(model.config.vocab_size)
    step = make_train_step(graphdef, optimizer, chunk_size=chunk_size, options=compute_options(config),
                           offload_optimizer=config.optim.offload,
                           learning_rate=learning_rate_schedule(config.optim, t.steps),
                           shardings=shardings)  # fmt: skip
    shape = (t.grad_accum, t.batch_size // t.grad_accum, config.data.max_length)
    batch = {field: jax.ShapeDtypeStruct(shape, jnp.int32) for field in BATCH_FIELDS}
    key = jax.eval_shape(lambda: jax.random.key(0))
    return step, (state, base, batch, key), model, shardings


def compiled_memory(config: TrainConfig, *, num_layers: int | None = None) -> CompiledMemory:
    """XLA's memory analysis of the configured training step, compiled for abstract arguments."""
    step, args, _, _ = _abstract_step(config, num_layers)
    return CompiledMemory.of(step.lower(*args).compile())


def plan_memory(config: TrainConfig, *, compare: bool = False) -> MemoryPlan:
    """The memory plan of `config`'s training step (see the module docstring for how each part is found); per
    device on the configured mesh."""
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
    )
