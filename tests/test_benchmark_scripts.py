"""The benchmark scripts still run (tiny shapes, CPU): a benchmark that rots is found here, not on a GPU."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_smoke(tmp_path):
    """benchmarks/gpu.py --smoke: every section in its own process (tiny shapes, CPU, Pallas interpreter) writes its
    records, the report and the table tool's input; a GPU run takes the same code paths at full size."""
    out = tmp_path / "gpu"
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads((out / "results.json").read_text())
    sections = {r["name"].split(" ")[0]: r for r in records if r["kind"] == "section"}
    assert set(sections) == {"correct", "kernels", "large", "ladder", "decode", "ckpt", "train", "torch", "moe"}
    assert all(r["status"] == "ok" for r in sections.values()), sections
    correct = [r for r in records if r["kind"] == "correct"]
    assert correct and all(r["ok"] for r in correct), [r for r in correct if not r["ok"]]
    timings = [r for r in records if r["kind"] == "timing"]
    assert all(r.get("time_us", 0) > 0 for r in timings), [r for r in timings if "error" in r]
    # every timed call reads its own weight, the bf16 baseline's included (none re-read from L2)
    assert all(r["copies"] == r["distinct_weights"] for r in timings), [r for r in timings if r["copies"] > 2]
    impls = {r["impl"] for r in timings}
    assert {"bf16 dot", "dequant+dot", "auto"} <= impls and any(i.startswith("fused DecodeConfig") for i in impls)
    assert {r["mode"] for r in timings} == {"unrolled", "scan"} and {r["phase"] for r in timings} == {"fwd", "fwd+bwd"}
    assert len([r for r in timings if r.get("ladder")]) == 5  # every rung
    choices = [r for r in records if r["kind"] == "choice"]
    assert choices and all(r["choice"]["source"].startswith("measured") for r in choices)
    (decode,) = [r for r in records if r["kind"] == "decode" and r["impl"] == "pallas"]
    assert decode["tokens_per_s"] > 0 and decode["prefill_s"] > 0 and decode["decode_s"] > 0  # timed apart
    decodes = [(r["base"], r["impl"]) for r in records if r["kind"] == "decode"]
    assert decodes[0] == ("nf4", "pallas")  # the decode kernel's row first: a cut takes the baselines' repeats
    (train,) = [r for r in records if r["kind"] == "train"]
    assert train["tokens_per_s"] > 0 and math.isfinite(train["first_loss"]) and train["load_s"] > 0
    (moe,) = [r for r in records if r["kind"] == "moe"]
    assert moe["tokens_per_s"] > 0 and math.isfinite(moe["first_loss"]) and moe["base_4bit_GiB"] > 0
    report = (out / "report.md").read_text()
    assert "## Kernels" in report and "## QLoRA step" in report and "## Decode" in report


def _gpu_module():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    return gpu


def test_gpu_benchmark_budget_is_shared_by_the_sections_that_run():
    gpu = _gpu_module()
    jobs = gpu.section_jobs(["kernels", "train"], ["base=nf4", "base=bf16"], 300)
    assert [(name, extra) for name, extra, _ in jobs] == [
        ("kernels", []),
        ("train", ["--row", "base=nf4"]),
        ("train", ["--row", "base=bf16"]),
    ]
    assert sum(limit for _, _, limit in jobs) == pytest.approx(300, abs=3)  # not a slice of all eight sections'
    shares = dict(gpu.SECTIONS)
    assert jobs[0][2] == int(300 * shares["kernels"] / (shares["kernels"] + shares["train"]))
    everything = gpu.section_jobs([name for name, _ in gpu.SECTIONS], ["base=nf4"], 465)
    order = [name for name, _, _ in everything]
    assert order == [name for name, _ in gpu.SECTIONS] and order.index("ckpt") < order.index("train")
    assert order[:2] == ["correct", "kernels"]  # what the run is for comes first; variations last


def test_gpu_benchmark_checks_each_kernel_before_the_variations():
    order = _gpu_module().correct_order(
        [("forward", 1), ("forward", 7), ("backward", 300)], [("nf4", True), ("fp4", False)], ["bfloat16", "float32"]
    )
    assert order[:3] == [
        ("forward", 1, ("nf4", True), "bfloat16"),
        ("forward", 7, ("nf4", True), "bfloat16"),
        ("backward", 300, ("nf4", True), "bfloat16"),
    ]
    assert len(order) == len(set(order)) == 3 * 2 * 2


