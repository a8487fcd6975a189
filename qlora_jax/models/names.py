"""Where a decoder's layers are: transformers' module path `model.layers`, which the decoder's own tree mirrors.

A checkpoint names layer 3's query projection `model.layers.3.self_attn.q_proj`; the decoder holds all layers as
one module at `model.layers` whose variables carry a leading [num_layers] axis, so its paths have no index
(`model.layers.self_attn.q_proj`). These functions go between the two spellings.

>>> layer_name("model.layers.self_attn.q_proj", 3)
'model.layers.3.self_attn.q_proj'
>>> split_layer_name("model.layers.3.self_attn.q_proj.weight")
('model.layers.self_attn.q_proj.weight', 3)
>>> split_layer_name("lm_head.weight")
('lm_head.weight', None)
"""

from __future__ import annotations

import re

__all__ = [
    "LAYERS",
    "LAYERS_PATH",
    "is_stacked",
    "layer_name",
    "split_layer_name",
    "hf_module_name",
    "module_name_from_hf",
]

LAYERS = "model.layers"
LAYERS_PATH: tuple[str, ...] = tuple(LAYERS.split("."))
_INDEXED = re.compile(rf"^{re.escape(LAYERS)}\.(0|[1-9][0-9]*)(?:\.(.+))?$")


def is_stacked(path: str | tuple[str, ...]) -> bool:
    """Whether a module or variable path (dotted, or a tuple of names) lies in the stacked layers."""
    parts = tuple(path.split(".")) if isinstance(path, str) else tuple(str(p) for p in path)
    return parts[: len(LAYERS_PATH)] == LAYERS_PATH and len(parts) > len(LAYERS_PATH)


def layer_name(path: str, layer: int | None) -> str:
    """One layer's name of a stacked path: `model.layers.<rest>` -> `model.layers.<layer>.<rest>` (and
    `model.layers` -> `model.layers.<layer>`); with layer None, `path` as it is (a module outside the layers).

    Raises ValueError for a layer index on a path outside the stacked layers.
    """
    if layer is None:
        return path
    if path == LAYERS:
        return f"{LAYERS}.{layer}"
    if not is_stacked(path):
        raise ValueError(f"{path!r} is not a path in {LAYERS}")
    return f"{LAYERS}.{layer}.{path[len(LAYERS) + 1 :]}"


def split_layer_name(name: str) -> tuple[str, int | None]:
    """The stacked path and layer index of one layer's name (`model.layers.3.<rest>` -> (`model.layers.<rest>`,
    3); `model.layers.3` -> (`model.layers`, 3)); any other name comes back as it is, with None."""
    if match := _INDEXED.match(name):
        return (LAYERS if match[2] is None else f"{LAYERS}.{match[2]}"), int(match[1])
    return name, None


def hf_module_name(name: str, text_model: str = "model") -> str:
    """A module's name in the transformers model a checkpoint loads as. Ours when the decoder is that model
    (`*ForCausalLM`); when the decoder sits inside another model at `text_model` (Gemma 3's image-text model:
    `model.language_model`), `model.` becomes `text_model.`; `lm_head` stays.

    >>> hf_module_name("model.layers.3.mlp.up_proj", "model.language_model")
    'model.language_model.layers.3.mlp.up_proj'
    """
    if text_model == "model" or (name != "model" and not name.startswith("model.")):
        return name
    return text_model + name[len("model") :]


def module_name_from_hf(name: str, text_model: str = "model") -> str | None:
    """The inverse of `hf_module_name`: our name of a transformers module, or None for a module outside the text
    decoder (`model.vision_tower.*`, `model.multi_modal_projector.*`)."""
    if text_model == "model":
        return name
    # transformers 4.x (before its Gemma 3 refactor) named them `language_model.model.*`, `language_model.lm_head`
    for prefix, ours in (
        (text_model, "model"),
        ("language_model.model", "model"),
        ("language_model.lm_head", "lm_head"),
    ):
        if name == prefix or name.startswith(prefix + "."):
            return ours + name[len(prefix) :]
    if name == "model" or name.startswith(("model.", "vision_tower.", "multi_modal_projector.")):
        return None
    return name
