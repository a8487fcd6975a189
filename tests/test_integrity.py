"""What we write is checked when it is read back (a flipped byte in an adapter, a merged or converted checkpoint, a
GGUF export is an error naming the file), and every tensor's claimed shape is checked against the model before its
data is read (a well-formed file whose known tensor claims gigabytes is refused without allocating them)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qlora_jax.integrity import IntegrityError

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    model_type="llama",
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
)


def _model(**fields):
    from qlora_jax.models import DecoderLM, ModelConfig

    config = ModelConfig.from_hf_config(TINY | fields)
    return DecoderLM(config, quant=None, dtype=jnp.float32, rngs=nnx.Rngs(0))


def _flip(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x04
    path.write_bytes(bytes(raw))


def _data_start(path: Path) -> int:
    """Where a safetensors file's tensor data begins (after its 8-byte length and JSON header)."""
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_a_flipped_byte_in_an_adapter_is_named_not_loaded(tmp_path):
    from qlora_jax.convert.peft import load_peft_adapter, save_peft_adapter
    from qlora_jax.lora import LoraConfig, apply_lora

    model = _model()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    apply_lora(model, config, rngs=nnx.Rngs(1))
    save_peft_adapter(model, tmp_path, config)
    load_peft_adapter(_model(), tmp_path)  # as written: loads
    weights = tmp_path / "adapter_model.safetensors"
    _flip(weights, _data_start(weights) + 5)
    with pytest.raises(
        IntegrityError,
        match=rf"{weights}: tensor base_model.model.model.layers.0.self_attn.\w_proj."
        r"lora_\w.weight does not match the checksum recorded",
    ):
        load_peft_adapter(_model(), tmp_path)


def test_a_flipped_byte_in_a_merged_checkpoint_is_named_not_loaded(tmp_path):
    from qlora_jax.convert.hf import load_pretrained
    from qlora_jax.convert.merge import merge_and_save

    merge_and_save(_model(), tmp_path, dtype=jnp.float32)
    load_pretrained(tmp_path, quantization=None, dtype=jnp.float32)
    weights = tmp_path / "model.safetensors"
    _flip(weights, len(weights.read_bytes()) - 7)
    with pytest.raises(
        IntegrityError,
        match=rf"{weights}: tensor .* does not match the checksum recorded when the "
        r"file was written",
    ):
        load_pretrained(tmp_path, quantization=None, dtype=jnp.float32)


def test_a_flipped_byte_in_a_gguf_export_is_named_not_loaded(tmp_path):
    pytest.importorskip("gguf")
    from qlora_jax.convert.gguf_export import save_gguf
    from qlora_jax.convert.hf import load_pretrained

    path = save_gguf(_model(), tmp_path / "model.gguf", tensor_type="f32")
    load_pretrained(path, quantization=None, dtype=jnp.float32)
    _flip(path, len(path.read_bytes()) - 9)
    with pytest.raises(IntegrityError, match=rf"{path}: its tensor data does not match the checksum recorded"):
        load_pretrained(path, quantization=None, dtype=jnp.float32)


# ---- claimed shapes are checked before any data is read -----------------------------------------------------------


def _sparse_safetensors(
    path: Path,
    tensors: dict[str, np.ndarray],
    huge: tuple[str, tuple[int, ...]],
    metadata: dict[str, str] | None = None,
) -> None:
    """A well-formed safetensors file holding `tensors` and, under `huge[0]`, a float32 tensor of shape `huge[1]`
    whose bytes are a hole in a sparse file (so it costs no disk)."""
    header, offset, chunks = {}, 0, []
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    size = int(np.prod(huge[1])) * 4
    header[huge[0]] = {"dtype": "F32", "shape": list(huge[1]), "data_offsets": [offset, offset + size]}
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))
        f.truncate(8 + len(text) + offset + size)


_PEAK = """
import sys
sys.path.insert(0, {root!r})
try:
{body}
except Exception as e:
    print(type(e).__name__ + ": " + str(e))
# VmHWM: this program's peak resident memory (ru_maxrss would carry over the parent's peak across exec)
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def _peak_and_error(body: str) -> tuple[int, str]:
    code = _PEAK.format(root=str(ROOT), body="\n".join("    " + line for line in body.strip().splitlines()))
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    *lines, peak = done.stdout.strip().splitlines()
    return int(peak), "\n".join(lines)


def test_a_base_weight_claiming_8_gib_is_refused_before_it_is_read(tmp_path):
    """model.safetensors whose mlp.down_proj claims [65536, 32768] float32 (8 GiB, a sparse file): the loader
    names file and tensor, and the process never holds the 8 GiB."""
    from qlora_jax.convert.merge import merged_tensors

    model = _model()
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf_config()))
    key = "model.layers.0.mlp.down_proj.weight"
    tensors = {k: v for k, v in merged_tensors(model, jnp.float32) if k != key}
    _sparse_safetensors(tmp_path / "model.safetensors", tensors, (key, (65536, 32768)))
    peak, error = _peak_and_error(f"""
import jax.numpy as jnp
from qlora_jax.convert.hf import load_pretrained
load_pretrained({str(tmp_path)!r}, dtype=jnp.float32)
""")
    assert error == (
        f"CheckpointError: {tmp_path / 'model.safetensors'}: tensor {key} has shape (65536, 32768), expected (16, 32)"
    ), error
    assert peak < 2 * 2**30, peak


def test_an_adapter_claiming_6_gib_is_refused_before_it_is_read(tmp_path):
    """adapter_model.safetensors whose lora_A claims [49152, 32768] float32 (6 GiB, sparse): refused naming the
    tensor and the shape the model needs, without holding it."""
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]})
    )
    _sparse_safetensors(
        tmp_path / "adapter_model.safetensors",
        {f"{prefix}.lora_B.weight": np.zeros((16, 2))},
        (f"{prefix}.lora_A.weight", (49152, 32768)),
    )
    peak, error = _peak_and_error(f"""
from tests.test_integrity import _model
from qlora_jax.convert.peft import load_peft_adapter
load_peft_adapter(_model(), {str(tmp_path)!r})
""")
    assert error == (
        f"PeftFormatError: {tmp_path / 'adapter_model.safetensors'}: model.layers.0.self_attn.q_proj."
        "lora_A has shape (49152, 32768), the model needs (2, 16) (rank 2 from the config)"
    ), error
    assert peak < 2 * 2**30, peak


def test_a_gguf_tensor_claiming_another_shape_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from qlora_jax.convert.gguf import GGUFCheckpoint
    from qlora_jax.convert.hf import load_pretrained
    from tests.families import write_one_block_gguf

    def never(self, name):
        raise AssertionError(f"{name} was decoded before every shape was checked")

    monkeypatch.setattr(GGUFCheckpoint, "tensor", never)

    path = tmp_path / "huge.gguf"
    write_one_block_gguf(
        path,
        [
            ("token_embd.weight", np.ones((16, 8), np.float32), None),
            ("blk.0.attn_norm.weight", np.ones(4096, np.float32), None),
        ],
    )
    with pytest.raises(
        ValueError,
        match=rf"{path}: tensor model.layers.0.input_layernorm.weight has shape "
        r"\(4096,\), expected \(8,\)",
    ):
        load_pretrained(path, quantization=None, dtype=jnp.float32)