def test_gpu_benchmark_writes_its_checkpoint_to_host_memory(tmp_path):
    gpu = _gpu_module()
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        assert gpu.scratch_root(need=1) == str(shm)  # the 16 GB checkpoint goes to RAM, not the GPU box's disk
    assert gpu.scratch_root(need=2**62) is None  # no room: the system's temporary directory


def test_gpu_benchmark_train_rows_pass_compute_options_through():
    gpu = _gpu_module()
    row = gpu.parse_row("base=bf16,batch=1,length=8192,remat=save_dots,attention_block=1024,kernels.impl=xla")
    assert (row["base"], row["batch"], row["length"]) == ("bf16", 1, 8192)
    assert row["compute"] == {"remat": "save_dots", "attention_block": 1024} and row["kernels"] == {"impl": "xla"}
    assert (row["packed"], row["dropout_rng"]) == (False, "threefry2x32")  # one example a row, as torch trains
    row = gpu.parse_row("packed=true,dropout_rng=rbg,attention=cudnn")
    assert (row["packed"], row["dropout_rng"], row["compute"]) == (True, "rbg", {"attention": "cudnn"})
    with pytest.raises(ValueError, match="dropout_rng must be one of"):
        gpu.parse_row("dropout_rng=mt19937")
    with pytest.raises(ValueError, match="unknown key 'flash'"):
        gpu.parse_row("base=nf4,flash=true")
    with pytest.raises(ValueError, match="remat policy"):
        gpu.parse_row("remat=sometimes")


@pytest.mark.slow
def test_train_benchmark_smoke(tmp_path):
    """All four rows (ours NF4/dense, torch bitsandbytes NF4/dense) on a tiny random model, with finite numbers;
    the torch rows only where torch, transformers, peft and bitsandbytes are installed."""
    configs = ["ours-nf4", "ours-dense"]
    if all(importlib.util.find_spec(name) for name in ("torch", "transformers", "peft", "bitsandbytes")):
        configs += ["torch-bnb-nf4", "torch-dense"]
    out = tmp_path / "train.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/train.py", "--smoke", "--configs", ",".join(configs), "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["config"]: r for r in data["rows"]}
    assert list(rows) == configs
    for name in configs:
        assert f"| {name} |" in result.stdout
        r = rows[name]
        assert "error" not in r, r
        numbers = [r["first_loss"], r["median_s"], r["min_s"], r["tokens_per_s"], r["rss_load"], r["peak_rss"]]
        assert all(math.isfinite(x) and x > 0 for x in numbers), r
        assert len(r["step_s"]) == data["settings"]["steps"]
        assert r["trainable_params"] == rows["ours-nf4"]["trainable_params"]
    # Identical weights, adapters starting at B = 0: the first losses agree across frameworks.
    if "torch-dense" in rows:
        assert rows["torch-dense"]["first_loss"] == pytest.approx(rows["ours-dense"]["first_loss"], rel=1e-4)
        assert rows["torch-bnb-nf4"]["first_loss"] == pytest.approx(rows["ours-nf4"]["first_loss"], rel=1e-3)


@pytest.mark.slow
def test_cost_benchmark_counts_the_stored_bytes(tmp_path):
    """Mistral-7B's row: its 4-bit base costs exactly NF4 + double quant's 4.127 bits per linear weight, LoRA r=16
    on all linears is counted in float32 with two AdamW moments, and XLA's full-step figure is beside the plan."""
    out = tmp_path / "cost.json"
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/cost.py",
            "--families",
            "mistral",
            "--remat",
            "full",
            "--compare",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    hidden, kv, mlp, layers, vocab = 4096, 1024, 14336, 32, 32768
    linear_in_out = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden)] + [(hidden, mlp)] * 3
    linear_params = layers * sum(i * o for i, o in linear_in_out)
    assert row["base_4bit"] * 8 / linear_params == pytest.approx(4.127, abs=5e-4)
    # embed, lm_head, norms in bf16; the adapters' per-layer scalings (float32, frozen) are stored beside them
    assert row["base_dense"] == (2 * vocab * hidden + (2 * layers + 1) * hidden) * 2 + len(linear_in_out) * layers * 4
    assert row["adapters"] == layers * sum(16 * (i + o) for i, o in linear_in_out) * 4
    assert row["optimizer"] >= 2 * row["adapters"]
    assert 0 < row["device_total"] and abs(row["device_total"] / row["xla_full_step"] - 1) < 0.1
    assert "| Mistral-7B-v0.3 | full |" in result.stdout
