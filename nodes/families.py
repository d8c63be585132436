"""Model families: the one answer to "which model is this?" for every node.

A family is the name of the class of a MODEL's model config (``model.model.model_config``): ComfyUI's own
``SD15``, ``SD20``, ``SDXL``, ``Flux`` ..., and ``MiniCanvas`` for the model of the MiniCanvas Checkpoint
node. A node that has to know the family asks here, never by looking at classes itself:

* :func:`model_family` -- the family's name (``"SD15"``, ``"MiniCanvas"``);
* :func:`in_family` / :func:`require_family` -- whether the model belongs to one of the families a method
  supports (a subclass of a supported ComfyUI config counts, e.g. an SD1.5 fine-tune's own config class), and
  a ValueError naming the model's family and the supported ones when it does not;
* :func:`family_matches` -- whether a family name an artefact records (an SAE's ``model_family``) is the model's;
* :func:`latent_downscale` -- image pixels per latent cell (8 for the SD families, 1 for MiniCanvas' pixel
  space), to size an empty latent for a width and height in pixels;
* :func:`transformer_block_types` -- the classes of the cross-attention transformer blocks of the family's
  UNet (ComfyUI's ``SpatialTransformer``, MiniCanvas' own), for nodes that hook such blocks by name.

Everything family-specific that more than one node needs belongs here, so a new family is one more entry
rather than a special case spread over the node modules. Imports of ``comfy.*`` are deferred.
"""

from __future__ import annotations

from typing import Any, Iterable

__all__ = [
    "MINICANVAS",
    "SD_FAMILIES",
    "family_matches",
    "in_family",
    "is_minicanvas",
    "latent_downscale",
    "model_family",
    "require_family",
    "transformer_block_types",
]

MINICANVAS = "MiniCanvas"
"""Family of the MiniCanvas Checkpoint's MODEL (the class name of its model config)."""

SD_FAMILIES = ("SD15", "SD20", "SDXL", "SDXLRefiner")
"""ComfyUI's Stable Diffusion UNet families (``comfy.supported_models`` classes)."""

SD_LATENT_DOWNSCALE = 8
"""Pixels per latent cell of the SD-family VAEs (and the default for families that do not say)."""


def _config(model: Any) -> Any:
    return getattr(getattr(model, "model", None), "model_config", None)


def model_family(model: Any) -> str:
    """The family of a MODEL (a ModelPatcher): ``"SD15"``, ``"SDXL"``, ``"MiniCanvas"``, ...

    The class name of its model config; for a model without one, the class name of the model itself.
    """
    config = _config(model)
    if config is not None:
        return type(config).__name__
    return type(getattr(model, "model", model)).__name__


def _lineage(model: Any) -> list[str]:
    """Names of the model config class and its base classes (most specific first)."""
    config = _config(model)
    return [c.__name__ for c in type(config).__mro__] if config is not None else [model_family(model)]


def family_matches(model: Any, name: str) -> bool | None:
    """Whether ``name`` (a model family an artefact records, any case) is the model's family or one it derives from:
    True / False, or None when ``name`` is no family ComfyUI or this pack knows (a third-party label)."""
    import comfy.supported_models

    wanted = str(name).strip().lower()
    if wanted in (n.lower() for n in _lineage(model)):
        return True
    known = {c.__name__.lower() for c in comfy.supported_models.models} | {MINICANVAS.lower()}
    return False if wanted in known else None


def in_family(model: Any, families: Iterable[str]) -> bool:
    """True when the model's family, or a family its config class derives from, is among ``families``."""
    wanted = set(families)
    return any(name in wanted for name in _lineage(model))


def require_family(model: Any, families: Iterable[str], what: str) -> str:
    """The model's family if :func:`in_family`; else a ValueError naming ``what`` needs which families.

    ``what`` says who asks, e.g. ``"RECE edits the cross-attention of"``; the message reads
    ``model: RECE edits the cross-attention of SD15, SDXL or MiniCanvas models; this model is Flux``.
    """
    families = tuple(families)
    name = model_family(model)
    if not in_family(model, families):
        listed = ", ".join(families[:-1]) + (" or " if len(families) > 1 else "") + families[-1]
        raise ValueError(f"model: {what} {listed} models; this model is {name}, which is not supported")
    return name


def is_minicanvas(model: Any) -> bool:
    """True for a MODEL of the MiniCanvas Checkpoint node (or a clone of one)."""
    return _config(model) is not None and model_family(model) == MINICANVAS


def latent_downscale(model: Any) -> int:
    """Image pixels per latent cell of the model's latent space: 8 for SD, 1 for MiniCanvas (pixel space).

    Read from the model's latent format (``spacial_downscale_ratio``, as ComfyUI's newer latent formats and
    MiniCanvas' pixel format carry it); families whose format does not say are SD-like (8).
    """
    fmt = None
    try:
        fmt = model.get_model_object("latent_format")
    except (AttributeError, KeyError):
        fmt = getattr(getattr(model, "model", None), "latent_format", None)
    ratio = getattr(fmt, "spacial_downscale_ratio", None)
    if isinstance(ratio, (int, float)) and ratio >= 1:
        return int(ratio)
    return 1 if is_minicanvas(model) else SD_LATENT_DOWNSCALE


def transformer_block_types(model: Any) -> tuple[type, ...]:
    """Classes of the cross-attention transformer blocks (``proj_out(attn(proj_in(norm(x)))) + x``) of the
    model's UNet: MiniCanvas' own ``SpatialTransformer`` for MiniCanvas, ComfyUI's for the other families."""
    if is_minicanvas(model):
        from sae_core.minicanvas.unet import SpatialTransformer as MiniCanvasTransformer

        return (MiniCanvasTransformer,)
    from comfy.ldm.modules.attention import SpatialTransformer

    return (SpatialTransformer,)
