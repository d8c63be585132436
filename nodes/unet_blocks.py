"""UNet block lookup for the nodes: a ComfyUI MODEL's SpatialTransformer blocks by name.

Blocks are named as in ComfyUI's UNet (``output_blocks.4.1``, optionally prefixed ``diffusion_model.``);
diffusers names as used by published SAEs (``unet.up_blocks.1.attentions.1``) and the short names of the
papers (``up.1.1``, ``down.2.1``, ``mid.0``: ``<up|down>.<diffusers block>.<attention>``) are accepted and
mapped with ComfyUI's own key map (``comfy.utils.unet_to_diffusers``), so each layout resolves through its
own config: SD1.x, SD2.x (linear projections in the transformers; v-prediction changes nothing here) and
SDXL (no attention at the first level, two transformer blocks per SpatialTransformer at the second level
and ten at the third and in the middle: one SpatialTransformer is the whole stack, hooked as one block).
Which classes are the transformer blocks depends on the model family (:mod:`.families`): ComfyUI's
SpatialTransformer for SD1.x/SD2.x/SDXL, MiniCanvas' own (same names and layout: ``output_blocks.3.1`` ...)
for MiniCanvas.

The blocks the literature uses (:data:`LITERATURE_BLOCKS`, also listed when a block name is not found):

* SD1.x (SAeUron, Cywinski & Deja 2025): ``up.1.1`` = ``output_blocks.4.1`` (objects) and ``up.1.2`` =
  ``output_blocks.5.1`` (styles), block outputs. SD2.x has the same layout (no published SAE).
* SDXL (the SDXL-Turbo SAEs of "Unpacking SDXL Turbo", Surkov et al. 2024, repository sdxl-unbox):
  ``down.2.1`` = ``input_blocks.8.1``, ``mid.0`` = ``middle_block.1``, ``up.0.0`` = ``output_blocks.0.1``
  and ``up.0.1`` = ``output_blocks.1.1`` (all 1280 wide, ten transformer blocks each), trained on the
  blocks' updates (``source`` ``diff``: output minus input); the paper finds up.0.1 carries style and
  up.0.0 / down.2.1 composition and local detail.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch

from sae_core.saeuron import BlockRef

from .families import in_family, model_family, transformer_block_types

__all__ = [
    "LITERATURE_BLOCKS",
    "block_width",
    "diffusers_to_ldm",
    "find_block",
    "literature_blocks",
    "resolve_block",
    "short_to_diffusers",
    "spatial_transformer_blocks",
    "unet_of",
]

LITERATURE_BLOCKS: dict[str, tuple[tuple[str, str], ...]] = {
    "SD15": (("up.1.1", "SAeUron objects"), ("up.1.2", "SAeUron styles")),
    "SD20": (("up.1.1", "SAeUron's object block on SD1.x"), ("up.1.2", "SAeUron's style block on SD1.x")),
    "SDXL": (("down.2.1", "sdxl-unbox, update"), ("mid.0", "sdxl-unbox, update"),
             ("up.0.0", "sdxl-unbox, update"), ("up.0.1", "sdxl-unbox, update; style")),
}
"""Per family (and families derived from it): the paper names of the blocks published SAEs hook, and what for."""

_SHORT = re.compile(r"^(?P<kind>up|down)\.(?P<block>\d+)\.(?P<attn>\d+)$|^mid\.(?P<mid>\d+)$")


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


def short_to_diffusers(name: str) -> str | None:
    """The diffusers path of a paper's short block name (``up.1.2`` -> ``up_blocks.1.attentions.2``,
    ``mid.0`` -> ``mid_block.attentions.0``), or None for any other text."""
    m = _SHORT.match(name)
    if m is None:
        return None
    if m.group("mid") is not None:
        return f"mid_block.attentions.{m.group('mid')}"
    return f"{m.group('kind')}_blocks.{m.group('block')}.attentions.{m.group('attn')}"


def literature_blocks(model: Any) -> list[tuple[str, str, str]]:
    """``(paper name, ComfyUI name, use)`` of the blocks published SAEs hook, for the model's family
    (empty for a family the literature has none for, or whose blocks this model lacks)."""
    out = []
    for family, entries in LITERATURE_BLOCKS.items():
        if not in_family(model, (family,)):
            continue
        for short, use in entries:
            ldm = diffusers_to_ldm(model, short_to_diffusers(short) or short)
            if ldm is not None:
                out.append((short, ldm, use))
        break
    return out


def _described(blocks: dict[str, torch.nn.Module]) -> str:
    return ", ".join(f"{name} ({block_width(m)})" for name, m in blocks.items())


def resolve_block(model: Any, block: str) -> tuple[str, torch.nn.Module]:
    """``(ComfyUI name, module)`` of a SpatialTransformer block named ``block``.

    Accepts ComfyUI names (``output_blocks.4.1``, optionally prefixed ``diffusion_model.``), diffusers
    names (``unet.up_blocks.1.attentions.1``) and the papers' short names (``up.1.1``, ``mid.0``). An
    unknown name raises a ValueError listing the valid ones with their widths, and the blocks the
    literature uses on this family.
    """
    blocks = spatial_transformer_blocks(model)
    family = model_family(model)
    if not blocks:
        raise ValueError(f"model: this {family} model has no SpatialTransformer blocks; SAeUron supports "
                         "SD1.x, SD2.x, SDXL and MiniCanvas UNets")
    text = (block or "").strip()
    for prefix in ("diffusion_model.", "unet."):
        text = text.removeprefix(prefix)
    name = text
    if text not in blocks:
        diffusers = short_to_diffusers(text) or text
        if diffusers.split(".")[0] in ("up_blocks", "down_blocks", "mid_block"):
            name = diffusers_to_ldm(model, diffusers) or text
    if name not in blocks:
        known = literature_blocks(model)
        hint = ("; published SAEs hook " + ", ".join(f"{s} = {c} ({u})" for s, c, u in known)) if known else ""
        raise ValueError(f"block: '{block}' is not a SpatialTransformer block of this {family} UNet; "
                         f"valid blocks (channels): {_described(blocks)}{hint}")
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
