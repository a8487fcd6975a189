"""`nf4_matmul`: y = x @ dequantize(W).T, differentiable in x, with the kernel chosen per shape and device.

impl:
  "auto"      XLA, unless a measurement says a fused kernel is faster for this shape on this GPU kind: the
              user's tuning cache (`qlora-jax tune`), then the table shipped for the GPU kind (`tables.py`)
  "pallas"    the fused kernels: the decode kernel for M <= 16, the tiled kernel above; the backward pass by the
              transposed kernel (an error if the weight's layout does not allow them)
  "xla"       dequantize (a Pallas kernel on GPU), then one XLA dot; what runs on CPU
  "reference" the bitsandbytes-semantics weight in float32 and a full-precision dot (for tests)

Every path multiplies by the weight as bitsandbytes' `matmul_4bit` forms it: each value T[code] * absmax in
float32, rounded to the weight's own dtype (`dequantize_4bit`), then cast to x's dtype; products are summed in
float32.

The backward pass computes only dx = dy @ dequantize(W), recomputing the dequantization (or reading the packed
weight in the fused kernel) instead of keeping a 16-bit copy of W alive between the passes; the weight itself gets
zero cotangents. The choice is a `KernelOptions` value passed to each call (models take it in `ComputeOptions`):
a frozen, hashable value that is part of what jit compiles, so changing it recompiles; nothing is read from global
or thread-local state while tracing (the tuning cache and tables are read once per traced shape). The device the
choice is made for is jax's default device, or the GPU target `KernelOptions.target` names (a deviceless compile
for an H100/H200: `qlora_jax.gpu_target`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from qlora_jax import gpu_target
from qlora_jax.kernels import autotune, common, tables, timing
from qlora_jax.kernels.decode import FMA_MAX_M, MAX_M, DecodeConfig, decode_pallas
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
      autotune: on GPU, time the candidates of a shape that neither the tuning cache nor the shipped table has,
        while tracing (up to ~20 s a shape and op). Off by default: a first trace that silently tunes for minutes
        is a bad surprise; run `qlora-jax tune CONFIG.yaml` once instead.
      cache: the tuning cache to read (and write) (default: `autotune.TuningCache()` at its default path).
      target: choose as on this GPU target (`qlora_jax.gpu_target.TARGETS`: "h100", "h200") instead of jax's
        default device: its shipped table, its SM count, Pallas dequantization. For compiling a step for that GPU
        without one (`gpu_target.compile_for_target`); nothing is measured for a target.

    Raises ValueError for an unknown impl or target.
    """

    impl: str = "auto"
    interpret: bool = False
    autotune: bool = False
    cache: autotune.TuningCache | None = None
    target: str | None = None

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.target is not None and self.target not in gpu_target.TARGETS:
            raise ValueError(f"target must be one of {sorted(gpu_target.TARGETS)} or None, got {self.target!r}")

    @property
    def device(self) -> gpu_target.DeviceFacts:
        """The device the choices are made for: the target's, else jax's default device's."""
        return gpu_target.device_facts(self.target)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What runs for one (shape, weight layout): static, so it can key jit caches."""

    forward: str  # "decode" | "matmul" | "xla" | "reference"
    forward_config: MatmulConfig | DecodeConfig | None
    backward: str  # "matmul" | "xla" | "reference"
    backward_config: MatmulConfig | None
    dequant: str  # how the "xla" path dequantizes: "pallas" | "xla"
    interpret: bool


def tuning_key(op: str, m: int, qt: QuantizedTensor, dtype: Any, device_kind: str | None = None) -> autotune.TuningKey:
    """The key of one (op, M, weight, activation dtype) on this (or the named) GPU kind."""
    n, k = qt.shape
    return autotune.TuningKey(
        op, device_kind or gpu_target.device_facts().device_kind, autotune.m_bucket(m), n, k, jnp.dtype(dtype).name,
        qt.quant_type, qt.blocksize, qt.double_quant,
    )  # fmt: skip


_tuning_key = tuning_key


def _kernel_name(config: Any) -> str:
    return "decode" if isinstance(config, DecodeConfig) else "matmul"


def fused_fn(op: str, config: Any, interpret: bool) -> Callable[[jax.Array, QuantizedTensor], jax.Array]:
    """The fused kernel call (activations, weight) -> output for a config of the tuning space."""
    if op == "backward":
        return functools.partial(matmul_transposed_pallas, config=config, interpret=interpret)
    if isinstance(config, DecodeConfig):
        return functools.partial(decode_pallas, config=config, interpret=interpret)
    return functools.partial(matmul_pallas, config=config, interpret=interpret)


def xla_fn(op: str, interpret: bool = False) -> Callable[[jax.Array, QuantizedTensor], jax.Array]:
    """The XLA path (Pallas dequantize on GPU or in the interpreter, then one dot) as (activations, weight) ->."""
    base = _xla_forward if op == "forward" else _xla_backward
    return functools.partial(base, dequant="pallas", interpret=interpret)


def measure(
    op: str, m: int, qt: QuantizedTensor, dtype: Any, *, interpret: bool = False, cache: Any = None,
    repeats: int = 3, budget_s: float = autotune.TUNE_BUDGET_S,
) -> autotune.Choice:  # fmt: skip
    """Times XLA and every fused config of the tuning space for this key on synthetic weights distinct per call,
    keeps the fastest and stores it in `cache`. Run outside any trace (in a worker thread while tracing)."""
    n, k = qt.shape
    key = tuning_key(op, m, qt, dtype)
    bucket = key.m_bucket
    count = timing.copies_for(n * k // 2 + n * k // qt.blocksize * 4)
    weights = timing.distinct_weights(
        n, k, qt.dtype, count, quant_type=qt.quant_type, blocksize=qt.blocksize, double_quant=qt.double_quant
    )
    rows = jax.random.normal(jax.random.key(1), (bucket, k if op == "forward" else n), jnp.float32).astype(dtype)
    configs = {f"pallas:{c}": c for c in autotune.tuning_space(op, bucket, n, k, qt.blocksize)}

    def thunk(fn):
        return lambda: timing.per_call_seconds(fn, (rows,), weights, count, repeats=repeats)

    candidates = {"xla": thunk(xla_fn(op, interpret))}
    for name, config in configs.items():
        candidates[name] = thunk(fused_fn(op, config, interpret))
    return autotune.tune(key, candidates, cache=cache, configs=configs, budget_s=budget_s)


def _measure(op: str, m: int, qt: QuantizedTensor, dtype: Any, options: KernelOptions) -> autotune.Choice:
    """`measure` in a worker thread (JAX's trace state is thread-local), caching into the options' cache."""
    cache = options.cache or autotune.TuningCache()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(measure, op, m, qt, dtype, interpret=options.interpret, cache=cache).result()


def _choose(op: str, m: int, qt: QuantizedTensor, dtype: Any, options: KernelOptions) -> autotune.Choice | None:
    """The measured choice for this key: the tuning cache, the shipped table, a measurement now (autotune on, on
    the GPU itself), or None (nothing measured: XLA). Only for a GPU, whose kind keys the measurements."""
    device = options.device
    if device.platform != "gpu":
        return None
    key = tuning_key(op, m, qt, dtype, device.device_kind)
    cache = options.cache or autotune.TuningCache()
    if (choice := cache.get(key)) is not None or (choice := tables.lookup(key)) is not None:
        return choice
    return _measure(op, m, qt, dtype, options) if options.autotune and options.target is None else None


def _config_for(op: str, m: int, qt: QuantizedTensor, choice: autotune.Choice | None, sm_count: int) -> Any:
    """impl="pallas": the best measured fused config if any, else the default one."""
    if choice is not None and choice.fused_config is not None:
        return choice.fused_config
    n, k = qt.shape
    return autotune.default_fused_config(op, m, n, k, qt.blocksize, sm_count)


def plan_for(m: int, qt: QuantizedTensor, dtype: Any, *, impl: str, config: Any = None, options: KernelOptions) -> Plan:
    """The kernels one call runs: a static decision made while tracing.

    config: a MatmulConfig or DecodeConfig forcing the forward kernel (impl="pallas"; a DecodeConfig needs
    M <= 16). Raises ValueError for an unknown impl, or impl="pallas" with a weight the fused kernels cannot take.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    interpret = options.interpret
    device = options.device
    dequant = "pallas" if (device.platform == "gpu" or interpret) and not dequant_unsupported_reason(qt) else "xla"
    if impl in ("reference", "xla"):
        return Plan(impl, None, impl, None, dequant, interpret)
    if reason := common.fused_unsupported_reason(qt):
        if impl == "pallas":
            raise ValueError(f"nf4_matmul(impl='pallas'): {reason}; use impl='auto' or 'xla'")
        return Plan("xla", None, "xla", None, dequant, interpret)
    forward, backward = _choose("forward", m, qt, dtype, options), _choose("backward", m, qt, dtype, options)
    if impl == "pallas":  # fused both ways, with the best measured (or default) configs
        forward_config = config or _config_for("forward", m, qt, forward, device.sm_count)
        if isinstance(forward_config, DecodeConfig) and m > MAX_M:
            forward_config = autotune.default_fused_config("forward", m, *qt.shape, qt.blocksize, device.sm_count)
        backward_config = _config_for("backward", m, qt, backward, device.sm_count)
        return Plan(_kernel_name(forward_config), forward_config, "matmul", backward_config, dequant, interpret)
    fwd, bwd = ("xla", None), ("xla", None)
    if forward is not None and forward.impl == "pallas":
        fwd = (_kernel_name(forward.config), forward.config)
    if backward is not None and backward.impl == "pallas":
        bwd = ("matmul", backward.config)
    return Plan(*fwd, *bwd, dequant, interpret)


def _fold_batch_into_m(fn: Callable[[jax.Array, QuantizedTensor], jax.Array], max_m: int | None = None):
    """Wraps a 2D kernel call so that vmap folds a batch of activations into M (one launch; up to `max_m` rows
    for the decode kernel, else mapped), and maps over a batch of weights (stacked layers) with lax.map."""

    @jax.custom_batching.custom_vmap
    def wrapped(a: jax.Array, qt: QuantizedTensor) -> jax.Array:
        return fn(a, qt)

    @wrapped.def_vmap
    def _rule(axis_size, in_batched, a, qt):
        a_batched, qt_batched = in_batched
        if not any(jax.tree.leaves(qt_batched)):
            if max_m is None or axis_size * a.shape[1] <= max_m:
                out = wrapped(a.reshape(axis_size * a.shape[1], a.shape[2]), qt)
                return out.reshape(axis_size, a.shape[1], out.shape[-1]), True
            return jax.lax.map(lambda rows: wrapped(rows, qt), a), True  # one weight, too many rows for one call
        a = a if a_batched else jnp.broadcast_to(a, (axis_size, *a.shape))
        qt = jax.tree.map(
            lambda leaf, batched: leaf if batched else jnp.broadcast_to(leaf, (axis_size, *jnp.shape(leaf))),
            qt,
            qt_batched,
        )
        return jax.lax.map(lambda args: wrapped(*args), (a, qt)), True

    return wrapped


@functools.cache
def _fused_forward(config: MatmulConfig | DecodeConfig, interpret: bool):
    max_m = None
    if isinstance(config, DecodeConfig):
        max_m = FMA_MAX_M if config.dot == "fma" else MAX_M
    return _fold_batch_into_m(fused_fn("forward", config, interpret), max_m)


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


def dequantize_auto(qt: QuantizedTensor, dtype: Any = None, *, interpret: bool = False, target: str | None = None
                    ) -> jax.Array:  # fmt: skip
    """`dequantize`, by the Pallas kernel on GPU (jax's default device, or the GPU `target` names; or in the
    interpreter) when the layout allows, else by XLA."""
    dtype = jnp.dtype(qt.dtype if dtype is None else dtype)
    if (gpu_target.device_facts(target).platform == "gpu" or interpret) and not dequant_unsupported_reason(qt):
        return _pallas_dequantizer(dtype, interpret)(qt)
    return dequantize(qt, dtype)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=common.dot_precision(a.dtype))


