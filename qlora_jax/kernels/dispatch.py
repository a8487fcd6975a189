"""`nf4_matmul`: y = x @ dequantize(W).T, differentiable in x, with the kernel chosen per shape and device.

impl:
  "auto"      XLA, unless a measurement says a fused kernel is faster for this shape on this GPU kind: the
              user's tuning cache (`qlora-jax tune`), then the table shipped for the GPU kind (`tables.py`)
  "pallas"    the decode kernel for M <= 16 (`KernelOptions.decode_kernel`); above, XLA unless a measurement
              says a fused kernel wins (a prompt's prefill is a training-sized matmul); the backward pass by the
              transposed kernel (an error if the weight's layout does not allow them)
  "xla"       dequantize (a Pallas kernel on GPU), then one XLA dot; what runs on CPU
  "reference" the bitsandbytes-semantics weight in float32 and a full-precision dot (for tests)

Every path multiplies by the weight as bitsandbytes' `matmul_4bit` forms it: each value T[code] * absmax in
float32, rounded to the weight's own dtype (`dequantize_4bit`), then cast to x's dtype; products are summed in
float32.

A weight may be one layer of a stack (`layer=`): the fused decode kernel reads it where it lies; the other paths
slice it. Weights that multiply the same x (q/k/v, gate/up) go through `nf4_matmul_group`: one decode-kernel
launch for all of them where the decode kernel is the choice for each.

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
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import gpu_target
from qlora_jax.kernels import autotune, common, registry, tables, timing
from qlora_jax.kernels.decode import MAX_M, decode_group_pallas, in_place_unsupported_reason, layer_of
from qlora_jax.kernels.dequant import dequant_unsupported_reason, dequantize_pallas
from qlora_jax.kernels.matmul import matmul_reference
from qlora_jax.quant import QuantizedTensor, dequantize

__all__ = ["IMPLS", "KernelOptions", "nf4_matmul", "nf4_matmul_group", "dequantize_auto", "plan_for"]

IMPLS = ("auto", "pallas", "xla", "reference")
DECODE_KERNELS = tuple(k.name for k in registry.KERNELS if k.decode)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelOptions:
    """How 4-bit matmuls are computed; a static value (hashable), so a jitted function compiled for one value is
    never reused for another.

    Attributes:
      impl: "auto" | "pallas" | "xla" | "reference" (see the module docstring).
      decode_kernel: the registry kernel impl="pallas" runs at M <= 16 (default "decode", Pallas' Triton
        backend; "decode_mosaic": the Mosaic GPU version, jax >= 0.11). Selectable by name only: "auto" takes
        a kernel only where a measurement chose it.
      interpret: run the Pallas kernels in Pallas' interpreter (any platform; for tests).
      tuning: the measured choices "auto" takes before the shipped per-GPU tables: a value read once
        (`autotune.load_choices()`: what `qlora-jax tune` wrote), part of what jit compiles; None: the tables only.
        The `qlora-jax` commands load the default cache's.
      autotune: on GPU, time the candidates of a shape that neither `tuning`, `cache` nor the shipped table has,
        while tracing (up to ~20 s a shape and op), and store them in `cache`. Off by default: a first trace that
        silently tunes for minutes is a bad surprise; run `qlora-jax tune CONFIG.yaml` once instead.
      cache: where autotune stores (and, with autotune on, looks up) its measurements (default:
        `autotune.TuningCache()` at its default path). Read only when autotune is on.
      target: choose as on this GPU target (`qlora_jax.gpu_target.TARGETS`: "h100", "h200") instead of jax's
        default device: its shipped table, its SM count, Pallas dequantization. For compiling a step for that GPU
        without one (`gpu_target.compile_for_target`); nothing is measured for a target.

    Raises ValueError for an unknown impl, decode kernel or target.
    """

    impl: str = "auto"
    decode_kernel: str = "decode"
    interpret: bool = False
    tuning: autotune.TuningChoices | None = None
    autotune: bool = False
    cache: autotune.TuningCache | None = None
    target: str | None = None

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.decode_kernel not in DECODE_KERNELS:
            raise ValueError(f"decode_kernel must be one of {DECODE_KERNELS}, got {self.decode_kernel!r}")
        if self.target is not None and self.target not in gpu_target.TARGETS:
            raise ValueError(f"target must be one of {sorted(gpu_target.TARGETS)} or None, got {self.target!r}")

    @property
    def device(self) -> gpu_target.DeviceFacts:
        """The device the choices are made for: the target's, else jax's default device's."""
        return gpu_target.device_facts(self.target)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What runs for one (shape, weight layout): static, so it can key jit caches."""

    forward: str  # a registry kernel name ("decode", "matmul", ...) | "xla" | "reference"
    forward_config: Any
    backward: str  # "matmul_transposed" | "xla" | "reference"
    backward_config: Any
    dequant: str  # how the "xla" path dequantizes: "pallas" | "xla"
    interpret: bool


def tuning_key(op: str, m: int, qt: QuantizedTensor, dtype: Any, device_kind: str | None = None) -> autotune.TuningKey:
    """The key of one (op, M, weight, activation dtype) on this (or the named) GPU kind."""
    n, k = qt.shape
    return autotune.TuningKey(
        op,
        device_kind or gpu_target.device_facts().device_kind,
        autotune.m_bucket(m),
        n,
        k,
        jnp.dtype(dtype).name,
        qt.quant_type,
        qt.blocksize,
        qt.double_quant,
    )


def fused_fn(op: str, config: Any, interpret: bool) -> Callable[..., jax.Array]:
    """The fused kernel call (activations, weight) -> output for a config of the tuning space."""
    return functools.partial(registry.kernel_for(op, config).call, config=config, interpret=interpret)


def xla_fn(op: str, interpret: bool = False) -> Callable[[jax.Array, QuantizedTensor], jax.Array]:
    """The XLA path (Pallas dequantize on GPU or in the interpreter, then one dot) as (activations, weight) ->."""
    base = xla_forward if op == "forward" else xla_backward
    return functools.partial(base, dequant="pallas", interpret=interpret)


def measure(
    op: str,
    m: int,
    qt: QuantizedTensor,
    dtype: Any,
    *,
    interpret: bool = False,
    cache: Any = None,
    repeats: int = 3,
    budget_s: float = autotune.TUNE_BUDGET_S,
) -> autotune.Choice:
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
    """The measured choice for this key: `options.tuning`, the shipped table, the autotune cache and a measurement
    now (autotune on, on the GPU itself), or None (nothing measured: XLA). Only for a GPU, whose kind keys the
    measurements. Nothing is read from a file here unless autotune is on."""
    device = options.device
    if device.platform != "gpu":
        return None
    key = tuning_key(op, m, qt, dtype, device.device_kind)
    if options.tuning is not None and (tuned := options.tuning.get(key)) is not None:
        return tuned  # this machine's measurements win over the shipped tables
    live = options.autotune and options.target is None
    if live and (tuned := (options.cache or autotune.TuningCache()).get(key)) is not None:
        return tuned
    if (tuned := tables.lookup(key)) is not None:
        return tuned
    return _measure(op, m, qt, dtype, options) if live else None


def _unsupported_reason(qt: QuantizedTensor, stacked: bool) -> str | None:
    """Why the fused kernels cannot take this weight (one layer of a stack when `stacked`), or None."""
    if stacked:
        return in_place_unsupported_reason(qt) or common.fused_unsupported_reason(qt, stacked=True)
    return common.fused_unsupported_reason(qt)


def plan_for(
    m: int,
    qt: QuantizedTensor,
    dtype: Any,
    *,
    impl: str,
    config: Any = None,
    options: KernelOptions,
    stacked: bool = False,
) -> Plan:
    """The kernels one call runs: a static decision made while tracing.

    config: a config of a registered forward kernel (`registry.kernel_for`), forcing it (impl="pallas").
    stacked: qt is a stack of layers, one of which is multiplied (`nf4_matmul(layer=...)`).
    Raises ValueError for an unknown impl, or impl="pallas" with a weight the fused kernels cannot take.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    interpret = options.interpret
    # The XLA path dequantizes one weight (one layer of a stack, sliced first) by the Pallas kernel on a GPU: XLA's
    # own dequantize fused into a matrix-vector product writes float32 products to HBM (8 bytes a weight).
    one = layer_of(qt, 0) if stacked else qt
    device = options.device
    dequant = "pallas" if (device.platform == "gpu" or interpret) and not dequant_unsupported_reason(one) else "xla"
    if impl in ("reference", "xla"):
        return Plan(impl, None, impl, None, dequant, interpret)
    if reason := _unsupported_reason(qt, stacked):
        if impl == "pallas":
            raise ValueError(f"nf4_matmul(impl='pallas'): {reason}; use impl='auto' or 'xla'")
        return Plan("xla", None, "xla", None, dequant, interpret)
    forward, backward = _choose("forward", m, qt, dtype, options), _choose("backward", m, qt, dtype, options)
    n, k = qt.shape
    cores = device.sm_count
    if impl == "pallas":
        if config is not None:
            fwd = (registry.kernel_for("forward", config).name, config)
        elif m <= MAX_M:
            kernel = registry.by_name(options.decode_kernel)
            if reason := kernel.unavailable() or kernel.unsupported(qt):
                raise ValueError(f"nf4_matmul(impl='pallas', decode_kernel={kernel.name!r}): {reason}")
            measured = forward.fused_config if forward is not None else None
            chosen = measured if type(measured) is kernel.config_type else None
            fwd = (kernel.name, chosen or kernel.default(m, n, k, qt.blocksize, cores))
        elif forward is not None and forward.impl == "pallas":  # a prefill-sized M: only on a measurement
            fwd = (registry.kernel_for("forward", forward.config).name, forward.config)
        else:
            fwd = ("xla", None)
        backward_config = backward.fused_config if backward is not None and backward.fused_config else None
        backward_config = backward_config or autotune.default_fused_config("backward", m, n, k, qt.blocksize, cores)
        return Plan(*fwd, "matmul_transposed", backward_config, dequant, interpret)
    fwd, bwd = ("xla", None), ("xla", None)
    if forward is not None and forward.impl == "pallas":
        fwd = (registry.kernel_for("forward", forward.config).name, forward.config)
    if backward is not None and backward.impl == "pallas":
        bwd = ("matmul_transposed", backward.config)
    return Plan(*fwd, *bwd, dequant, interpret)


