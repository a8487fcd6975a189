"""The `qlora-jax` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import qlora_jax


def _inspect(args: argparse.Namespace) -> int:
    """Lists the 4-bit weights of a safetensors file and what they cost."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from qlora_jax.convert import bnb

    path = Path(args.path)
    if not path.is_file():
        raise SystemExit(f"qlora-jax inspect: {path}: no such file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise SystemExit(f"qlora-jax inspect: {path}: not a readable safetensors file ({e})") from e
    try:
        quantized, rest = bnb.split_state_dict(tensors)
    except bnb.BnbFormatError as e:
        raise SystemExit(f"qlora-jax inspect: {path}: {e}") from e
    print(f"{path}: {len(quantized)} 4-bit weights, {len(rest)} other tensors")
    q_params = q_bytes = 0
    for key, qt in quantized.items():
        q_params += qt.size
        q_bytes += qt.nbytes
        print(
            f"  {key:60s} {qt.quant_type} {str(qt.shape):>14s} blocksize={qt.blocksize:<5d} "
            f"{'dq' if qt.double_quant else '  '} {qt.bits_per_param:.3f} bits/param"
        )
    other_params = sum(v.size for v in rest.values())
    other_bytes = sum(v.nbytes for v in rest.values())
    if q_params:
        print(f"4-bit: {q_params:,} params in {q_bytes:,} bytes ({8 * q_bytes / q_params:.3f} bits/param)")
    print(f"other: {other_params:,} params in {other_bytes:,} bytes")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-jax", description=qlora_jax.__doc__)
    parser.add_argument("--version", action="version", version=f"qlora-jax {qlora_jax.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = commands.add_parser("inspect", help="list the bitsandbytes 4-bit weights of a safetensors file")
    inspect.add_argument("path", help="a .safetensors file")
    inspect.set_defaults(run=_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
