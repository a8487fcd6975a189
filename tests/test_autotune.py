"""Kernel choice: XLA unless measured otherwise (tuning cache, shipped tables), the tuning space and its bounded
timing, the persistent cache, the table tool and `qlora-jax tune`, on a (simulated) GPU."""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import gpu_target
from qlora_jax.cli import main as cli_main
from qlora_jax.kernels import DecodeConfig, MatmulConfig, autotune, dispatch, registry, tables, timing
from qlora_jax.kernels.autotune import (
    MAX_CANDIDATES,
    Choice,
    TuningCache,
    TuningKey,
    default_fused_config,
    m_bucket,
    tune,
    tuning_space,
)
from qlora_jax.quant import quantize

H100 = "NVIDIA H100 80GB HBM3"


def _key(**overrides) -> TuningKey:
    fields = dict(
        op="forward",
        device_kind=H100,
        m_bucket=16,
        n=4096,
        k=4096,
        dtype="bfloat16",
        quant_type="nf4",
        blocksize=64,
        double_quant=True,
    )
    return TuningKey(**(fields | overrides))


def test_m_buckets():
    assert [m_bucket(m) for m in (1, 2, 3, 16, 17, 300, 8192, 100_000)] == [1, 2, 4, 16, 32, 512, 8192, 16384]


def test_key_round_trips_through_its_text():
    assert TuningKey.parse(str(_key())) == _key()
    with pytest.raises(ValueError, match="not a tuning key"):
        TuningKey.parse("forward|H100|1")


@pytest.mark.parametrize(
    ("op", "m"),
    [("forward", 1), ("forward", 3), ("forward", 16), ("forward", 4096), ("backward", 4096), ("backward", 8)],
)
@pytest.mark.parametrize(("k", "blocksize"), [(14336, 64), (4096, 128), (4096, 4096), (1024, 64)])
def test_tuning_space_is_small_and_valid(op, m, k, blocksize):
    configs = tuning_space(op, m, 4096, k, blocksize)
    assert 4 <= len(configs) <= MAX_CANDIDATES and len(set(configs)) == len(configs)
    for config in configs:
        config.check(m=m, n=4096, k=k, blocksize=blocksize)
        assert op == "forward" or config.split_k == 1
    decode = [c for c in configs if isinstance(c, DecodeConfig)]
    assert bool(decode) == (op == "forward" and m <= 16)
    assert any(c.dot == "fma" for c in decode) == (op == "forward" and m <= 4)
    assert any(c.dot == "mma" for c in decode) == (op == "forward" and m <= 16)  # tensor cores at every M


