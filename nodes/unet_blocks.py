"""UNet block lookup for the nodes: a ComfyUI MODEL's SpatialTransformer blocks by name.

Blocks are named as in ComfyUI's UNet (``output_blocks.4.1``, optionally prefixed
``diffusion_model.``); diffusers names as used by published SAEs (``unet.up_blocks.1.attentions.1``)
are accepted and mapped with ComfyUI's own key map (``comfy.utils.unet_to_diffusers``). Which classes
are the transformer blocks depends on the model family (:mod:`.families`): ComfyUI's SpatialTransformer
for SD1.x/SD2.x/SDXL, MiniCanvas' own (same names and layout: ``output_blocks.3.1`` ...) for MiniCanvas.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from sae_core.saeuron import BlockRef

from .families import model_family, transformer_block_types

__all__ = [
    "block_width",
    "diffusers_to_ldm",
    "find_block",
    "resolve_block",
    "spatial_transformer_blocks",
    "unet_of",
]


def unet_of(model: Any) -> torch.nn.Module:
    """The UNet (``diffusion_model``) of a MODEL; ValueError for model families without one."""
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if unet is None:
        raise ValueError(f"model: {type(getattr(model, 'model', model)).__name__} has no diffusion_model; "
                         "SAeUron needs a UNet with SpatialTransformer blocks (SD1.x, SD2.x, SDXL, MiniCanvas)")
    return unet


def spatial_transformer_blocks(model: Any) -> dict[str, torch.nn.Module]:
    """Every SpatialTransformer of the model's UNet, by its ComfyUI name (``output_blocks.4.1``)."""
    types = transformer_block_types(model)
    return {name: m for name, m in unet_of(model).named_modules() if isinstance(m, types)}


def diffusers_to_ldm(model: Any, name: str) -> Optional[str]:
    """ComfyUI name of a diffusers module path (``up_blocks.1.attentions.1``) via ComfyUI's key map."""
    import comfy.utils

    config = getattr(getattr(model.model, "model_config", None), "unet_config", None)
    if not config:
        return None
    prefix = name + "."
    for key, ldm in comfy.utils.unet_to_diffusers(config).items():
        if key.startswith(prefix):
            suffix = key[len(prefix):]
            if ldm.endswith("." + suffix):
                return ldm[: -len(suffix) - 1]
    return None


def resolve_block(model: Any, block: str) -> tuple[str, torch.nn.Module]:
    """``(ComfyUI name, module)`` of a SpatialTransformer block named ``block``.

    Accepts ComfyUI names (``output_blocks.4.1``, optionally prefixed ``diffusion_model.``) and
    diffusers names (``unet.up_blocks.1.attentions.1``). An unknown name raises a ValueError listing
    the valid ones.
    """
    blocks = spatial_transformer_blocks(model)
    family = model_family(model)
    if not blocks:
        raise ValueError(f"model: this {family} model has no SpatialTransformer blocks; SAeUron supports "
                         "SD1.x, SD2.x, SDXL and MiniCanvas UNets")
    text = (block or "").strip()
    for prefix in ("diffusion_model.", "unet."):
        if text.startswith(prefix):
            text = text[len(prefix):]
    name = text
    if text.split(".")[0] in ("up_blocks", "down_blocks", "mid_block"):
        name = diffusers_to_ldm(model, text) or text
    if name not in blocks:
        raise ValueError(f"block: '{block}' is not a SpatialTransformer block of this {family} UNet; "
                         f"valid blocks: {', '.join(blocks)}")
    return name, blocks[name]


def block_width(module: torch.nn.Module) -> int:
    """Channels of a SpatialTransformer's output (equal to its input channels)."""
    channels = getattr(module, "in_channels", None)
    if channels is None:  # MiniCanvas' transformer: a linear proj_out over the channels
        channels = module.proj_out.out_features
    return int(channels)


def find_block(model: Any, block: str) -> BlockRef:
    """:func:`resolve_block` as the :class:`~sae_core.saeuron.BlockRef` the SAeUron pipeline reads."""
    name, module = resolve_block(model, block)
    return BlockRef(name, module, block_width(module))