def _fold_batch_into_m(fn: Callable[..., jax.Array], max_m: int | None = None):
    """Wraps a 2D kernel call fn(a, qt, layer) so that vmap folds a batch of activations into M (one launch; up
    to `max_m` rows for the decode kernel, else mapped), and maps over a batch of weights with lax.map."""

    @jax.custom_batching.custom_vmap
    def wrapped(a: jax.Array, qt: QuantizedTensor, layer: jax.Array) -> jax.Array:
        return fn(a, qt, layer)

    @wrapped.def_vmap
    def _rule(axis_size, in_batched, a, qt, layer):
        a_batched, qt_batched, layer_batched = in_batched
        if not any(jax.tree.leaves(qt_batched)) and not layer_batched:
            if max_m is None or axis_size * a.shape[1] <= max_m:
                out = wrapped(a.reshape(axis_size * a.shape[1], a.shape[2]), qt, layer)
                return out.reshape(axis_size, a.shape[1], out.shape[-1]), True
            return jax.lax.map(lambda rows: wrapped(rows, qt, layer), a), True  # too many rows for one call

        def batch(leaf, batched):
            return leaf if batched else jnp.broadcast_to(leaf, (axis_size, *jnp.shape(leaf)))

        a, qt, layer = batch(a, a_batched), jax.tree.map(batch, qt, qt_batched), batch(layer, layer_batched)
        return jax.lax.map(lambda args: wrapped(*args), (a, qt, layer)), True

    return wrapped


