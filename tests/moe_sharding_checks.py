"""Expert parallelism on 8 simulated CPU devices, run by tests/test_moe_sharding.py in a subprocess:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/moe_sharding_checks.py OUT_DIR

A tiny Qwen3-MoE (8 experts, NF4, adapters on attention, router and experts, the load-balancing loss on) takes one
SGD step of rate 1 (minus the gradient) on one device and on meshes with the experts split by expert over fsdp
(expert parallel) or gathered as FSDP does; writes OUT_DIR/results.json.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sharding_checks import shard_map_operands  # this directory's (the script's own) sibling

from qlora_jax.lora import LoraConfig, apply_lora
from qlora_jax.models import ComputeOptions, DecoderLM, ModelConfig
from qlora_jax.parallel.mesh import make_mesh
from qlora_jax.parallel.placement import global_batch, place
from qlora_jax.quant import QuantConfig
from qlora_jax.sharding import param_shardings
from qlora_jax.train.parallel import step_shardings
from qlora_jax.train.step import TrainState, make_train_step

OPTIONS = ComputeOptions(remat="full", attention_block=0)
HF = dict(
    model_type="qwen3_moe",
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    output_router_logits=True,
    router_aux_loss_coef=0.1,
)
# (data, fsdp, expert parallel)
MESHES = {"ep8": (1, 8, True), "data2_ep4": (2, 4, True), "fsdp8": (1, 8, False)}


def _split():
    config = ModelConfig.from_hf_config(HF)
    model = DecoderLM(config, quant=QuantConfig(), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    with jax.default_device(jax.devices()[0]):
        apply_lora(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), rngs=nnx.Rngs(1))
    # a decisive router, so that no near-tie is decided differently by another summation order
    gate = model.model.layers.mlp.gate.weight
    gate.set_value(gate[...] * 50)
    return nnx.split(model, nnx.LoRAParam, ...)


def _batch(accum=2, rows=8, length=8):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, HF["vocab_size"], (accum, rows, length)).astype(np.int32)
    targets = np.roll(tokens, -1, axis=-1)
    targets[..., -1] = -100
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()
    return {"tokens": tokens, "targets": targets, "positions": positions, "segment_ids": np.ones_like(tokens)}


def check_users_mesh(graphdef, lora, base, tokens) -> dict:
    """The model called under a mesh set with `jax.set_mesh` (data 2 x fsdp 4, the experts placed by expert), with
    and without `ComputeOptions(expert_parallel=True)`: how many shard_maps hold a device's own experts (4-bit
    codes [experts / fsdp, parts, bytes] inside the layer scan) and the logits vs one device's."""

    def forward(options):
        return jax.jit(lambda lora, base, tokens: nnx.merge(graphdef, lora, base)(tokens, options=options))

    reference = forward(OPTIONS)(lora, base, tokens)
    mesh = make_mesh(2, 4)
    lora, base = (place(tree, param_shardings(tree, mesh, expert_parallel=True)) for tree in (lora, base))
    out = {}
    with jax.set_mesh(mesh):
        for name, options in (
            ("expert_parallel", dataclasses.replace(OPTIONS, expert_parallel=True)),
            ("not", OPTIONS),
        ):
            operands = shard_map_operands(forward(options).trace(lora, base, tokens).jaxpr.jaxpr, [])
            local = [ops for ops in operands if any(a.dtype == jnp.uint8 and a.ndim == 3 for a in ops)]
            out[name] = {
                "expert_shard_maps": len(local),
                "local_experts": sorted({a.shape[0] for ops in local for a in ops if a.dtype == jnp.uint8}),
                "error": float(jnp.max(jnp.abs(forward(options)(lora, base, tokens) - reference))),
            }
    return out


def main(out: Path) -> None:
    graphdef, lora, base = _split()
    optimizer = optax.sgd(1.0)
    batch, key = _batch(), jax.random.key(0)
    state = TrainState.create(jax.tree.map(jnp.copy, lora), optimizer)
    before = jax.tree.map(np.asarray, state.lora)
    step = make_train_step(graphdef, optimizer, chunk_size=32, options=OPTIONS)
    state, metrics = step(state, base, {k: jnp.asarray(v) for k, v in batch.items()}, key)
    reference = jax.tree.map(lambda a, b: a - np.asarray(b), before, state.lora)
    results: dict = {
        "devices": jax.device_count(),
        "loss": float(metrics["loss"]),
        "grad_scale": max(float(np.abs(g).max()) for g in jax.tree.leaves(reference)),
        "meshes": {},
    }
    for name, (data, fsdp, expert_parallel) in MESHES.items():
        mesh = make_mesh(data, fsdp)
        shardings = step_shardings(mesh, lora, base, optimizer, expert_parallel=expert_parallel)
        placed = place(base, shardings.base)
        state = TrainState.create(
            place(jax.tree.map(jnp.copy, lora), shardings.state.lora), optimizer, shardings=shardings.state
        )
        step = make_train_step(graphdef, optimizer, chunk_size=32, options=OPTIONS, shardings=shardings)
        new_state, metrics = step(state, placed, global_batch(batch, shardings.batch), key)
        grads = jax.tree.map(lambda a, b: a - np.asarray(b), before, new_state.lora)
        errors = [
            float(np.abs(g - r).max()) for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True)
        ]
        packed = placed["model"]["layers"]["mlp"]["experts"]["gate_up_proj"]["packed"]
        lora_a = new_state.lora["model"]["layers"]["mlp"]["experts"]["down_proj"]["lora"]["lora_A"]
        results["meshes"][name] = {
            "loss": float(metrics["loss"]),
            "grad_error": max(errors),
            "packed_spec": str(packed.sharding.spec),
            "packed_shard_shape": list(packed.addressable_shards[0].data.shape),
            "lora_spec": str(lora_a.sharding.spec),
        }
    results["users_mesh"] = check_users_mesh(graphdef, lora, base, jnp.asarray(batch["tokens"][0]))
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
