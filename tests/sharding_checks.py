"""Checks that need 8 devices, run by tests/test_sharding.py in a subprocess with 8 simulated CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_checks.py OUT_DIR [TINY_MODEL_DIR]

Writes OUT_DIR/results.json (what the tests assert on) and OUT_DIR/checkpoints (saved on 8 devices, restored by
the 1-device test process too). Every check runs in this one process: starting JAX and compiling dominate.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qlora_jax.lora import AdapterScaling, LoraConfig, apply_lora
from qlora_jax.models import ComputeOptions, DecoderLM, ModelConfig
from qlora_jax.nn import QuantizedWeight
from qlora_jax.parallel.distributed import local_rows
from qlora_jax.parallel.mesh import make_mesh
from qlora_jax.parallel.placement import global_batch, place
from qlora_jax.quant import QuantConfig, QuantizedTensor, dequantize
from qlora_jax.sharding import param_shardings
from qlora_jax.train.parallel import step_shardings
from qlora_jax.train.run.checkpoint import RunCheckpoints
from qlora_jax.train.step import BATCH_FIELDS, TrainState, make_train_step

# The 16-token rows run as two query blocks: blocked attention under each mesh.
OPTIONS = ComputeOptions(remat="full", attention_block=8)
MESHES = {"data8": (8, 1), "fsdp8": (1, 8), "data2_fsdp4": (2, 4)}
# Every linear weight of this model divides into 8 shards of whole double-quantization blocks (256 x 64 values).
HF = dict(
    model_type="llama",
    vocab_size=256,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    rope_theta=10000.0,
)


def _model_config(**changes) -> ModelConfig:
    return ModelConfig.from_hf_config(HF | changes)


def _split(model_config: ModelConfig, *, abstract: bool = False, dtype=jnp.float32):
    def build():
        model = DecoderLM(model_config, quant=QuantConfig(), dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
        apply_lora(model, LoraConfig(r=4, init_lora_weights=False), rngs=nnx.Rngs(1))  # B random: nonzero grads
        return model

    return nnx.split(nnx.eval_shape(build) if abstract else build(), nnx.LoRAParam, ...)


def _batch(accum=2, rows=8, length=16):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, HF["vocab_size"], (accum, rows, length)).astype(np.int32)
    targets = np.roll(tokens, -1, axis=-1)
    targets[..., -1] = -100
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()
    return {"tokens": tokens, "targets": targets, "positions": positions, "segment_ids": np.ones_like(tokens)}


def _max_error(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


def check_equivalence(out: Path) -> dict:
    """Loss and LoRA gradients (an SGD step of rate 1 is minus the gradient) on each mesh vs one device; the base
    bytes each device holds; the shards of a 4-bit weight are whole blocks; a checkpoint saved on the mesh."""
    graphdef, lora, base = _split(_model_config())
    optimizer = optax.sgd(1.0)
    batch, key = _batch(), jax.random.key(0)
    results: dict = {"devices": jax.device_count()}

    def grads_of(state_before, state_after):
        return jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), state_before, state_after)

    state = TrainState.create(jax.tree.map(jnp.copy, lora), optimizer)
    before = jax.tree.map(np.asarray, state.lora)
    step = make_train_step(graphdef, optimizer, chunk_size=32, options=OPTIONS)
    state, metrics = step(state, base, {k: jnp.asarray(v) for k, v in batch.items()}, key)
    reference_loss, reference_grads = float(metrics["loss"]), grads_of(before, state.lora)
    results["grad_scale"] = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(reference_grads))
    results["meshes"] = {}
    for name, shape in MESHES.items():
        mesh = make_mesh(*shape)
        shardings = step_shardings(mesh, lora, base, optimizer)
        placed_base = place(base, shardings.base)
        state = TrainState.create(
            place(jax.tree.map(jnp.copy, lora), shardings.state.lora), optimizer, shardings=shardings.state
        )
        step = make_train_step(graphdef, optimizer, chunk_size=32, options=OPTIONS, shardings=shardings)
        new_state, metrics = step(state, placed_base, global_batch(batch, shardings.batch), key)
        device_index = {d: i for i, d in enumerate(mesh.devices.flat)}
        per_device, quantized_per_device = [0] * mesh.size, [0] * mesh.size
        for path, leaf in jax.tree_util.tree_leaves_with_path(placed_base):
            is_codes = any(n in jax.tree_util.keystr(path) for n in ("packed", "absmax"))  # and nested_absmax
            for shard in leaf.addressable_shards:
                per_device[device_index[shard.device]] += shard.data.nbytes
                if is_codes:
                    quantized_per_device[device_index[shard.device]] += shard.data.nbytes
        results["meshes"][name] = {
            "loss_error": abs(float(metrics["loss"]) - reference_loss),
            "grad_error": _max_error(reference_grads, grads_of(before, new_state.lora)),
            "base_bytes_per_device": per_device,
            "codes_bytes_per_device": quantized_per_device,
            "lora_specs": sorted({str(s.spec) for s in jax.tree.leaves(shardings.state.lora)}),
            "opt_specs": sorted({str(s.spec) for s in jax.tree.leaves(shardings.state.opt_state)}),
        }
        if name == "data2_fsdp4":
            checkpoints = RunCheckpoints(out / "checkpoints", keep=1)
            checkpoints.save(new_state, {"mesh": name})
            checkpoints.close()
            np.savez(out / "saved_lora.npz", *[np.asarray(x) for x in jax.tree.leaves(new_state.lora)])
            results["restore"] = check_restore(out / "checkpoints", new_state, graphdef, optimizer)
    results["base_total_bytes"] = sum(x.nbytes for x in jax.tree.leaves(base))
    quantized = nnx.state(nnx.merge(graphdef, lora, base), QuantizedWeight)
    results["quantized_total_bytes"] = sum(x.nbytes for x in jax.tree.leaves(quantized))
    results["offset_bytes"] = sum(
        x.nbytes for p, x in jax.tree_util.tree_leaves_with_path(quantized) if "offset" in jax.tree_util.keystr(p)
    )
    # the adapters' per-layer scalings ([num_layers] float32 each): too small to split, replicated
    scalings = nnx.state(nnx.merge(graphdef, lora, base), AdapterScaling)
    results["adapter_scaling_bytes"] = sum(x.nbytes for x in jax.tree.leaves(scalings))
    results["whole_blocks"] = check_whole_blocks(graphdef, lora, base)
    return results


def check_restore(directory: Path, saved: TrainState, graphdef, optimizer) -> dict:
    """The mesh checkpoint restored onto 4 devices (another mesh) and onto 1 device."""
    out = {}
    for name, devices in (("4_devices", jax.devices()[:4]), ("1_device", jax.devices()[:1])):
        checkpoints = RunCheckpoints(directory, keep=1)
        if len(devices) > 1:
            mesh = make_mesh(1, -1, devices=devices)
            _, lora, base = _split(_model_config(), abstract=True)
            target = step_shardings(mesh, lora, base, optimizer).state
        else:
            target = jax.tree.map(lambda _, d=devices[0]: jax.sharding.SingleDeviceSharding(d), saved)
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), saved)
        restored, extra = checkpoints.restore(like, shardings=target)
        checkpoints.close()
        out[name] = {
            "error": _max_error(saved, restored),
            "devices": sorted({len(x.sharding.device_set) for x in jax.tree.leaves(restored)}),
            "extra": extra,
        }
    return out


def check_whole_blocks(graphdef, lora, base) -> dict:
    """Each device's shard of a 4-bit weight (codes, absmax codes, nested absmax, offset) dequantizes on its own
    to its contiguous part of the whole weight: shards hold whole quantization and double-quantization blocks."""
    mesh = make_mesh(1, 8)
    placed = place(base, param_shardings(base, mesh))
    layer = nnx.merge(graphdef, lora, placed).model.layers.mlp.down_proj
    qt = layer.quantized_tensor()
    whole = np.asarray(dequantize(jax.tree.map(lambda x: x[0], qt))).reshape(-1)

    def shards(x) -> list:
        by_start = {shard.index[-1].start or 0: np.asarray(shard.data) for shard in x.addressable_shards}
        return [by_start[start][0] for start in sorted(by_start)]

    codes, absmax, nested = shards(qt.packed), shards(qt.absmax), shards(qt.nested_absmax)
    errors = []
    for k in range(8):
        part = QuantizedTensor(
            codes[k],
            absmax[k],
            nested[k],
            np.asarray(qt.offset)[0],
            (whole.size // 8,),
            qt.dtype,
            qt.quant_type,
            qt.blocksize,
            qt.dq_blocksize,
        )
        expected = whole[k * whole.size // 8 : (k + 1) * whole.size // 8]
        errors.append(float(np.max(np.abs(np.asarray(dequantize(part)) - expected))))
    specs = {
        name: str(getattr(layer, name)[...].sharding.spec) for name in ("packed", "absmax", "nested_absmax", "offset")
    }
    return {"errors": errors, "specs": specs}


def check_small_weights_replicate() -> dict:
    """Weights whose blocks do not split 8 ways in whole double-quantization blocks stay whole (all buffers)."""
    _, _, base = _split(
        _model_config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
        abstract=True,
    )
    shardings = param_shardings(base, make_mesh(1, 8))
    flat = {jax.tree_util.keystr(p): str(s.spec) for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
    return {k: v for k, v in flat.items() if "q_proj" in k or "embed" in k}


def check_memory() -> dict:
    """Per-layer growth of the per-device temporary memory of the step (abstract weights, compiled only) with
    fsdp=8 and 8 rows, and on one device with 1 row (the same rows a device): gathered weights kept per layer would
    add a whole layer's weights to each layer's growth."""
    out = {}
    optimizer = optax.adamw(1e-3)
    key = jax.eval_shape(lambda: jax.random.key(0))
    for remat, mesh_shapes in (("none", ((1, 8), None)), ("full", ((1, 8),))):
        for shape in mesh_shapes:
            temps, base_bytes = {}, {}
            rows = 1 if shape is None else 8
            batch = {f: jax.ShapeDtypeStruct((1, rows, 16), jnp.int32) for f in BATCH_FIELDS}
            for layers in (2, 4):
                graphdef, lora, base = _split(
                    _model_config(num_hidden_layers=layers), abstract=True, dtype=jnp.bfloat16
                )
                shardings = None if shape is None else step_shardings(make_mesh(*shape), lora, base, optimizer)
                state = jax.eval_shape(lambda adapters: TrainState.create(adapters, optimizer), lora)
                step = make_train_step(
                    graphdef, optimizer, chunk_size=64, options=ComputeOptions(remat=remat), shardings=shardings
                )
                analysis = step.lower(state, base, batch, key).compile().memory_analysis()
                temps[layers] = int(analysis.temp_size_in_bytes)
                base_bytes[layers] = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(base))
            name = f"{remat}_{'fsdp8' if shape else 'single'}"
            out[name] = {
                "temp_per_layer": (temps[4] - temps[2]) / 2,
                "base_per_layer": (base_bytes[4] - base_bytes[2]) / 2,
            }
    return out


def shard_map_operands(jaxpr, found: list) -> list:
    """The per-device operand avals of every shard_map in `jaxpr` (a ClosedJaxpr's jaxpr), inner jaxprs (scan,
    checkpoint, custom_vjp, pjit) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "shard_map":
            found.append([v.aval for v in eqn.params["jaxpr"].invars])
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr or a Jaxpr
                if hasattr(inner, "eqns"):
                    shard_map_operands(inner, found)
    return found


