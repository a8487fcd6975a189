"""benchmarks/moe.py still runs (tiny shapes, CPU): a mixture-of-experts step, ours and transformers + PEFT's."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_moe_benchmark_smoke(tmp_path):
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        pytest.importorskip(name)
    out = tmp_path / "moe.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/moe.py", "--smoke", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    configs = data["configs"]
    assert set(configs) == {"ours-nf4", "ours-dense", "torch-dense", "torch-bnb"}
    for row in configs.values():
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("first_loss", "median_s", "tokens_per_s")), row
    # the same float32 weights and adapters starting at B = 0: the dense first losses agree across frameworks
    assert configs["ours-dense"]["first_loss"] == pytest.approx(configs["torch-dense"]["first_loss"], rel=1e-5)
    assert data["ours-nf4 / torch-bnb"] > 0
