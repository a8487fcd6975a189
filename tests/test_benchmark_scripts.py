"""The benchmark scripts still run (tiny shapes, CPU): a benchmark that rots is found here, not on a GPU."""

from __future__ import annotations

import json
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