@functools.cache
def _fused_forward(config: Any, interpret: bool, stacked: bool):
    kernel = registry.kernel_for("forward", config)
    call = functools.partial(kernel.call, config=config, interpret=interpret)
    if stacked and not kernel.decode:  # the decode kernels read a stacked weight in place; others take a slice
        unstacked = call
        call = lambda a, qt, layer: unstacked(a, layer_of(qt, layer))  # noqa: E731
    elif not stacked:
        unstacked = call
        call = lambda a, qt, layer: unstacked(a, qt)  # noqa: E731
    return _fold_batch_into_m(call, kernel.max_rows(config))


@functools.cache
def _fused_backward(config: Any, interpret: bool, stacked: bool):
    call = functools.partial(registry.kernel_for("backward", config).call, config=config, interpret=interpret)
    return _fold_batch_into_m(lambda a, qt, layer: call(a, layer_of(qt, layer) if stacked else qt))


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


def dequantize_auto(
    qt: QuantizedTensor, dtype: Any = None, *, interpret: bool = False, target: str | None = None
) -> jax.Array:
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


def xla_forward(x: jax.Array, qt: QuantizedTensor, dequant: str, interpret: bool = False) -> jax.Array:
    """The XLA path's forward: the weight dequantized (by `dequant`: "pallas" or "xla"), then one dot."""
    return _dot(x, _xla_weight(qt, x.dtype, dequant, interpret).T).astype(x.dtype)


