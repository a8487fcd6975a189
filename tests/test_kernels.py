"""The fused 4-bit kernels against their plain-JAX references.

`TestKernelsInterpret` runs every test in Pallas' interpreter on CPU (CI); `TestKernelsGPU` runs the same tests
compiled, and only where a GPU is present (run it on the device machine).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.kernels import (
    DecodeConfig,
    DequantConfig,
    KernelOptions,
    MatmulConfig,
    dequantize_pallas,
    matmul_pallas,
    matmul_reference,
    matmul_transposed_pallas,
    matmul_transposed_reference,
    nf4_matmul,
    nf4_matmul_group,
    plan_for,
)
from qlora_jax.kernels.decode import decode_group_pallas, decode_pallas, decode_reference
from qlora_jax.quant import dequantize, quantize

# Relative to the output's largest magnitude: 16-bit inputs differ from the float32 reference by their rounding.
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}
SMALL = MatmulConfig(block_m=16, block_n=32, block_k=64, split_k=2, num_warps=2, num_stages=2)
LARGE = MatmulConfig(block_m=64, block_n=64, block_k=64)
BACKWARD = MatmulConfig(block_m=64, block_n=32, block_k=64)
QUANT_VARIANTS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False), ("int4", True)]


def _weight(n, k, dtype=jnp.bfloat16, quant_type="nf4", double_quant=True, blocksize=64, seed=0):
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    return quantize(jnp.asarray(w, dtype), quant_type=quant_type, double_quant=double_quant, blocksize=blocksize)


def _activations(*shape, dtype=jnp.bfloat16, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _assert_close(got, want, dtype):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    scale = max(float(np.max(np.abs(want))), 1e-6)
    np.testing.assert_allclose(got, want, atol=TOLERANCE[dtype] * scale, rtol=0)


class KernelTests:
    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _platform(self):
        if not self.INTERPRET and jax.default_backend() != "gpu":
            pytest.skip("compiled kernels need a GPU; TestKernelsInterpret covers them on CPU")
        self.options = KernelOptions(interpret=self.INTERPRET)
        yield

    # --- forward ---------------------------------------------------------------------------------------------

    @pytest.mark.parametrize("m", [1, 7, 64, 300])
    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
    def test_forward_matches_reference(self, m, dtype):
        qt = _weight(96, 256, dtype)
        x = _activations(m, 256, dtype=dtype)
        config = SMALL if m <= 16 else LARGE
        _assert_close(matmul_pallas(x, qt, config=config, interpret=self.INTERPRET), matmul_reference(x, qt), dtype)

    @pytest.mark.parametrize(("quant_type", "double_quant"), QUANT_VARIANTS)
    @pytest.mark.parametrize("config", [SMALL, LARGE], ids=["small_m", "large_m"])
    def test_forward_every_quant_variant(self, quant_type, double_quant, config):
        qt = _weight(80, 192, quant_type=quant_type, double_quant=double_quant)  # ragged N tile, 3 K steps
        x = _activations(7 if config is SMALL else 70, 192)
        if config is SMALL:
            config = MatmulConfig(block_m=16, block_n=32, block_k=64, split_k=3)
        _assert_close(
            matmul_pallas(x, qt, config=config, interpret=self.INTERPRET), matmul_reference(x, qt), jnp.bfloat16
        )

    def test_forward_bf16_tile_equals_dequantized_weight(self):
        """A one-hot x picks single columns of W: the kernel's tile is exactly dequantize(W) in bfloat16."""
        qt = _weight(64, 128, jnp.float32)
        x = jnp.eye(128, dtype=jnp.bfloat16)[:16]
        y = matmul_pallas(x, qt, config=SMALL, interpret=self.INTERPRET)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(dequantize(qt, jnp.bfloat16)).T[:16])

    def test_forward_larger_blocksize_and_block_k(self):
        qt = _weight(64, 512, blocksize=256)
        x = _activations(20, 512)
        config = MatmulConfig(block_m=32, block_n=64, block_k=128)
        _assert_close(
            matmul_pallas(x, qt, config=config, interpret=self.INTERPRET), matmul_reference(x, qt), jnp.bfloat16
        )

    # --- the decode kernel (M <= 16) -----------------------------------------------------------------------------

    @pytest.mark.parametrize(("quant_type", "double_quant"), QUANT_VARIANTS)
    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
    def test_decode_every_quant_variant_and_dtype(self, quant_type, double_quant, dtype):
        qt = _weight(80, 512, dtype, quant_type=quant_type, double_quant=double_quant)  # ragged N: 80 of 3 x 32
        x = _activations(3, 512, dtype=dtype)
        for config in (
            DecodeConfig(block_n=32, block_k=128, split_k=2, dot="fma"),
            DecodeConfig(block_n=32, block_k=256, split_k=1, dot="mma"),
        ):
            got = decode_pallas(x, qt, config=config, interpret=self.INTERPRET)
            assert got.dtype == dtype
            _assert_close(got, decode_reference(x, qt), dtype)
            _assert_close(got, matmul_reference(x, qt), dtype)

    @pytest.mark.parametrize("m", [1, 2, 4, 5, 9, 16])
    def test_decode_every_m(self, m):
        qt = _weight(200, 1024)
        x = _activations(m, 1024)
        dots = ("fma", "mma") if m <= 4 else ("mma",)
        for dot in dots:
            config = DecodeConfig(block_n=64, block_k=128, split_k=4, dot=dot)
            _assert_close(
                decode_pallas(x, qt, config=config, interpret=self.INTERPRET), decode_reference(x, qt), jnp.bfloat16
            )

    @pytest.mark.parametrize(("blocksize", "block_k"), [(64, 64), (64, 512), (128, 64), (256, 128), (512, 512)])
    @pytest.mark.parametrize("lookup", ["gather", "select"])
    def test_decode_blocks_and_lookups(self, blocksize, block_k, lookup):
        """block_k below the blocksize (several steps share a scale) and above it (a step spans blocks)."""
        qt = _weight(64, 1024, blocksize=blocksize)
        x = _activations(2, 1024)
        config = DecodeConfig(block_n=32, block_k=block_k, split_k=2, dot="fma", lookup=lookup)
        _assert_close(
            decode_pallas(x, qt, config=config, interpret=self.INTERPRET), decode_reference(x, qt), jnp.bfloat16
        )

    def test_decode_equals_reference_exactly_for_one_hot_rows(self):
        """A one-hot x picks single columns of W: the kernel's weight is exactly dequantize(W) in its own dtype."""
        qt = _weight(64, 256, jnp.bfloat16)
        x = jnp.eye(256, dtype=jnp.float32)[jnp.array([0, 1, 130, 255])]
        config = DecodeConfig(block_n=32, block_k=128, split_k=2, dot="fma")
        y = decode_pallas(x, qt, config=config, interpret=self.INTERPRET)
        want = np.asarray(dequantize(qt).astype(jnp.float32)).T[[0, 1, 130, 255]]
        np.testing.assert_array_equal(np.asarray(y), want)

    @pytest.mark.parametrize("dot", ["fma", "mma"])
    def test_decode_reads_one_layer_of_a_stack_in_place(self, dot):
        """A stacked weight and a (traced) layer index: each layer's product, without slicing the stack."""
        layers = [_weight(80, 512, seed=seed) for seed in range(3)]
        stack = jax.tree.map(lambda *a: jnp.stack(a), *layers)
        x = _activations(2, 512)
        config = DecodeConfig(block_n=32, block_k=128, split_k=2, dot=dot, lookup="select")
        run = jax.jit(lambda x, stack, layer: decode_pallas(x, stack, layer, config=config, interpret=self.INTERPRET))
        for index, qt in enumerate(layers):
            got = run(x, stack, jnp.int32(index))
            np.testing.assert_array_equal(
                np.asarray(got), np.asarray(decode_pallas(x, qt, config=config, interpret=self.INTERPRET))
            )
            _assert_close(got, decode_reference(x, qt), jnp.bfloat16)

    @pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("fp4", False)])
    @pytest.mark.parametrize(
        "config",
        [
            DecodeConfig(block_n=32, block_k=128, split_k=2, dot="fma"),
            DecodeConfig(block_n=16, block_k=256, split_k=1, dot="mma"),
        ],
    )
    def test_decode_group_equals_one_call_per_weight(self, quant_type, double_quant, config):
        """q/k/v-like weights (different out_features, ragged tiles) in one launch: each output is exactly the
        single-weight kernel's, stacked or not."""
        qts = [_weight(n, 256, quant_type=quant_type, double_quant=double_quant, seed=n) for n in (64, 32, 48)]
        x = _activations(3, 256)
        got = decode_group_pallas(x, tuple(qts), config=config, interpret=self.INTERPRET)
        stacks = tuple(jax.tree.map(lambda *a: jnp.stack(a), qt, qt) for qt in qts)
        got_stacked = decode_group_pallas(x, stacks, jnp.int32(1), config=config, interpret=self.INTERPRET)
        for y, y_stacked, qt in zip(got, got_stacked, qts, strict=True):
            want = decode_pallas(x, qt, config=config, interpret=self.INTERPRET)
            assert y.shape == want.shape == (3, qt.shape[0])
            np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
            np.testing.assert_array_equal(np.asarray(y_stacked), np.asarray(want))

    def test_nf4_matmul_pallas_runs_the_decode_kernel_for_small_m(self):
        qt = _weight(96, 256)
        x = _activations(2, 3, 256)  # M = 6 after flattening
        plan = plan_for(6, qt, jnp.bfloat16, impl="pallas", options=self.options)
        assert plan.forward == "decode" and plan.backward == "matmul_transposed"
        _assert_close(nf4_matmul(x, qt, options=self.options, impl="pallas"), matmul_reference(x, qt), jnp.bfloat16)
        # vmap folds rows into M while they fit (<= 16), and maps beyond
        for batch in (2, 5):
            xs = _activations(batch, 4, 256)
            got = jax.vmap(lambda a: nf4_matmul(a, qt, options=self.options, impl="pallas"))(xs)
            _assert_close(got, matmul_reference(xs, qt), jnp.bfloat16)

    @pytest.mark.parametrize("impl", ["pallas", "xla", "reference"])
    def test_nf4_matmul_of_one_layer_of_a_stack(self, impl):
        """`layer=`: the product with that layer of a stacked weight, and its gradient, on every path."""
        layers = [_weight(96, 256, seed=seed) for seed in range(3)]
        stack = jax.tree.map(lambda *a: jnp.stack(a), *layers)
        x = _activations(2, 256)

        def loss(x, layer):
            y = nf4_matmul(x, stack, layer=layer, options=self.options, impl=impl)
            return jnp.sum(y.astype(jnp.float32) ** 2), y

        for index in (0, 2):
            (_, y), dx = jax.jit(jax.value_and_grad(loss, has_aux=True))(x, jnp.int32(index))
            _assert_close(y, matmul_reference(x, layers[index]), jnp.bfloat16)
            (_, _), want = jax.value_and_grad(
                lambda a, q=layers[index]: (jnp.sum(nf4_matmul(a, q, impl="reference").astype(jnp.float32) ** 2), 0),
                has_aux=True,
            )(x)
            _assert_close(dx, want, jnp.bfloat16)

    @pytest.mark.parametrize("impl", ["pallas", "xla"])
    def test_nf4_matmul_group_equals_separate_calls(self, impl):
        """q/k/v through one call: the same outputs as one nf4_matmul each (bit for bit) and the summed dx."""
        qts = [_weight(n, 256, seed=n) for n in (64, 32, 32)]
        x = _activations(1, 2, 256)
        got = nf4_matmul_group(x, qts, options=self.options, impl=impl)
        for y, qt in zip(got, qts, strict=True):
            np.testing.assert_array_equal(np.asarray(y), np.asarray(nf4_matmul(x, qt, options=self.options, impl=impl)))
        if impl == "pallas":
            plans = [plan_for(2, qt, jnp.bfloat16, impl=impl, options=self.options) for qt in qts]
            assert {p.forward for p in plans} == {"decode"}

        def total(x, fn):
            return sum(jnp.sum(y.astype(jnp.float32) * (i + 1)) for i, y in enumerate(fn(x)))

        grouped = jax.grad(total)(x, lambda a: nf4_matmul_group(a, qts, options=self.options, impl=impl))
        separate = jax.grad(total)(x, lambda a: [nf4_matmul(a, q, options=self.options, impl=impl) for q in qts])
        _assert_close(grouped, separate, jnp.bfloat16)

    # --- backward (dx = dy @ W) --------------------------------------------------------------------------------

    @pytest.mark.parametrize("m", [1, 7, 64, 300])
    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
    def test_transposed_matches_reference(self, m, dtype):
        qt = _weight(80, 128, dtype)
        dy = _activations(m, 80, dtype=dtype)
        got = matmul_transposed_pallas(dy, qt, config=BACKWARD, interpret=self.INTERPRET)
        _assert_close(got, matmul_transposed_reference(dy, qt), dtype)

    @pytest.mark.parametrize(("quant_type", "double_quant"), QUANT_VARIANTS)
    def test_transposed_every_quant_variant(self, quant_type, double_quant):
        qt = _weight(96, 128, jnp.float16, quant_type=quant_type, double_quant=double_quant)
        dy = _activations(33, 96, dtype=jnp.float16)
        got = matmul_transposed_pallas(dy, qt, config=BACKWARD, interpret=self.INTERPRET)
        _assert_close(got, matmul_transposed_reference(dy, qt), jnp.float16)

    # --- gradients through nf4_matmul -------------------------------------------------------------------------

    @pytest.mark.parametrize("impl", ["pallas", "xla"])
    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
    def test_gradient_matches_reference(self, impl, dtype):
        qt = _weight(80, 128, dtype)
        x = _activations(3, 5, 128, dtype=dtype)
        target = _activations(3, 5, 80, dtype=jnp.float32, seed=2)

        def loss(x, impl):
            return jnp.sum((nf4_matmul(x, qt, options=self.options, impl=impl).astype(jnp.float32) - target) ** 2)

        value, grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)(x, impl)
        ref_value, ref_grad = jax.value_and_grad(loss)(x, "reference")
        np.testing.assert_allclose(value, ref_value, rtol=TOLERANCE[dtype] * 5)
        _assert_close(grad, ref_grad, dtype)

    def test_weight_gets_zero_cotangent_and_no_dequantized_residual(self):
        qt = _weight(64, 128)
        x = _activations(16, 128)
        grad_qt = jax.grad(
            lambda q: nf4_matmul(x, q, options=self.options, impl="pallas").astype(jnp.float32).sum(), allow_int=True
        )(qt)
        for leaf in jax.tree.leaves(grad_qt):
            assert leaf.dtype == jax.dtypes.float0 or not np.any(np.asarray(leaf))
        # Residuals of the forward pass: the packed weight, never a dense copy of W (impl="reference" keeps one).
        for impl, keeps_dense_w in (("pallas", False), ("xla", False), ("reference", True)):
            _, vjp = jax.vjp(lambda a, impl=impl: nf4_matmul(a, qt, options=self.options, impl=impl), x)
            float_sizes = [r.size for r in jax.tree.leaves(vjp) if jnp.issubdtype(r.dtype, jnp.floating)]
            assert (max(float_sizes) >= 64 * 128) == keeps_dense_w, (impl, float_sizes)

    # --- composition: jit, vmap, scan, checkpoint --------------------------------------------------------------

    def test_vmap_folds_activations_and_maps_stacked_weights(self):
        w = np.random.default_rng(0).standard_normal((3, 64, 128)).astype(np.float32)
        stacked = jax.vmap(quantize)(jnp.asarray(w, jnp.bfloat16))
        x = _activations(3, 9, 128)
        got = jax.vmap(lambda q, a: nf4_matmul(a, q, options=self.options, impl="pallas"))(stacked, x)
        want = jnp.stack([matmul_reference(x[i], jax.tree.map(lambda leaf, i=i: leaf[i], stacked)) for i in range(3)])
        _assert_close(got, want, jnp.bfloat16)
        qt = jax.tree.map(lambda leaf: leaf[0], stacked)
        got = jax.vmap(lambda a: nf4_matmul(a, qt, options=self.options, impl="pallas"))(x)
        _assert_close(got, matmul_reference(x, qt), jnp.bfloat16)

    def test_scan_over_layers_with_checkpoint_and_grad(self):
        w = np.random.default_rng(0).standard_normal((2, 128, 128)).astype(np.float32) * 0.1
        stacked = jax.vmap(quantize)(jnp.asarray(w, jnp.float32))
        x = _activations(16, 128, dtype=jnp.float32)

        def forward(x, impl):
            def layer(h, qt):
                return jnp.tanh(jax.checkpoint(lambda a: nf4_matmul(a, qt, options=self.options, impl=impl))(h)), None

            return jnp.sum(jax.lax.scan(layer, x, stacked)[0] ** 2)

        grad = jax.jit(jax.grad(forward), static_argnums=1)(x, "pallas")
        _assert_close(grad, jax.grad(forward)(x, "reference"), jnp.float32)

    # --- dequantize ------------------------------------------------------------------------------------------

    @pytest.mark.parametrize(("quant_type", "double_quant"), QUANT_VARIANTS)
    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
    def test_dequantize_matches_reference(self, quant_type, double_quant, dtype):
        qt = _weight(70, 320, jnp.float32, quant_type=quant_type, double_quant=double_quant)
        got = dequantize_pallas(qt, dtype, config=DequantConfig(block_rows=16), interpret=self.INTERPRET)
        want = dequantize(qt, dtype)
        if self.INTERPRET:  # the interpreter runs XLA's CPU arithmetic: bit for bit
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        else:  # the GPU compiler may fuse the absmax decode's multiply-add: an ulp of the scale
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-6)

    def test_dequantize_any_flat_shape(self):
        qt = quantize(np.random.default_rng(3).standard_normal((5, 7, 128)).astype(np.float32), blocksize=128)
        got = dequantize_pallas(qt, config=DequantConfig(block_rows=4, block_cols=32), interpret=self.INTERPRET)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(dequantize(qt)))