def check_context_mesh() -> dict:
    """The model (2 layers of 4-bit linears with adapters) jitted once by its user and traced with and without a
    mesh set by JAX's own API (`jax.set_mesh`): what shard_maps the trace holds (a 4-bit matmul's: one operand of
    packed uint8 codes), each one's per-device row count, and the logits on the mesh vs one device."""
    model_config = _model_config()
    graphdef, lora, base = _split(model_config)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, HF["vocab_size"], (8, 16)), jnp.int32)

    @jax.jit
    def forward(lora, base, tokens):
        return nnx.merge(graphdef, lora, base)(tokens, options=OPTIONS)

    def matmuls(lora, base) -> list:
        operands = shard_map_operands(forward.trace(lora, base, tokens).jaxpr.jaxpr, [])
        return [ops for ops in operands if any(a.dtype == jnp.uint8 for a in ops)]

    reference = forward(lora, base, tokens)
    no_mesh = matmuls(lora, base)
    mesh = make_mesh(2, 4)
    lora = place(lora, param_shardings(lora, mesh))
    base = place(base, param_shardings(base, mesh))
    with jax.set_mesh(mesh):
        on_mesh = matmuls(lora, base)
        logits = forward(lora, base, tokens)
    out_of_mesh = matmuls(lora, base)  # the same jitted function, the mesh context left again
    # each matmul's largest uint8 operand: its packed codes (the others: absmax codes, 1 byte per 64 values)
    packed = {max(int(np.prod(a.shape)) for a in ops if a.dtype == jnp.uint8) for ops in on_mesh}
    return {
        "no_mesh_matmuls": len(no_mesh),
        "mesh_matmuls": len(on_mesh),
        "after_mesh_matmuls": len(out_of_mesh),
        "linears_per_layer": 7,
        "row_counts": sorted({int(ops[0].shape[0]) for ops in on_mesh}),
        "rows": int(tokens.shape[0]),
        # one layer's codes, whole on each device: q/o 512 x 512, k/v 256 x 512, gate/up/down 1024 x 512 (2 a byte)
        "packed_sizes": sorted(packed),
        "max_error": float(jnp.max(jnp.abs(logits - reference))),
        "logits_spec": str(logits.sharding.spec),
    }


