"""qlora-jax: QLoRA fine-tuning in JAX, with 4-bit NF4 base weights stored exactly as bitsandbytes stores them."""

from qlora_jax.quant import QuantizedTensor, decode_absmax, dequantize, quantize

__version__ = "0.1.0"

__all__ = ["QuantizedTensor", "quantize", "dequantize", "decode_absmax", "__version__"]
