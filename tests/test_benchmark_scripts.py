"""The benchmark scripts still run (tiny shapes, CPU): a benchmark that rots is found here, not on a GPU."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_kernel_benchmark_smoke(tmp_path):
    out = tmp_path / "kernels.json"
    subprocess.run(
        [sys.executable, "benchmarks/kernels.py", "--smoke", "--interpret", "--repeats", "1", "--json", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=600,
    )
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"bf16 dot", "dequant+dot", "fused nf4", "auto"}
    assert all(r["time_us"] > 0 and r["speedup_vs_bf16"] > 0 for r in rows)


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
        [sys.executable, "benchmarks/cost.py", "--families", "mistral", "--remat", "full", "--compare",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    hidden, kv, mlp, layers, vocab = 4096, 1024, 14336, 32, 32768
    linear_in_out = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden)] + [(hidden, mlp)] * 3
    linear_params = layers * sum(i * o for i, o in linear_in_out)
    assert row["base_4bit"] * 8 / linear_params == pytest.approx(4.127, abs=5e-4)
    assert row["base_dense"] == (2 * vocab * hidden + (2 * layers + 1) * hidden) * 2  # embed, lm_head, norms; bf16
    assert row["adapters"] == layers * sum(16 * (i + o) for i, o in linear_in_out) * 4
    assert row["optimizer"] >= 2 * row["adapters"]
    assert 0 < row["device_total"] and abs(row["device_total"] / row["xla_full_step"] - 1) < 0.1
    assert "| Mistral-7B-v0.3 | full |" in result.stdout
