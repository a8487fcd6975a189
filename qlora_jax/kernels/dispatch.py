"""`nf4_matmul`: y = x @ dequantize(W).T, differentiable in x, with the kernel chosen per shape and device.

impl:
  "auto"      fused Pallas kernels on GPU where measured (or, untuned, expected) faster, else "xla"
  "pallas"    the fused kernels (an error if the weight's layout does not allow them)
  "xla"       dequantize (a Pallas kernel on GPU), then one XLA dot; what runs on CPU
  "reference" dequantize to float32 and multiply at full precision (for tests)

The backward pass computes only dx = dy @ dequantize(W), recomputing the dequantization (or reading the packed
weight in the fused kernel) instead of keeping a 16-bit copy of W alive between the passes; the weight itself gets
zero cotangents. The choice is a `KernelOptions` value passed to each call (models take it in `ComputeOptions`):
a frozen, hashable value that is part of what jit compiles, so changing it recompiles; nothing is read from global
or thread-local state while tracing.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from qlora_jax.kernels import autotune, common
from qlora_jax.kernels.dequant import dequant_unsupported_reason, dequantize_pallas
from qlora_jax.kernels.matmul import (
    MatmulConfig,
    matmul_pallas,
    matmul_reference,
    matmul_transposed_pallas,
)
from qlora_jax.quant import QuantizedTensor, dequantize

__all__ = ["IMPLS", "KernelOptions", "nf4_matmul", "dequantize_auto", "plan_for"]

IMPLS = ("auto", "pallas", "xla", "reference")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelOptions:
    """How 4-bit matmuls are computed; a static value (hashable), so a jitted function compiled for one value is
    never reused for another.

    Attributes:
      impl: "auto" | "pallas" | "xla" | "reference" (see the module docstring).
      interpret: run the Pallas kernels in Pallas' interpreter (any platform; for tests).
      autotune: on GPU, time the candidates of a shape the tuning cache lacks (at trace time, once per shape).
      cache: the tuning cache to read and write (default: `autotune.TuningCache()` at its default path).

    Raises ValueError for an unknown impl.
    """

    impl: str = "auto"
    interpret: bool = False
    autotune: bool = True
    cache: autotune.TuningCache | None = None

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What runs for one (shape, weight layout): static, so it can key jit caches."""

    forward: str  # "pallas" | "xla" | "reference"
    forward_config: MatmulConfig | None
    backward: str
    backward_config: MatmulConfig | None
    dequant: str  # how the "xla" path dequantizes: "pallas" | "xla"
    interpret: bool


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _device() -> tuple[str, int]:
    """The default device's kind and its number of cores (SMs on a GPU)."""
    device = jax.devices()[0]
    return device.device_kind, getattr(device, "core_count", 132)


def _tuning_key(op: str, m: int, qt: QuantizedTensor, dtype: Any) -> autotune.TuningKey:
    n, k = qt.shape
    device_kind = _device()[0]
    return autotune.TuningKey(
        op, device_kind, autotune.m_bucket(m), n, k, jnp.dtype(dtype).name, qt.quant_type, qt.blocksize,
        qt.double_quant,
    )  # fmt: skip


def _measure(op: str, m: int, qt: QuantizedTensor, dtype: Any, options: KernelOptions) -> autotune.Choice:
    """Times XLA and every fused config for this shape in a worker thread (outside any trace), and caches it."""
    n, k = qt.shape
    key = _tuning_key(op, m, qt, dtype)
    interpret = options.interpret

    def run() -> autotune.Choice:
        x, dy, weight = autotune.synthetic_inputs(
            key.m_bucket, n, k, dtype, quant_type=qt.quant_type, blocksize=qt.blocksize,
            double_quant=qt.double_quant,
        )  # fmt: skip
        configs = {f"pallas:{c}": c for c in autotune.tuning_space(op, key.m_bucket, n, k, qt.blocksize)}
        if op == "forward":
            fused, baseline, activations = matmul_pallas, _xla_forward, x
        else:
            fused, baseline, activations = matmul_transposed_pallas, _xla_backward, dy
        baseline = jax.jit(functools.partial(baseline, dequant="pallas", interpret=interpret))
        candidates = {"xla": functools.partial(baseline, activations, weight)}
        for name, config in configs.items():
            candidates[name] = functools.partial(fused, activations, weight, config=config, interpret=interpret)
        return autotune.tune(key, candidates, cache=options.cache or autotune.TuningCache(), configs=configs)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # JAX's trace state is thread-local
        return pool.submit(run).result()