@pytest.mark.parametrize(("op", "m"), [("forward", 1), ("forward", 9), ("forward", 300), ("backward", 1)])
def test_default_fused_config_is_valid(op, m):
    sms = gpu_target.load_target("h100").sm_count
    config = default_fused_config(op, m, 4096, 4096, 64, num_cores=sms)
    config.check(m=m, n=4096, k=4096, blocksize=64)
    assert isinstance(config, DecodeConfig) == (op == "forward" and m <= 16)
    if isinstance(config, DecodeConfig):
        assert -(-4096 // config.block_n) * config.split_k >= 132  # a program for every SM
        assert config.dot == "mma" and config.lookup == "select"  # what the sm_90 figures favour (docs/kernels.md)


def test_the_registry_names_each_kernel_once_and_finds_it_by_config():
    names = [kernel.name for kernel in registry.KERNELS]
    assert len(names) == len(set(names))
    assert registry.kernel_for("forward", DecodeConfig()).name == "decode"
    assert registry.kernel_for("forward", MatmulConfig()).name == "matmul"
    assert registry.kernel_for("backward", MatmulConfig()).name == "matmul_transposed"
    with pytest.raises(ValueError, match="no backward kernel takes a DecodeConfig"):
        registry.kernel_for("backward", DecodeConfig())
    with pytest.raises(ValueError, match="unknown kernel 'nope'"):
        registry.by_name("nope")
    for config in (DecodeConfig(block_n=16, lookup="gather"), MatmulConfig(block_m=16, split_k=4)):
        assert autotune.config_from_json(autotune.config_to_json(config)) == config
    for kernel in registry.KERNELS:
        if kernel.op != "dequantize":
            assert kernel.reference is not None and kernel.space(1, 256, 512, 64) is not None


def test_tune_keeps_the_fastest_skips_failures_and_caches(tmp_path):
    times = {"xla": 3.0, "pallas:a": 2.0, "pallas:b": 1.0}

    def boom():
        raise RuntimeError("out of shared memory")

    candidates = {name: (lambda t=t: t) for name, t in times.items()} | {"pallas:c": boom}
    config_b = DecodeConfig(block_n=128, split_k=2)
    cache = TuningCache(tmp_path / "tune.json")
    choice = tune(_key(), candidates, cache=cache, configs={"pallas:b": config_b, "pallas:a": MatmulConfig()})
    assert choice == Choice("pallas", config_b, "measured", 1.0, 3.0, fused_config=config_b, fused_time_s=1.0)
    assert TuningCache(tmp_path / "tune.json").get(_key()) == choice  # persisted, DecodeConfig included

    candidates["xla"] = lambda: 0.5
    choice = tune(_key(m_bucket=32), candidates, cache=cache, configs={"pallas:b": config_b})
    assert choice.impl == "xla" and choice.config is None  # never slower than XLA
    assert choice.fused_config == config_b  # still what impl="pallas" uses
    assert len(json.loads((tmp_path / "tune.json").read_text())) == 2


def test_tune_stops_starting_candidates_when_its_budget_is_spent():
    now = [0.0]
    ran = []

    def candidate(name, seconds):
        def run():
            ran.append(name)
            now[0] += seconds  # the time this candidate took to compile and time
            return 1.0 if name == "xla" else 0.5

        return run

    candidates = {f"pallas:{i}": candidate(f"pallas:{i}", 8.0) for i in range(10)} | {"xla": candidate("xla", 1.0)}
    choice = tune(_key(), candidates, configs={}, budget_s=20.0, clock=lambda: now[0])
    assert ran[0] == "xla"  # the baseline always runs, first
    assert len(ran) == 4  # started at t = 1, 9, 17; not at 25
    assert choice.impl == "pallas"


def test_tune_fails_clearly_if_the_baseline_fails():
    def boom():
        raise RuntimeError("no")

    with pytest.raises(RuntimeError, match="XLA baseline itself failed"):
        tune(_key(), {"xla": boom})


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
    assert hash(first) == hash(second) and first == second  # usable inside a static KernelOptions


def test_per_call_seconds_both_modes():
    weights = timing.distinct_weights(32, 128, jnp.bfloat16, 3)
    x = jnp.ones((2, 128), jnp.bfloat16)
    fn = functools.partial(dispatch.xla_forward, dequant="xla")
    for mode in ("unrolled", "scan"):
        seconds = timing.per_call_seconds(fn, (x,), weights, 3, mode=mode, repeats=2)
        assert math.isfinite(seconds) and seconds > 0
    assert timing.copies_for(8 * 2**20) == 32 and timing.copies_for(2**30) == 2
    with pytest.raises(ValueError, match="count=4 calls need as many distinct weights; the stack holds 3"):
        timing.per_call_seconds(fn, (x,), weights, 4)  # a fourth call would re-read a weight from L2


# --- `impl="auto"` on a simulated GPU --------------------------------------------------------------------------


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """Pretend the default device is an H100 so that `impl="auto"` consults the cache and the tables."""
    h100 = gpu_target.device_facts("h100")
    real = gpu_target.device_facts
    monkeypatch.setattr(gpu_target, "device_facts", lambda target=None: h100 if target is None else real(target))
    return TuningCache(tmp_path / "tune.json")


def _plan(m, qt, options, impl="auto"):
    return dispatch.plan_for(m, qt, jnp.bfloat16, impl=impl, config=None, options=options)


@pytest.mark.parametrize("m", [1, 16, 4096])
def test_untuned_auto_is_xla_everywhere(fake_gpu, m):
    """Nothing measured for this shape: XLA, never a fused kernel on trust; impl="pallas" still has a config."""
    qt = quantize(jnp.ones((256, 512), jnp.bfloat16))
    options = dispatch.KernelOptions(tuning=fake_gpu.choices())
    assert not options.autotune  # no silent minutes of tuning at the first trace
    plan = _plan(m, qt, options)
    assert (plan.forward, plan.backward, plan.dequant) == ("xla", "xla", "pallas")
    fused = _plan(m, qt, options, impl="pallas")  # prefill-sized M: XLA unless a measurement says otherwise
    assert fused.forward == ("decode" if m <= 16 else "xla") and fused.backward == "matmul_transposed"


def test_auto_uses_the_cached_measurement(fake_gpu):
    qt = quantize(jnp.ones((256, 512), jnp.bfloat16))
    config = DecodeConfig(block_n=128, block_k=128, split_k=2, dot="fma")
    fake_gpu.put(dispatch.tuning_key("forward", 3, qt, jnp.bfloat16), Choice("pallas", config, "measured", 1e-5, 2e-5))
    plan = _plan(3, qt, dispatch.KernelOptions(tuning=fake_gpu.choices()))
    assert (plan.forward, plan.forward_config) == ("decode", config)
    assert plan.backward == "xla"  # the backward was not measured


def test_auto_uses_the_shipped_table_after_the_cache(fake_gpu, monkeypatch, tmp_path):
    qt = quantize(jnp.ones((256, 512), jnp.bfloat16))
    key = dispatch.tuning_key("forward", 1, qt, jnp.bfloat16)
    config = DecodeConfig(block_n=64, split_k=4, dot="fma")
    shipped = {str(tables.table_key(key)): Choice("pallas", config, "measured: H100 run", 1e-5, 3e-5)}
    autotune.write_entries(tmp_path / "H100.json", shipped)
    monkeypatch.setattr(tables, "TABLE_DIR", tmp_path)
    monkeypatch.setattr(tables, "lookup", functools.partial(tables.lookup, table_dir=tmp_path))
    assert _plan(1, qt, dispatch.KernelOptions(tuning=fake_gpu.choices())).forward == "decode"
    fake_gpu.put(key, Choice("xla", source="measured"))  # this machine's own measurement wins
    assert _plan(1, qt, dispatch.KernelOptions(tuning=fake_gpu.choices())).forward == "xla"


def test_tuning_choices_are_a_value_read_once(fake_gpu, monkeypatch):
    """The measured choices are part of what jit sees, compared by content: a changed cache file read again is
    another value (and another compiled program), the same content the same one; nothing is read while tracing."""
    qt = quantize(jnp.ones((256, 512), jnp.bfloat16))
    before = autotune.load_choices(fake_gpu.path)
    config = DecodeConfig(block_n=128, block_k=128, split_k=2, dot="fma")
    fake_gpu.put(dispatch.tuning_key("forward", 3, qt, jnp.bfloat16), Choice("pallas", config, "measured", 1e-5, 2e-5))
    after = autotune.load_choices(fake_gpu.path)
    assert len(before) == 0 and len(after) == 1
    assert dispatch.KernelOptions(tuning=after) == dispatch.KernelOptions(tuning=autotune.load_choices(fake_gpu.path))
    assert hash(dispatch.KernelOptions(tuning=before)) != hash(dispatch.KernelOptions(tuning=after))

    def no_reading(*args, **kwargs):
        raise AssertionError("a tuning cache file was read while tracing")

    monkeypatch.setattr(TuningCache, "_read", no_reading)
    assert _plan(3, qt, dispatch.KernelOptions(tuning=before)).forward == "xla"
    assert _plan(3, qt, dispatch.KernelOptions(tuning=after)).forward == "decode"
    assert _plan(3, qt, dispatch.KernelOptions()).forward == "xla"  # the shipped tables only


def test_the_shipped_tables_hold_only_measured_entries():
    assert tables.gpu_family("NVIDIA H200") == "H200" and tables.gpu_family("NVIDIA H100 80GB HBM3") == "H100"
    assert tables.gpu_family("NVIDIA A100-SXM4-80GB") is None
    for family in tables.FAMILIES:
        for text, choice in tables.load_table(family).items():
            assert TuningKey.parse(text).device_kind == family
            assert choice.source.startswith("measured")
    # The 2026-11-30 H200 measurement: XLA won at every shape it measured.
    h200 = tables.lookup(_key(device_kind="NVIDIA H200", m_bucket=1))
    assert h200.impl == "xla" and h200.fused_time_s > h200.xla_time_s


def test_autotune_measures_a_missing_shape_once(fake_gpu, monkeypatch):
    measured = []

    def fake_measure(op, m, qt, dtype, options):
        measured.append((op, m))
        choice = Choice("xla", source="measured")
        options.cache.put(dispatch.tuning_key(op, m, qt, dtype), choice)
        return choice

    monkeypatch.setattr(dispatch, "_measure", fake_measure)
    qt = quantize(jnp.ones((256, 512), jnp.bfloat16))
    options = dispatch.KernelOptions(cache=fake_gpu, autotune=True)
    for _ in range(2):
        plan = _plan(1000, qt, options)
        assert plan.forward == plan.backward == "xla"
    assert measured == [("forward", 1000), ("backward", 1000)]


@pytest.mark.parametrize(("op", "m"), [("forward", 4), ("backward", 4)])
def test_measure_runs_every_candidate(fake_gpu, monkeypatch, op, m):
    """The tuner's plumbing end to end, in the interpreter: every candidate runs on real inputs; a fake clock makes
    the widest fused tile the winner."""
    ran = []

    def fake_per_call_seconds(fn, args, weights, count, **kwargs):
        out = np.asarray(fn(*args, jax.tree.map(lambda leaf: leaf[0], weights)), np.float32)
        assert np.all(np.isfinite(out))
        config = fn.keywords.get("config")
        ran.append(config)
        if config is None:
            return 1.0
        return 1.0 / (config.block_n * getattr(config, "block_m", 16) * config.split_k * config.block_k)

    monkeypatch.setattr(timing, "per_call_seconds", fake_per_call_seconds)
    full = tuning_space(op, m, 64, 256, 64)
    space = [*full[:2], full[-1]]  # decode fma + mma, a tiled config (the interpreter is slow; all lower in CI)
    monkeypatch.setattr(autotune, "tuning_space", lambda *args: space)
    qt = quantize(jnp.ones((64, 256), jnp.bfloat16))
    choice = dispatch.measure(op, m, qt, jnp.bfloat16, interpret=True, cache=fake_gpu, budget_s=1e9)
    assert sorted(map(str, filter(None, ran))) == sorted(map(str, space)) and None in ran  # the XLA baseline too
    assert choice.impl == "pallas" and choice.source == "measured" and choice.config in space
    assert fake_gpu.get(dispatch.tuning_key(op, m, qt, jnp.bfloat16)) == choice


# --- the table tool and `qlora-jax tune` ------------------------------------------------------------------------


def test_table_tool_merges_measured_entries_of_its_gpu_kind(tmp_path, capsys):
    config = DecodeConfig(block_n=128, split_k=4)
    cache = TuningCache(tmp_path / "cache.json")
    cache.put(_key(device_kind="NVIDIA H200", m_bucket=1), Choice("pallas", config, "measured", 1e-5, 2e-5))
    cache.put(_key(device_kind="NVIDIA A100-SXM4-80GB"), Choice("xla", source="measured"))  # another kind: left out
    lines = tmp_path / "results.jsonl"
    record = {
        "kind": "choice",
        "key": str(_key(device_kind="NVIDIA H200", m_bucket=8)),
        "choice": Choice("xla", source="measured: gpu.py").to_json(),
    }
    lines.write_text(json.dumps({"kind": "timing"}) + "\n" + json.dumps(record) + "\n")
    table_dir = tmp_path / "tables"
    assert tables.main(["H200", str(cache.path), str(lines), "--table-dir", str(table_dir)]) == 0
    written = autotune.read_entries(table_dir / "H200.json")
    assert set(written) == {str(_key(device_kind="H200", m_bucket=1)), str(_key(device_kind="H200", m_bucket=8))}
    assert written[str(_key(device_kind="H200", m_bucket=1))].config == config
    assert "added forward|H200|1|" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no measured H100 entries"):
        tables.main(["H100", str(cache.path), "--table-dir", str(table_dir)])


@pytest.fixture
def tune_config(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    hf = {
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }
    (model / "config.json").write_text(json.dumps(hf))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{path: {model}, dtype: bfloat16}}\ndata: {{train: x.jsonl, max_length: 64}}\n"
        "train: {batch_size: 4, grad_accum: 2}\n"
    )
    return config


