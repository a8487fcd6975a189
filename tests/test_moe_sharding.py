"""Expert parallelism: a mixture of experts' experts split by expert over the mesh's fsdp axis and computed where
they are; one training step (loss with the load-balancing loss, every adapter's gradient) equal to one device's.
The 8-device checks run in a subprocess (tests/moe_sharding_checks.py) with simulated CPU devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from qlora_jax.parallel.mesh import make_mesh
from qlora_jax.sharding import param_shardings

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_sharding")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    subprocess.run(
        [sys.executable, str(HERE / "moe_sharding_checks.py"), str(out)],
        check=True,
        env=env,
        cwd=HERE.parent,
        timeout=1800,
    )
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_expert_parallel_step_equals_one_device(results):
    assert results["devices"] == 8
    for name, mesh in results["meshes"].items():
        assert abs(mesh["loss"] - results["loss"]) < 1e-5, name
        assert mesh["grad_error"] < 1e-5 * results["grad_scale"], name


@pytest.mark.slow
def test_each_device_holds_its_own_experts(results):
    for name, devices in (("ep8", 8), ("data2_ep4", 4)):
        mesh = results["meshes"][name]
        assert mesh["packed_spec"] == "P(None, 'fsdp', None, None)" and mesh["lora_spec"] == mesh["packed_spec"]
        assert mesh["packed_shard_shape"][1] == 8 // devices  # experts a device holds: [layers, experts, parts, ..]
    assert results["meshes"]["fsdp8"]["packed_shard_shape"][1] == 8  # FSDP: blocks split (or whole), not experts


@pytest.mark.slow
def test_under_a_users_mesh_the_option_alone_chooses_expert_parallelism(results):
    """`jax.set_mesh` gives the mesh, `ComputeOptions.expert_parallel` the choice: no state of qlora_jax's own."""
    ep, gathered = results["users_mesh"]["expert_parallel"], results["users_mesh"]["not"]
    assert ep["expert_shard_maps"] == 1 and ep["local_experts"] == [8 // 4]  # one MoE block in the layer scan
    assert gathered["expert_shard_maps"] == 0
    assert ep["error"] < 1e-5 and gathered["error"] < 1e-5


def test_the_rule_finds_the_expert_axis_and_refuses_what_does_not_divide():
    from qlora_jax.sharding import _expert_axis

    experts = ("model", "layers", "mlp", "experts", "down_proj")
    assert _expert_axis((*experts, "packed"), (2, 8, 1, 512), 4) == 1  # [layers, experts, parts, bytes]
    assert _expert_axis((*experts, "lora", "lora_B"), (2, 8, 64, 4), 4) == 1
    assert _expert_axis((*experts, "lora", "scaling"), (2,), 4) is None  # per layer: replicated
    assert _expert_axis(("model", "layers", "mlp", "gate", "weight"), (2, 8, 64), 4) is None  # the router
    with pytest.raises(ValueError, match=r"6 experts \(model\.layers\.mlp\.experts\.down_proj\.packed\) do not"):
        _expert_axis((*experts, "packed"), (2, 6, 1, 8), 4)
    tree = {
        "model": {
            "layers": {"mlp": {"experts": {"down_proj": {"packed": jax.ShapeDtypeStruct((2, 6, 1, 8), "uint8")}}}}
        }
    }
    assert param_shardings(tree, make_mesh(1, 1), expert_parallel=True)  # one device: nothing to split
