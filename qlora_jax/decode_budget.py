"""The per-token budget of decoding, checked without a GPU: kernel launches and HBM bytes of one generated token.

`generate.decode` (the whole generation loop, one program) is compiled for an H100/H200 on the CPU
(`qlora_jax.gpu_target`, deviceless) for an abstract model of any size, and its scheduled HLO is read
(`qlora_jax.hlo_report`): one iteration of its token loop is one token for the whole batch. The bytes it moves are
set against the roofline, what decoding a token cannot avoid reading: every weight once (4-bit linears as stored,
4.127 bits a value for NF4 with double quantization; the 16-bit lm_head, norms and biases), one embedding row a
sequence, and the KV cache as allocated (the step attends over every slot, masking the empty ones). Launches per
layer come from the same program compiled one layer deeper: what one more layer adds.

    budget = decode_budget(config, batch=1, cache_length=256)  # Llama-3.1-8B's shape: docs/benchmarks.md
    budget.bytes_ratio, budget.launches_per_layer, budget.slice_copies

Nothing runs and nothing is timed: tokens/s needs the GPU (`benchmarks/gpu.py decode`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qlora_jax import gpu_target, hlo_report
from qlora_jax.generate import SamplingConfig, decode
from qlora_jax.kernels import KernelOptions
from qlora_jax.models import ComputeOptions, DecoderLM, KVCache, ModelConfig
from qlora_jax.quant import QuantConfig

__all__ = ["DecodeBudget", "decode_budget", "roofline_bytes"]

PALLAS = ComputeOptions(kernels=KernelOptions(impl="pallas"))
NF4 = QuantConfig()


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeBudget:
    """One generated token (for the whole batch) of a compiled decode loop.

    Attributes:
      target: the GPU compiled for; batch, cache_length, num_layers: the shape.
      launches: kernel launches of one token; launches_per_layer: what one more layer adds (None if not asked).
      bytes_read, bytes_written: HBM traffic of one token, counted launch by launch (`hlo_report`).
      roofline_bytes: what a token cannot avoid reading (`roofline_bytes`).
      slice_copies: launches that copy a slice of a program input (a weight, the cache), with their bytes.
      report: the token loop's launches, for tables (`report.table()`).
    """

    target: str
    batch: int
    cache_length: int
    num_layers: int
    launches: int
    launches_per_layer: int | None
    bytes_read: int
    bytes_written: int
    roofline_bytes: int
    slice_copies: tuple[tuple[str, int], ...]
    report: hlo_report.LaunchReport = dataclasses.field(repr=False, compare=False)

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def bytes_ratio(self) -> float:
        """Bytes moved per token over the roofline's (1.0 is ideal)."""
        return self.bytes / self.roofline_bytes


def _nbytes(tree: Any) -> int:
    return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def roofline_bytes(model: DecoderLM, cache: KVCache, batch: int) -> int:
    """Bytes one decoding step must read: every weight of the model but the embedding table (one row a sequence
    instead), as stored, plus the whole KV cache."""
    state = nnx.state(model)
    embedding = model.model.embed_tokens.weight
    rows = 0 if model.lm_head is None else _nbytes(embedding) // embedding.shape[0] * batch
    tied = 0 if model.lm_head is not None else _nbytes(embedding)  # tied: the table is the lm_head, read whole
    return _nbytes(state) - _nbytes(embedding) + rows + tied + _nbytes((cache.k, cache.v))


def _token_loop(report: hlo_report.LaunchReport) -> str:
    """The generation's while loop: the outermost one (the layers are unrolled, or nested in it)."""
    outermost = {launch.loops[0] for launch in report.launches if launch.loops}
    if len(outermost) != 1:
        raise ValueError(f"expected one outermost while loop (the token loop), found {sorted(outermost)}")
    return outermost.pop()


def _compile(config: ModelConfig, *, quant, dtype, batch, cache_length, options, target, max_new_tokens):
    # the kernel choices made as on that GPU (its SM count, its table, Pallas dequantization)
    options = dataclasses.replace(options, kernels=dataclasses.replace(options.kernels, target=target))
    model = nnx.eval_shape(lambda: DecoderLM(config, quant=quant, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    cache = jax.eval_shape(lambda: KVCache.empty(config, batch, cache_length, jnp.dtype(dtype)))
    logits = jax.ShapeDtypeStruct((batch, config.vocab_size), jnp.float32)
    position = jax.ShapeDtypeStruct((batch,), jnp.int32)
    stop_ids = jax.ShapeDtypeStruct((1,), jnp.int32)
    seen = jax.ShapeDtypeStruct((batch, 0), bool)  # greedy, no repetition penalty
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    compiled = gpu_target.compile_for_target(
        decode,
        graphdef,
        state,
        logits,
        cache,
        position,
        stop_ids,
        seen,
        target=target,
        config=sampling,
        options=options,
    )
    report = hlo_report.launch_report(compiled.as_text())
    return report.in_loop(_token_loop(report)), roofline_bytes(model, cache, batch)


def decode_budget(
    config: ModelConfig,
    *,
    quant: QuantConfig | None = NF4,
    dtype: Any = jnp.bfloat16,
    batch: int = 1,
    cache_length: int = 256,
    options: ComputeOptions = PALLAS,
    target: str = "h200",
    per_layer: bool = True,
) -> DecodeBudget:
    """The budget of one token of `generate.decode` for a model of this config (abstract: no weight is made),
    compiled for `target` with these options (default: the fused decode kernel, impl="pallas").

    per_layer: also compile the model one and two layers deep for the launches one layer adds (cheap next to
    the full depth). Raises DevicelessUnavailable when this process cannot compile for a GPU
    (`gpu_target.deviceless_unavailable_reason`).
    """
    shape = dict(
        quant=quant,
        dtype=dtype,
        batch=batch,
        cache_length=cache_length,
        options=options,
        target=target,
        max_new_tokens=cache_length,
    )
    report, roofline = _compile(config, **shape)
    launches_per_layer = None
    if per_layer:
        counts = []
        for depth in (1, 2):
            types = config.layer_types
            cut = dataclasses.replace(config, num_layers=depth, layer_types=types[:depth] if types else ())
            counts.append(_compile(cut, **shape)[0].count)
        launches_per_layer = counts[1] - counts[0]
    copies = tuple(
        (f"{launch.name} ({', '.join(launch.slice_of)})", launch.count * launch.bytes) for launch in report.slice_copies
    )
    return DecodeBudget(
        target=target,
        batch=batch,
        cache_length=cache_length,
        num_layers=config.num_layers,
        launches=report.count,
        launches_per_layer=launches_per_layer,
        bytes_read=report.bytes_read,
        bytes_written=report.bytes_written,
        roofline_bytes=roofline,
        slice_copies=copies,
        report=report,
    )
