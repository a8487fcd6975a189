"""Fuzzing the readers: GGUF files, safetensors checkpoints, bitsandbytes state dicts, PEFT adapter directories,
the YAML config and JSONL data, each with `FUZZ_EXAMPLES` (10^4) generated inputs (tests/fuzzing.py). Whatever
the input, a reader returns or raises one of the library's own errors (`qlora_jax.errors.QloraJaxError`): never an
IndexError, KeyError, TypeError, numpy's or a parser's exception, and never a crash. Each test also checks that its
inputs reach both outcomes (some accepted, some refused), so that the fuzzing gets past the first check.

`QLORA_JAX_FUZZ_EXAMPLES` sets the count (e.g. 10**5 for a longer session), `QLORA_JAX_FUZZ_SEED` the seed.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.families import write_one_block_gguf
from tests.fuzzing import Fuzzer, dumps, run

pytestmark = pytest.mark.slow  # 10^4 inputs a reader: outside the fast subset (-m "not slow and not oracle")
FUZZ_EXAMPLES = int(os.environ.get("QLORA_JAX_FUZZ_EXAMPLES", 10_000))
SEED = int(os.environ.get("QLORA_JAX_FUZZ_SEED", 0))
_names = itertools.count()
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _yaml(value) -> str:
    """YAML text of a fuzzed value (libyaml cannot write lone surrogates: then Python's repr, also YAML-ish)."""
    try:
        return yaml.dump(value, Dumper=_DUMPER, allow_unicode=True)
    except (yaml.YAMLError, UnicodeError):
        return repr(value)


def _fresh(directory: Path, suffix: str = "") -> Path:
    """A new name for every input: readers memory-map their files, which must not change under them."""
    return directory / f"{next(_names)}{suffix}"


def _both_outcomes(outcomes) -> None:
    total = sum(outcomes.values())
    assert total == FUZZ_EXAMPLES
    assert outcomes["accepted"] >= total // 100 and total - outcomes["accepted"] >= total // 100, outcomes


# ---- GGUF --------------------------------------------------------------------------------------------------------


def _gguf_seed(path: Path) -> bytes:
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    q8 = gguf.quants.quantize(rng.standard_normal((4, 32)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    write_one_block_gguf(
        path,
        [
            ("token_embd.weight", rng.standard_normal((16, 8)).astype(np.float32), None),
            ("blk.0.attn_norm.weight", np.ones(8, np.float16), None),
            ("blk.0.attn_q.weight", q8, gguf.GGMLQuantizationType.Q8_0),
        ],
    )
    return path.read_bytes()


def test_fuzz_gguf(tmp_path):
    from qlora_jax.convert.gguf import read_gguf

    seed = _gguf_seed(tmp_path / "seed.gguf")
    checkpoint = read_gguf(tmp_path / "seed.gguf")
    assert all(checkpoint.tensor(name) is not None for name in checkpoint.tensor_names)  # the seed is valid
    header = seed.index(b"token_embd.weight") + 200  # metadata and tensor infos; the tensor data follows

    def read(data: bytes) -> None:
        path = _fresh(tmp_path, ".gguf")
        path.write_bytes(data)
        try:
            checkpoint = read_gguf(path)
            for name in checkpoint.tensor_names:
                checkpoint.tensor(name)
        finally:
            path.unlink()

    _both_outcomes(
        run("gguf", FUZZ_EXAMPLES, SEED, lambda f: f.mutate_bytes(seed, header), read, failures=tmp_path / "failures")
    )


# ---- safetensors ---------------------------------------------------------------------------------------------

_DTYPES = ["F32", "F16", "BF16", "U8", "I8", "I64", "F64", "BOOL", "F8_E4M3", "X"]


def test_fuzz_safetensors(tmp_path):
    from safetensors.numpy import save_file

    from qlora_jax.convert.safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsReader

    rng = np.random.default_rng(0)
    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((4, 8)).astype(np.float32),
        "model.norm.weight": np.ones(8, np.float16),
        "codes": np.arange(6, dtype=np.uint8).reshape(6, 1),
    }
    save_file(tensors, str(tmp_path / "seed.safetensors"))
    seed = (tmp_path / "seed.safetensors").read_bytes()
    length = int.from_bytes(seed[:8], "little")
    seed_header, data = json.loads(seed[8 : 8 + length]), seed[8 + length :]
    fields = {
        "dtype": _DTYPES,
        "shape": [[], [0], [4, 8], [8], [-1, 2], [2**40], [6, 1]],
        "data_offsets": [[0, 0], [0, 128], [128, 0], [0, 2**62], [-1, 4], [0, 1]],
    }

    def make(f: Fuzzer):
        r = f.rng.random()
        if r < 0.4:  # the header's JSON, changed in its own terms
            header = copy.deepcopy(seed_header)
            key = f.rng.choice(list(header))
            header[key] = f.mutate_value(header[key], fields) if f.chance(0.9) else f.json_value()
            text = dumps(header).encode() if f.chance(0.95) else f.mutate_bytes(dumps(header).encode())
            size = len(text) if f.chance(0.9) else f.integer()
            return None, (size % 2**64).to_bytes(8, "little") + text + data
        if r < 0.8:
            return None, f.mutate_bytes(seed, 8 + length)
        index = {
            "weight_map": {
                k: f.rng.choice(["a.safetensors", "b.safetensors", "../a.safetensors", ""])
                for k in f.rng.sample([*tensors, "x"], f.rng.randint(0, 4))
            }
        }
        return (f.mutate_value(index) if f.chance(0.3) else index), f.mutate_bytes(seed, 8 + length)

    def read(case) -> None:
        index, content = case
        directory = _fresh(tmp_path)
        directory.mkdir()
        try:
            if index is None:
                (directory / SINGLE_FILE).write_bytes(content)
            else:  # a sharded checkpoint: the mutated file as one shard, the seed as the other
                (directory / "a.safetensors").write_bytes(content)
                (directory / "b.safetensors").write_bytes(seed)
                (directory / INDEX_FILE).write_text(dumps(index))
            reader = SafetensorsReader(directory)
            for key in reader.keys():
                reader.shape_and_dtype(key)
                reader.tensor(key)
            dict(reader.tensors())
        finally:
            shutil.rmtree(directory)

    _both_outcomes(run("safetensors", FUZZ_EXAMPLES, SEED, make, read, failures=tmp_path / "failures"))


# ---- bitsandbytes state dicts -----------------------------------------------------------------------------------

_SUFFIXES = (
    "",
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
    ".quant_state.bitsandbytes__fp4",
)


def test_fuzz_bitsandbytes_state_dicts():
    import jax.numpy as jnp

    from qlora_jax.convert import bnb
    from qlora_jax.quant import quantize

    valid = {
        **bnb.to_state_dict(quantize(jnp.linspace(-1, 1, 8 * 64).reshape(8, 64), double_quant=True), "w"),
        **bnb.to_state_dict(quantize(jnp.ones((4, 32)), quant_type="fp4", blocksize=32, double_quant=False), "v"),
    }
    assert set(bnb.split_state_dict(valid)[0]) == {"w", "v"}
    metas = {k: json.loads(bytes(v)) for k, v in valid.items() if ".quant_state." in k}
    vocabulary = {
        "quant_type": ["nf4", "fp4", "int4", "NF4", ""],
        "blocksize": [32, 64, 4096, 0, -64, 63, "64"],
        "dtype": ["float32", "bfloat16", "float16", "int8", "x"],
        "shape": [[8, 64], [0], [], [-8, 64]],
        "nested_blocksize": [256, 0, 7],
        "nested_offset": [0.0, "x", None],
        "nested_dtype": ["float32", "float16"],
    }

    def array(f: Fuzzer) -> np.ndarray:
        dtype = f.rng.choice(["uint8", "float32", "float16", "int64", "bool"])
        shape = tuple(f.rng.randint(0, 40) for _ in range(f.rng.randint(0, 3)))
        return np.full(shape, f.rng.choice([0, 1, 255, 0.5, -3.0, np.inf, np.nan])).astype(dtype)

    def make(f: Fuzzer) -> dict:
        tensors = dict(valid)
        for _ in range(f.rng.randint(1, 4)):
            key = f.rng.choice(["w", "v"]) + f.rng.choice(_SUFFIXES)
            r = f.rng.random()
            if r < 0.2:
                tensors.pop(key, None)
            elif r < 0.6 and key in metas:
                text = dumps(f.mutate_value(metas[key], vocabulary)).encode()
                tensors[key] = np.frombuffer(text if f.chance(0.9) else f.mutate_bytes(text), np.uint8)
            elif r < 0.8 and key in tensors:  # the right dtype, another shape or other values
                old = np.asarray(tensors[key])
                tensors[key] = np.resize(old, (max(old.size + f.rng.randint(-3, 3), 0),)).astype(old.dtype)
            else:
                tensors[key] = array(f)
        return tensors

    def read(tensors: dict) -> None:
        quantized, _ = bnb.split_state_dict(tensors)
        for qt in quantized.values():
            assert qt.packed.size * 2 >= np.prod(qt.shape)

    _both_outcomes(run("bnb", FUZZ_EXAMPLES, SEED, make, read, failures=Path("/tmp") / "qlora_jax_fuzz"))


# ---- PEFT adapter directories ----------------------------------------------------------------------------------


def test_fuzz_peft_adapters(tmp_path):
    import jax.numpy as jnp
    from flax import nnx
    from safetensors.numpy import load_file, save_file

    from qlora_jax.convert.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_peft_adapter
    from qlora_jax.models import DecoderLM, ModelConfig

    config = ModelConfig.from_hf_config(
        dict(
            model_type="llama",
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    model = nnx.eval_shape(lambda: DecoderLM(config, quant=None, dtype=jnp.float32, rngs=nnx.Rngs(0)))  # structure
    seed = {}
    for layer, (module, n_in, n_out) in itertools.product(
        range(2), [("self_attn.q_proj", 16, 16), ("mlp.down_proj", 32, 16)]
    ):
        prefix = f"base_model.model.model.layers.{layer}.{module}"
        seed |= {
            f"{prefix}.lora_A.weight": np.full((2, n_in), 0.1, np.float32),
            f"{prefix}.lora_B.weight": np.zeros((n_out, 2), np.float32),
            f"{prefix}.lora_magnitude_vector": np.ones(n_out, np.float32),
        }
    (tmp_path / "seed").mkdir()
    save_file(seed, str(tmp_path / "seed" / ADAPTER_WEIGHTS))
    seed_config = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["q_proj", "down_proj"],
        "use_dora": True,
        "bias": "none",
        "lora_dropout": 0.0,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
    }
    (tmp_path / "seed" / ADAPTER_CONFIG).write_text(json.dumps(seed_config))
    assert set(read_peft_adapter(model, tmp_path / "seed")[1]) == {
        "model.layers.self_attn.q_proj",
        "model.layers.mlp.down_proj",
    }
    seed_tensors = load_file(str(tmp_path / "seed" / ADAPTER_WEIGHTS))
    seed_bytes = (tmp_path / "seed" / ADAPTER_WEIGHTS).read_bytes()
    header = 8 + int.from_bytes(seed_bytes[:8], "little")
    keys = sorted(seed_tensors)
    vocabulary = {
        "peft_type": ["LORA", "PROMPT_TUNING", None],
        "r": [2, 4, 0, -1, "2", 2.5, 10**9],
        "lora_alpha": [4, 0, None, "x"],
        "target_modules": [["q_proj"], "all-linear", "q_proj", 3],
        "use_dora": [True, False, "yes"],
        "bias": ["none", "all", "x"],
        "rank_pattern": [{}, {"q": 4}],
        "modules_to_save": [None, ["lm_head"]],
        "lora_dropout": [0.0, None, "x", -1],
    }

    def make(f: Fuzzer):
        config_text = dumps(f.mutate_value(seed_config, vocabulary)) if f.chance(0.5) else dumps(seed_config)
        if f.chance(0.05):
            config_text = f.text()
        if f.chance(0.3):
            return config_text, f.mutate_bytes(seed_bytes, header)
        tensors = dict(seed_tensors)
        for _ in range(f.rng.randint(1, 3)):
            key = f.rng.choice(sorted(tensors) or keys)
            if key not in tensors:
                continue
            r = f.rng.random()
            if r < 0.25:
                tensors.pop(key)
            elif r < 0.45:  # renamed: another layer, another module, or anything
                anything = f.text().encode("utf-8", "replace").decode() or "x"
                new = f.rng.choice(
                    [
                        key.replace("layers.0", f"layers.{f.integer()}"),
                        key.replace("q_proj", "k_proj"),
                        key.replace(".lora_A", ""),
                        anything,
                    ]
                )
                tensors[new] = tensors.pop(key)
            elif r < 0.8:
                shape = tuple(f.rng.randint(0, 40) for _ in range(f.rng.randint(0, 3)))
                tensors[key] = np.ones(shape, f.rng.choice(["float32", "float16", "int32", "uint8"]))
            else:
                tensors[key] = np.full_like(tensors[key], f.rng.choice([np.nan, np.inf, 1e30]))
        return config_text, tensors

    directory = tmp_path / "adapter"  # rewritten for every input: load_file keeps no mapping of the file open
    directory.mkdir()

    def read(case) -> None:
        config_text, weights = case
        (directory / ADAPTER_CONFIG).write_text(config_text, errors="surrogatepass")
        if isinstance(weights, bytes):
            (directory / ADAPTER_WEIGHTS).write_bytes(weights)
        else:
            save_file(weights, str(directory / ADAPTER_WEIGHTS))
        read_peft_adapter(model, directory)

    _both_outcomes(run("peft", FUZZ_EXAMPLES, SEED, make, read, failures=tmp_path / "failures"))


# ---- the YAML config ----------------------------------------------------------------------------------------------


def test_fuzz_yaml_config(tmp_path):
    import dataclasses

    from qlora_jax.train.config import _SECTIONS, load_config

    fields = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in _SECTIONS.items()}
    valid = {
        "model": {"path": "m.gguf", "quant": "nf4"},
        "data": {"train": "t.jsonl", "max_length": 64},
        "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
        "optim": {"learning_rate": 1e-4},
        "train": {"steps": 10, "batch_size": 4, "grad_accum": 2, "samples": ["hi"]},
        "mesh": {"data": 1, "fsdp": -1},
    }
    vocabulary = {
        name: [None, 0, -1, 1, 3, "x", "nf4", "all", [], {}, 1e-3, True] for fs in fields.values() for name in fs
    }
    flags = [f"--{s}.{f}" for s, fs in fields.items() for f in fs]

    def make(f: Fuzzer):
        raw = valid
        for _ in range(f.rng.randint(1, 3)):
            section = f.rng.choice([*fields, "trian", f.text()])
            if not isinstance(raw, dict):
                break
            if f.chance(0.8) and isinstance(raw.get(section), dict):
                raw = raw | {section: f.mutate_value(raw[section], vocabulary)}
            else:
                raw = f.mutate_value(raw, vocabulary) if f.chance(0.5) else raw | {section: f.json_value(1)}
        text = _yaml(raw).encode("utf-8", "surrogatepass")
        if f.chance(0.3):
            text = f.mutate_bytes(text)
        overrides = []
        for _ in range(f.rng.choice([0, 0, 1, 2])):
            overrides += [f.rng.choice(flags) if f.chance(0.9) else f.text(), _yaml(f.json_value(1))]
        return text, overrides if f.chance(0.9) else overrides[:-1]

    def read(case) -> None:
        text, overrides = case
        path = _fresh(tmp_path, ".yaml")
        path.write_bytes(text)
        try:
            load_config(path, overrides)
        finally:
            path.unlink()

    _both_outcomes(run("yaml", FUZZ_EXAMPLES, SEED, make, read, failures=tmp_path / "failures"))


# ---- JSONL data ------------------------------------------------------------------------------------------------


def test_fuzz_jsonl_data(tmp_path):
    from qlora_jax.train.data import load_examples, pack_examples
    from tests.test_data import TINY_WORDS, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    words = TINY_WORDS.split()
    valid = [
        {"text": "hello world"},
        {"prompt": "how are you", "completion": "fine thanks"},
        {
            "messages": [
                {"role": "system", "content": "hello"},
                {"role": "user", "content": "what is"},
                {"role": "assistant", "content": "fine"},
            ]
        },
    ]
    vocabulary = {
        "role": ["user", "assistant", "system", "tool", "bot", None, 3],
        "content": ["hello", "", None, 3],
        "text": ["", " ".join(words), None],
        "messages": [[], "x", None],
    }

    def make(f: Fuzzer) -> bytes:
        lines = []
        for _ in range(f.rng.randint(1, 4)):
            record = f.rng.choice(valid)
            if f.chance(0.6):
                record = f.mutate_value(record, vocabulary)
            line = dumps(record).encode("utf-8", "surrogatepass")
            lines.append(f.mutate_bytes(line) if f.chance(0.15) else line)
        return b"\n".join(lines)

    def read(data: bytes) -> None:
        path = _fresh(tmp_path, ".jsonl")
        path.write_bytes(data)
        try:
            examples = load_examples(path, tokenizer, max_length=16, loss_on="completion")
            pack_examples(examples, 16)
        finally:
            path.unlink()

    _both_outcomes(run("jsonl", FUZZ_EXAMPLES, SEED, make, read, failures=tmp_path / "failures"))
