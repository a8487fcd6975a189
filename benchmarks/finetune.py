"""QLoRA (NF4 + double quant) vs LoRA on the dense base vs QLoRA with LoftQ init, on the demo task, over seeds.

    python benchmarks/finetune.py [--seeds 0 1 2] [--steps 16] [--json out.json] [--plot finetune.png]

Every run is `qlora-jax train examples/smollm2_dates.yaml` (same data, steps, batch, LoRA and optimizer) with only
the base's storage and the adapter init changed, and the seed (adapter init, dropout, data order) varied. Each
run is a fresh process with its own output directory under a temporary directory. Reported per method: the final
eval loss and the exact-match score on 50 held-out dates (mean and spread over the seeds), and the loss curves.
The demo computes in float32, so the dense base is float32. The paper's finding to check: QLoRA matches
LoRA on an unquantized base.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "smollm2_dates.yaml"
METHODS = {
    "QLoRA (NF4 + DQ)": ["--model.quant", "nf4"],
    "LoRA (dense base)": ["--model.quant", "none"],
    "QLoRA + LoftQ": ["--model.quant", "nf4", "--lora.init_lora_weights", "loftq"],
}


def run(method: str, seed: int, steps: int, directory: Path) -> dict:
    out = directory / f"{method.split()[0].lower()}-{len(method)}-seed{seed}"
    command = [
        sys.executable,
        "-m",
        "qlora_jax.cli",
        "train",
        "--no-progress",
        str(CONFIG),
        *METHODS[method],
        "--train.seed",
        str(seed),
        "--data.seed",
        str(seed),
        "--train.steps",
        str(steps),
        "--train.output_dir",
        str(out),
        "--train.samples",
        "[]",
        "--train.export_peft",
        "false",
        "--train.resume",
        "false",
    ]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{method}, seed {seed} failed:\n{result.stderr[-3000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "method": method,
        "seed": seed,
        "losses": [(m["step"], m["loss"]) for m in metrics if "loss" in m],
        "eval_loss": [m["eval_loss"] for m in metrics if "eval_loss" in m][-1],
        "exact_match_before": [m["eval_exact_match"] for m in metrics if "eval_exact_match" in m][0],
        "exact_match": [m["eval_exact_match"] for m in metrics if "eval_exact_match" in m][-1],
        "seconds": time.perf_counter() - started,
    }


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as directory:
        for method in args.methods:
            for seed in args.seeds:
                runs.append(run(method, seed, args.steps, Path(directory)))
                r = runs[-1]
                scores = f"exact match {r['exact_match_before']:.0%} -> {r['exact_match']:.0%}"
                print(
                    f"  {method}, seed {seed}: eval loss {r['eval_loss']:.4f}, {scores} ({r['seconds']:.0f} s)",
                    flush=True,
                )
    print(f"\n{args.steps} steps, seeds {args.seeds}; mean ± standard deviation over the seeds")
    print("| method | final eval loss | exact match (50 dates) |")
    print("|---|---|---|")
    for method in args.methods:
        mine = [r for r in runs if r["method"] == method]
        print(f"| {method} | {spread([r['eval_loss'] for r in mine])} | {spread([r['exact_match'] for r in mine])} |")
    if args.json:
        args.json.write_text(json.dumps({"steps": args.steps, "seeds": args.seeds, "runs": runs}, indent=2))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for i, method in enumerate(args.methods):
            for r in (r for r in runs if r["method"] == method):
                steps, losses = zip(*r["losses"], strict=True)
                ax.plot(steps, losses, color=f"C{i}", alpha=0.7, label=method if r["seed"] == args.seeds[0] else None)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title("SmolLM2-135M on the dates task: one line per seed")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
