"""`qlora-jax plan --target h100|h200`: the run's own training step, compiled by XLA:GPU for an H100/H200 on this
machine without a GPU, its memory per part, and the memory goals' mechanism (a budget, the longest row that fits,
the part that takes the memory) on a small model. Where jax's CUDA plugin is missing the compiling tests skip
with the reason, and the command says why in one line."""

from __future__ import annotations

import pytest

from qlora_jax import gpu_target
from qlora_jax.cli import main as cli_main
from qlora_jax.train.config import config_from_dict
from qlora_jax.train.plan import longest_row, memory_budget, plan_memory
from tests.families import config_only_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Only a config.json: planning reads nothing else."""
    return config_only_model(tmp_path_factory.mktemp("gpu_plan_model"))


def _config(model_dir, *, remat="full", length=512, batch=2, packing=False, offload=False, memory_budget=None):
    return config_from_dict(
        {
            "model": {"path": str(model_dir), "quant": "nf4", "dtype": "bfloat16"},
            "data": {"train": "unused.jsonl", "max_length": length, "packing": packing},
            "lora": {"r": 8, "target_modules": "all-linear"},
            "optim": {"offload": offload},
            "train": {"batch_size": batch, "remat": remat, "loss_chunk_size": 256, "memory_budget": memory_budget},
        }
    )


def _yaml(model_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{path: {model_dir}, dtype: bfloat16}}\ndata: {{train: x.jsonl, max_length: 256}}\n"
        "train: {remat: full}\n"
    )
    return config


def test_plan_for_a_target_without_the_plugin_says_why_in_one_line(model_dir, tmp_path, monkeypatch):
    reason = "jax's CUDA plugin is not installed: pip install --no-deps jax-cuda13-plugin==X jax-cuda13-pjrt==X"
    monkeypatch.setattr(gpu_target, "deviceless_unavailable_reason", lambda: reason)
    monkeypatch.delenv(gpu_target.SKIP_CHECK_ENV, raising=False)  # restored after the test; the command sets it
    config = _yaml(model_dir, tmp_path)
    with pytest.raises(SystemExit) as failure:
        cli_main(["plan", str(config), "--target", "h200"])
    assert str(failure.value) == f"qlora-jax plan: --target h200: cannot compile for a GPU on this machine: {reason}"
    with pytest.raises(SystemExit, match=r"--target: choose one of h100, h200, got 'a100'"):
        cli_main(["plan", str(config), "--target", "a100"])


def test_the_default_budget_of_a_target_is_what_jax_takes_of_its_memory(model_dir, monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    budget, source = memory_budget(_config(model_dir), target="h100")
    assert budget == int(gpu_target.load_target("h100").memory_bytes * 0.75 * 0.9)
    assert "NVIDIA H100 80GB HBM3" in source
    assert memory_budget(_config(model_dir, memory_budget="8GiB"), target="h100") == (8 * 2**30, "train.memory_budget")


@pytest.mark.deviceless
def test_plan_for_the_h200_is_xla_gpus_compile_of_the_run_step(model_dir, h200, tmp_path, capsys):
    plan = plan_memory(_config(model_dir, packing=True), compare=True, target=h200)
    assert plan.backend == h200 and plan.compiled_by == "XLA:GPU, NVIDIA H200 (deviceless)"
    assert abs(plan.device_total / plan.compiled.total - 1) < 0.15, plan.table()
    assert plan.saved_activations_per_layer > 0 and plan.working_set > 0
    cpu = plan_memory(_config(model_dir, packing=True))
    assert cpu.backend == "cpu" and cpu.stored == plan.stored  # the same parts; only the compiled figures differ
    assert cli_main(["plan", str(_yaml(model_dir, tmp_path)), "--target", h200, "--train.memory_budget", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "for NVIDIA H200 (GPU target h200, compiled here without it)" in out
    assert "activations and totals: XLA:GPU, NVIDIA H200 (deviceless) figures" in out
    assert "memory budget (train.memory_budget): fits 1.00 GiB" in out


@pytest.mark.deviceless
def test_memory_goal_mechanism_on_a_small_model(model_dir, h200):
    """What docs/benchmarks.md's memory goals run, at a small scale: a budget the step must fit, the longest row
    within it, and the part named when a step does not fit."""
    at_1k = plan_memory(_config(model_dir, length=1024, batch=1), target=h200)
    budget = at_1k.device_total + 1
    length, plan = longest_row(_config(model_dir), budget=budget, multiple=256, limit=4096, target=h200)
    assert length >= 1024 and plan.device_total <= budget and plan.backend == h200
    if length < 4096:
        over = plan_memory(_config(model_dir, length=length + 256, batch=1), target=h200)
        assert over.device_total > budget
        verdict = over.verdict(budget)
        assert verdict.startswith(f"does not fit {budget / 2**20:.2f} MiB") and "the largest parts: " in verdict
    assert plan.verdict(budget).startswith("fits")


@pytest.mark.deviceless
def test_offloaded_optimizer_state_stays_in_the_targets_host_memory(model_dir, h200):
    plan = plan_memory(_config(model_dir, offload=True), compare=True, target=h200)
    on_device = plan_memory(_config(model_dir), compare=True, target=h200)
    assert plan.optimizer_offloaded and plan.stored == on_device.stored - on_device.optimizer_state
    assert plan.compiled.arguments < on_device.compiled.arguments  # the moments are not device arguments


@pytest.mark.deviceless
def test_full_offload_keeps_the_layer_inputs_in_host_memory(model_dir, h200):
    """remat full_offload: what full saves (each layer's input) goes to the GPU's pinned host memory: XLA:GPU puts
    the scan's stacked layer inputs in host memory (S(5)) and the device saves exactly one input a layer.

    At 2 x 4096 tokens the device peak is in the layers' backward, where the saved inputs are live. (At 2 x 1024 on
    this tiny model it is not: the loss value's chunk loop, scheduled after the backward, holds a 32 MiB cuBLASLt
    workspace, a larger peak than the backward's with every saved input, so neither policy's device total grows
    with the inputs: each layer adds only a little more than its float32 adapter gradients, 77,824 bytes.)"""
    full = plan_memory(_config(model_dir, remat="full", length=4096), target=h200)
    offloaded = plan_memory(_config(model_dir, remat="full_offload", length=4096), target=h200)
    layer_input = 2 * 4096 * 128 * 2  # [2 rows, 4096 tokens, hidden 128] bfloat16
    assert full.host_activations == 0
    assert offloaded.host_activations == full.num_layers * layer_input
    assert offloaded.saved_activations_per_layer <= full.saved_activations_per_layer - layer_input
    # the device total drops by every layer's input (less one input's worth: room for the working sets to differ)
    assert full.device_total - offloaded.device_total >= (full.num_layers - 1) * layer_input


@pytest.mark.deviceless
def test_the_frozen_lm_heads_backward_keeps_no_float32_copy_of_it(h200):
    """XLA:GPU's program (cuBLAS dots, as the measured H200 compiled them): autodiff's backward of a bf16 frozen
    matmul converts the weight to float32 (2 GiB for Llama-3's lm_head); `nn.frozen_matmul` multiplies in bf16
    (the same products: tests/test_models.py)."""
    import jax
    import jax.numpy as jnp

    from qlora_jax.nn import frozen_matmul

    x = jax.ShapeDtypeStruct((512, 1024), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((8192, 1024), jnp.bfloat16)

    def plain(x, w):
        return jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(jnp.bfloat16)

    def loss(matmul):
        return jax.grad(lambda x, w: jnp.sum(matmul(x, jax.lax.stop_gradient(w)).astype(jnp.float32) ** 2))

    programs = {
        name: gpu_target.compile_for_target(
            loss(fn), x, w, target=h200, compiler_options=gpu_target.AS_TUNED_ON_GPU
        ).as_text()
        for name, fn in (("plain", plain), ("ours", frozen_matmul))
    }
    assert "f32[8192,1024]" in programs["plain"] or "f32[1024,8192]" in programs["plain"]
    assert "f32[8192,1024]" not in programs["ours"] and "f32[1024,8192]" not in programs["ours"]