def test_cli_tune_without_a_gpu_fails_clearly(tune_config):
    if jax.default_backend() == "gpu":
        pytest.skip("checks the message on a machine without a GPU")
    with pytest.raises(SystemExit, match="qlora-jax tune: no GPU: JAX sees only cpu devices"):
        cli_main(["tune", str(tune_config)])
    with pytest.raises(SystemExit, match="data.max_length"):
        cli_main(["tune", str(tune_config), "--data.max_length", "none"])


def test_cli_tune_measures_every_linear_shape_for_decode_and_training(fake_gpu, monkeypatch, tune_config, capsys):
    calls = []

    def fake_measure(op, m, qt, dtype, *, cache):
        calls.append((op, m, qt.shape, jnp.dtype(dtype).name))
        choice = Choice("xla", source="measured", time_s=1e-5, xla_time_s=1e-5)
        cache.put(dispatch.tuning_key(op, m, qt, dtype), choice)
        return choice

    monkeypatch.setattr(dispatch, "measure", fake_measure)
    args = ["tune", str(tune_config), "--decode-m", "1,8", "--cache", str(fake_gpu.path)]
    assert cli_main(args) == 0
    # q/o (128x128), k/v (64x128), gate/up (256x128), down (128x256): M 1 and 8 forward, M = 2 x 64 both ways
    shapes = {(128, 128), (64, 128), (256, 128), (128, 256)}
    assert {c[2] for c in calls} == shapes and len(calls) == len(shapes) * 4
    assert {(c[0], c[1]) for c in calls} == {("forward", 1), ("forward", 8), ("forward", 128), ("backward", 128)}
    assert all(c[3] == "bfloat16" for c in calls)
    assert len(json.loads(fake_gpu.path.read_text())) == len(calls)
    assert "self_attn.q_proj" in capsys.readouterr().out
    calls.clear()
    assert cli_main(args) == 0 and not calls  # cached keys are kept
    assert cli_main([*args, "--force", "--no-train"]) == 0 and len(calls) == len(shapes) * 2
