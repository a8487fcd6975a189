"""The Mosaic GPU decode kernel (jax >= 0.11) against the decode kernel's reference, in Mosaic GPU's CPU interpreter,
and compiled for sm_90 without a GPU. On older jax (the main suite's 0.10) only the refusal is tested."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import gpu_target
from qlora_jax.kernels import KernelOptions, nf4_matmul, registry
from qlora_jax.kernels.decode import decode_reference
from qlora_jax.kernels.decode_mosaic import MosaicDecodeConfig, decode_mosaic, mosaic_unavailable_reason
from qlora_jax.quant import quantize
from tests.helpers import launches_by_kind

UNAVAILABLE = mosaic_unavailable_reason()
needs_mosaic = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))
MOSAIC = KernelOptions(impl="pallas", decode_kernel="decode_mosaic", interpret=True)


def _weight(n, k, *, dtype=jnp.bfloat16, double_quant=True, blocksize=64, quant_type="nf4", seed=0):
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    return quantize(jnp.asarray(w, dtype), double_quant=double_quant, blocksize=blocksize, quant_type=quant_type)


def _x(m, k, dtype=jnp.bfloat16):
    return jnp.asarray(np.random.default_rng(1).standard_normal((m, k)), dtype)


def test_it_is_selectable_by_name_and_never_auto():
    kernel = registry.by_name("decode_mosaic")
    assert kernel.decode and not kernel.in_auto and kernel.space(1, 4096, 4096, 64) == []
    assert all(not isinstance(c, MosaicDecodeConfig) for c in registry.candidates("forward", 1, 4096, 4096, 64))


@pytest.mark.skipif(UNAVAILABLE is None, reason="checks the refusal on jax < 0.11")
def test_older_jax_refuses_with_the_reason():
    with pytest.raises(ValueError, match="needs jax >= 0.11"):
        nf4_matmul(_x(1, 256), _weight(128, 256), options=MOSAIC)


@needs_mosaic
@pytest.mark.parametrize(
    ("double_quant", "blocksize", "quant_type", "m"),
    [(True, 64, "nf4", 1), (False, 128, "nf4", 3), (True, 64, "fp4", 16), (False, 64, "fp4", 7)],
)
def test_equals_the_reference_in_the_interpreter(double_quant, blocksize, quant_type, m):
    qt = _weight(128, 256, double_quant=double_quant, blocksize=blocksize, quant_type=quant_type)
    x = _x(m, 256)
    got = decode_mosaic(x, qt, config=MosaicDecodeConfig(split_k=2), interpret=True)
    assert got.shape == (m, 128) and got.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(decode_reference(x, qt)))


@needs_mosaic
def test_reads_one_layer_of_a_stack_through_nf4_matmul():
    layers = [_weight(128, 256, dtype=jnp.float16, seed=seed) for seed in range(3)]
    stack = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    x = _x(2, 256, jnp.float16)
    for index in (0, 2):
        got = nf4_matmul(x, stack, layer=jnp.int32(index), options=MOSAIC)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(decode_reference(x, layers[index])))


@needs_mosaic
def test_bad_weights_and_inputs_are_refused():
    with pytest.raises(ValueError, match="out_features % 64"):
        decode_mosaic(_x(1, 256), _weight(96, 256), interpret=True)
    with pytest.raises(ValueError, match="blocksize multiple of 64"):
        nf4_matmul(_x(1, 256), _weight(128, 256, blocksize=32), options=MOSAIC)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        decode_mosaic(_x(1, 256, jnp.float32), _weight(128, 256), interpret=True)


@needs_mosaic
@pytest.mark.deviceless
def test_compiles_for_sm90_and_reads_the_stack_in_place():
    if reason := gpu_target.deviceless_unavailable_reason():
        pytest.skip(f"deviceless GPU compile unavailable: {reason}")
    from qlora_jax.hlo_report import launch_report

    stack = jax.eval_shape(lambda: jax.vmap(quantize)(jnp.zeros((2, 4096, 4096), jnp.bfloat16)))
    x = jax.ShapeDtypeStruct((1, 4096), jnp.bfloat16)
    layer = jax.ShapeDtypeStruct((), jnp.int32)
    compiled = gpu_target.compile_for_target(lambda x, s, i: decode_mosaic(x, s, i), x, stack, layer, target="h200")
    report = launch_report(compiled.as_text())
    kinds = launches_by_kind(report)
    assert kinds.get("mosaic_gpu_v2") == 1, kinds
    assert not [launch for launch in report.slice_copies if "packed" in ",".join(launch.slice_of)]