class TestKernelsInterpret(KernelTests):
    INTERPRET = True


class TestKernelsGPU(KernelTests):
    INTERPRET = False


# --- dispatch and validation (no kernel runs) -----------------------------------------------------------------


def test_auto_is_xla_on_cpu_and_matches_reference():
    if jax.default_backend() == "gpu":
        pytest.skip("checks the CPU choice")
    qt = _weight(48, 128)
    x = _activations(4, 128)
    _assert_close(nf4_matmul(x, qt), matmul_reference(x, qt), jnp.bfloat16)
    from qlora_jax.kernels import plan_for

    plan = plan_for(4, qt, jnp.bfloat16, impl="auto", config=None, options=KernelOptions())
    assert (plan.forward, plan.backward, plan.dequant) == ("xla", "xla", "xla")


def test_in_features_not_a_multiple_of_blocksize():
    qt = _weight(16, 96)  # 96 % 64 != 0: blocks straddle rows
    x = _activations(2, 96)
    with pytest.raises(ValueError, match="in_features=96 must be a multiple of blocksize=64"):
        nf4_matmul(x, qt, impl="pallas")
    _assert_close(nf4_matmul(x, qt, impl="auto"), matmul_reference(x, qt), jnp.bfloat16)  # falls back to XLA


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"x": _activations(2, 64)}, ValueError, r"x.shape\[-1\]=64 must equal the weight's in_features=128"),
        ({"x": jnp.ones((2, 128), jnp.int32)}, TypeError, "int32"),
        ({"impl": "cuda"}, ValueError, "impl must be one of"),
    ],
)
def test_bad_calls(kwargs, error, match):
    args = {"x": _activations(2, 128), "impl": "auto"} | kwargs
    with pytest.raises(error, match=match):
        nf4_matmul(args["x"], _weight(32, 128), impl=args["impl"])


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (MatmulConfig(block_k=16), "block_k=16 must be >= 32"),
        (MatmulConfig(block_n=48), "block_n=48 must be one of"),
        (MatmulConfig(block_k=64, split_k=3), "must be a multiple of block_k"),
    ],
)
def test_bad_configs(config, match):
    with pytest.raises(ValueError, match=match):
        matmul_pallas(_activations(2, 128), _weight(32, 128), config=config, interpret=True)


