"""Every reachable kernel configuration compiles for sm_90 with XLA's own Triton and ptxas, and none spills.

"Reachable": what impl="auto", the shipped tables, the tuner's candidate lists and impl="pallas"'s defaults can
choose (`qlora_jax.kernels.resources.reachable_cases`). Each case is compiled without a GPU for an H100
(`gpu_target.compiled_kernels`); where this machine cannot (no jax CUDA plugin, no ptxas), the tests skip with the
reason. `python -m qlora_jax.kernels.resources` prints the whole report.
"""

from __future__ import annotations

import dataclasses

import pytest

from qlora_jax import gpu_target
from qlora_jax.kernels import autotune, registry
from qlora_jax.kernels.decode import DecodeConfig
from qlora_jax.kernels.dequant import DequantConfig
from qlora_jax.kernels.flash_attention import FlashConfig
from qlora_jax.kernels.matmul import MatmulConfig
from qlora_jax.kernels.resources import KernelCase, case_resources, reachable_cases

CASES = reachable_cases("bfloat16") + [c for c in reachable_cases("float32") if c.op == "dequant"]


def test_the_reachable_cases_cover_every_candidate_list():
    """The list itself (no compile): the tuner's candidates, the defaults, the dequant and attention configs."""

    def compiled_as(op, config):  # the kernel's code depends on whether K is split, not into how many (resources.py)
        split = getattr(config, "split_k", 1)
        return op, dataclasses.replace(config, split_k=2) if split > 1 else config

    configs = {(c.op, c.config) for c in CASES}
    kernels = {compiled_as(c.op, c.config) for c in CASES}
    for op in autotune.OPS:
        for m in (1, 4, 16, 2048):
            for config in autotune.tuning_space(op, m, 4096, 4096, 64):
                assert compiled_as(op, config) in kernels, (op, m, config)
    assert ("dequant", DequantConfig()) in configs and all(("dequant", c) in configs for c in registry.DEQUANT_SPACE)
    assert all(("attention", FlashConfig.for_head_dim(d)) in configs for d in (64, 128, 256))
    assert not [c for c in reachable_cases("float32") if c.op == "attention"]  # float32 attention runs XLA
    fma = {c.m for c in CASES if isinstance(c.config, DecodeConfig) and c.config.dot == "fma"}
    assert fma == {1, 2, 3, 4}  # the multiply-add path unrolls its rows: each M is its own kernel
    assert all(c.reached_by for c in CASES)
    with pytest.raises(ValueError, match="op must be one of"):
        KernelCase(op="gemm", config=MatmulConfig())


@pytest.fixture(scope="module")
def target():
    if reason := gpu_target.kernel_resources_unavailable_reason():
        pytest.skip(f"GPU kernel resources unavailable: {reason}")
    return gpu_target.DEFAULT_TARGET


@pytest.mark.deviceless
@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_reachable_configuration_does_not_spill(target, case):
    kernels = case_resources(case, target=target)
    assert kernels, f"no Pallas kernel compiled for {case}"
    for kernel in kernels:
        print(kernel)  # the report: `pytest -s` shows registers, shared memory and programs per SM
        assert not kernel.spills, f"{case} [{case.reached_by}]: {kernel}"
        assert kernel.programs_per_sm >= 1, f"{case}: {kernel} cannot launch"
