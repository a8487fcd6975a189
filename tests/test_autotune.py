"""Kernel choice: the tuning space, measured choices, the persistent cache, and `impl="auto"` on a (simulated) GPU."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.kernels import MatmulConfig, autotune, dispatch
from qlora_jax.kernels.autotune import Choice, TuningCache, TuningKey, default_choice, m_bucket, tune, tuning_space
from qlora_jax.quant import quantize


def _key(**overrides) -> TuningKey:
    fields = dict(op="forward", device_kind="NVIDIA H100 80GB HBM3", m_bucket=16, n=4096, k=4096,
                  dtype="bfloat16", quant_type="nf4", blocksize=64, double_quant=True)  # fmt: skip
    return TuningKey(**(fields | overrides))


def test_m_buckets():
    assert [m_bucket(m) for m in (1, 2, 3, 16, 17, 300, 8192, 100_000)] == [1, 2, 4, 16, 32, 512, 8192, 16384]


@pytest.mark.parametrize(("op", "m"), [("forward", 1), ("forward", 4096), ("backward", 4096), ("backward", 8)])
@pytest.mark.parametrize("blocksize", [64, 128, 4096])
def test_tuning_space_configs_are_all_valid(op, m, blocksize):
    configs = tuning_space(op, m, 4096, 14336, blocksize)
    assert configs and len(set(configs)) == len(configs)
    for config in configs:
        config.check(m=m, n=4096, k=14336, blocksize=blocksize)
        assert op == "forward" or config.split_k == 1


def test_default_choice_is_fused_only_for_small_m_forward():
    small = default_choice("forward", 1, 4096, 4096, 64, num_cores=132)
    assert small.impl == "pallas" and small.config.block_m == 16
    assert small.config.split_k > 1  # 64 column tiles alone would leave most of 132 SMs idle
    small.config.check(m=1, n=4096, k=4096, blocksize=64)
    assert default_choice("forward", 4096, 4096, 4096, 64).impl == "xla"
    assert default_choice("backward", 1, 4096, 4096, 64).impl == "xla"


def test_tune_keeps_the_fastest_skips_failures_and_caches(tmp_path):
    times = {"xla": 3.0, "pallas:a": 2.0, "pallas:b": 1.0}

    def boom():
        raise RuntimeError("out of shared memory")

    candidates = {name: (lambda name=name: name) for name in times} | {"pallas:c": boom}
    timer = lambda thunk: times[thunk()]  # noqa: E731
    config_b = MatmulConfig(block_m=16, block_n=128)
    cache = TuningCache(tmp_path / "tune.json")
    choice = tune(_key(), candidates, cache=cache, timer=timer, configs={"pallas:b": config_b})
    assert choice == Choice("pallas", config_b, "measured", 1.0, 3.0, fused_config=config_b, fused_time_s=1.0)
    assert TuningCache(tmp_path / "tune.json").get(_key()) == choice  # persisted

    times["xla"] = 0.5
    choice = tune(_key(m_bucket=32), candidates, cache=cache, timer=timer, configs={"pallas:b": config_b})
    assert choice.impl == "xla" and choice.config is None  # never slower than XLA
    assert choice.fused_config == config_b  # still what impl="pallas" uses
    assert len(json.loads((tmp_path / "tune.json").read_text())) == 2


def test_tune_fails_clearly_if_the_baseline_fails():
    def boom():
        raise RuntimeError("no")

    with pytest.raises(RuntimeError, match="XLA baseline itself failed"):
        tune(_key(), {"xla": boom}, timer=lambda thunk: thunk())


def test_corrupt_cache_is_ignored_not_fatal(tmp_path, caplog):
    path = tmp_path / "tune.json"
    path.write_text("{not json")
    cache = TuningCache(path)
    assert cache.get(_key()) is None
    assert "unreadable autotune cache" in caplog.text
    cache.put(_key(), Choice("xla"))
    assert TuningCache(path).get(_key()) == Choice("xla")


def test_cache_merges_entries_written_by_another_process(tmp_path):
    path = tmp_path / "tune.json"
    first, second = TuningCache(path), TuningCache(path)
    first.get(_key())  # loaded while empty
    second.put(_key(m_bucket=1), Choice("xla", source="measured"))
    first.put(_key(m_bucket=2), Choice("xla", source="measured"))
    fresh = TuningCache(path)
    assert fresh.get(_key(m_bucket=1)) and fresh.get(_key(m_bucket=2))


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """Pretend the default backend is an H100 so that `impl="auto"` consults the tuner and its cache."""
    monkeypatch.setattr(dispatch, "_on_gpu", lambda: True)
    monkeypatch.setattr(dispatch, "_device", lambda: ("NVIDIA H100 80GB HBM3", 132))
    return TuningCache(tmp_path / "tune.json")


def test_auto_uses_the_cached_measurement(fake_gpu):
    qt = quantize(jnp.ones((256, 512), jnp.bfloat16))
    config = MatmulConfig(block_m=16, block_n=128, block_k=64, split_k=4)
    key = dispatch._tuning_key("forward", 3, qt, jnp.bfloat16)
    fake_gpu.put(key, Choice("pallas", config, "measured", 1e-5, 2e-5))
    options = dispatch.KernelOptions(autotune=False, cache=fake_gpu)
    plan = dispatch.plan_for(3, qt, jnp.bfloat16, impl="auto", config=None, options=options)
    assert (plan.forward, plan.forward_config) == ("pallas", config)
    assert plan.backward == "xla" and plan.dequant == "pallas"  # untuned backward: the XLA default


def test_auto_measures_a_missing_shape_once(fake_gpu, monkeypatch):
    measured = []

    def fake_measure(op, m, qt, dtype, options):
        measured.append((op, m))
        choice = Choice("xla", source="measured")
        options.cache.put(dispatch._tuning_key(op, m, qt, dtype), choice)
        return choice

    monkeypatch.setattr(dispatch, "_measure", fake_measure)
    qt = quantize(jnp.ones((256, 512), jnp.bfloat16))
    options = dispatch.KernelOptions(cache=fake_gpu)
    for _ in range(2):
        plan = dispatch.plan_for(1000, qt, jnp.bfloat16, impl="auto", config=None, options=options)
        assert plan.forward == plan.backward == "xla"
    assert measured == [("forward", 1000), ("backward", 1000)]


@pytest.mark.parametrize("op", ["forward", "backward"])
def test_measure_runs_every_candidate(fake_gpu, monkeypatch, op):
    """The tuner's plumbing end to end, in the interpreter: every candidate thunk runs; a fake clock makes the
    widest fused tile the winner."""
    ran = []

    def fake_timer(thunk):
        out = np.asarray(thunk())
        assert np.all(np.isfinite(out))
        config = thunk.keywords.get("config") if hasattr(thunk, "keywords") else None
        ran.append(config)
        return 1.0 if config is None else 1.0 / (config.block_n * config.block_m * config.split_k)

    monkeypatch.setattr(autotune, "time_on_device", fake_timer)
    qt = quantize(jnp.ones((64, 128), jnp.bfloat16))
    options = dispatch.KernelOptions(cache=fake_gpu, interpret=True)
    choice = dispatch._measure(op, 4, qt, jnp.bfloat16, options)
    space = tuning_space(op, 4, 64, 128, 64)
    assert sorted(map(str, filter(None, ran))) == sorted(map(str, space)) and None in ran  # the XLA baseline too
    assert choice.impl == "pallas" and choice.source == "measured" and choice.config in space
    assert fake_gpu.get(dispatch._tuning_key(op, 4, qt, jnp.bfloat16)) == choice
