"""The decoder (every supported family) and its configuration, read from config.json or GGUF metadata."""

from qlora_jax.models.config import SUPPORTED_MODEL_TYPES, ConfigError, ModelConfig, RopeConfig, UnsupportedModelError
from qlora_jax.models.config_files import read_model_config
from qlora_jax.models.decoder import ATTENTION_IMPLS, REMAT_POLICIES, ComputeOptions, DecoderLM, KVCache

__all__ = [
    "ATTENTION_IMPLS",
    "SUPPORTED_MODEL_TYPES",
    "REMAT_POLICIES",
    "ComputeOptions",
    "ConfigError",
    "DecoderLM",
    "KVCache",
    "ModelConfig",
    "RopeConfig",
    "UnsupportedModelError",
    "read_model_config",
]