# --- the weight is used in its own dtype, as bitsandbytes' matmul_4bit does ---------------------------------------


def _bnb_semantics(x, qt):
    """x @ W.T with W = dequantize_4bit(W) (the weight's own dtype) cast to x's dtype, summed in float64."""
    w = np.asarray(dequantize(qt).astype(x.dtype), np.float64)
    return np.asarray(x, np.float64) @ w.T


@pytest.mark.parametrize("impl", ["xla", "pallas", "reference"])
def test_float32_x_uses_the_bf16_stored_weight_rounded_to_bf16(impl):
    """A bf16-stored weight multiplied by float32 activations is the weight rounded to bf16 (bitsandbytes'
    `dequantize_4bit(W).to(A.dtype)`), not the exact float32 product T[code] * absmax."""
    qt = _weight(64, 256, jnp.bfloat16)
    x = _activations(5, 256, dtype=jnp.float32)
    got = np.asarray(nf4_matmul(x, qt, options=KernelOptions(interpret=True), impl=impl), np.float64)
    want = _bnb_semantics(x, qt)
    exact_f32_weight = np.asarray(x, np.float64) @ np.asarray(dequantize(qt, jnp.float32), np.float64).T
    scale = np.max(np.abs(want))
    assert np.max(np.abs(exact_f32_weight - want)) > 1e-4 * scale  # the two semantics are far apart here
    np.testing.assert_allclose(got, want, atol=2e-6 * scale, rtol=0)