def xla_backward(dy: jax.Array, qt: QuantizedTensor, dequant: str, interpret: bool = False) -> jax.Array:
    """The XLA path's backward dx = dy @ W."""
    return _dot(dy, _xla_weight(qt, dy.dtype, dequant, interpret)).astype(dy.dtype)


def _index(layer: Any) -> jax.Array:
    """The layer operand of the fused wrappers (a placeholder 0 for an unstacked weight, which ignores it)."""
    return jnp.int32(0) if layer is None else layer


def _forward(x: jax.Array, qt: QuantizedTensor, layer: Any, plan: Plan) -> jax.Array:
    if plan.forward != "xla":
        return _fused_forward(plan.forward_config, plan.interpret, layer is not None)(x, qt, _index(layer))
    return xla_forward(x, layer_of(qt, layer), plan.dequant, plan.interpret)


def _backward(dy: jax.Array, qt: QuantizedTensor, layer: Any, plan: Plan) -> jax.Array:
    if plan.backward == "matmul_transposed":
        return _fused_backward(plan.backward_config, plan.interpret, layer is not None)(dy, qt, _index(layer))
    return xla_backward(dy, layer_of(qt, layer), plan.dequant, plan.interpret)


def _layer_cotangent(layer: Any) -> Any:
    return None if layer is None else np.zeros(jnp.shape(layer), jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _matmul(x: jax.Array, qt: QuantizedTensor, layer: Any, plan: Plan) -> jax.Array:
    return _forward(x, qt, layer, plan)


def _matmul_fwd(x, qt, layer, plan):
    return _forward(x, qt, layer, plan), (qt, layer)  # the packed weight is the only residual


def _matmul_bwd(plan, residuals, dy):
    qt, layer = residuals
    return _backward(dy, qt, layer, plan), common.zero_cotangents(qt), _layer_cotangent(layer)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _checked_2d(x: jax.Array, qt: QuantizedTensor, layer: Any) -> jax.Array:
    if len(qt.shape) != 2:
        raise ValueError(f"nf4_matmul needs a 2D weight (out_features, in_features), got shape {qt.shape}")
    stacked = np.ndim(qt.packed) > 1
    if layer is None and stacked:
        raise ValueError(f"the weight is stacked (packed shape {np.shape(qt.packed)}): pass its layer index")
    if layer is not None and (not stacked or np.ndim(layer) != 0):
        raise ValueError(f"layer= takes a scalar index into a stacked weight (packed {np.shape(qt.packed)})")
    n, k = qt.shape
    if x.shape[-1] != k:
        raise ValueError(f"x.shape[-1]={x.shape[-1]} must equal the weight's in_features={k} (weight {qt.shape})")
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    return x.reshape(-1, k)


def nf4_matmul(
    x: jax.Array,
    qt: QuantizedTensor,
    *,
    layer: jax.Array | None = None,
    options: KernelOptions = KernelOptions(),
    impl: str | None = None,
    config: Any = None,
) -> jax.Array:
    """y = x @ dequantize(qt).T for a weight qt of shape (out_features, in_features), in PyTorch's layout.

    Args:
      x: [..., in_features], float32, bfloat16 or float16.
      qt: the 4-bit weight (any quant type, with or without double quantization), or a stack of such weights
        (buffers with a leading [L] axis) with `layer` naming the one to use.
      layer: an int32 scalar (may be traced) indexing a stacked qt: the decode kernel reads that layer in place;
        other paths slice it.
      options: the kernel choice (`KernelOptions`; default: impl "auto").
      impl: overrides `options.impl` for this call: "auto" | "pallas" | "xla" | "reference".
      config: the fused forward kernel and its tiles (impl="pallas"): a config of a registered forward kernel
        (`DecodeConfig` for M <= 16, `MatmulConfig`); by default the best measured one, else the kernel's default.

    Returns [..., out_features] in x's dtype: x times the weight as bitsandbytes' matmul_4bit forms it
    (dequantized to qt.dtype, then cast to x's dtype), products accumulated in float32. Differentiable in x (jit,
    vmap, scan and jax.checkpoint compose with it); the weight receives zero cotangents. Raises ValueError for a
    weight that is not 2D or does not match x, a stacked weight without its layer, or an unknown impl; TypeError
    for another x dtype.
    """
    impl = options.impl if impl is None else impl
    x2 = _checked_2d(x, qt, layer)
    plan = plan_for(x2.shape[0], qt, x.dtype, impl=impl, config=config, options=options, stacked=layer is not None)
    if plan.forward == "reference":  # plain autodiff through the float32 weight (for tests)
        y = matmul_reference(x2, layer_of(qt, layer))
    else:
        y = _matmul(x2, qt, layer, plan)
    return y.reshape(*x.shape[:-1], qt.shape[0])


def _group_config(plans: Sequence[Plan], qts: Sequence[QuantizedTensor]) -> Any:
    """The decode config one launch can use for all the weights, or None (then each weight runs its own plan).

    Every weight must have chosen the decode kernel; the config is the one chosen for the largest weight."""
    if any(plan.forward != "decode" for plan in plans):
        return None
    first = qts[0]
    if any(
        (q.shape[1], q.quant_type, q.blocksize, q.dq_blocksize, jnp.dtype(q.dtype), np.shape(q.packed)[:-1])
        != (
            first.shape[1],
            first.quant_type,
            first.blocksize,
            first.dq_blocksize,
            jnp.dtype(first.dtype),
            np.shape(first.packed)[:-1],
        )
        for q in qts
    ):
        return None
    largest = max(range(len(qts)), key=lambda i: qts[i].shape[0])
    return plans[largest].forward_config


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group(x, qts, layer, plans, config):
    return decode_group_pallas(x, qts, layer, config=config, interpret=plans[0].interpret)


def _group_fwd(x, qts, layer, plans, config):
    return _group(x, qts, layer, plans, config), (qts, layer)


def _group_bwd(plans, config, residuals, dys):
    qts, layer = residuals
    dx = sum(_backward(dy, qt, layer, plan) for dy, qt, plan in zip(dys, qts, plans, strict=True))
    return dx, tuple(common.zero_cotangents(qt) for qt in qts), _layer_cotangent(layer)


_group.defvjp(_group_fwd, _group_bwd)


def nf4_matmul_group(
    x: jax.Array,
    qts: Sequence[QuantizedTensor],
    *,
    layer: jax.Array | None = None,
    options: KernelOptions = KernelOptions(),
    impl: str | None = None,
) -> tuple[jax.Array, ...]:
    """(nf4_matmul(x, qt) for qt in qts), in one decode-kernel launch where the plan of every weight is the decode
    kernel (x read once; q/k/v, gate/up), else one call each. Same arguments, numerics and errors as `nf4_matmul`;
    the weights share in_features (their out_features may differ) and, to share a launch, their format."""
    impl = options.impl if impl is None else impl
    x2 = [_checked_2d(x, qt, layer) for qt in qts][0]
    stacked = layer is not None
    plans = tuple(plan_for(x2.shape[0], qt, x.dtype, impl=impl, options=options, stacked=stacked) for qt in qts)
    config = _group_config(plans, qts) if len(qts) > 1 else None
    if config is None or x2.shape[0] > registry.by_name("decode").max_rows(config):
        return tuple(nf4_matmul(x, qt, layer=layer, options=options, impl=impl) for qt in qts)
    ys = _group(x2, tuple(qts), layer, plans, config)
    return tuple(y.reshape(*x.shape[:-1], qt.shape[0]) for y, qt in zip(ys, qts, strict=True))