def check_process_rows() -> dict:
    """Rows each of two (pretend) processes of 4 devices supplies, global_batch's round trip, and AdamW's state
    shardings (moments like their parameters, counts replicated)."""
    mesh = make_mesh(2, 4)
    sharding = step_shardings(mesh, *_split(_model_config(), abstract=True)[1:], optax.sgd(1.0)).batch
    shape = (2, 8, 16)
    indices = sharding.devices_indices_map(shape)
    rows = {}
    for process in (0, 1):
        mine = [index for device, index in indices.items() if device.id // 4 == process]
        span = local_rows(mine, 1, shape[1])
        rows[process] = [span.start, span.stop]
    batch = _batch()
    arrays = global_batch(batch, sharding)
    _, lora, base = _split(_model_config(), abstract=True)
    adam = step_shardings(mesh, lora, base, optax.adamw(1e-3)).state.opt_state
    opt_specs = sorted({str(s.spec) for s in jax.tree.leaves(adam)})
    round_trip = all(np.array_equal(np.asarray(arrays[f]), batch[f]) for f in BATCH_FIELDS)
    return {
        "rows": rows,
        "round_trip": round_trip,
        "spec": str(arrays["tokens"].sharding.spec),
        "adam_specs": opt_specs,
    }


def check_plan(out: Path) -> dict:
    """`plan_memory` on an fsdp=8 mesh: per-device stored parts, and its total beside XLA's for the full step."""
    from qlora_jax.train.build import abstract_model
    from qlora_jax.train.config import config_from_dict
    from qlora_jax.train.plan import plan_memory

    model_dir = out / "plan_model"
    model_dir.mkdir(exist_ok=True)
    hf = HF | {"num_hidden_layers": 6, "vocab_size": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    (model_dir / "config.json").write_text(json.dumps(hf))
    raw = {
        "model": {"path": str(model_dir), "dtype": "bfloat16"},
        "data": {"train": "unused", "max_length": 128},
        "lora": {"r": 8},
        "train": {"batch_size": 16, "remat": "full", "loss_chunk_size": 256},
        "mesh": {"fsdp": 8},
    }
    config = config_from_dict(raw)
    plan = plan_memory(config, compare=True)
    model = abstract_model(config)
    quantized = nnx.state(model, QuantizedWeight)
    offsets = sum(
        int(np.prod(x.shape)) * 4
        for p, x in jax.tree_util.tree_leaves_with_path(quantized)
        if "offset" in jax.tree_util.keystr(p)
    )
    total_quantized = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(quantized))
    lora = nnx.state(model, nnx.LoRAParam)
    return {
        "mesh": list(plan.mesh),
        "quantized": plan.quantized_weights,
        "quantized_total": total_quantized,
        "offsets": offsets,
        "adapters": plan.adapters,
        "adapters_total": sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(lora)),
        "batch": plan.batch,
        "device_total": plan.device_total,
        "compiled_total": plan.compiled.total,
        "table": plan.table(),
    }