def _xla_weight(qt: QuantizedTensor, dtype: Any, dequant: str, interpret: bool = False) -> jax.Array:
    """The weight as bitsandbytes' matmul_4bit multiplies by it: dequantized to its own dtype, then cast."""
    if dequant == "pallas":
        w = _pallas_dequantizer(jnp.dtype(qt.dtype), interpret)(qt)
    else:
        w = dequantize(qt)
    return w.astype(dtype)


def _xla_forward(x: jax.Array, qt: QuantizedTensor, dequant: str, interpret: bool = False) -> jax.Array:
    return _dot(x, _xla_weight(qt, x.dtype, dequant, interpret).T).astype(x.dtype)


def _xla_backward(dy: jax.Array, qt: QuantizedTensor, dequant: str, interpret: bool = False) -> jax.Array:
    return _dot(dy, _xla_weight(qt, dy.dtype, dequant, interpret)).astype(dy.dtype)


def _forward(x: jax.Array, qt: QuantizedTensor, plan: Plan) -> jax.Array:
    if plan.forward in ("decode", "matmul"):
        return _fused_forward(plan.forward_config, plan.interpret)(x, qt)
    return _xla_forward(x, qt, plan.dequant, plan.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x: jax.Array, qt: QuantizedTensor, plan: Plan) -> jax.Array:
    return _forward(x, qt, plan)


