"""Every file format in and out: bitsandbytes 4-bit state dicts (`bnb`)."""

from qlora_jax.convert import bnb

__all__ = ["bnb"]