def check_train(out: Path, model_dir: str) -> dict:
    """`train()` with a mesh section: 2 steps on data=2 x fsdp=4, evaluated, checkpointed, exported."""
    from qlora_jax.train.config import config_from_dict
    from qlora_jax.train.loop import train

    data = Path(__file__).resolve().parents[1] / "examples" / "data"
    raw = {
        "model": {"path": model_dir, "quant": "nf4", "dtype": "float32"},
        "data": {"train": str(data / "dates_train.jsonl"), "eval": str(data / "dates_eval.jsonl"), "max_length": 64},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1},
        "optim": {"learning_rate": 3e-3},
        # a fixed policy: remat: auto would plan each candidate on the mesh (check_plan plans on one) first
        "train": {
            "output_dir": str(out / "run"),
            "steps": 2,
            "batch_size": 8,
            "grad_accum": 1,
            "eval_batches": 1,
            "samples": ["March 5, 2021"],
            "remat": "full",
        },
        "mesh": {"data": 2, "fsdp": -1},
    }
    result = train(config_from_dict(raw), progress=False)
    return {
        "losses": result.train_losses,
        "eval_losses": result.eval_losses,
        "steps": result.steps,
        "files": sorted(p.name for p in result.output_dir.iterdir()),
    }


def main() -> None:
    if jax.device_count() != 8:
        raise SystemExit(
            f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), got {jax.device_count()}"
        )
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    timings, results = {}, {}
    checks = [
        ("equivalence", lambda: check_equivalence(out)),
        ("small_weights", check_small_weights_replicate),
        ("memory", check_memory),
        ("process_rows", check_process_rows),
        ("context_mesh", check_context_mesh),
        ("plan", lambda: check_plan(out)),
    ]
    if len(sys.argv) > 2:
        checks.append(("train", lambda: check_train(out, sys.argv[2])))
    for name, check in checks:
        started = time.perf_counter()
        results[name] = check()
        timings[name] = round(time.perf_counter() - started, 1)
    results["timings"] = timings
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
