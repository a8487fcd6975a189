"""The jitted train and eval steps, for users' own scripts and for `train()`.

    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    optimizer = make_optimizer(config.optim, steps)
    state = TrainState.create(lora, optimizer)
    step = make_train_step(graphdef, optimizer)
    state, metrics = step(state, base, batch, key)   # batch: tokens/targets/positions/segment_ids [accum, B, T]

On a device mesh, pass `shardings` (`qlora_jax.train.parallel.step_shardings`): the step is compiled for them and
its model traced under their mesh as JAX's context mesh (`qlora_jax.parallel.mesh.context_mesh`), so each layer's
weights are gathered inside the layer scan and the 4-bit kernels run per device.

Only `lora` (the adapters) and the optimizer state change; `base` (the frozen, mostly 4-bit weights) goes in
unchanged and is never differentiated (its variables are not `nnx.LoRAParam`s, so `jax.grad` never sees them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qlora_jax.models import ComputeOptions
from qlora_jax.models.moe import load_balancing_loss
from qlora_jax.parallel.mesh import mesh_size
from qlora_jax.train.loss import chunked_cross_entropy
from qlora_jax.train.optim import to_memory

__all__ = ["TrainState", "make_train_step", "make_eval_step", "step_options", "router_aux_coefficient", "BATCH_FIELDS"]

BATCH_FIELDS = ("tokens", "targets", "positions", "segment_ids")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """What training changes: the step counter, the adapters and the optimizer state."""

    step: jax.Array
    lora: Any
    opt_state: Any

    @classmethod
    def create(
        cls, lora: Any, optimizer: optax.GradientTransformation, *, offload: bool = False, shardings: Any = None
    ) -> TrainState:
        """The initial state; `shardings` (a TrainState of shardings) places the optimizer state on a mesh."""
        if shardings is None:
            opt_state = optimizer.init(lora)
            if offload:
                opt_state = to_memory(opt_state, "pinned_host")
            return cls(jnp.int32(0), lora, opt_state)
        on_device = jax.tree.map(lambda s: s.with_memory_kind("device"), shardings.opt_state)
        opt_state = jax.jit(optimizer.init, out_shardings=on_device)(lora)
        if offload:
            opt_state = to_memory(opt_state, "pinned_host", shardings.opt_state)
        return cls(jax.device_put(jnp.int32(0), shardings.step), lora, opt_state)


def router_aux_coefficient(model_config: Any, override: float | None = None) -> float:
    """The weight of a mixture of experts' load-balancing loss in the training loss: `override` if given, else
    config.json's `router_aux_loss_coef` when its `output_router_logits` is set (transformers' rule); 0 for a dense
    model."""
    moe = model_config.moe
    if moe is None:
        return 0.0
    if override is not None:
        return float(override)
    return moe.router_aux_loss_coef if moe.output_router_logits else 0.0


def step_options(options: ComputeOptions, shardings: Any) -> ComputeOptions:
    """`options` as a step placed by `shardings` (a StepShardings or None) computes: a mixture of experts runs
    expert-parallel exactly where the placement splits its experts by expert (`shardings.expert_parallel`)."""
    if shardings is None:
        return options
    return dataclasses.replace(options, expert_parallel=shardings.expert_parallel)


def _loss(
    graphdef,
    lora,
    base,
    batch,
    key,
    *,
    chunk_size: int,
    options: ComputeOptions,
    packed_rows: bool,
    mesh=None,
    router_aux_loss_coef: float | None = None,
):
    # Traced for the mesh as JAX's context mesh (jit's arguments carry their shardings, not a context): weights
    # gathered where used, kernels per device; without one, whatever context the caller set.
    on_mesh = contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)
    with on_mesh:
        model = nnx.merge(graphdef, lora, base)
        # Unpacked rows are one example then right padding: causal attention alone gives every target token the
        # same value (no real token attends a later padding token), and lets attention take cuDNN's causal mask.
        segment_ids = batch["segment_ids"] if packed_rows else None
        coef = router_aux_coefficient(model.config, router_aux_loss_coef)
        # A mixture of experts' load-balancing loss over the real tokens (segment 0: padding), docs/moe.md.
        h, _, router = model.hidden_states(
            batch["tokens"],
            positions=batch["positions"],
            segment_ids=segment_ids,
            dropout_key=key,
            options=options,
            router_mask=batch["segment_ids"] > 0,
            return_router_stats=True,
        )
        logits = functools.partial(model.logits, options=options)
        loss_sum, count = chunked_cross_entropy(
            logits, h, batch["targets"], chunk_size=chunk_size, batch_shards=mesh_size(mesh)
        )
        if coef:  # summed per target token, so that the step's mean is cross-entropy + coef * aux
            loss_sum = loss_sum + coef * load_balancing_loss(router, model.config.moe.num_experts) * count
        return loss_sum, count


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    *,
    chunk_size: int = 1024,
    options: ComputeOptions = ComputeOptions(),
    offload_optimizer: bool = False,
    learning_rate: optax.Schedule | None = None,
    shardings: Any = None,
    packed_rows: bool = True,
    router_aux_loss_coef: float | None = None,
) -> Callable:
    """A jitted `step(state, base, batch, key) -> (state, metrics)`.

    batch: arrays [accum, micro_batch, T]; gradients are summed over the accumulation steps and the loss is the
    mean over every target token of the whole batch. If the loss or the gradients are not finite, the update is
    skipped (state unchanged) and `metrics["finite"]` is False: the caller stops, the last good state intact.
    `options`: how the model computes (checkpointing, attention blocks, kernels), compiled into the step.
    With `offload_optimizer`, the optimizer state lives in pinned host memory and visits the device only here.
    `shardings` (a `qlora_jax.train.parallel.StepShardings`): compiled for that mesh placement, arguments and
    the new state alike, the model traced under its mesh, `options.expert_parallel` the placement's
    (`step_options`). `packed_rows=False` promises rows of one example each, right-padded (`pad_examples`):
    `segment_ids` is then not used (same loss and gradients; attention needs only its causal mask).
    `router_aux_loss_coef`: a mixture of experts' load-balancing loss weight (`router_aux_coefficient`; None: the
    model's config.json, as transformers).
    """
    mesh = None if shardings is None else shardings.mesh
    options = step_options(options, shardings)
    opt_shardings = None if shardings is None else shardings.state.opt_state

    def loss_and_grads(lora, base, micro, key):
        def fn(adapters):
            return _loss(
                graphdef,
                adapters,
                base,
                micro,
                key,
                chunk_size=chunk_size,
                options=options,
                packed_rows=packed_rows,
                mesh=mesh,
                router_aux_loss_coef=router_aux_loss_coef,
            )

        (loss_sum, count), grads = jax.value_and_grad(fn, has_aux=True)(lora)
        return loss_sum, count, grads

    def step(state: TrainState, base, batch, key):
        opt_state = to_memory(state.opt_state, "device", opt_shardings) if offload_optimizer else state.opt_state
        key = jax.random.fold_in(key, state.step)
        accum = batch["tokens"].shape[0]

        def micro_step(carry, xs):
            loss_acc, count_acc, grads_acc = carry
            micro, index = xs
            loss_sum, count, grads = loss_and_grads(state.lora, base, micro, jax.random.fold_in(key, index))
            return (loss_acc + loss_sum, count_acc + count, jax.tree.map(jnp.add, grads_acc, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, state.lora)
        init = (jnp.float32(0), jnp.int32(0), zeros)
        (loss_sum, count, grads), _ = jax.lax.scan(micro_step, init, (batch, jnp.arange(accum)))
        denominator = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        loss = loss_sum / denominator
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, opt_state, state.lora)
        new_lora = optax.apply_updates(state.lora, updates)
        # Skip a non-finite update: the returned state is the last good one.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_lora, new_opt_state = keep(new_lora, state.lora), keep(new_opt_state, opt_state)
        if offload_optimizer:
            new_opt_state = to_memory(new_opt_state, "pinned_host", opt_shardings)
        metrics = {"loss": loss, "tokens": count, "grad_norm": grad_norm, "finite": finite}
        if learning_rate is not None:
            metrics["learning_rate"] = learning_rate(state.step)
        return TrainState(state.step + 1, new_lora, new_opt_state), metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=(0,))
    s = shardings
    return jax.jit(
        step,
        donate_argnums=(0,),
        in_shardings=(s.state, s.base, s.batch, s.replicated),
        out_shardings=(s.state, s.replicated),
    )


def make_eval_step(
    graphdef: nnx.GraphDef,
    *,
    chunk_size: int = 1024,
    options: ComputeOptions = ComputeOptions(),
    shardings: Any = None,
    packed_rows: bool = True,
) -> Callable:
    """A jitted `eval_step(lora, base, batch) -> (loss_sum, target_count)` for batch arrays [B, T] (no dropout);
    `options`, `shardings` and `packed_rows` as for `make_train_step` (with shardings, B must divide by the mesh's
    data x fsdp devices)."""
    mesh = None if shardings is None else shardings.mesh
    options = step_options(options, shardings)

    def eval_step(lora, base, batch):
        return _loss(
            graphdef,
            lora,
            base,
            batch,
            None,
            chunk_size=chunk_size,
            options=options,
            packed_rows=packed_rows,
            mesh=mesh,
        )

    if shardings is None:
        return jax.jit(eval_step)
    s = shardings
    return jax.jit(eval_step, in_shardings=(s.state.lora, s.base, s.eval_batch), out_shardings=s.replicated)
