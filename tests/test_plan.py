"""`qlora-jax plan`: exact byte counts for the stored parts, a total within 15% of XLA's compiled analysis of the
full training step (the activations are extrapolated from 2- and 4-layer compiles), and `remat: auto` taking the
cheapest checkpointing policy whose plan fits the memory budget."""

from __future__ import annotations

import pytest

from qlora_jax.cli import main as cli_main
from qlora_jax.train.config import config_from_dict
from qlora_jax.train.plan import REMAT_ORDER, choose_remat, longest_row, memory_budget, plan_memory
from tests.families import config_only_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Only a config.json: planning reads nothing else."""
    return config_only_model(tmp_path_factory.mktemp("plan_model"))


def _config(model_dir, *, remat="none", offload=False, length=256, batch=4, accum=1, quant="nf4", memory_budget=None):
    return config_from_dict(
        {
            "model": {"path": str(model_dir), "quant": quant, "dtype": "bfloat16"},
            "data": {"train": "unused.jsonl", "max_length": length},
            "lora": {"r": 8, "target_modules": "all-linear"},
            "optim": {"offload": offload},
            "train": {
                "batch_size": batch,
                "grad_accum": accum,
                "remat": remat,
                "loss_chunk_size": 256,
                "memory_budget": memory_budget,
            },
        }
    )


@pytest.mark.parametrize(
    "options",
    [
        {"remat": "none"},
        {"remat": "full", "length": 512, "batch": 2, "offload": True},
        {"remat": "save_dots", "accum": 2, "quant": "none"},
    ],
    ids=["none", "full-long-offloaded-optimizer", "save_dots-accum-dense-base"],
)
def test_plan_is_within_15_percent_of_the_compiled_step(model_dir, options):
    plan = plan_memory(_config(model_dir, **options), compare=True)
    assert plan.compiled is not None
    assert abs(plan.device_total / plan.compiled.total - 1) < 0.15, plan.table()
    assert plan.saved_activations_per_layer > 0 and plan.working_set > 0


def test_stored_parts_are_counted_exactly(model_dir):
    plan = plan_memory(_config(model_dir))
    layers, d, inner, kv = 8, 128, 384, 64
    # LoRA r=8 on q, k, v, o, gate, up, down: r * (in + out) float32 values each
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, inner), (d, inner), (inner, d)]
    lora_params = layers * sum(8 * (i + o) for i, o in shapes)
    assert plan.adapters == 4 * lora_params
    assert 0 < plan.optimizer_state - 2 * plan.adapters <= 16  # AdamW's two moments + int32 step counts
    linear_params = layers * sum(i * o for i, o in shapes)
    # NF4 + double quantization: 4 bits a weight, one 8-bit absmax per 64, one float32 per 256 absmax, the offset
    assert plan.quantized_weights == pytest.approx(linear_params * 4.127 / 8, rel=2e-3)
    norms = (2 * layers + 1) * d * 2
    # bf16 embeddings and lm_head (untied), norms, and each adapter's per-layer scaling (float32, docs/lora.md)
    assert plan.dense_weights == 2 * (2 * 2048 * d) + norms + 7 * layers * 4
    assert plan.batch == 4 * 4 * 256 * 4
    assert plan.logits_chunk == 256 * 2048 * 4


def test_cli_plan_prints_every_component(model_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{path: {model_dir}, dtype: bfloat16}}\ndata: {{train: x.jsonl, max_length: 128}}\n")
    assert cli_main(["plan", str(config), "--train.remat", "full"]) == 0
    out = capsys.readouterr().out
    for part in (
        "4-bit",
        "LoRA adapters",
        "optimizer state",
        "saved activations (8 layers",
        "logits chunk",
        "device total (estimate)",
    ):
        assert part in out, part
    with pytest.raises(SystemExit, match="train.remat"):
        cli_main(["plan", str(config), "--train.remat", "sometimes"])
    missing = tmp_path / "missing.yaml"
    missing.write_text("model: {path: /nonexistent/model}\ndata: {train: x.jsonl}\n")
    with pytest.raises(SystemExit, match="/nonexistent/model"):
        cli_main(["plan", str(missing)])


def test_remat_auto_takes_the_cheapest_policy_that_fits(model_dir):
    sizes = dict(length=512, batch=4)
    totals = {p: plan_memory(_config(model_dir, remat=p, **sizes)).device_total for p in ("none", "save_dots", "full")}
    assert totals["none"] > totals["save_dots"] >= totals["full"], totals
    auto = _config(model_dir, remat="auto", **sizes)
    for budget in (totals["none"], totals["save_dots"], totals["full"] + 1):
        choice, plan = choose_remat(auto, budget=budget)
        expected = next(p for p in REMAT_ORDER if p in totals and totals[p] <= budget)
        assert choice.policy == plan.remat == expected and choice.fits
        assert plan.device_total == totals[expected]
        if expected == "full":  # reached past offload, which is no candidate on CPU (the host is the device)
            assert "offload" in choice.skipped
        assert f"remat: auto -> {expected}" in plan.table()
    choice, plan = choose_remat(auto, budget=totals["full"] // 2)
    assert choice.policy == "full" and not choice.fits and "offload" in choice.skipped
    assert "no policy fits" in choice.explain()


def test_memory_budget_is_the_configured_one_or_most_of_the_free_memory(model_dir):
    assert memory_budget(_config(model_dir, remat="auto", memory_budget="3 GiB")) == (3 * 2**30, "train.memory_budget")
    budget, source = memory_budget(_config(model_dir, remat="auto"))
    assert "90%" in source and budget > 0


def test_cli_plan_explains_remat_auto(model_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{path: {model_dir}, dtype: bfloat16}}\ndata: {{train: x.jsonl, max_length: 128}}\n")
    assert cli_main(["plan", str(config), "--train.memory_budget", "64GiB"]) == 0  # remat: auto is the default
    out = capsys.readouterr().out
    assert "remat=none" in out and "remat: auto -> none; budget 64.00 GiB (train.memory_budget)" in out


def test_longest_row_is_the_longest_that_fits(model_dir):
    def total(length):
        return plan_memory(_config(model_dir, remat="full", length=length, batch=1)).device_total

    budget = total(2048)
    length, plan = longest_row(_config(model_dir, remat="auto", batch=4), budget=budget, multiple=1024, limit=8192)
    assert length >= 2048 and plan.device_total <= budget and plan.remat == "full"
    assert length == 8192 or total(length + 1024) > budget  # (planned during the search: compiled once)
    assert longest_row(_config(model_dir), budget=1, multiple=1024) == (0, None)