def _choose(op: str, m: int, qt: QuantizedTensor, dtype: Any, options: KernelOptions) -> autotune.Choice:
    """The measured choice for this shape (measured now if missing and autotuning is on), else the default."""
    n, k = qt.shape
    on_gpu = _on_gpu()
    if on_gpu:
        cache = options.cache or autotune.TuningCache()
        if (choice := cache.get(_tuning_key(op, m, qt, dtype))) is not None:
            return choice
        if options.autotune:
            return _measure(op, m, qt, dtype, options)
    return autotune.default_choice(op, m, n, k, qt.blocksize, _device()[1] if on_gpu else 132)


def plan_for(
    m: int, qt: QuantizedTensor, dtype: Any, *, impl: str, config: MatmulConfig | None, options: KernelOptions
) -> Plan:
    """The kernels one call runs: a static decision made while tracing."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    interpret = options.interpret
    dequant = "pallas" if (_on_gpu() or interpret) and not dequant_unsupported_reason(qt) else "xla"
    if impl in ("reference", "xla"):
        return Plan(impl, None, impl, None, dequant, interpret)
    if reason := common.fused_unsupported_reason(qt):
        if impl == "pallas":
            raise ValueError(f"nf4_matmul(impl='pallas'): {reason}; use impl='auto' or 'xla'")
        return Plan("xla", None, "xla", None, dequant, interpret)
    forward, backward = _choose("forward", m, qt, dtype, options), _choose("backward", m, qt, dtype, options)
    if impl == "pallas":  # fused both ways, with the best measured (or default) tiles
        return Plan("pallas", config or forward.fused_config, "pallas", backward.fused_config, dequant, interpret)
    if not _on_gpu() and not interpret:
        return Plan("xla", None, "xla", None, dequant, interpret)
    return Plan(forward.impl, config or forward.config, backward.impl, backward.config, dequant, interpret)


def _fold_batch_into_m(fn: Callable[[jax.Array, QuantizedTensor], jax.Array]):
    """Wraps a 2D kernel call so that vmap folds a batch of activations into M (one launch), and maps over a
    batch of weights (stacked layers) with lax.map."""

    @jax.custom_batching.custom_vmap
    def wrapped(a: jax.Array, qt: QuantizedTensor) -> jax.Array:
        return fn(a, qt)

    @wrapped.def_vmap
    def _rule(axis_size, in_batched, a, qt):
        a_batched, qt_batched = in_batched
        if not any(jax.tree.leaves(qt_batched)):
            out = wrapped(a.reshape(axis_size * a.shape[1], a.shape[2]), qt)
            return out.reshape(axis_size, a.shape[1], out.shape[-1]), True
        a = a if a_batched else jnp.broadcast_to(a, (axis_size, *a.shape))
        qt = jax.tree.map(
            lambda leaf, batched: leaf if batched else jnp.broadcast_to(leaf, (axis_size, *jnp.shape(leaf))),
            qt,
            qt_batched,
        )
        return jax.lax.map(lambda args: wrapped(*args), (a, qt)), True

    return wrapped


@functools.cache
def _fused_forward(config: MatmulConfig, interpret: bool):
    return _fold_batch_into_m(functools.partial(matmul_pallas, config=config, interpret=interpret))


@functools.cache
def _fused_backward(config: MatmulConfig, interpret: bool):
    return _fold_batch_into_m(functools.partial(matmul_transposed_pallas, config=config, interpret=interpret))


@functools.cache
def _pallas_dequantizer(dtype: Any, interpret: bool):
    @jax.custom_batching.custom_vmap
    def fn(qt: QuantizedTensor) -> jax.Array:
        return dequantize_pallas(qt, dtype, interpret=interpret)

    @fn.def_vmap
    def _rule(axis_size, in_batched, qt):
        (qt_batched,) = in_batched
        qt = jax.tree.map(
            lambda leaf, b: leaf if b else jnp.broadcast_to(leaf, (axis_size, *jnp.shape(leaf))), qt, qt_batched
        )
        return jax.lax.map(fn, qt), True

    return fn


def dequantize_auto(qt: QuantizedTensor, dtype: Any = None, *, interpret: bool = False) -> jax.Array:
    """`dequantize`, by the Pallas kernel on GPU (or in the interpreter) when the layout allows, else by XLA."""
    dtype = jnp.dtype(qt.dtype if dtype is None else dtype)
    if (_on_gpu() or interpret) and not dequant_unsupported_reason(qt):
        return _pallas_dequantizer(dtype, interpret)(qt)
    return dequantize(qt, dtype)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=common.dot_precision(a.dtype))


def _xla_weight(qt: QuantizedTensor, dtype: Any, dequant: str, interpret: bool = False) -> jax.Array:
    if dequant == "pallas":
        return _pallas_dequantizer(jnp.dtype(dtype), interpret)(qt)
    return dequantize(qt, dtype)


def _xla_forward(x: jax.Array, qt: QuantizedTensor, dequant: str, interpret: bool = False) -> jax.Array:
    return _dot(x, _xla_weight(qt, x.dtype, dequant, interpret).T).astype(x.dtype)


def _xla_backward(dy: jax.Array, qt: QuantizedTensor, dequant: str, interpret: bool = False) -> jax.Array:
    return _dot(dy, _xla_weight(qt, dy.dtype, dequant, interpret)).astype(dy.dtype)


def _forward(x: jax.Array, qt: QuantizedTensor, plan: Plan) -> jax.Array:
    if plan.forward == "pallas":
        return _fused_forward(plan.forward_config, plan.interpret)(x, qt)
    return _xla_forward(x, qt, plan.dequant, plan.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x: jax.Array, qt: QuantizedTensor, plan: Plan) -> jax.Array:
    return _forward(x, qt, plan)


def _matmul_fwd(x, qt, plan):
    return _forward(x, qt, plan), qt  # the packed weight is the only residual


def _matmul_bwd(plan, qt, dy):
    if plan.backward == "pallas":
        dx = _fused_backward(plan.backward_config, plan.interpret)(dy, qt)
    else:
        dx = _xla_backward(dy, qt, plan.dequant, plan.interpret)
    return dx, common.zero_cotangents(qt)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def nf4_matmul(
    x: jax.Array,
    qt: QuantizedTensor,
    *,
    options: KernelOptions = KernelOptions(),
    impl: str | None = None,
    config: MatmulConfig | None = None,
) -> jax.Array:
    """y = x @ dequantize(qt).T for a weight qt of shape (out_features, in_features), in PyTorch's layout.

    Args:
      x: [..., in_features], float32, bfloat16 or float16.
      qt: the 4-bit weight (any quant type, with or without double quantization).
      options: the kernel choice (`KernelOptions`; default: impl "auto").
      impl: overrides `options.impl` for this call: "auto" | "pallas" | "xla" | "reference".
      config: tile sizes for the fused forward kernel (impl="pallas"); autotuned or defaulted otherwise.

    Returns [..., out_features] in x's dtype, accumulated in float32. Differentiable in x (jit, vmap, scan and
    jax.checkpoint compose with it); the weight receives zero cotangents. Raises ValueError for a weight that is not
    2D or does not match x, or an unknown impl; TypeError for another x dtype.
    """
    impl = options.impl if impl is None else impl
    if len(qt.shape) != 2:
        raise ValueError(f"nf4_matmul needs a 2D weight (out_features, in_features), got shape {qt.shape}")
    n, k = qt.shape
    if x.shape[-1] != k:
        raise ValueError(f"x.shape[-1]={x.shape[-1]} must equal the weight's in_features={k} (weight {qt.shape})")
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    x2 = x.reshape(-1, k)
    plan = plan_for(x2.shape[0], qt, x.dtype, impl=impl, config=config, options=options)
    y = matmul_reference(x2, qt) if plan.forward == "reference" else _matmul(x2, qt, plan)
    return y.reshape(*x.shape[:-1], n)