def _matmul_fwd(x, qt, plan):
    return _forward(x, qt, plan), qt  # the packed weight is the only residual


def _matmul_bwd(plan, qt, dy):
    if plan.backward == "matmul":
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
    config: MatmulConfig | DecodeConfig | None = None,
) -> jax.Array:
    """y = x @ dequantize(qt).T for a weight qt of shape (out_features, in_features), in PyTorch's layout.

    Args:
      x: [..., in_features], float32, bfloat16 or float16.
      qt: the 4-bit weight (any quant type, with or without double quantization).
      options: the kernel choice (`KernelOptions`; default: impl "auto").
      impl: overrides `options.impl` for this call: "auto" | "pallas" | "xla" | "reference".
      config: the fused forward kernel and its tiles (impl="pallas"): a DecodeConfig (M <= 16) or a MatmulConfig;
        by default the best measured one, else `autotune.default_fused_config`.

    Returns [..., out_features] in x's dtype: x times the weight as bitsandbytes' matmul_4bit forms it
    (dequantized to qt.dtype, then cast to x's dtype), products accumulated in float32. Differentiable in x (jit,
    vmap, scan and jax.checkpoint compose with it); the weight receives zero cotangents. Raises ValueError for a
    weight that is not 2D or does not match x, or an unknown impl; TypeError for another x dtype.
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
