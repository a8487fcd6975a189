"""Kernel choices shipped with the package, one table per GPU kind, and the tool that fills them from measurements.

`impl="auto"` consults, in order: the user's tuning cache (measured on this machine), the table shipped for this
GPU kind (`tables/H100.json`, `tables/H200.json`), and otherwise runs XLA. A table holds only measured entries:
a fused kernel appears in one only where a GPU run measured it faster than XLA at that key.

Filling a table from a GPU run (docs/kernels.md):

    python -m qlora_jax.kernels.tables H200 gpu-results/results.jsonl   # `benchmarks/gpu.py --out gpu-results`
    python -m qlora_jax.kernels.tables H200 ~/.cache/qlora_jax/autotune.json   # after `qlora-jax tune`

Each source is a tuning cache (JSON) or the JSON lines of `benchmarks/gpu.py` (its "choice" records); entries of
other GPU kinds are left out. The merged table is written in place (or to --table-dir) and the entries it changed
are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

from qlora_jax.kernels.autotune import Choice, TuningKey, read_entries, write_entries

__all__ = ["FAMILIES", "TABLE_DIR", "gpu_family", "lookup", "load_table", "collect", "main"]

FAMILIES = ("H200", "H100")  # matched in this order against the device kind ("NVIDIA H100 80GB HBM3", ...)
TABLE_DIR = Path(__file__).parent / "tables"


def gpu_family(device_kind: str) -> str | None:
    """The table a device kind uses ("H100" for "NVIDIA H100 80GB HBM3"), or None."""
    kind = device_kind.upper()
    return next((family for family in FAMILIES if family in kind), None)


@functools.cache
def load_table(family: str, table_dir: Path = TABLE_DIR) -> dict[str, Choice]:
    path = Path(table_dir) / f"{family}.json"
    return read_entries(path) if path.is_file() else {}


def table_key(key: TuningKey) -> TuningKey | None:
    family = gpu_family(key.device_kind)
    return None if family is None else dataclasses.replace(key, device_kind=family)


def lookup(key: TuningKey, table_dir: Path = TABLE_DIR) -> Choice | None:
    """The shipped choice for this key's GPU kind, or None."""
    shipped = table_key(key)
    return None if shipped is None else load_table(shipped.device_kind, Path(table_dir)).get(str(shipped))


def _read_source(path: Path) -> dict[str, Choice]:
    """Entries of a tuning cache (JSON object) or of gpu.py's JSON lines ({"kind": "choice", "key", "choice"})."""
    text = path.read_text()
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if not isinstance(whole, dict) or "kind" in whole:  # JSON lines (one line is also one JSON object)
        entries = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e})") from e
            if record.get("kind") == "choice":
                try:
                    TuningKey.parse(record["key"])
                    entries[record["key"]] = Choice.from_json(record["choice"])
                except (ValueError, TypeError, KeyError) as e:
                    raise ValueError(f"{path}:{number}: bad choice record ({e})") from e
        return entries
    return read_entries(path)


def collect(family: str, sources: list[Path]) -> dict[str, Choice]:
    """The measured entries of `sources` for GPU kind `family`, keyed for its table (later sources win)."""
    out = {}
    for source in sources:
        for text, choice in _read_source(Path(source)).items():
            key = table_key(TuningKey.parse(text))
            if key is None or key.device_kind != family or not choice.source.startswith("measured"):
                continue
            out[str(key)] = dataclasses.replace(choice, source=f"{choice.source} ({Path(source).name})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qlora_jax.kernels.tables",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("family", choices=FAMILIES, help="the GPU kind whose table to update")
    parser.add_argument("sources", nargs="+", type=Path, help="tuning caches (.json) or gpu.py results (.jsonl)")
    parser.add_argument("--table-dir", type=Path, default=TABLE_DIR)
    parser.add_argument("--dry-run", action="store_true", help="print the changes, write nothing")
    args = parser.parse_args(argv)
    try:
        new = collect(args.family, args.sources)
        path = args.table_dir / f"{args.family}.json"
        table = read_entries(path) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise SystemExit(f"qlora_jax.kernels.tables: {e}") from e
    if not new:
        names = ", ".join(map(str, args.sources))
        raise SystemExit(f"qlora_jax.kernels.tables: no measured {args.family} entries in {names}")
    for key, choice in sorted(new.items()):
        old = table.get(key)
        what = "pallas " + str(choice.config) if choice.impl == "pallas" else "xla"
        print(f"{'updated' if old else 'added'} {key}: {what}")
    if not args.dry_run:
        write_entries(path, table | new)
        load_table.cache_clear()
        print(f"wrote {path} ({len(table | new)} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
