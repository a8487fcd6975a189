"""Which GPU kernel configurations can run, and what each costs a GPU: registers, spills, programs per SM.

A configuration is *reachable* when something other than a caller's explicit `config=` can choose it:
`impl="auto"` (the XLA path's Pallas dequantization; the flash-attention kernel), the shipped tables
(`tables/*.json`), the tuner's candidate lists (`autotune.tuning_space`, `registry.DEQUANT_SPACE`) and
`impl="pallas"`'s defaults (`autotune.default_fused_config`, `FlashConfig.for_head_dim`). `reachable_cases()` lists
them as `KernelCase`s, each at a shape that exercises it; `case_resources(case)` compiles one with XLA:GPU for an
H100/H200 on this machine, without a GPU (`qlora_jax.gpu_target.compiled_kernels`: XLA's own Triton and ptxas),
and returns its Pallas kernels' registers, spills, shared memory and programs per SM. Any kernel configuration
works (a new kernel's config included): `KernelCase(op="forward", config=MyConfig(...), m=4)` compiles whatever
`dispatch.fused_fn` runs for it. A reachable configuration that spills is a defect, and
tests/test_kernel_resources.py fails on it.

    python -m qlora_jax.kernels.resources [--target h100|h200] [--dtype bfloat16]   # one line a kernel
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from qlora_jax import gpu_target
from qlora_jax.kernels import autotune, dispatch, registry, tables
from qlora_jax.kernels.decode import FMA_MAX_M, DecodeConfig
from qlora_jax.kernels.dequant import DequantConfig, dequantize_pallas
from qlora_jax.kernels.flash_attention import FlashConfig, flash_attention
from qlora_jax.quant import quantize

__all__ = ["OPS", "KernelCase", "case_function", "case_resources", "reachable_cases", "main"]

OPS = ("forward", "backward", "dequant", "attention")
# The 4-bit linear shapes (out, in) the candidates are listed for: Llama-3-8B's q/o, k/v, gate/up and down.
_SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))
# Attention heads (query heads, key/value heads, head_dim) of the families: Llama 3, SmolLM2/Qwen (64), Gemma (256).
_HEADS = ((32, 8, 128), (9, 3, 64), (8, 4, 256))


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelCase:
    """One kernel configuration at one shape, to compile.

    Attributes:
      op: "forward" (y = x W^T: the decode or tiled kernel, by the config's type), "backward" (dx = dy W), "dequant"
        or "attention" (the flash-attention forward and backward kernels).
      config: the kernel's configuration (MatmulConfig, DecodeConfig, DequantConfig, FlashConfig, or any config
        `dispatch.fused_fn` takes).
      m: rows of activations (matmuls), or the sequence length (attention).
      n, k: the weight's (out_features, in_features).
      dtype: the activations' dtype (and the weight's).
      quant_type, double_quant, blocksize: the 4-bit format.
      heads: attention's (query heads, key/value heads, head_dim); softcap: its logit soft-capping.
      reached_by: what can choose this configuration (for the report).
    """

    op: str
    config: Any
    m: int = 16
    n: int = 4096
    k: int = 4096
    dtype: str = "bfloat16"
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    heads: tuple[int, int, int] = (32, 8, 128)
    softcap: float | None = None
    reached_by: str = ""

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")

    def __str__(self) -> str:
        if self.op == "attention":
            h, hkv, d = self.heads
            cap = f", softcap {self.softcap:g}" if self.softcap else ""
            shape = f"T={self.m} heads {h}/{hkv} x {d}{cap}"
        elif self.op == "dequant":
            shape = f"{self.n}x{self.k}"
        else:
            shape = f"M={self.m} {self.n}x{self.k}"
        fmt = f"{self.quant_type}{'+dq' if self.double_quant else ''} bs{self.blocksize}"
        return f"{self.op} {self.config} at {shape} {self.dtype}" + ("" if self.op == "attention" else f" {fmt}")


def _weight(case: KernelCase) -> Any:
    w = jax.ShapeDtypeStruct((case.n, case.k), jnp.dtype(case.dtype))
    return jax.eval_shape(
        functools.partial(
            quantize, quant_type=case.quant_type, blocksize=case.blocksize, double_quant=case.double_quant
        ),
        w,
    )


def case_function(case: KernelCase) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """(function, abstract arguments) that run the case's kernel(s) once."""
    dtype = jnp.dtype(case.dtype)
    if case.op in ("forward", "backward"):
        rows = case.k if case.op == "forward" else case.n
        return dispatch.fused_fn(case.op, case.config, False), (
            jax.ShapeDtypeStruct((case.m, rows), dtype),
            _weight(case),
        )
    if case.op == "dequant":
        return functools.partial(dequantize_pallas, config=case.config), (_weight(case),)
    heads, kv_heads, head_dim = case.heads

    def attention(q, k, v, segments):
        def loss(q, k, v):
            out = flash_attention(
                q,
                k,
                v,
                scale=head_dim**-0.5,
                q_segments=segments,
                k_segments=segments,
                softcap=case.softcap,
                config=case.config,
            )
            return jnp.sum(out.astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    q = jax.ShapeDtypeStruct((1, case.m, heads, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((1, case.m, kv_heads, head_dim), dtype)
    return attention, (q, kv, kv, jax.ShapeDtypeStruct((1, case.m), jnp.int32))


def case_resources(
    case: KernelCase, *, target: str = gpu_target.DEFAULT_TARGET
) -> tuple[gpu_target.KernelResources, ...]:
    """The Pallas kernels of the case, compiled by XLA:GPU for `target` (an H100 by default), with their registers,
    spills, launch and programs per SM. Raises gpu_target.DevicelessUnavailable with the reason where this machine
    cannot compile for a GPU or has no ptxas."""
    fn, args = case_function(case)
    return tuple(k for k in gpu_target.compiled_kernels(fn, *args, target=target) if k.pallas)


def _matmul_cases(dtype: str, sm_count: int) -> dict[KernelCase, list[str]]:
    """forward/backward configurations the tuner can time, the tables hold, or impl="pallas" defaults to."""
    found: dict[tuple, tuple[KernelCase, list[str]]] = {}

    def add(op, config, m, n, k, why):
        # What a kernel's code depends on: its config, its op, the dtype and, for the decode kernel's multiply-add
        # path, the rows of x it unrolls (M <= FMA_MAX_M); not the shape (tiles are masked or padded), nor how many
        # programs split K (a grid dimension and a loop count) beyond whether K is split at all. Compiled once per
        # such key.
        rows = m if isinstance(config, DecodeConfig) and config.dot == "fma" else None
        split = getattr(config, "split_k", 1)
        key = (op, dataclasses.replace(config, split_k=min(split, 2)) if split > 1 else config, rows)
        if key not in found:
            found[key] = (KernelCase(op=op, config=config, m=m, n=n, k=k, dtype=dtype), [])
        if why not in found[key][1]:
            found[key][1].append(why)

    buckets = [1 << i for i in range(15)]  # the tuner's M buckets 1 .. 16384
    for n, k in _SHAPES:
        for op in autotune.OPS:
            for bucket in buckets:
                for config in autotune.tuning_space(op, bucket, n, k, 64):
                    fma = isinstance(config, DecodeConfig) and config.dot == "fma"
                    for m in range(1, min(bucket, FMA_MAX_M) + 1) if fma else (min(bucket, 2048),):
                        if fma and autotune.m_bucket(m) != bucket:
                            continue
                        add(op, config, m, n, k, "the tuner's candidates")
                for m in (bucket,) if bucket > FMA_MAX_M else range(1, bucket + 1):
                    if m > 2048:
                        continue
                    add(op, autotune.default_fused_config(op, m, n, k, 64, sm_count), m, n, k, 'impl="pallas" default')
    for family in tables.FAMILIES:
        for text, choice in tables.load_table(family).items():
            key = autotune.TuningKey.parse(text)
            for config in (choice.config, choice.fused_config):
                if config is not None and key.dtype == dtype:
                    add(key.op, config, min(key.m_bucket, 2048), key.n, key.k, f"the {family} table")
    return {case: why for case, why in found.values()}


def reachable_cases(dtype: str = "bfloat16", *, target: str = gpu_target.DEFAULT_TARGET) -> list[KernelCase]:
    """Every reachable kernel configuration (see the module docstring) for activations of `dtype`, each once at a
    shape that exercises it, with what can choose it in `reached_by`."""
    sm_count = gpu_target.device_facts(target).sm_count
    cases = [
        dataclasses.replace(case, reached_by=", ".join(why)) for case, why in _matmul_cases(dtype, sm_count).items()
    ]
    for config in dict.fromkeys((DequantConfig(), *registry.DEQUANT_SPACE)):
        why = 'impl="auto" (the XLA path on a GPU)' if config == DequantConfig() else "registry.DEQUANT_SPACE"
        for double_quant in (True, False):
            cases.append(
                KernelCase(op="dequant", config=config, dtype=dtype, double_quant=double_quant, reached_by=why)
            )
    for heads in _HEADS if jnp.dtype(dtype).itemsize == 2 else ():  # attention="auto" takes XLA for float32
        softcaps = (None, 50.0) if heads[2] == 256 else (None,)  # Gemma 2: head_dim 256 with soft-capping
        for softcap in softcaps:
            config = FlashConfig.for_head_dim(heads[2])
            cases.append(
                KernelCase(
                    op="attention",
                    config=config,
                    m=2048,
                    heads=heads,
                    softcap=softcap,
                    dtype=dtype,
                    reached_by='attention="auto" (packed rows)',
                )
            )
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qlora_jax.kernels.resources",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", choices=sorted(gpu_target.TARGETS), default=gpu_target.DEFAULT_TARGET)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--op", choices=OPS, default=None, help="only this kernel")
    args = parser.parse_args(argv)
    if reason := gpu_target.kernel_resources_unavailable_reason():
        raise SystemExit(f"qlora_jax.kernels.resources: {reason}")
    spilled = 0
    for case in reachable_cases(args.dtype, target=args.target):
        if args.op and case.op != args.op:
            continue
        print(f"{case}  [{case.reached_by}]", flush=True)
        for kernel in case_resources(case, target=args.target):
            spilled += kernel.spills
            print(f"    {kernel}", flush=True)
    print(f"{spilled} kernel(s) spill")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
